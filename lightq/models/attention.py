"""The attention seam: every softmax attention of the Wan DiT (self, cross, I2V image) calls ``attention(q, k, v)``.

Contract of an implementation ``impl(q, k, v) -> out``:

- ``q`` is ``[B, Lq, heads, head_dim]``, ``k`` and ``v`` are ``[B, Lk, heads, head_dim]``, all three of one
  dtype (bf16 / fp16 in a run, fp32 in CPU tests) on one device; they may be non-contiguous views;
- ``out = softmax(q k^T / sqrt(head_dim)) v`` per batch and head, with no mask and no dropout, returned as
  ``[B, Lq, heads * head_dim]`` in ``q``'s dtype (the layout the output projection takes).

The default implementation is torch's ``scaled_dot_product_attention`` (``sdpa``). A run installs another one
for its duration with ``with use_attention(impl): ...``; the previous implementation comes back on exit, also on
error, so one job's choice never leaks into the next job of a sweep. The choice is process-wide (a module global,
read on every call), not per model: set it around the whole job, not around one component.

The DiT's self-attention (video tokens to themselves) calls ``self_attention(q, k, v)``, which runs the
implementation installed by ``use_self_attention(impl)`` (the ``attn_quant`` group's quantized attention), else
the one ``attention`` runs; cross-attention to the text and image tokens always calls ``attention``.

``keep_sdpa_switches()`` guards torch's process-wide SDPA backend switches (flash / memory-efficient / math /
cuDNN) across code that may flip them, such as importing a kernel library.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

AttentionImpl = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The default implementation: torch's ``scaled_dot_product_attention`` over the heads-first transposes."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


_current: AttentionImpl = sdpa
_self_current: AttentionImpl | None = None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention by the implementation installed for this run (see the module docstring)."""
    return _current(q, k, v)


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The DiT's self-attention: the ``use_self_attention`` implementation if one is installed, else ``attention``'s."""
    return (_self_current or _current)(q, k, v)


def current_attention() -> AttentionImpl:
    """The implementation ``attention`` calls now."""
    return _current


def current_self_attention() -> AttentionImpl:
    """The implementation ``self_attention`` calls now."""
    return _self_current or _current


def _check_callable(impl) -> None:
    if not callable(impl):
        raise TypeError(f"an attention implementation must be callable, got {type(impl).__name__}")


@contextmanager
def use_attention(impl: AttentionImpl) -> Iterator[AttentionImpl]:
    """Make ``attention`` call ``impl`` inside the ``with`` block; the previous implementation is restored on exit."""
    global _current
    _check_callable(impl)
    previous, _current = _current, impl
    try:
        yield impl
    finally:
        _current = previous


@contextmanager
def use_self_attention(impl: AttentionImpl) -> Iterator[AttentionImpl]:
    """Make ``self_attention`` call ``impl`` inside the ``with`` block (cross-attention is untouched); the previous
    choice is restored on exit."""
    global _self_current
    _check_callable(impl)
    previous, _self_current = _self_current, impl
    try:
        yield impl
    finally:
        _self_current = previous


_SDPA_SWITCHES = ("flash", "mem_efficient", "math", "cudnn")


def sdpa_switches() -> tuple[bool, ...]:
    """torch's (flash, memory-efficient, math, cuDNN) scaled-dot-product-attention backend switches, as set now."""
    return tuple(getattr(torch.backends.cuda, f"{name}_sdp_enabled")() for name in _SDPA_SWITCHES)


@contextmanager
def keep_sdpa_switches() -> Iterator[None]:
    """Put the SDPA backend switches back as they were when the block exits (also on error).

    Importing some kernel libraries flips them for the whole process (vLLM's CUDA platform module turns cuDNN
    attention off), which would slow every later attention call."""
    before = sdpa_switches()
    try:
        yield
    finally:
        for name, on in zip(_SDPA_SWITCHES, before):
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(on)
