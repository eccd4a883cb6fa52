"""The DiT's video tokens split over the ranks of a sequence-parallel group, and the self-attention that spans them.

Rank ``r`` of ``P`` holds the contiguous tokens ``[start_r, start_r + n_r)``, ``n_r = L // P + (r < L % P)``
(any token count; the slices differ by at most one token). Every DiT operation but self-attention is per token,
so the ranks run the blocks on their slices (``TokenSplit``, installed at ``models.sequence``); self-attention
sees all ``L`` tokens by one of:

- ``ulysses``: an all-to-all turns each rank's ``[B, n_r, H, D]`` q, k, v into ``[B, L, H / P, D]`` (heads
  ``[r H / P, (r + 1) H / P)`` of every token), the run's attention runs on those heads, and a second all-to-all
  returns ``[B, n_r, H * D]``. Every head sees exactly the inputs it sees in one process, so a kernel whose
  heads are independent gives the single-process result bit for bit.
- ``allgather``: each rank gathers every rank's k and v (``[B, L, H, D]``) and attends its own queries to them.
  Rows of the output are independent, so this too is the single-process result wherever the kernel's per-row
  arithmetic does not depend on which rows share its launch (torch SDPA on CPU; the quantized modes' Q blocks of
  128 queries start at each rank's first token, so their Q scales, not the method, differ from one process).

- ``ring``: key/value blocks travel around the ranks (``P - 1`` transfers, ``parallel.p2p``: on NCCL the next block's
  send and receive are posted before the current block's attention and waited for after it, so they overlap; on
  gloo they are blocking, even ranks sending first; ``O(L / P)`` key/value memory per rank); each rank attends its
  queries to every
  block with torch's flash attention, which also returns the log-sum-exp ``l_s`` of each row, and merges the
  partial outputs exactly in fp32: ``L = logsumexp_s l_s``, ``out = sum_s exp(l_s - L) o_s``. The reduction is
  reordered, so the bound (``RING_BOUND``) is stated: with ``u`` the unit roundoff of the attention dtype (bf16
  2^-8) and ``A = softmax(q k^T / sqrt(D)) |v|``, ``|out_ring - out_one| <= 4 u A + 2 u |out_one|``: each partial
  output is rounded once (``u`` of its own ``A_s``, and ``sum_s exp(l_s - L) A_s = A``), the kernel rounds P
  against another running maximum (``u A`` on each side), and both results are rounded once (``u |out|``).

Tensors cross ranks through ``torch.distributed`` collectives on the group (gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..models.attention import AttentionImpl
from . import p2p

RING_BOUND = (4.0, 2.0)  # |out_ring - out_one| <= 4 u A + 2 u |out_one| (module docstring)


def slice_sizes(n: int, parts: int) -> list[int]:
    """Token counts of the ``parts`` ranks for ``n`` tokens (the first ``n % parts`` ranks hold one more)."""
    return [n // parts + (r < n % parts) for r in range(parts)]


def padded(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """``x`` contiguous, zero-padded along ``dim`` to ``length`` entries (collectives take equal shapes)."""
    pad = list(x.shape)
    pad[dim] = length - x.shape[dim]
    return torch.cat((x, x.new_zeros(pad)), dim=dim) if pad[dim] else x.contiguous()


def gather_slices(x: torch.Tensor, sizes: list[int], dim: int, group) -> torch.Tensor:
    """Every rank's slice of ``x`` along ``dim`` (rank ``r`` holds ``sizes[r]`` entries), concatenated in rank order.
    Slices are padded to the largest for the collective and trimmed after."""
    mine = padded(x, max(sizes), dim)
    parts = [torch.empty_like(mine) for _ in sizes]
    dist.all_gather(parts, mine, group=group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)


def exchange(chunks: list[torch.Tensor], sizes: list[int], dim: int, group) -> list[torch.Tensor]:
    """All-to-all: ``chunks[j]`` goes to rank ``j``; returns what each rank ``i`` sent here, trimmed to ``sizes[i]``
    entries along ``dim`` (every chunk is padded to ``max(sizes)`` for the collective)."""
    longest = max(max(sizes), *(c.shape[dim] for c in chunks))
    send = [padded(c, longest, dim) for c in chunks]
    recv = [torch.empty_like(send[0]) for _ in chunks]
    dist.all_to_all(recv, send, group=group)
    return [r.narrow(dim, 0, n) for r, n in zip(recv, sizes)]


class TokenSplit:
    """The ``models.sequence`` split over ``group`` (this process is rank ``rank`` of ``size``)."""

    def __init__(self, group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size
        self.sizes: list[int] = []

    def local_tokens(self, x, rope, *per_token):
        self.sizes = slice_sizes(x.shape[1], self.size)
        start = sum(self.sizes[:self.rank])
        stop = start + self.sizes[self.rank]
        cos, sin = rope
        mine = [t[:, start:stop].contiguous() for t in (x, *per_token)]
        return mine[0], (cos[start:stop].contiguous(), sin[start:stop].contiguous()), *mine[1:]

    def all_tokens(self, x):
        return gather_slices(x, self.sizes, 1, self.group)


def ulysses_attention(inner: AttentionImpl, split: TokenSplit) -> AttentionImpl:
    """Self-attention over the whole sequence through two all-to-alls (module docstring); ``inner`` runs on this
    rank's heads of every token."""

    def attend(q, k, v):
        n, h = q.shape[1], q.shape[2]
        size, sizes, group = split.size, split.sizes, split.group
        hp = h // size
        qkv = torch.stack((q, k, v))  # [3, B, n_r, H, D]
        heads = [qkv[:, :, :, j * hp:(j + 1) * hp] for j in range(size)]
        full = torch.cat(exchange(heads, sizes, 2, group), dim=2)  # [3, B, L, H / P, D]
        out = inner(full[0], full[1], full[2])  # [B, L, H / P * D]
        mine = exchange(list(out.split(sizes, dim=1)), [n] * size, 1, group)
        return torch.cat(mine, dim=-1)  # heads in rank order: [B, n_r, H * D]

    return attend


