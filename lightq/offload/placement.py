"""Where a component's weights are while it runs, per offload mode (``place`` picks the placement).

- ``WholeOffload`` (``offload=model``, and CLIP / VAE under block / phase): the component's tensors live in one
  flat (pinned) host buffer; ``start`` copies it to the device in one non-blocking transfer and binds the module
  to it, ``stop`` binds the module back to the host buffer (weights never change, so nothing is copied back);
  ``prefetch`` issues that copy ahead of ``start`` on a side stream (a Wan2.2 expert during the previous one's
  last step).
- ``BlockOffload`` (``offload=block|phase`` for the Wan DiT and the umT5 encoder): everything outside
  ``model.blocks`` (embeddings, head, final norm) is resident on the device while active; the blocks stream
  through a ``Streamer`` driven by forward hooks on each unit's start and end module. A model loaded by
  ``load_lazy`` gets its blocks from the disk reader instead of host memory.

Both pack the component when they are made: each original tensor is freed as it is copied into the pack, the
freed heap goes back to the OS (``return_freed_heap``), and the pack is page-locked once it is full (tensors in
host memory) or before it is filled by DMA (tensors on the device: ``binding.Pack``), so host memory peaks at the
packs' size plus one tensor and ends at the packs' size. A ``BlockOffload`` may take its blocks' packs made while
the component loaded (``pack_units``, one buffer per unit, called as the loader completes each block), so a
component loaded on the GPU is never there whole.
"""

from __future__ import annotations

import torch
from torch import nn

from .binding import (HostBuffers, Pack, host_buffer, layout_bytes, on_device, prefault, refs_of, refs_outside,
                      return_freed_heap)
from .lazy import LazyBlocks
from .streaming import ResidentUnits, Streamer
from .units import streams_blocks, unit_specs


class WholeOffload:
    """``prefetch`` starts the copy ahead on a side CUDA stream (on the CPU: now); the next ``start`` binds to it once
    the compute stream has waited for the copy's event instead of copying. The side stream first waits for the
    compute stream, so the device memory it writes (handed out by the caching allocator for the compute stream) is
    no longer read by kernels queued before."""

    def __init__(self, module: nn.Module, device: torch.device, pin: bool):
        self.device = device
        self.pack = Pack(refs_of(module), pin)
        return_freed_heap()
        self.on_device: torch.Tensor | None = None
        self.ahead: tuple[torch.Tensor, object, object] | None = None  # (device copy, its event, its stream)

    @property
    def nbytes(self) -> int:
        return self.pack.nbytes

    def prefetch(self) -> None:
        if self.ahead is not None or self.on_device is not None:
            return
        if self.device.type != "cuda":
            self.ahead = (self.pack.to_device(self.device), None, None)
            return
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        out = torch.empty(max(self.pack.nbytes, 1), dtype=torch.uint8, device=self.device)
        with torch.cuda.stream(side):
            self.pack.to_device(self.device, out)
            done = torch.cuda.Event()
            done.record(side)
        self.ahead = (out, done, side)

    def start(self) -> None:
        if self.ahead is not None:
            out, done, _ = self.ahead
            if done is not None:
                torch.cuda.current_stream(self.device).wait_event(done)
            self.on_device, self.ahead = out, None
        else:
            self.on_device = self.pack.to_device(self.device)
        self.pack.bind(self.on_device)

    def drop(self) -> None:
        """Forget a prefetched copy that was never started (the compute stream waits for it before its memory is
        reused)."""
        if self.ahead is not None and self.ahead[1] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ahead[1])
        self.ahead = None

    def stop(self) -> None:
        self.pack.bind_host()
        self.on_device = None


