"""The block streamer: a cyclic sequence of units copied host -> device through a ring of device slots.

Units ``0 .. count-1`` run in order, over and over (every DiT forward runs every block). ``buffers`` device slots
hold the unit computing now and the next ``buffers - 1`` units, copied ahead on a side stream:

    acquire(k):  the compute stream waits for slot(k)'s ``ready`` event (its copy is done), the unit's modules
                 are bound to views of the slot, then units k+1 .. k+buffers-1 are issued: for each, the copy
                 stream waits for its slot's ``free`` event (the compute that last read it is done), copies the
                 unit's flat host buffer into it (non-blocking, pinned memory), and records ``ready``.
    release(k):  ``free`` of slot(k) is recorded on the compute stream; the modules go back to their host views.

So the copy of unit k+1 overlaps the compute of unit k, with no host-side wait and no global synchronize. On the
CPU the same code runs with plain copies and no streams or events. Slots are flat ``uint8`` tensors, grown when a
larger unit arrives (mixed-precision blocks differ in size); a new slot's ``free`` event is recorded at once, so
no copy lands in memory the compute stream may still read. A unit requested out of order (a forward that raised
half-way) resets the ring; ``close`` makes the compute stream wait for pending copies before the slots are freed.

A unit source provides ``count``, ``pack(k)`` (the unit's host ``Pack``), ``released(k)`` (the streamer is done
with unit k for this pass) and ``reset(k)`` (the next unit asked for is k, out of order).
"""

from __future__ import annotations

from collections import deque

import torch

from .binding import Pack


class ResidentUnits:
    """Units whose host buffers live for the whole run (``offload=block|phase`` without lazy loading)."""

    def __init__(self, packs: list[Pack]):
        self.packs = packs
        self.count = len(packs)

    def pack(self, k: int) -> Pack:
        return self.packs[k]

    def released(self, k: int) -> None:
        pass

    def reset(self, k: int) -> None:
        pass


class Streamer:
    def __init__(self, source, device: torch.device, buffers: int):
        self.source, self.device = source, device
        self.nbuf = max(1, min(buffers, source.count))
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.ready = [torch.cuda.Event() if self.cuda else None for _ in range(self.nbuf)]
        self.free = [torch.cuda.Event() if self.cuda else None for _ in range(self.nbuf)]
        self.slots: list[torch.Tensor | None] = [None] * self.nbuf
        self.inflight: deque = deque()  # (k, slot, pack), oldest first
        self.next_slot = 0
        self.copies = 0

    def _compute_stream(self):
        return torch.cuda.current_stream(self.device)

    def _issue(self, k: int) -> None:
        pack = self.source.pack(k)
        s = self.next_slot
        self.next_slot = (s + 1) % self.nbuf
        if self.slots[s] is None or self.slots[s].numel() < pack.nbytes:
            if self.cuda and self.slots[s] is not None:  # a copy into the old slot may still be running
                self._compute_stream().wait_stream(self.copy_stream)
            self.slots[s] = None
            self.slots[s] = torch.empty(max(pack.nbytes, 1), dtype=torch.uint8, device=self.device)
            if self.cuda:
                self.free[s].record(self._compute_stream())
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.free[s])
                pack.to_device(self.device, self.slots[s])
                self.ready[s].record(self.copy_stream)
        else:
            pack.to_device(self.device, self.slots[s])
        self.copies += 1
        self.inflight.append((k, s, pack))

    def acquire(self, k: int) -> None:
        if self.inflight and self.inflight[0][0] != k:
            self._reset(k)
        if not self.inflight:
            self._issue(k)
        while len(self.inflight) < self.nbuf:
            self._issue((self.inflight[-1][0] + 1) % self.source.count)
        _, s, pack = self.inflight[0]
        if self.cuda:
            self._compute_stream().wait_event(self.ready[s])
        pack.bind(self.slots[s])

    def release(self, k: int) -> None:
        if not self.inflight or self.inflight[0][0] != k:
            return  # already reset (a forward raised inside this unit)
        _, s, pack = self.inflight.popleft()
        if self.cuda:
            self.free[s].record(self._compute_stream())
        pack.bind_host()
        self.source.released(k)

    def _drop_inflight(self) -> None:
        while self.inflight:
            k, s, pack = self.inflight.popleft()
            if self.cuda:
                self.free[s].record(self._compute_stream())
            pack.bind_host()
            self.source.released(k)

    def _reset(self, k: int) -> None:
        self._drop_inflight()
        self.source.reset(k)

    def close(self) -> None:
        """Unbind everything; the compute stream waits for pending copies before the slots are released."""
        self._drop_inflight()
        if self.cuda:
            self._compute_stream().wait_stream(self.copy_stream)
        self.slots = [None] * self.nbuf
