"""Point-to-point transfers between ranks of a group: a list of sends and receives, run as one ``Transfer``.

On NCCL the whole list is posted at once (``torch.distributed.batch_isend_irecv``) and runs on NCCL's stream while
the caller computes; ``Transfer.wait`` makes the caller's stream wait for it, so the received tensors may be read
(and the sent ones changed) only after ``wait``. On gloo the list runs there and then, one blocking send or receive
after the other, in the order given (the asynchronous gloo ``isend`` / ``irecv`` aborted ranks at process exit now
and then: docs/PARALLEL.md), so the caller lists them in an order in which no two ranks wait on each other
(``chain_order``, or the ring's parity order in ``sequence_parallel.ring_attention``); ``wait`` is then a no-op.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

POSTED = {"nccl"}  # backends whose transfers are posted together (tests add gloo to run that path on CPU)
Op = tuple[str, torch.Tensor, int]  # ("send" | "recv", tensor, the peer's rank in the group)


class Transfer:
    """Sends and receives under way (NCCL) or done (gloo); ``wait`` before touching their tensors."""

    def __init__(self, works: list, tensors: list[torch.Tensor]):
        self._works, self._tensors = works, tensors  # the tensors stay alive until the transfer is done

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works, self._tensors = [], []


def start(ops: list[Op], group) -> Transfer:
    """Run ``ops`` (``("send", tensor, peer)`` / ``("recv", tensor, peer)``, peers as ranks of ``group``): all at once
    on a ``POSTED`` backend (NCCL), returning before they finish; one after the other, blocking, on any other."""
    peers = [(kind, tensor.contiguous() if kind == "send" else tensor, dist.get_global_rank(group, peer))
             for kind, tensor, peer in ops]
    if any(kind == "recv" and not tensor.is_contiguous() for kind, tensor, _ in peers):
        raise ValueError("a receive buffer must be contiguous")  # a caller's bug: it would receive into a copy
    if dist.get_backend(group) in POSTED:
        calls = {"send": dist.isend, "recv": dist.irecv}
        works = dist.batch_isend_irecv([dist.P2POp(calls[k], t, p, group) for k, t, p in peers])
        return Transfer(works, [t for _, t, _ in peers])
    for kind, tensor, peer in peers:
        (dist.send if kind == "send" else dist.recv)(tensor, peer, group=group)
    return Transfer([], [])


def chain_order(rank: int, size: int, before: tuple[Op, Op] | None, after: tuple[Op, Op] | None) -> list[Op]:
    """The ops of rank ``rank`` of a chain ``0 - 1 - ... - size-1`` in an order that cannot deadlock when run blocking:
    ``before`` = (send, recv) with rank ``rank - 1``, ``after`` = (send, recv) with rank ``rank + 1`` (None at the
    ends). The links ``(i, i + 1)`` with even ``i`` go first, then the odd ones; on a link the lower rank sends first
    and the higher receives first, so every blocking call meets its partner's."""
    links = []
    if after is not None:
        links.append((rank % 2, list(after)))  # this rank is the lower end: send, then receive
    if before is not None:
        links.append(((rank - 1) % 2, list(reversed(before))))  # the higher end: receive, then send
    return [op for _, pair in sorted(links, key=lambda link: link[0]) for op in pair]
