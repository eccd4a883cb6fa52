"""The cached bf16 baseline a quantized job is compared with: its key, what the weights are, reading the cache.

A baseline is the bf16 run (every quantization mode ``none``) of the same job. It is cached under
``<cache>/baselines/<key>.pt``, ``key`` = sha256 over everything the bf16 run computes from:

- the model config (sizes, frames, dtype, weights reference), the sampler settings and the source of the solver's
  step (a changed stepping rule is a new baseline), seed, prompts, the input image's bytes and the device;
- what the weights are (``weights_identity``), not only where they are: for ``synthetic``, the tiny generator's
  version (architectures, seed, torch version and the generator's source, ``models.tiny.version``); for
  ``random``, the seed, the architectures, the source of the loader that draws them and the torch version; for a folder or
  Hub snapshot, per file its relative name, size, modification time (ns) and the sha256 of its first and last MiB
  — a checkpoint changed in place gets a new key without reading 65 GB on every run.

The run's LoRAs are (each file's resolved path, size and modification time, and its strength): the baseline
applies them, merged into the bf16 weights, whatever the job's ``lora_mode``. The quantization modes are not part
of the key (the baseline is what they are compared with); neither is offload, which is bit-identical. A cached file
that cannot be read, or does not hold a finite baseline, is removed and treated as absent. The file is
``torch.save``'s format: the video as the decode made it (float32 in [-1, 1], what the metrics compare: four bytes
a pixel and channel) and the final latents.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from pathlib import Path

import torch

from ..config import COMPONENTS, AttnQuantConfig, ParallelConfig, QuantConfig

log = logging.getLogger("lightq")
SAMPLE_BYTES = 1 << 20  # hashed at each end of every weights file


def _file_identity(path: Path, root: Path) -> list:
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE_BYTES))
        if st.st_size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, st.st_size - SAMPLE_BYTES))
            h.update(f.read(SAMPLE_BYTES))
    return [str(path.relative_to(root)), st.st_size, st.st_mtime_ns, h.hexdigest()]


def files_identity(folder: Path) -> list:
    """Name, size, mtime and end-sample hash of every visible file under ``folder`` (symlinks followed)."""
    folder = Path(folder)
    files = [p for p in sorted(folder.rglob("*"))
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return [_file_identity(p, folder) for p in files]


def weights_identity(cfg) -> object:
    """What ``cfg.model.weights`` are (see the module doc), as a JSON-able value."""
    m = cfg.model
    if m.weights == "synthetic":
        from ..models.tiny import ensure_tiny, version

        return ["synthetic", m.name, version(m.name), files_identity(ensure_tiny(m.name))]
    if m.weights == "random":
        from ..checkpoints import loader
        from ..models.family import family

        fam = family(m.family)  # every component of the task, each from its own architecture table
        archs = [(c, fam.components[c].arch_table()[m[f"{c}_arch"]]) for c in fam.pipeline(m.task)]
        generator = hashlib.sha256(inspect.getsource(loader).encode()).hexdigest()  # the loader draws them
        return ["random", cfg.seed, repr(archs), generator, torch.__version__]
    from .components import model_folder

    return ["files", files_identity(model_folder(cfg))]


def key(cfg, device: str) -> str:
    from omegaconf import OmegaConf

    from .sampler import sampler_config
    from .sampler import solver_class

    image = Path(cfg.image).read_bytes() if cfg.image else b""
    scfg = sampler_config(cfg)
    solver = hashlib.sha256(inspect.getsource(solver_class(scfg.name)).encode()).hexdigest()
    desc = {"model": OmegaConf.to_container(cfg.model), "sampler": repr(scfg), "solver": solver, "seed": cfg.seed,
            "prompt": cfg.prompt, "negative": cfg.negative_prompt, "image": hashlib.sha256(image).hexdigest(),
            "device": device, "weights": weights_identity(cfg)}
    if cfg.lora:  # the baseline runs the same LoRAs (merged into bf16): which files, at which strengths, which expert
        from ..checkpoints.lora import file_identity

        desc["lora"] = [[file_identity(e.path), float(e.strength)] + ([e.expert] if e.get("expert") else [])
                        for e in cfg.lora]
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:20]


def bf16_config(cfg):
    """``cfg`` with every quantization mode ``none``, attention included (no scheme, checkpoint, skip list or
    options left over), its LoRAs merged, no lazy loading, which reads the mode's block-split checkpoint (offload
    itself stays: it is bit-identical), and one process (``parallel=none``: the baseline of a parallel run is the
    single-GPU one)."""
    from omegaconf import OmegaConf

    base = cfg.copy()
    for c in COMPONENTS:
        base[f"{c}_quant"] = OmegaConf.structured(QuantConfig())
    base.attn_quant = OmegaConf.structured(AttnQuantConfig())
    base.offload.lazy_load = False
    base.lora_mode = "merged"  # the same LoRAs, merged into the bf16 weights: the reference both modes approach
    base.parallel = OmegaConf.structured(ParallelConfig())
    return base


def _valid(data) -> bool:
    tensors = [data.get("latents"), data.get("video")] if isinstance(data, dict) else []
    timings = data.get("timings") if isinstance(data, dict) else None
    return (len(tensors) == 2 and all(isinstance(t, torch.Tensor) and t.is_floating_point()
                                      and bool(torch.isfinite(t).all()) for t in tensors)
            and isinstance(timings, dict) and isinstance(timings.get("denoise"), (int, float)))


def load(path: Path, device: torch.device | str = "cpu") -> tuple[dict | None, str]:
    """(the cached baseline, its tensors on ``device``, "") — or (None, why) when there is none; a damaged file is
    removed (it would fail every later job with this key) and said so. The file is memory-mapped and each tensor
    copied to ``device`` once, where it is checked."""
    if not path.is_file():
        return None, ""
    try:
        data = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        if isinstance(data, dict):
            data = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in data.items()}
        problem = None if _valid(data) else "it does not hold finite latents, video and timings"
    except Exception as exc:  # any damage: truncated zip, bad pickle, wrong types
        problem = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if problem is None:
        return data, ""
    data = None  # its mapping of the file goes first
    path.unlink(missing_ok=True)
    why = f"the cached bf16 baseline {path.name} was unreadable ({problem}) and was removed"
    log.warning(why)
    return None, why
