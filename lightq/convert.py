"""``python -m lightq.convert``: quantize a float checkpoint into a pre-quantized one (Hydra app, ``conf/convert.yaml``).

    python -m lightq.convert component=dit scheme=fp8 source=/models/Wan2.1-T2V-14B output=/models/dit-fp8.safetensors
    python -m lightq.convert component=t5 scheme=int8 source=tiny layout=lightx2v output=/tmp/enc

``source`` is a checkpoint file, a model folder (the component's file is found by name, as LightX2V does), a Hub
``owner/repo[/file]``, or ``tiny`` / ``tiny-i2v``. The numerics, layouts, atomic write and provenance are those of
``lightq.checkpoints.conversion``. Any problem the user can fix prints one line and exits 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import LightqError

TINY = ("tiny", "tiny-i2v")
HUB_PATTERNS = {
    "dit": ["diffusion_pytorch_model*"],
    "t5": ["models_t5_umt5-xxl-enc-bf16.pth"],
    "clip": ["models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"],
}


def open_component_source(ref: str, component: str):
    """The float checkpoint of ``component`` that ``ref`` names (file, folder, Hub reference or tiny model)."""
    from .checkpoints import hub
    from .checkpoints.io import open_source
    from .checkpoints.locate import find_component_file

    if ref in TINY:
        from .models.tiny import ensure_tiny

        path = ensure_tiny("tiny-i2v" if component == "clip" else ref)
    else:
        path = hub.resolve(ref, HUB_PATTERNS.get(component))
    if path.is_dir():
        path = find_component_file(path, component, None)
    return open_source(path)


def run(cfg) -> Path:
    from omegaconf import OmegaConf

    from .checkpoints.conversion import convert

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise LightqError(f"missing {', '.join(k + '=...' for k in missing)}: pass it on the command line")

    source = open_component_source(str(cfg.source), cfg.component)
    return convert(source, component=cfg.component, scheme=cfg.scheme, output=cfg.output, layout=cfg.layout,
                   skip=list(cfg.skip), overwrite=bool(cfg.overwrite), float_dtype=cfg.float_dtype,
                   shard_bytes=int(float(cfg.shard_gb) * (1 << 30)), progress=bool(cfg.progress))


def _task(cfg) -> None:
    try:
        out = run(cfg)
    except LightqError as exc:
        print(f"lightq.convert: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    print(f"lightq.convert: wrote {out}")


def main() -> None:
    import hydra

    from .paths import conf_dir

    hydra.main(config_path=str(conf_dir()), config_name="convert", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
