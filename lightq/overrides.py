"""Command-line overrides of free text (``prompt=``, ``negative_prompt=``), made safe before Hydra parses them.

A prompt is data. Two Hydra rules would otherwise change it without a word:

- ``${...}`` is an interpolation: ``prompt='${oc.env:SECRET}'`` would be resolved and written into every record,
  and an unknown ``${key}`` would fail the job. ``literal_prompts`` escapes it (``\\${``), so the prompt is the
  text typed, everywhere (the job, its saved config, a sweep's worker process).
- An unquoted comma makes a sweep: ``-m prompt="A cat walks on the grass, realistic style."`` would run two jobs,
  one per half. ``literal_prompts`` refuses such a value, naming both ways to say what was meant: quote the
  prompt to keep it whole, quote each prompt to sweep several (Hydra's quoted strings), or ``choice(...)``.
"""

from __future__ import annotations

from .errors import LightqError

FREE_TEXT = ("prompt", "negative_prompt")


def _key(arg: str) -> str:
    return arg.lstrip("+~").split("=", 1)[0]


def _escape(text: str) -> str:
    """``${`` -> ``\\${`` unless already escaped."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("${", i) and not (i and text[i - 1] == "\\"):
            out.append("\\")
        out.append(text[i])
        i += 1
    return "".join(out)


def _check_sweep(arg: str) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import QuotedString, ValueType
    from hydra.errors import HydraException

    try:
        override = OverridesParser.create().parse_override(arg)
    except HydraException:
        return  # not lightq's to judge: Hydra reports its own syntax errors
    if override.value_type != ValueType.SIMPLE_CHOICE_SWEEP:
        return
    parts = override.value().list
    if all(isinstance(p, QuotedString) for p in parts):
        return  # each prompt quoted: a deliberate sweep
    key = _key(arg)
    halves = ", ".join(repr(str(p.text if isinstance(p, QuotedString) else p)) for p in parts[:3])
    raise LightqError(f"{key}= holds an unquoted comma, which Hydra reads as {len(parts)} {key}s ({halves}): "
                      f"quote it to keep it whole, '{key}=\"{arg.split('=', 1)[1]}\"', or quote each one to "
                      f"sweep several, '{key}=\"first\",\"second\"'")


def literal_prompts(argv: list[str]) -> list[str]:
    """``argv`` with free-text overrides escaped (see module doc); raises LightqError for an unquoted comma."""
    out = []
    for arg in argv:
        if "=" in arg and _key(arg) in FREE_TEXT:
            _check_sweep(arg)
            key, value = arg.split("=", 1)
            arg = f"{key}={_escape(value)}"
        out.append(arg)
    return out
