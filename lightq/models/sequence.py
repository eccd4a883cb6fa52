"""The sequence seam: where the DiT's video tokens may be split across processes (sequence parallelism).

``WanDiT.forward`` calls ``local_tokens(x, rope, *per_token)`` once the latents are patch-embedded (``x``
``[B, L, dim]``, the RoPE tables ``[L, 1, head_dim / 2]``, and per-token tensors ``[B, L, ...]`` such as Wan2.2
TI2V's per-token time embeddings) and runs its blocks on what it returns; after the head it calls
``all_tokens(out)`` (``[B, L_local, C]`` -> ``[B, L, C]``) before unpatchifying. Every other operation of a block
is per token, except self-attention, which goes through ``models.attention.self_attention`` and so is the split's
business too (``lightq.parallel`` installs both).

The default is no split: both calls return their input. A run installs a split for its duration with
``with use_sequence_split(split): ...`` (restored on exit, also on error). A split has
``local_tokens(x, rope, *per_token)`` -> ``(x_local, rope_local, *per_token_local)`` and ``all_tokens(x_local)``
-> ``x``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch

Rope = tuple[torch.Tensor, torch.Tensor]


class SequenceSplit(Protocol):
    def local_tokens(self, x: torch.Tensor, rope: Rope, *per_token: torch.Tensor) -> tuple: ...

    def all_tokens(self, x: torch.Tensor) -> torch.Tensor: ...


_current: SequenceSplit | None = None


def local_tokens(x: torch.Tensor, rope: Rope, *per_token: torch.Tensor) -> tuple:
    """This process's tokens of ``x``, their RoPE rows and their rows of each ``per_token`` tensor (all of them
    without a split), as ``(x, rope, *per_token)``."""
    return (x, rope, *per_token) if _current is None else _current.local_tokens(x, rope, *per_token)


def all_tokens(x: torch.Tensor) -> torch.Tensor:
    """Every process's tokens of ``x`` in sequence order (``x`` itself without a split)."""
    return x if _current is None else _current.all_tokens(x)


@contextmanager
def use_sequence_split(split: SequenceSplit) -> Iterator[SequenceSplit]:
    """Split the DiT's tokens by ``split`` inside the ``with`` block; the previous split is restored on exit."""
    global _current
    previous, _current = _current, split
    try:
        yield split
    finally:
        _current = previous
