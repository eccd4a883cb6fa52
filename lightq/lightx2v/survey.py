"""Which LightX2V configs of a folder lightq runs, and why not the others.

    python -m lightq.lightx2v.survey <folder> [--classes model_cls.json] [--markdown docs/LIGHTX2V.md]

Imports every ``*.json`` under ``<folder>`` (``importer.import_config``) as LightX2V's model class of that file
(``--classes``: a JSON object, relative path -> ``{"model_cls": ...}``; default: none given, as on a LightX2V
command line without ``--model_cls``), composes every import into a lightq job config (Hydra, then
``config.validate``, on the tiny model of the class's family, ``TINY``: the check ``python -m lightq
from_lightx2v=... --cfg job`` makes),
and prints the counts: imported, refused by feature. ``--markdown`` writes the table of docs/LIGHTX2V.md.
A config that neither imports nor is refused in one line is a bug: the survey lets the exception through.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import keys as K
from .importer import Imported, LightX2VError, import_config

UNKNOWN = "keys or values lightq does not know"
TINY = {"wan2.1": "tiny-i2v", "wan2.2-a14b": "tiny-i2v-a14b", "wan2.2-ti2v": "tiny-ti2v-5b"}  # family -> model


@dataclass
class Outcome:
    path: str  # relative to the surveyed folder
    model_cls: str | None
    imported: Imported | None
    reason: str = ""  # the refusal's line
    feature: str = ""  # what the refusal is for

    @property
    def verdict(self) -> str:
        return "imports" if self.imported else f"refused: {self.feature}"


def survey(folder: Path, classes: dict[str, dict] | None = None) -> list[Outcome]:
    outcomes = []
    for path in sorted(folder.rglob("*.json")):
        rel = path.relative_to(folder).as_posix()
        if classes is not None and rel not in classes:
            continue  # not a config of the listed corpus (the class list itself, ...)
        cls = (classes or {}).get(rel, {}).get("model_cls")
        try:
            outcomes.append(Outcome(rel, cls, import_config(path, cls)))
        except LightX2VError as exc:
            outcomes.append(Outcome(rel, cls, None, str(exc).replace(str(path), rel), exc.feature or UNKNOWN))
    return outcomes


def compose(imported: Imported) -> None:
    """Compose ``imported`` into a job config as ``python -m lightq`` would and validate it (LightqError if not)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    from .. import config
    from ..paths import conf_dir
    from .cli import GROUP, node

    config.register()
    ConfigStore.instance().store(group=GROUP, name="survey", node=node(imported), package="_global_")
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="lightq"):
        model = TINY[K.CLASS_FAMILIES[imported.model_cls]]
        cfg = hydra_compose("config", overrides=[f"{GROUP}=survey", f"model={model}"])
    config.validate(cfg)


def counts(outcomes: list[Outcome]) -> collections.Counter:
    return collections.Counter(o.verdict for o in outcomes)