def allgather_attention(inner: AttentionImpl, split: TokenSplit) -> AttentionImpl:
    """Self-attention of this rank's queries to every rank's keys and values (module docstring)."""

    def attend(q, k, v):
        kv = gather_slices(torch.stack((k, v)), split.sizes, 2, split.group)  # [2, B, L, H, D]
        return inner(q, kv[0], kv[1])

    return attend


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``softmax(q k^T / sqrt(D)) v`` in ``q``'s dtype, its rows' natural-log sum of exponentials in fp32) for
    heads-first ``[B, H, L, D]`` inputs: torch's flash-attention kernel (CPU or CUDA), which returns both."""
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
    return out, lse


def ring_attention(split: TokenSplit) -> AttentionImpl:
    """Self-attention with the key/value blocks passed around the ranks (module docstring)."""

    def attend(q, k, v):
        size, rank, sizes, group = split.size, split.rank, split.sizes, split.group
        qh = q.transpose(1, 2)
        kv = padded(torch.stack((k, v)), max(sizes), 2)  # [2, B, n_max, H, D]
        out = lse = None
        for step in range(size):
            if step < size - 1:  # hand the block on while attending to it (NCCL); gloo: now, even ranks send first
                arrived = torch.empty_like(kv)
                ops = [("send", kv, (rank + 1) % size), ("recv", arrived, (rank - 1) % size)]
                transfer = p2p.start(ops if rank % 2 == 0 else ops[::-1], group)
            block = kv[:, :, :sizes[(rank - step) % size]]
            o, l = attention_with_lse(qh, block[0].transpose(1, 2), block[1].transpose(1, 2))
            if out is None:
                out, lse = o.float(), l
            else:
                total = torch.logaddexp(lse, l)
                out = out * torch.exp(lse - total)[..., None] + o.float() * torch.exp(l - total)[..., None]
                lse = total
            if step < size - 1:
                transfer.wait()
                kv = arrived
        return out.to(q.dtype).transpose(1, 2).flatten(2)

    return attend
