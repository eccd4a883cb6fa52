"""Where a module's tensors live: one flat byte buffer per group of tensors, and re-binding without copying.

A ``Pack`` lays a group of tensors (parameters and buffers of some modules, ``TensorRef``s) back to back in one
flat ``uint8`` buffer, each at an offset aligned to ``ALIGN`` bytes, keeping its dtype, shape and strides.
``views(flat)`` reads the same layout out of any flat buffer of at least ``nbytes`` bytes, so moving a whole
group to the device is one copy of its flat buffer, and ``bind(flat)`` points the modules at those views.
Weights are immutable during inference, so going back to the host is a re-bind to ``host``, never a copy.

Packing is incremental: each tensor is copied into the host buffer and its module re-bound to the copy before
the next one is read, so peak host memory grows by one tensor, not one group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

ALIGN = 256  # bytes: above every dtype's size and CUDA's 16-byte vector / GEMM operand alignment


@dataclass(frozen=True)
class TensorRef:
    """Parameter or buffer ``name`` of module ``owner``."""

    owner: nn.Module
    name: str
    is_param: bool

    def get(self) -> torch.Tensor:
        return (self.owner._parameters if self.is_param else self.owner._buffers)[self.name]

    def set(self, t: torch.Tensor) -> None:
        if self.is_param:
            self.owner._parameters[self.name] = nn.Parameter(t, requires_grad=False)
        else:
            self.owner._buffers[self.name] = t


def refs_of(module: nn.Module, recurse: bool = True) -> list[TensorRef]:
    """Every parameter and buffer of ``module`` (its own only when ``recurse`` is False), in a fixed order."""
    mods = module.modules() if recurse else [module]
    refs = []
    for m in mods:
        refs += [TensorRef(m, n, True) for n, p in m._parameters.items() if p is not None]
        refs += [TensorRef(m, n, False) for n, b in m._buffers.items() if b is not None]
    return refs


def refs_outside(module: nn.Module, excluded: Iterable[nn.Module]) -> list[TensorRef]:
    """The parameters and buffers of ``module`` that do not belong to any module in ``excluded``."""
    skip = {id(m) for e in excluded for m in e.modules()}
    return [r for m in module.modules() if id(m) not in skip for r in refs_of(m, recurse=False)]


@dataclass(frozen=True)
class _Entry:
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    extent: int  # elements spanned in storage


def _dense_strides(t: torch.Tensor) -> bool:
    """True when ``t`` covers its span exactly once (contiguous up to a permutation of its dims)."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(order).is_contiguous()


def _entry(t: torch.Tensor, offset: int) -> _Entry:
    if t.numel() and not _dense_strides(t):  # expanded / overlapping views are stored contiguous
        t = t.contiguous()
    return _Entry(offset, t.dtype, tuple(t.shape), tuple(t.stride()), t.numel())


def _layout(refs: list[TensorRef]) -> tuple[list[_Entry], int]:
    entries, offset = [], 0
    for ref in refs:
        e = _entry(ref.get(), offset)
        entries.append(e)
        offset += -(-e.extent * e.dtype.itemsize // ALIGN) * ALIGN
    return entries, offset


def layout_bytes(refs: list[TensorRef]) -> int:
    """Bytes a ``Pack`` of ``refs`` occupies (a multiple of ``ALIGN``)."""
    return _layout(refs)[1]


class Pack:
    """A group of tensors in one flat host buffer (``host``); the modules are bound to it.

    ``host`` is a new buffer (pinned when ``pin``), or the given ``arena`` slice of at least ``layout_bytes(refs)``
    bytes (one pinned allocation for many packs: the pinned-memory cache rounds every allocation up to a power of
    two, which per-block buffers would pay each time).
    """

    def __init__(self, refs: list[TensorRef], pin: bool = False, arena: torch.Tensor | None = None):
        self.refs = list(refs)
        self.entries, self.nbytes = _layout(self.refs)
        if arena is None:
            arena = torch.empty(max(self.nbytes, 1), dtype=torch.uint8, pin_memory=pin)
        self.host = arena
        for ref, view in zip(self.refs, self.views(self.host)):
            view.copy_(ref.get())
            ref.set(view)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for e in self.entries:
            raw = flat[e.offset:e.offset + e.extent * e.dtype.itemsize].view(e.dtype)
            out.append(raw.as_strided(e.shape, e.stride))
        return out

    def bind(self, flat: torch.Tensor) -> None:
        """Point every module tensor of the group at its view of ``flat`` (``host`` or a device copy of it)."""
        for ref, view in zip(self.refs, self.views(flat)):
            ref.set(view)

    def bind_host(self) -> None:
        self.bind(self.host)

    def to_device(self, device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
        """The flat buffer copied to ``device`` (into ``out`` when given; non-blocking from pinned memory)."""
        if out is None:
            out = torch.empty(max(self.nbytes, 1), dtype=torch.uint8, device=device)
        out[:self.nbytes].copy_(self.host[:self.nbytes], non_blocking=True)
        return out
