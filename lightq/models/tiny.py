"""The embedded tiny models: the real Wan2.1 and Wan2.2 architectures at toy size, with deterministic synthetic
weights.

``ensure_tiny(name)`` writes, once, a model folder in the official file layout of its family — each DiT as bf16
safetensors chunks with their index (Wan2.2 A14B: in ``high_noise_model/`` and ``low_noise_model/``), the umT5
encoder and CLIP as ``.pth``, the VAE as ``Wan2.1_VAE.pth`` (Wan2.2 TI2V: ``Wan2.2_VAE.pth``) — under
``<cache>/tiny/<version>/<name>`` (the folder appears complete or not at all), and returns it. The run then loads it
through the same loader as real weights. Weights are a seeded model's own initialisation, so they are
deterministic for a given torch version.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..paths import cache_dir
from .family import WAN21, family

SEED = 20260101
# name: (family, task, {component: arch}) — every component of the family's pipeline for the task
TINY = {
    "tiny": ("wan2.1", "t2v", {"t5": "tiny", "dit": "tiny", "vae": "tiny"}),
    "tiny-i2v": ("wan2.1", "i2v", {"t5": "tiny", "clip": "tiny", "dit": "tiny-i2v", "vae": "tiny"}),
    # Wan2.2 at toy size: two experts in high_noise_model/ and low_noise_model/ (A14B), the Wan2.2 VAE (TI2V)
    "tiny-t2v-a14b": ("wan2.2-a14b", "t2v", {"t5": "tiny", "dit": "tiny", "dit_low": "tiny", "vae": "tiny"}),
    "tiny-i2v-a14b": ("wan2.2-a14b", "i2v", {"t5": "tiny", "dit": "tiny-i2v-a14b", "dit_low": "tiny-i2v-a14b",
                                             "vae": "tiny"}),
    "tiny-ti2v-5b": ("wan2.2-ti2v", "t2v", {"t5": "tiny", "dit": "tiny-ti2v", "vae": "tiny"}),
}
SEEDS = {"dit": SEED, "t5": SEED + 1, "vae": SEED + 2, "clip": SEED + 3, "dit_low": SEED + 4}
DTYPES = {"t5": torch.bfloat16, "vae": torch.float32, "clip": torch.float16}  # as released; DiTs bf16
DIT_INDEX = f"{WAN21.components['dit'].stem}.safetensors.index.json"
DIT_CHUNK = WAN21.components["dit"].stem + "-{:05d}-of-{:05d}.safetensors"
T5_FILE = WAN21.components["t5"].official
CLIP_FILE = WAN21.components["clip"].official
VAE_FILE = WAN21.components["vae"].official


def _seeded_state(build, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build()
    return {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}


def _records(name: str):
    """(component, its family record, its arch) of tiny model ``name``, in pipeline order."""
    fam_name, task, archs = TINY[name]
    fam = family(fam_name)
    return [(c, fam.components[c], archs[c]) for c in fam.pipeline(task)]


def version(name: str) -> str:
    """Changes whenever the architectures or the model code (every file of ``lightq/models``) change, so a stale
    cache is never reused."""
    parts: list = [name, SEED, torch.__version__, [(c, record.arch_table()[arch]) for c, record, arch in _records(name)]]
    parts += [p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py"))]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _write_dit_chunks(state: dict[str, torch.Tensor], folder: Path, chunks: int = 2) -> None:
    from safetensors.torch import save_file

    keys = sorted(state)
    per = -(-len(keys) // chunks)
    weight_map = {}
    for i in range(chunks):
        fname = DIT_CHUNK.format(i + 1, chunks)
        part = {k: state[k] for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / DIT_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _write(name: str, folder: Path) -> None:
    for component, record, arch in _records(name):
        state = _seeded_state(record.build(arch), SEEDS[component], DTYPES.get(component, torch.bfloat16))
        if not record.official:  # a DiT: safetensors chunks with their index, in its subfolder
            (folder / record.subfolder).mkdir(exist_ok=True)
            _write_dit_chunks(state, folder / record.subfolder)
            continue
        if component == "clip":
            # the released file holds the whole XLM-RoBERTa CLIP; the text half is present and ignored by the loader
            state["textual.token_embedding.weight"] = torch.zeros(8, 8, dtype=torch.float16)
            state["log_scale"] = torch.tensor(4.6052, dtype=torch.float16)
        torch.save(state, folder / record.official)


def _marker(name: str) -> Path:
    """A file that exists once the folder is complete (the folder appears by one rename, whole)."""
    dit = next(record for c, record, _ in _records(name) if c == "dit")
    return Path(dit.subfolder) / DIT_INDEX


def ensure_tiny(name: str) -> Path:
    """The folder of tiny model ``name`` (one of ``TINY``), written on first use."""
    if name not in TINY:
        raise KeyError(f"no tiny model '{name}' (have {', '.join(TINY)})")
    final = cache_dir() / "tiny" / version(name) / name
    if (final / _marker(name)).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
    try:
        _write(name, tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: theirs is identical
            if not (final / _marker(name)).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
