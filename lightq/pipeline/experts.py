"""The DiT experts of a run in denoising order (one, or Wan2.2 A14B's high- then low-noise expert), and when each is
on the device.

``Experts.at(t)`` is the expert of the step at timestep ``t`` (``sampler.high_noise``); when it changes, the previous
one is released and the next one started through the run's ``Offload`` (under ``offload=model`` only the active
expert's weights are on the device; under block / phase each streams its own blocks). ``close`` releases the active
one.

Prefetch (``offload=model``, two experts, ``offload.prefetch``): at the start of the last high-noise step the
low-noise expert's weights start their host-to-device copy on a side CUDA stream (from pinned memory) while that
step computes, so the switch finds them there instead of stalling on the copy. It is done only when the device has
room for both experts at once: the expert's bytes must fit in the memory the device has free (driver-free plus the
allocator's cached, unallocated bytes) less the run's working memory (its peak allocation so far less what is
allocated now: an overestimate, so the check errs towards not prefetching), and within ``offload.max_gpu_gib``
when set. Otherwise the switch copies as before. ``record`` says which, for result.json (``memory.expert_prefetch``).
The weights are the same bytes either way: the latents are bit-identical with and without prefetch.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("lightq")
GIB = 2**30


class Experts:
    def __init__(self, models: list, scfg, offload, prefetch: bool = True):
        from .sampler import high_noise, timesteps

        self.models, self.scfg, self.offload = models, scfg, offload
        self.active: int | None = None
        self.prefetch = prefetch and len(models) > 1 and offload.mode == "model"
        steps = timesteps(scfg).timesteps.tolist() if len(models) > 1 else []
        high = [i for i, t in enumerate(steps) if high_noise(scfg, t)]
        # the timestep of the last high-noise step, when a low-noise step follows it
        self.last_high = steps[high[-1]] if high and high[-1] + 1 < len(steps) else None
        self.prefetch_step = high[-1] if self.last_high is not None else None
        self.decision: dict | None = None

    def at(self, t: float):
        from .sampler import high_noise

        i = 0 if len(self.models) == 1 or high_noise(self.scfg, t) else 1
        if i != self.active:
            if self.active is not None:
                self.offload.release(self.models[self.active])
                where = (f"the boundary {self.scfg.boundary:.3f}" if self.scfg.boundary_step is None else
                         f"sampler.boundary_step={self.scfg.boundary_step}")
                log.info("denoise: t=%.1f: %s: the low-noise expert takes over", t, where)
            self.offload.start(self.models[i])
            self.active = i
        if i == 0 and self.decision is None and self.last_high is not None and t == self.last_high:
            self._maybe_prefetch()
        return self.models[i]

    def _maybe_prefetch(self) -> None:
        low = self.models[1]
        if not self.prefetch:
            why = {"model": "offload.prefetch=false", "none": "offload=none: both experts stay on the device"}.get(
                self.offload.mode, f"offload={self.offload.mode}: each expert streams its own blocks")
            self.decision = {"prefetched": False, "why": why}
            return
        need, room, why = self.offload.room_for(low)
        self.decision = {"prefetched": need <= room, "step": self.prefetch_step, "need_bytes": need,
                         "room_bytes": room, "why": why}
        if need <= room:
            self.offload.prefetch(low)
            log.info("denoise: copying the low-noise expert (%.2f GiB) to the device during step %d (room: %.2f GiB)",
                     need / GIB, self.prefetch_step, room / GIB)
        else:
            log.info("denoise: no room to prefetch the low-noise expert (%.2f GiB, room %.2f GiB: %s): it is copied "
                     "at the switch", need / GIB, room / GIB, why)

    def record(self) -> dict | None:
        """result.json's ``memory.expert_prefetch`` (None for one expert, or one that never hands over)."""
        if len(self.models) == 1 or self.last_high is None:
            return None
        return self.decision or {"prefetched": False, "why": "the last high-noise step was not reached"}

    def close(self) -> None:
        if self.active is not None:
            self.offload.release(self.models[self.active])
            self.active = None
        if self.prefetch:
            self.offload.drop_prefetched()


def device_room(device: torch.device, max_gpu_gib: float | None) -> tuple[int, str]:
    """Bytes a prefetched expert may take on ``device`` (module doc) and how they were counted."""
    if device.type != "cuda":
        return 2**63 - 1, "a CPU run: host memory (the copy is synchronous)"
    free, _ = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    cached = torch.cuda.memory_reserved(device) - allocated
    working = torch.cuda.max_memory_allocated(device) - allocated
    room = free + cached - working
    why = (f"{free / GIB:.2f} GiB free + {cached / GIB:.2f} GiB cached - {working / GIB:.2f} GiB working memory "
           "(peak so far less allocated now)")
    if max_gpu_gib is not None:
        budget = int(max_gpu_gib * GIB) - allocated - working
        if budget < room:
            room, why = budget, f"offload.max_gpu_gib={max_gpu_gib} less {allocated / GIB:.2f} GiB allocated and " \
                                f"{working / GIB:.2f} GiB working memory"
    return max(room, 0), why
