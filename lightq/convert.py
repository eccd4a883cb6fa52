"""``python -m lightq.convert``: quantize a float checkpoint into a pre-quantized one (Hydra app, ``conf/convert.yaml``).

    python -m lightq.convert component=dit scheme=fp8 source=/models/Wan2.1-T2V-14B output=/models/dit-fp8.safetensors
    python -m lightq.convert component=t5 scheme=int8 source=tiny layout=lightx2v output=/tmp/enc
    python -m lightq.convert source=tiny output=/tmp/dit-fp8-lora.safetensors lora='[{path: style.safetensors, strength: 0.8}]'

``source`` is a checkpoint file, a model folder (the component's file is found by name, as LightX2V does), a Hub
``owner/repo[/file]``, or ``tiny`` / ``tiny-i2v``. The numerics, layouts, atomic write and provenance are those of
``lightq.checkpoints.conversion``. Any problem the user can fix prints one line and exits 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import LightqError, from_os_error
from .interrupts import Terminated, terminate_gracefully

TINY = ("tiny", "tiny-i2v")


def open_component_source(ref: str, component: str):
    """The float checkpoint of ``component`` that ``ref`` names (file, folder, Hub reference or tiny model)."""
    from .checkpoints import hub
    from .checkpoints.conventions import open_source
    from .checkpoints.locate import find_component_file

    if ref in TINY:
        from .models.tiny import ensure_tiny

        path = ensure_tiny("tiny-i2v" if component == "clip" else ref)
    else:
        from .models.family import WAN21

        record = WAN21.components.get(component)
        patterns = [*record.hub, f"{record.diffusers}/*", "model_index.json"] if record is not None else None
        path = hub.resolve(ref, patterns)
    if path.is_dir():
        path = find_component_file(path, component, None)
    return open_source(path)


def run(cfg) -> Path:
    from omegaconf import OmegaConf

    from .checkpoints.conversion import convert

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise LightqError(f"missing {', '.join(k + '=...' for k in missing)}: pass it on the command line")

    shard_bytes = _shard_bytes(cfg.shard_gb)
    source = open_component_source(str(cfg.source), cfg.component)
    return convert(source, component=cfg.component, scheme=cfg.scheme, output=cfg.output, layout=cfg.layout,
                   skip=list(cfg.skip), overwrite=bool(cfg.overwrite), float_dtype=cfg.float_dtype,
                   shard_bytes=shard_bytes, progress=bool(cfg.progress), lora=_lora(cfg, source))


def _lora(cfg, source):
    """The ``lora`` list merged into the conversion, checked against the source's own tensors (2-D ``.weight``
    keys are its linears), or None."""
    from .checkpoints.lora import load_loras

    if not cfg.lora:
        return None
    if cfg.component != "dit":
        raise LightqError(f"lora= applies to the DiT; component={cfg.component} has no published LoRA layout")
    shapes = {k: tuple(source.shape(k)) for k in source}
    linears = {k[:-len(".weight")] for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2}
    return load_loras(cfg.lora, "merged", shapes, linears)


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
