"""Run by tests/test_parallel.py under torchrun (gloo): ring attention over the ranks against one process's
attention of the same bf16 inputs, checked against ``sequence_parallel.RING_BOUND``; and the ring again with its transfers posted
together and waited for after each block's attention (``p2p.POSTED``, NCCL's path), which must give the same bits
(the same arithmetic on the same blocks). Rank 0 writes the largest ``|ring - one| / bound`` and whether the two
ring outputs are equal to the JSON file named on the command line."""

import json
import sys

import torch
import torch.distributed as dist

from lightq.attention.inputs import wan_like_qkv
from lightq.attention.numerics import exact_attention
from lightq.models.attention import sdpa
from lightq.parallel import p2p
from lightq.parallel.runtime import leave
from lightq.parallel.sequence_parallel import RING_BOUND, TokenSplit, gather_slices, ring_attention, slice_sizes

dist.init_process_group("gloo")
rank, size = dist.get_rank(), dist.get_world_size()
q, k, v = wan_like_qkv(1, 1001, 3, 64, torch.bfloat16, seed=5)  # every rank draws the same tensors
split = TokenSplit(dist.group.WORLD, rank, size)
sizes = slice_sizes(q.shape[1], size)
start = sum(sizes[:rank])
split.sizes = sizes
mine = ring_attention(split)(*(t[:, start:start + sizes[rank]] for t in (q, k, v)))
ring = gather_slices(mine, sizes, 1, dist.group.WORLD)
p2p.POSTED.add("gloo")  # the NCCL path: transfers posted before each block's attention, waited for after it
posted = gather_slices(ring_attention(split)(*(t[:, start:start + sizes[rank]] for t in (q, k, v))), sizes, 1,
                       dist.group.WORLD)
p2p.POSTED.discard("gloo")
if rank == 0:
    one = sdpa(q, k, v).double()
    a = exact_attention(q, k, v.abs()).double()
    u = 2.0 ** -8
    bound = RING_BOUND[0] * u * a + RING_BOUND[1] * u * one.abs()
    worst = float(((ring.double() - one).abs() / bound).max())
    json.dump({"worst": worst, "differs": bool((ring.double() != one).any()),
               "posted_equal": torch.equal(posted, ring)}, open(sys.argv[1], "w"))
leave(0)  # as a lightq job's rank leaves: barrier, destroy, os._exit (docs/PARALLEL.md)
