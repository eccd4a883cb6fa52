"""The VAE decode split over the ranks by latent rows (``parallel.vae=split``): the ``models.vae.RowSplit`` that
``WanVAE.decode`` / ``Wan22VAE.decode`` take.

Rank ``r`` of ``P`` owns the latent rows ``[start_r, start_r + n_r)`` (``n_r = h // P + (r < h % P)``, each at
least 1) and, at a resolution of ``s`` pixels per latent row, the rows ``[s start_r, s (start_r + n_r))``: every
layer of the decoders maps a rank's rows to the same rows at its own resolution (per-pixel layers, nearest 2x
upsampling, the Wan2.2 pixel unfolds), except

- a conv of kernel height ``k`` (all 3x3 convs: ``k = 3``): its output row ``y`` reads the input rows
  ``y - k // 2 .. y + k // 2``, so each rank first receives ``k // 2`` rows from each neighbour (``halo``; zero rows
  beyond the frame's edges, the conv's own zero padding) and the conv runs without vertical padding. A causal
  conv caches its input's last frames for the next chunk with those halo rows, so the cached rows are the
  neighbours' exact values too.
- the attention block of the decoders' middle, which attends over the whole frame: every rank gathers the whole
  latent-resolution frame (``whole``), runs the block as one process does, and keeps its own rows (``own``).

So every rank computes, for its rows, exactly the operations of one process on exactly the same inputs; a single
halo at the input would have to cover the decoder's whole receptive field instead (15 latent rows after the
attention block for Wan2.1; docs/PARALLEL.md). ``collect`` gathers the decoded rows on rank 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import p2p
from .sequence_parallel import gather_slices, padded, slice_sizes


class RowSplit:
    """Latent rows of a ``rows``-row frame split over ``group`` (this process is rank ``rank`` of ``size``)."""

    def __init__(self, group, rank: int, size: int, rows: int):
        if rows < size:
            raise ValueError(f"{rows} latent rows cannot give each of {size} ranks one")  # checked at validation
        self.group, self.rank, self.size, self.rows = group, rank, size, rows
        self.sizes = slice_sizes(rows, size)
        self.start = sum(self.sizes[:rank])

    def _scale(self, x: torch.Tensor, rows: int) -> int:
        scale, rest = divmod(x.shape[-2], rows)
        if rest or not scale:
            raise ValueError(f"{x.shape[-2]} rows are no whole multiple of {rows}")
        return scale

    def own(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows (dim -2) of the whole-frame ``x``, at ``x``'s resolution."""
        s = self._scale(x, self.rows)
        return x.narrow(-2, s * self.start, s * self.sizes[self.rank])

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of ``x`` (this rank's rows, dim -2), in order, on every rank."""
        s = self._scale(x, self.sizes[self.rank])
        return gather_slices(x, [s * n for n in self.sizes], x.dim() - 2, self.group)

    def halo(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """This rank's rows of ``x`` with ``n`` rows of each neighbour's above and below (zeros at the frame's
        top and bottom edges), ``n`` at most the rows of one latent row at ``x``'s resolution."""
        if n > self._scale(x, self.sizes[self.rank]):
            raise ValueError(f"a halo of {n} rows needs more than one latent row of each neighbour")
        above, below = x.new_zeros(*x.shape[:-2], n, x.shape[-1]), x.new_zeros(*x.shape[:-2], n, x.shape[-1])
        r = self.rank
        before = (("send", x[..., :n, :], r - 1), ("recv", above, r - 1)) if r > 0 else None
        after = (("send", x[..., -n:, :], r + 1), ("recv", below, r + 1)) if r < self.size - 1 else None
        p2p.start(p2p.chain_order(r, self.size, before, after), self.group).wait()
        return torch.cat((above, x, below), dim=-2)

    def collect(self, x: torch.Tensor) -> torch.Tensor | None:
        """The whole frame of every rank's rows of ``x`` on rank 0 of the group (None on the others)."""
        s = self._scale(x, self.sizes[self.rank])
        mine = padded(x, s * max(self.sizes), x.dim() - 2)
        root = dist.get_global_rank(self.group, 0)
        parts = [torch.empty_like(mine) for _ in self.sizes] if self.rank == 0 else None
        dist.gather(mine, parts, dst=root, group=self.group)
        if parts is None:
            return None
        return torch.cat([p.narrow(-2, 0, s * n) for p, n in zip(parts, self.sizes)], dim=-2)
