"""The embedded tiny models: the real Wan2.1 architectures at toy size, with deterministic synthetic weights.

``ensure_tiny(name)`` writes, once, a model folder in the official Wan2.1 file layout — the DiT as bf16
safetensors chunks with their index, the umT5 encoder and CLIP as ``.pth``, the VAE as ``Wan2.1_VAE.pth`` — under
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
from .family import WAN21

SEED = 20260101
TINY = {
    # name: (task, dit arch, t5 arch, clip arch or None, vae arch)
    "tiny": ("t2v", "tiny", "tiny", None, "tiny"),
    "tiny-i2v": ("i2v", "tiny-i2v", "tiny", "tiny", "tiny"),
}
DIT_INDEX = f"{WAN21.components['dit'].stem}.safetensors.index.json"
DIT_CHUNK = WAN21.components["dit"].stem + "-{:05d}-of-{:05d}.safetensors"
T5_FILE = WAN21.components["t5"].official
CLIP_FILE = WAN21.components["clip"].official
VAE_FILE = WAN21.components["vae"].official


def _seeded_state(build, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build()
    return {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}


def version(name: str) -> str:
    """Changes whenever the architectures or this writer change, so a stale cache is never reused."""
    from . import clip, t5, vae, wan_dit

    task, dit, t5a, clipa, vaea = TINY[name]
    desc = repr((name, SEED, torch.__version__, wan_dit.DIT_ARCHS[dit], t5.T5_ARCHS[t5a],
                 clip.CLIP_ARCHS[clipa] if clipa else None, vae.VAE_ARCHS[vaea],
                 Path(__file__).read_bytes(), Path(wan_dit.__file__).read_bytes(), Path(t5.__file__).read_bytes(),
                 Path(clip.__file__).read_bytes(), Path(vae.__file__).read_bytes()))
    return hashlib.sha256(desc.encode()).hexdigest()[:16]


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
    from . import clip, t5, vae, wan_dit

    task, dit_a, t5_a, clip_a, vae_a = TINY[name]
    _write_dit_chunks(_seeded_state(lambda: wan_dit.WanDiT(wan_dit.DIT_ARCHS[dit_a]), SEED, torch.bfloat16), folder)
    torch.save(_seeded_state(lambda: t5.UMT5Encoder(t5.T5_ARCHS[t5_a]), SEED + 1, torch.bfloat16), folder / T5_FILE)
    torch.save(_seeded_state(lambda: vae.WanVAE(vae.VAE_ARCHS[vae_a]), SEED + 2, torch.float32), folder / VAE_FILE)
    if clip_a:
        state = _seeded_state(lambda: clip.ClipVisual(clip.CLIP_ARCHS[clip_a]), SEED + 3, torch.float16)
        # the released file holds the whole XLM-RoBERTa CLIP; the text half is present and ignored by the loader
        state["textual.token_embedding.weight"] = torch.zeros(8, 8, dtype=torch.float16)
        state["log_scale"] = torch.tensor(4.6052, dtype=torch.float16)
        torch.save(state, folder / CLIP_FILE)


def ensure_tiny(name: str) -> Path:
    """The folder of tiny model ``name`` (``tiny`` or ``tiny-i2v``), written on first use."""
    if name not in TINY:
        raise KeyError(f"no tiny model '{name}' (have {', '.join(TINY)})")
    final = cache_dir() / "tiny" / version(name) / name
    if (final / DIT_INDEX).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
    try:
        _write(name, tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: theirs is identical
            if not (final / DIT_INDEX).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
