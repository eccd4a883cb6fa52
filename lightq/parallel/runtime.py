"""The process groups of a ``torchrun`` launch and what one job installs on them.

``start(layout, cuda)`` joins the launch's process group once per process (NCCL on GPUs, each rank on
``cuda:LOCAL_RANK``; gloo on CPUs) and makes the layout's subgroups: one sequence-parallel group per CFG half
(ranks ``c * sp .. c * sp + sp - 1``) and one CFG group per sequence position (ranks ``s, sp + s``). Every rank
creates every group in the same order, as ``torch.distributed.new_group`` requires. ``leave`` ends a rank whose
work is done.
"""

from __future__ import annotations

import atexit
import os
import sys
from contextlib import ExitStack, contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import LightqError
from ..models.attention import current_self_attention, use_self_attention
from ..models.sequence import use_sequence_split
from ..teardown import drop_exit_collections
from .guidance import split_guidance
from .layout import Layout
from .rows import RowSplit
from .sequence_parallel import TokenSplit, allgather_attention, ring_attention, ulysses_attention

# A rank that waits longer than this for the others has lost them (a crashed or killed peer).
TIMEOUT = timedelta(minutes=30)
_groups: dict[tuple[int, int], tuple] = {}


class Runtime:
    """This rank's groups for ``layout``."""

    def __init__(self, layout: Layout, sp_group, cfg_group):
        self.layout, self.sp_group, self.cfg_group = layout, sp_group, cfg_group

    @contextmanager
    def denoising(self):
        """Split the DiT's tokens and its self-attention over the sequence-parallel group (wrapping the
        self-attention installed now) for the ``with`` block."""
        lay = self.layout
        with ExitStack() as stack:
            if lay.sp > 1:
                split = TokenSplit(self.sp_group, lay.sp_rank, lay.sp)
                if lay.attention == "ring":
                    attend = ring_attention(split)
                else:
                    wrap = ulysses_attention if lay.attention == "ulysses" else allgather_attention
                    attend = wrap(current_self_attention(), split)
                stack.enter_context(use_self_attention(attend))
                stack.enter_context(use_sequence_split(split))
            yield

    def guidance(self):
        """The sampler's guidance function: the split CFG pass with ``parallel.cfg=2``, else None (one process's)."""
        return split_guidance(self.cfg_group, self.layout.cfg_rank) if self.layout.cfg == 2 else None

    def decode_rows(self, rows: int) -> RowSplit | None:
        """The VAE decode's split of ``rows`` latent rows over every rank (``parallel.vae=split``), else None."""
        lay = self.layout
        return RowSplit(dist.group.WORLD, lay.rank, lay.world, rows) if lay.vae == "split" else None

    def gather(self, value):
        """``value`` of every rank, in rank order (a picklable object)."""
        values = [None] * self.layout.world
        dist.all_gather_object(values, value)
        return values


def start(layout: Layout, cuda: bool) -> Runtime:
    """Join the launch's process group (once per process) and return this rank's groups for ``layout``."""
    if cuda:
        if torch.cuda.device_count() <= layout.local_rank:
            raise LightqError(f"rank {layout.rank} has LOCAL_RANK {layout.local_rank}, but this machine shows "
                              f"{torch.cuda.device_count()} GPUs: launch at most that many processes per node")
        torch.cuda.set_device(layout.local_rank)
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        except (RuntimeError, ValueError) as exc:
            raise LightqError(f"could not join the {layout.world} processes of the launch ({exc}); start them with "
                              "torchrun --nproc-per-node <N> -m lightq ...") from None
    if dist.get_world_size() != layout.world:
        raise LightqError(f"the process group has {dist.get_world_size()} ranks, the launch says {layout.world}")
    key = (layout.cfg, layout.sp)
    if key not in _groups:
        sp_groups = [dist.new_group(list(range(c * layout.sp, (c + 1) * layout.sp))) for c in range(layout.cfg)]
        cfg_groups = [dist.new_group([c * layout.sp + s for c in range(layout.cfg)]) for s in range(layout.sp)]
        _groups[key] = (sp_groups, cfg_groups)
    sp_groups, cfg_groups = _groups[key]
    return Runtime(layout, sp_groups[layout.cfg_rank], cfg_groups[layout.sp_rank])


def leave(code: int) -> None:
    """End this process of a launch whose work finished with exit ``code`` 0: wait for every rank (a barrier, so
    none tears down while another still talks to it), destroy the process group, run the exit handlers (logging's
    flush, the rank's temporary folders; not ``lightq.teardown``'s collection: no teardown follows), and exit by
    ``os._exit(0)``. The interpreter's own teardown is skipped: on CPU a gloo rank aborted there now and then
    ("terminate called without an active exception", after ``destroy_process_group`` had returned on every rank;
    docs/PARALLEL.md). Returns at once without a process group or with a failure's code (a failed rank's peers may be
    inside a collective: it leaves as usual)."""
    if code or not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    _groups.clear()
    drop_exit_collections()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