def pack_units(block: nn.Module, granularity: str, pin: bool, buffers: HostBuffers | None = None) -> list[Pack]:
    """One ``Pack`` per streamed unit of ``block`` (``unit_specs``), each in its own (pinned) host buffer: how a
    block is packed the moment the loader completes it (``BlockOffload``'s ``packed``). A block whose tensors
    are all on a CUDA device takes its buffers from ``buffers`` when given (made ahead, page-locked before the
    copies)."""
    specs = unit_specs(block, granularity)
    if buffers is None or not on_device([r for s in specs for r in s.refs]):
        return [Pack(s.refs, pin) for s in specs]
    hosts = buffers.take([max(layout_bytes(s.refs), 1) for s in specs])
    return [Pack(s.refs, pin, host) for s, host in zip(specs, hosts)]


class BlockOffload:
    """``packed`` (``pack_units`` of every block, in order) are the blocks' packs made while loading; without it
    the blocks' units are packed here into one arena, page-locked once filled (or, when every tensor is on a CUDA
    device, before it is filled by DMA, as a ``Pack``)."""

    def __init__(self, model: nn.Module, granularity: str, device: torch.device, buffers: int, pin: bool,
                 ahead: int = 2, packed: list[list[Pack]] | None = None):
        self.model, self.granularity, self.device = model, granularity, device
        self.buffers, self.pin, self.ahead = buffers, pin, ahead
        self.outside = Pack(refs_outside(model, model.blocks), pin)
        self.lazy: LazyBlocks | None = getattr(model, "lazy_blocks", None)
        self.resident = None
        if self.lazy is None:
            self.specs = [unit_specs(block, granularity) for block in model.blocks]
            if packed is not None:
                self.resident = ResidentUnits([p for packs in packed for p in packs])
            else:
                units = [s.refs for specs in self.specs for s in specs]
                sizes = [layout_bytes(refs) for refs in units]
                arena, seal = host_buffer(max(sum(sizes), 1), pin)
                if pin and on_device([r for refs in units for r in refs]):  # as a Pack of device tensors
                    prefault(arena)
                    seal()
                    seal = lambda: None  # noqa: E731
                starts = [sum(sizes[:i]) for i in range(len(sizes))]
                self.resident = ResidentUnits([Pack(refs, pin, arena[a:a + n])
                                               for refs, a, n in zip(units, starts, sizes)])
                seal()
        return_freed_heap()
        self.streamer: Streamer | None = None
        self.handles: list = []
        self.on_device: torch.Tensor | None = None

    def _hook(self, specs, k0: int) -> list:
        """Forward hooks acquiring / releasing units k0, k0+1, ... (a lazily read block's die with its module)."""
        handles = []
        for j, spec in enumerate(specs):
            k = k0 + j
            handles.append(spec.start.register_forward_pre_hook(lambda m, a, k=k: self.streamer.acquire(k)))
            handles.append(spec.end.register_forward_hook(lambda m, a, o, k=k: self.streamer.release(k)))
        return handles

    def start(self) -> None:
        self.on_device = self.outside.to_device(self.device)
        self.outside.bind(self.on_device)
        if self.lazy is not None:
            source = self.lazy.open(self.granularity, self.pin, self.ahead, self._hook)
        else:
            source = self.resident
            for b, specs in enumerate(self.specs):
                self.handles += self._hook(specs, b * len(specs))
        self.streamer = Streamer(source, self.device, self.buffers)

    def stop(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.streamer.close()
        if self.lazy is not None:
            self.lazy.close(self.streamer.source)
        self.streamer = None
        self.outside.bind_host()
        self.on_device = None


def place(module: nn.Module, mode: str, device: torch.device, buffers: int, pin: bool, ahead: int = 2,
          packed: list[list[Pack]] | None = None):
    """The placement of ``module`` under offload ``mode`` (model | block | phase); ``packed``: its blocks' packs
    made while loading (``pack_units``), for a component whose blocks stream."""
    if mode in ("block", "phase") and streams_blocks(module):
        return BlockOffload(module, mode, device, buffers, pin, ahead, packed)
    return WholeOffload(module, device, pin)
