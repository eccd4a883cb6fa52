"""``python -m lightq.convert``: quantize a float checkpoint into a pre-quantized one (Hydra app, ``conf/convert.yaml``).

    python -m lightq.convert component=dit scheme=fp8 source=/models/Wan2.1-T2V-14B output=/models/dit-fp8.safetensors
    python -m lightq.convert component=t5 scheme=int8 source=tiny layout=lightx2v output=/tmp/enc
    python -m lightq.convert source=tiny output=/tmp/dit-fp8-lora.safetensors lora='[{path: style.safetensors, strength: 0.8}]'

``source`` is a checkpoint file, a model folder (the component's file is found by name, as LightX2V does), a Hub
``owner/repo[/file]``, or a tiny model (``TINY``). Wan2.2: in an A14B folder (``high_noise_model/`` and
``low_noise_model/``) ``component=dit`` is the high-noise expert and ``component=dit_low`` the low-noise one (a DiT
checkpoint, loaded by ``dit_low_quant.ckpt=``); TI2V-5B's folder is read as Wan2.1's (its DiT at the top). The
numerics, layouts, atomic write and provenance are those of ``lightq.checkpoints.conversion``. Any problem the user
can fix prints one line and exits 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import LightqError, from_os_error
from .interrupts import Terminated, terminate_gracefully

TINY = ("tiny", "tiny-i2v", "tiny-t2v-a14b", "tiny-i2v-a14b", "tiny-ti2v-5b")
COMPONENTS = ("dit", "dit_low", "t5", "clip")  # dit_low: Wan2.2 A14B's low-noise expert, converted as a DiT


def open_component_source(ref: str, component: str):
    """The float checkpoint of ``component`` that ``ref`` names (file, folder, Hub reference or tiny model)."""
    from .checkpoints import hub
    from .checkpoints.conventions import open_source
    from .checkpoints.locate import find_component_file
    from .models.family import FAMILIES

    if component not in COMPONENTS:
        raise LightqError(f"component={component}: choose one of {', '.join(COMPONENTS)}")
    if ref in TINY:
        from .models.tiny import ensure_tiny

        path = ensure_tiny("tiny-i2v" if component == "clip" and ref == "tiny" else ref)
    else:  # a Hub repository: the component's files in any family's layout
        records = [f.components[component] for f in FAMILIES.values() if component in f.components]
        patterns = [p for r in records for p in (*r.hub, *([f"{r.diffusers}/*"] if r.diffusers else []))]
        path = hub.resolve(ref, sorted(set(patterns)) + ["model_index.json"])
    if path.is_dir():
        path = find_component_file(path, component, None, _folder_family(path, component))
    elif component == "dit_low":
        raise LightqError(f"source={ref}: component=dit_low is the low-noise expert of a Wan2.2 A14B model folder "
                          "(its low_noise_model/); a single file is a DiT: component=dit")
    return open_source(path)


def _folder_family(folder: Path, component: str):
    """Wan2.2 A14B's record when ``folder`` has its expert subfolders (or the low-noise expert is asked for), else
    Wan2.1's (whose DiT, umT5 and CLIP files are TI2V-5B's too)."""
    from .models.family import WAN21, WAN22_A14B

    experts = any((folder / WAN22_A14B.components[c].subfolder).is_dir() for c in WAN22_A14B.experts)
    return WAN22_A14B if experts or component == "dit_low" else WAN21


def run(cfg) -> Path:
    from omegaconf import OmegaConf

    from .checkpoints.conversion import convert

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise LightqError(f"missing {', '.join(k + '=...' for k in missing)}: pass it on the command line")

    shard_bytes = _shard_bytes(cfg.shard_gb)
    source = open_component_source(str(cfg.source), cfg.component)
    return convert(source, component="dit" if cfg.component == "dit_low" else cfg.component, scheme=cfg.scheme, output=cfg.output, layout=cfg.layout,
                   skip=list(cfg.skip), overwrite=bool(cfg.overwrite), float_dtype=cfg.float_dtype,
                   shard_bytes=shard_bytes, progress=bool(cfg.progress), lora=_lora(cfg, source))


def _lora(cfg, source):
    """The ``lora`` list merged into the conversion, checked against the source's own tensors (2-D ``.weight``
    keys are its linears), or None."""
    from .checkpoints.lora import load_loras

    if not cfg.lora:
        return None
    if cfg.component not in ("dit", "dit_low"):
        raise LightqError(f"lora= applies to the DiT; component={cfg.component} has no published LoRA layout")
    shapes = {k: tuple(source.shape(k)) for k in source}
    linears = {k[:-len(".weight")] for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2}
    stack = load_loras(cfg.lora, "merged", shapes, linears, component=cfg.component)
    if stack is None:
        raise LightqError(f"lora= names no LoRA for component={cfg.component}: each entry says the expert it is for "
                          "(expert: high | low | both; none: the DiT / high-noise expert)")
    return stack


def _shard_bytes(shard_gb) -> int:
    try:
        gib = float(shard_gb)
    except (TypeError, ValueError):
        gib = float("nan")
    if not gib > 0 or gib == float("inf"):
        raise LightqError(f"shard_gb={shard_gb!r}: give the largest shard size in GiB, a number above 0 "
                          "(e.g. shard_gb=4)")
    return max(1, int(gib * (1 << 30)))


def _task(cfg) -> None:
    try:
        out = run(cfg)
    except OSError as exc:  # a full disk, a read-only folder, a file in the way: one line, as for bad input
        err = from_os_error(exc, "the conversion")
        if err is None:
            raise
        _fail(err)
    except LightqError as exc:
        _fail(exc)
    except Terminated:
        print("lightq.convert: terminated by SIGTERM; nothing was written at the output", file=sys.stderr)
        sys.exit(Terminated.exit_code)
    print(f"lightq.convert: wrote {out}")


def _fail(exc: LightqError) -> None:
    print(f"lightq.convert: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)


def main() -> None:
    import hydra

    from .paths import conf_dir

    terminate_gracefully()
    hydra.main(config_path=str(conf_dir()), config_name="convert", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
