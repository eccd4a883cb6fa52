"""``python -m lightq.backends [--hardware auto|cpu|sm80|...] [--deep]``: the backend availability table.

One row per backend published under the entry-point group ``lightq.backends``: its name, the version of its
kernel library (read from package metadata, nothing imported; torch's for the ``torch`` backend), the schemes it
implements with their minimum compute capability, and whether it can run on the chosen hardware or why not.
``--hardware`` names a profile instead of the detected device (only the device is assumed: packages are still
those installed here). ``--deep`` also imports each usable implementation (``spec.load()``) and reports an
import failure as the reason. A broken plugin becomes a row with its reason; this command never raises for one.
A second table lists the attention backends (entry-point group ``lightq.attention``, the ``attn_quant`` group's
kernels) the same way.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from importlib import metadata

from ..hardware import PROFILES, Hardware, detect
from ..attention import registry as attention_registry
from . import registry
from .spec import BackendSpec

HEADER = ("backend", "version", "schemes (min compute capability)", "status")


def kernel_version(spec: BackendSpec) -> str:
    """Version of the distribution providing the backend's first required module (torch when it needs none)."""
    module = spec.requires[0].split(".")[0] if spec.requires else "torch"
    try:
        dists = metadata.packages_distributions().get(module) or [module]
        return metadata.version(dists[0])
    except Exception:  # not installed, or metadata unreadable
        return "-"


def schemes_text(spec: BackendSpec) -> str:
    if not spec.schemes:
        return "-"
    return ", ".join(f"{name} " + ("any" if cap is None else f"sm{int(round(cap * 10))}+")
                     for name, cap in spec.schemes.items())


def status(spec: BackendSpec, hw: Hardware, deep: bool) -> str:
    """"available here", or why not (per scheme where only some can run)."""
    if not spec.schemes:
        return f"unusable: {spec.description or 'declares no schemes'}"
    ok, why = spec.is_available(hw)
    if not ok:
        return f"not here: {why}"
    checks = {scheme: spec.can_implement(scheme, hw) for scheme in spec.schemes}
    usable = [scheme for scheme, (good, _) in checks.items() if good]
    refused = [f"{scheme}: {reason}" for scheme, (good, reason) in checks.items() if not good]
    if not usable:
        return "not here: " + "; ".join(refused)
    if deep:
        try:
            spec.load()
        except Exception as exc:  # BackendUnavailable names the install command; anything else is reported too
            return f"not here: {exc}"
    text = "available here" + (" (loaded)" if deep else "")
    return text + (f" for {', '.join(usable)}; not {'; '.join(refused)}" if refused else "")


def row(spec: BackendSpec, hw: Hardware, deep: bool) -> tuple[str, str, str, str]:
    try:
        return spec.name, kernel_version(spec), schemes_text(spec), status(spec, hw, deep)
    except Exception as exc:  # a plugin whose spec misbehaves still gets its row
        return getattr(spec, "name", "?"), "-", "-", f"plugin error: {type(exc).__name__}: {exc}"


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER) - 1)]
    lines = []
    for r in [HEADER, *rows]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1])
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(HEADER[-1]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightq.backends", description=__doc__.splitlines()[0])
    parser.add_argument("--hardware", default="auto", choices=["auto", *PROFILES],
                        help="device to judge availability for: detected (auto) or a profile")
    parser.add_argument("--deep", action="store_true", help="also import each usable implementation")
    args = parser.parse_args(argv)
    hw = detect() if args.hardware == "auto" else replace(PROFILES[args.hardware], chosen=True)
    found = []
    for reg in (registry, attention_registry):
        try:
            found.append(reg.specs())
        except Exception as exc:  # entry-point metadata unreadable
            print(f"cannot read the '{reg.GROUP}' entry points: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    specs, attention_specs = found
    print(f"lightq backends on {hw.describe()} (hardware={args.hardware})")
    if not specs:
        print("no backend is installed: install lightq itself (pip install -e . in a checkout)")
        return 0
    print(table([row(spec, hw, args.deep) for _, spec in sorted(specs.items())]))
    print(f"\nattention backends ({attention_registry.GROUP}, the attn_quant modes)")
    print(table([row(spec, hw, args.deep) for _, spec in sorted(attention_specs.items())]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