def markdown(outcomes: list[Outcome], source: str) -> str:
    """docs/LIGHTX2V.md: what maps, the missing features (``keys.MISSING``), the counts, one row per config."""
    c = counts(outcomes)
    lines = [
        "# LightX2V configs in lightq",
        "",
        "`python -m lightq from_lightx2v=config.json` runs a LightX2V JSON config with LightX2V's meaning, or refuses",
        "it in one line naming the feature lightq lacks, the key and the file. What each key maps to:",
        "`lightq/lightx2v/importer.py` (mapped keys) and `lightq/lightx2v/keys.py` (missing features, kernel choices,",
        "constants; `lightq/lightx2v/wan22.py`: the Wan2.2 keys). LightX2V's model class (`--model_cls` on its",
        "command line) is `from_lightx2v.model_cls=...`; lightq runs `wan2.1` and `wan2.1_distill` on a Wan2.1 `model=`,",
        "`wan2.2` on `wan2.2-ti2v-5b`, `wan2.2_moe` and `wan2.2_moe_distill` on a Wan2.2 A14B model (two experts:",
        "`boundary` is `model.boundary`, `boundary_step_index` `sampler.boundary_step`, `sample_guide_scale`",
        "[high, low] `sampler.guide_scale` / `guide_scale_low`, `high_noise_*` / `low_noise_*` checkpoints",
        "`dit_quant.ckpt` / `dit_low_quant.ckpt`). The command line beats the JSON; `-m from_lightx2v=a.json,b.json`",
        "sweeps over configs. result.json keeps the import under `from_lightx2v`: the kernel choices and a note on",
        "every meaning that differs (e.g. SageAttention2's per-thread scales, tiled VAE decoding) or goes unused.",
        "",
        "## Missing features (refused)",
        "",
        "| feature | keys | planned |",
        "|---|---|---|",
    ]
    seen: dict[str, list[str]] = {}
    issues: dict[str, str] = {}
    for m in K.MISSING:
        feature = m.feature if m.classes == K.CLASSES else f"{m.feature} (classes {', '.join(m.classes)})"
        seen.setdefault(feature, []).extend([f"`{k}`" for k in m.keys] + [f"`{p}*`" for p in m.prefixes])
        issues[feature] = issues.get(feature) or m.issue
    lines += [f"| {f} | {', '.join(ks)} | {issues[f]} |" for f, ks in seen.items()]
    lines += ["", "## Kernel choices (accepted, recorded in result.json)", "",
              "| key | value | numerics in lightq |", "|---|---|---|"]
    lines += [f"| `{k}` | `{v}` | {note or 'the same (another kernel)'} |" for k, table in K.KERNELS.items()
              for v, note in table.items()]
    lines += ["", "## Constants (accepted when equal, refused otherwise)", "",
              ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in K.CONSTANTS.items()), "",
              *[f"Class `{c}`: " + ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in table.items()
                                             if v != K.CONSTANTS.get(k)) +
                f" (required: {', '.join(f'`{k}`' for k in K.REQUIRED.get(c, ()))})." for c, table in
                K.CLASS_CONSTANTS.items()], "",
              "Placement keys (no numerics, noted): " + ", ".join(f"`{k}`" for k in K.PLACEMENT) + ".", ""]
    lines += ["", f"## The corpus: {len(outcomes)} configs of {source}", "",
              "Generated by `python -m lightq.lightx2v.survey tests/data/lightx2v-configs --classes "
              "tests/data/lightx2v-configs/model_cls.json --markdown docs/LIGHTX2V.md`; "
              "`tests/test_lightx2v_corpus.py` checks this page is current.", "",
              "| result | configs |", "|---|---|"]
    lines += [f"| {v} | {n} |" for v, n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))]
    lines += ["", "| config | model class | result | lightq settings, or the refusal |", "|---|---|---|---|"]
    here = os.getcwd() + os.sep  # relative checkpoint paths resolve against it: the page shows them as ./...
    for o in outcomes:
        detail = " ".join(f"`{x}`" for x in o.imported.overrides()) if o.imported else o.reason.split(": ", 1)[1]
        detail = detail.replace(here, "./")
        result = "imports" if o.imported else f"refused: {o.feature}"
        lines.append(f"| {o.path} | {o.model_cls or o.imported.model_cls if o.imported else o.model_cls or '-'} "
                     f"| {result} | {detail.replace('|', '&#124;')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightq.lightx2v.survey", description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--classes", type=Path, help="JSON: relative path -> {\"model_cls\": ...}")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    args = parser.parse_args(argv)
    classes = json.loads(args.classes.read_text()) if args.classes else None
    outcomes = survey(args.folder, classes)
    for o in outcomes:
        if o.imported:
            compose(o.imported)
    for verdict, n in sorted(counts(outcomes).items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"{n:4d}  {verdict}")
    if args.markdown:
        args.markdown.write_text(markdown(outcomes, "LightX2V's configs/ (commit f8aee98b)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
