"""The GPU memory budget (``offload.max_gpu_gib``), checked from the architectures before anything is loaded.

Weight bytes are counted on models built on the meta device: a linear the mode quantizes counts its quantized
data + scale (``schemes.expected_layout``), every other float tensor counts in the model's dtype (the VAE in fp32),
each tensor rounded up to the packing alignment; an unmerged LoRA adds its side paths to their linears (ranks read
from the LoRA files' headers). What must be on the GPU at once:

    none         every component
    model        the largest component
    block/phase  per component, the largest of: DiT / umT5 tensors outside the blocks + ``buffers`` streamed units
                 (a block, or the largest phase); CLIP and the VAE whole

Activations come on top and are not counted: the check refuses budgets that the weights alone cannot meet.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..checkpoints.lora import LORA_COMPONENTS, side_path_ranks
from ..errors import LightqError
from ..config import quant_of
from ..models.family import family
from ..quant.linear import selected
from ..quant.schemes import expected_layout
from .binding import ALIGN, refs_of, refs_outside
from .units import streams_blocks, unit_specs

GIB = 1 << 30
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class _Sizer:
    """Bytes of tensor refs of one meta-built component once loaded in ``scheme`` (``None``: high precision)."""

    def __init__(self, model: nn.Module, include: tuple[str, ...], scheme: str | None, skip, dtype: torch.dtype,
                 lora_ranks: dict[str, int] | None = None):
        self.names = {id(m): n for n, m in model.named_modules()}
        self.include, self.skip = include, tuple(skip)
        self.scheme, self.dtype = scheme, dtype
        self.lora_ranks = lora_ranks or {}

    def __call__(self, refs) -> int:
        total = 0
        for r in refs:
            t = r.get()
            name = self.names[id(r.owner)]
            if (self.scheme and r.name == "weight" and isinstance(r.owner, nn.Linear)
                    and selected(name, self.include, self.skip)):
                data_shape, data_dtype, scale_shape = expected_layout(self.scheme, *t.shape)
                total += _aligned(math.prod(data_shape) * data_dtype.itemsize) + _aligned(math.prod(scale_shape) * 4)
            else:
                itemsize = self.dtype.itemsize if t.is_floating_point() else t.dtype.itemsize
                total += _aligned(t.numel() * itemsize)
            rank = self.lora_ranks.get(name, 0) if r.name == "weight" and isinstance(r.owner, nn.Linear) else 0
            if rank:  # an unmerged LoRA's side path: down [R, K], up [N, R], fp32 alpha / r and scale [R]
                n, k = t.shape
                total += (_aligned(rank * k * self.dtype.itemsize) + _aligned(n * rank * self.dtype.itemsize)
                          + 2 * _aligned(rank * 4))
        return total


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB // 10 else f"{nbytes / (1 << 20):.1f} MiB"


def _components(cfg) -> dict[str, tuple[nn.Module, str | None, tuple, torch.dtype]]:
    """Every component of the run built on the meta device (the model family says which), with its scheme
    (``None``: high precision), skip patterns and dtype."""
    m, fam = cfg.model, family(cfg.model.family)
    out = {}
    with torch.device("meta"):
        for comp in fam.pipeline(m.task):
            model = fam.components[comp].build(m[f"{comp}_arch"])()
            if comp == fam.decoder:
                out[comp] = (model, None, (), torch.float32)
                continue
            q = quant_of(cfg, comp)
            out[comp] = (model, None if q.scheme == "none" else q.scheme, tuple(q.skip), DTYPES[m.dtype])
    return out


def gpu_weight_need(cfg) -> tuple[int, str]:
    """(bytes of weights on the GPU at once under ``cfg.offload``, a breakdown naming where they come from)."""
    mode, buffers = cfg.offload.mode, cfg.offload.buffers
    needs = {}
    for comp, (model, scheme, skip, dtype) in _components(cfg).items():
        ranks = None
        if cfg.lora and cfg.lora_mode == "unmerged" and comp in LORA_COMPONENTS:
            ranks = side_path_ranks(cfg.lora, {k: tuple(v.shape) for k, v in model.state_dict().items()}, comp)
        size = _Sizer(model, family(cfg.model.family).components[comp].quantizable, scheme, skip, dtype, ranks)
        total = size(refs_of(model))
        if mode in ("block", "phase") and streams_blocks(model):
            units = [size(s.refs) for block in model.blocks for s in unit_specs(block, mode)]
            slots = min(buffers, len(units))
            outside = size(refs_outside(model, model.blocks))
            needs[comp] = (outside + slots * max(units),
                           f"{comp}: {_size(outside)} outside the blocks + {slots} x {_size(max(units))} {mode} buffers")
        else:
            needs[comp] = (total, f"{comp}: {_size(total)}")
    detail = "; ".join(d for _, d in needs.values())
    if mode == "none":
        return sum(n for n, _ in needs.values()), detail
    return max(n for n, _ in needs.values()), f"the largest of {detail}"


def check_budget(cfg) -> None:
    """Raise a LightqError, before anything is loaded, when ``offload.max_gpu_gib`` cannot hold the weights."""
    limit = cfg.offload.max_gpu_gib
    if limit is None:
        return
    need, detail = gpu_weight_need(cfg)
    if need > limit * GIB:
        raise LightqError(f"offload.max_gpu_gib={limit}: offload={cfg.offload.mode} needs {_size(need)} of "
                          f"weights on the GPU at once ({detail}), activations not counted; raise the budget, use "
                          "offload=block or phase, fewer offload.buffers, or a quantized mode")
