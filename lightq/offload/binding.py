"""Where a module's tensors live: one flat byte buffer per group of tensors, and re-binding without copying.

A ``Pack`` lays a group of tensors (parameters and buffers of some modules, ``TensorRef``s) back to back in one
flat ``uint8`` buffer, each at an offset aligned to ``ALIGN`` bytes, keeping its dtype, shape and strides.
``views(flat)`` reads the same layout out of any flat buffer of at least ``nbytes`` bytes, so moving a whole
group to the device is one copy of its flat buffer, and ``bind(flat)`` points the modules at those views.
Weights are immutable during inference, so going back to the host is a re-bind to ``host``, never a copy.

Tensors that are views of one storage (the fused DiT block's q/k/v codes and their concatenation) are laid out
once: the bytes of that storage that they use form one span, and each is re-bound as a view into it with its own
offset, shape and strides, so they still alias each other and the storage is stored (and copied) once.

Packing is incremental: each tensor (or shared span) is copied into the host buffer and its module re-bound to the
copy before the next one is read, so peak host memory grows by one tensor, not one group.

Pinned host buffers come from ``host_buffer``: ordinary memory page-locked in place at its exact size (PyTorch's
``pin_memory=True`` allocator rounds each allocation up to a power of two: just over 16 GiB would pin 32 GiB). A
pack of host tensors is page-locked once filled (locking commits every page: before the fill, host memory would
hold the originals and the whole pack); a pack of tensors that are all on a CUDA device is prefaulted
(``prefault``), page-locked, then filled by asynchronous device -> pinned copies (DMA, straight into the pack: one
crossing per byte, no pageable staging), the device tensors freed as they are re-bound. ``HostBuffers`` makes the buffers of a component packed
block by block ahead, on a thread, so the page faults of fresh memory overlap the making of the next block.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from ..errors import LightqError

ALIGN = 256  # bytes: above every dtype's size and CUDA's 16-byte vector / GEMM operand alignment
PAGE = 4096  # bytes: pinned buffers start on a page boundary
HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable
log = logging.getLogger(__name__)


@dataclass
class _Pinned:
    """A live ``cudaHostRegister`` of ``nbytes`` at ``ptr``; ``reads`` holds, per CUDA stream, the event recorded
    after the latest copy out of it (``note_read``)."""

    ptr: int
    nbytes: int
    reads: dict = field(default_factory=dict)


_PINNED: dict[int, _Pinned] = {}  # by start address


def _cudart():
    return torch.cuda.cudart()


def host_buffer(nbytes: int, pin: bool = True) -> tuple[torch.Tensor, Callable[[], None]]:
    """``nbytes`` of uninitialised ``uint8`` host memory and ``seal``, which page-locks it in place at exactly that
    size when ``pin`` (and CUDA is available; otherwise ``seal`` does nothing and the memory stays ordinary).

    The memory is a numpy allocation, untouched until written, starting on a page boundary. Page-locking faults in
    and locks every page at once, so a pack of host tensors is filled first (each original tensor freed as it is
    copied) and sealed after: host memory then peaks at the pack plus one tensor, not the pack plus the whole
    model (a pack filled from the device is sealed first: ``Pack``). ``seal`` registers
    it with ``cudaHostRegister`` (portable: page-locked for every device's context, not only the current one); it
    stays registered while any view of it lives; when the last one dies, numpy's array finalizer (which runs before
    numpy frees the data) waits for the copies recorded by ``note_read``, then unregisters it, so the memory is
    never freed while registered or while a copy from it may be in flight.
    """
    if not (pin and nbytes > 0 and torch.cuda.is_available()):
        return torch.empty(nbytes, dtype=torch.uint8), lambda: None
    base = np.empty(nbytes + PAGE, dtype=np.uint8)
    start = -base.ctypes.data % PAGE
    buf = torch.from_numpy(base[start:start + nbytes])

    def seal() -> None:
        ptr = buf.data_ptr()
        rc = int(_cudart().cudaHostRegister(ptr, nbytes, HOST_REGISTER_PORTABLE))
        if rc != 0:
            raise LightqError(f"cannot page-lock {nbytes / 2**30:.2f} GiB of host memory (cudaHostRegister error "
                              f"{rc}): free host memory or run with offload.pin_memory=false")
        record = _PINNED[ptr] = _Pinned(ptr, nbytes)
        weakref.finalize(base, _unpin, record).atexit = False  # at exit the CUDA context may be gone already
    return buf, seal


def prefault(buf: torch.Tensor) -> None:
    """Write one byte of every page of ``buf``, which holds nothing yet: its memory is mapped now, by user-space
    page faults (which take the huge pages numpy asks for), so page-locking it after is about twice as fast as
    ``cudaHostRegister`` faulting untouched memory in itself (docs/BENCHMARKS.md, issue 12's offload load)."""
    buf[::PAGE].zero_()
    buf[-1:].zero_()  # the last page, where ``buf`` does not start on a page boundary


def pinned_empty(nbytes: int, pin: bool = True) -> torch.Tensor:
    """``host_buffer`` page-locked at once (for buffers that are written by device copies, not filled by packing)."""
    buf, seal = host_buffer(nbytes, pin)
    seal()
    return buf


class HostBuffers:
    """Host buffers for packs filled from the device one group after another (a component packed block by block
    as it loads). ``take(sizes)`` returns buffers of exactly those sizes, page-locked when ``pin``, and starts a
    thread making the same sizes for the next call with every page already written: the page faults and zeroing
    of fresh memory, most of what page-locking it costs, then happen while the device makes the next group, and
    ``take`` only locks resident pages. A size not made ahead is made (and ``prefault``ed) at once. ``close``
    waits for the thread and drops what it made (host memory holds one group more while loading)."""

    def __init__(self, pin: bool):
        self.pin = pin
        self._ahead: _Ahead | None = None

    def take(self, sizes: list[int]) -> list[torch.Tensor]:
        ready = self._collect()
        out = []
        for n in sizes:
            i = next((j for j, (buf, _) in enumerate(ready) if buf.numel() == n), None)
            if i is not None:
                buf, seal = ready.pop(i)
            else:
                buf, seal = host_buffer(n, self.pin)
                prefault(buf)
            seal()
            out.append(buf)
        del ready
        self._ahead = _Ahead(sizes, self.pin)
        return out

    def close(self) -> None:
        self._collect()

    def _collect(self) -> list[tuple[torch.Tensor, Callable[[], None]]]:
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return []
        ahead.join()
        if ahead.error is not None:
            raise ahead.error
        return ahead.made


class _Ahead(threading.Thread):
    """``host_buffer``s of ``sizes``, each prefaulted (``made``), on a daemon thread."""

    def __init__(self, sizes: list[int], pin: bool):
        super().__init__(name="lightq-host-buffers", daemon=True)
        self.sizes, self.pin = sizes, pin
        self.made: list[tuple[torch.Tensor, Callable[[], None]]] = []
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            for n in self.sizes:
                buf, seal = host_buffer(n, self.pin)
                prefault(buf)
                self.made.append((buf, seal))
        except BaseException as exc:  # raised by the next take / close, in the loading thread
            self.error = exc


def _unpin(record: _Pinned) -> None:
    for done in record.reads.values():
        done.synchronize()
    _PINNED.pop(record.ptr, None)
    rc = int(_cudart().cudaHostUnregister(record.ptr))
    if rc != 0:
        log.warning("cudaHostUnregister of %d bytes at %#x failed with error %d", record.nbytes, record.ptr, rc)


def return_freed_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc's ``malloc_trim``; nothing elsewhere).

    After packing, the model's original tensors are freed, but those below glibc's mmap threshold (32 MiB at
    most: most of a quantized DiT's codes) were heap chunks, and glibc keeps freed heap pages resident: without
    this, the model's first copy stays in host memory beside its pack."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def note_read(src: torch.Tensor, stream) -> None:
    """The copy just issued on CUDA ``stream`` reads ``src``: if ``src`` lies in ``pinned_empty`` memory, that
    memory is kept allocated and registered until the copy is done."""
    record = _PINNED.get(src.untyped_storage().data_ptr())
    if record is not None:
        done = torch.cuda.Event()
        done.record(stream)
        record.reads[stream.cuda_stream] = done


@dataclass(frozen=True)
class TensorRef:
    """Parameter or buffer ``name`` of module ``owner``."""

    owner: nn.Module
    name: str
    is_param: bool

    def get(self) -> torch.Tensor:
        return (self.owner._parameters if self.is_param else self.owner._buffers)[self.name]

    def set(self, t: torch.Tensor) -> None:
        if self.is_param:
            self.owner._parameters[self.name] = nn.Parameter(t, requires_grad=False)
        else:
            self.owner._buffers[self.name] = t


def refs_of(module: nn.Module, recurse: bool = True) -> list[TensorRef]:
    """Every parameter and buffer of ``module`` (its own only when ``recurse`` is False), in a fixed order."""
    mods = module.modules() if recurse else [module]
    refs = []
    for m in mods:
        refs += [TensorRef(m, n, True) for n, p in m._parameters.items() if p is not None]
        refs += [TensorRef(m, n, False) for n, b in m._buffers.items() if b is not None]
    return refs


def refs_outside(module: nn.Module, excluded: Iterable[nn.Module]) -> list[TensorRef]:
    """The parameters and buffers of ``module`` that do not belong to any module in ``excluded``."""
    skip = {id(m) for e in excluded for m in e.modules()}
    return [r for m in module.modules() if id(m) not in skip for r in refs_of(m, recurse=False)]


@dataclass(frozen=True)
class _Entry:
    offset: int  # byte offset of the tensor's first element in the flat buffer
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    extent: int  # elements spanned from its first element


@dataclass(frozen=True)
class _Span:
    """Bytes ``[lo, lo + nbytes)`` of one storage, used by the refs ``members``, stored at ``offset``."""

    offset: int
    lo: int
    nbytes: int
    members: tuple[int, ...]


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _dense_strides(t: torch.Tensor) -> bool:
    """True when ``t`` covers its span exactly once (contiguous up to a permutation of its dims)."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(order).is_contiguous()


def _extent(t: torch.Tensor) -> int:
    """Elements from ``t``'s first element to just past its last one in its storage."""
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0


def _entry(t: torch.Tensor, offset: int) -> _Entry:
    if t.numel() and not _dense_strides(t):  # expanded / overlapping views are stored contiguous
        t = t.contiguous()
    return _Entry(offset, t.dtype, tuple(t.shape), tuple(t.stride()), t.numel())


def _shared_storages(tensors: list[torch.Tensor]) -> dict[tuple, tuple[int, int, list[int]]]:
    """Storages used by several of ``tensors`` and worth storing once: key -> (lo, hi, indices), where bytes
    ``[lo, hi)`` (``lo`` rounded down to ``ALIGN``) cover every use. A storage is shared only when its span is no
    larger than its tensors stored apart, so one small view never drags in a big storage."""
    uses = defaultdict(list)
    for i, t in enumerate(tensors):
        if t.numel():
            uses[(t.device, t.untyped_storage().data_ptr())].append(i)
    shared = {}
    for key, idx in uses.items():
        if len(idx) < 2:
            continue
        first = [tensors[i].storage_offset() * tensors[i].element_size() for i in idx]
        lo = min(first) // ALIGN * ALIGN
        hi = max(f + _extent(tensors[i]) * tensors[i].element_size() for f, i in zip(first, idx))
        apart = sum(_aligned(tensors[i].numel() * tensors[i].element_size()) for i in idx)
        if _aligned(hi - lo) <= apart:
            shared[key] = (lo, hi, idx)
    return shared


def _layout(refs: list[TensorRef]) -> tuple[list[_Entry], list[_Span], int]:
    """Every ref's entry, the shared spans, and the total bytes: in ref order, each tensor alone in its storage
    (within this group) at the next aligned offset, each shared storage's span where its first ref comes."""
    tensors = [ref.get() for ref in refs]
    shared = _shared_storages(tensors)
    span_of = {i: key for key, (_, _, idx) in shared.items() for i in idx}
    entries: list[_Entry] = []
    spans: dict[tuple, _Span] = {}
    offset = 0
    for i, t in enumerate(tensors):
        key = span_of.get(i)
        if key is None:
            e = _entry(t, offset)
            offset += _aligned(e.extent * e.dtype.itemsize)
        else:
            if key not in spans:
                lo, hi, idx = shared[key]
                spans[key] = _Span(offset, lo, hi - lo, tuple(idx))
                offset += _aligned(hi - lo)
            span = spans[key]
            e = _Entry(span.offset + t.storage_offset() * t.element_size() - span.lo, t.dtype, tuple(t.shape),
                       tuple(t.stride()), _extent(t))
        entries.append(e)
    return entries, list(spans.values()), offset


def layout_bytes(refs: list[TensorRef]) -> int:
    """Bytes a ``Pack`` of ``refs`` occupies (a multiple of ``ALIGN``; each shared storage counted once)."""
    return _layout(refs)[2]


def on_device(refs: list[TensorRef]) -> bool:
    """True when ``refs`` name tensors and every one is on a CUDA device (their pack is page-locked first)."""
    return bool(refs) and all(ref.get().is_cuda for ref in refs)


def _storage_bytes(t: torch.Tensor, lo: int, nbytes: int) -> torch.Tensor:
    """Bytes ``[lo, lo + nbytes)`` of ``t``'s storage as a ``uint8`` tensor."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage(), lo, (nbytes,))


class Pack:
    """A group of tensors in one flat host buffer (``host``); the modules are bound to it.

    ``host`` is a new buffer (``host_buffer``), or the given ``arena`` slice of at least ``layout_bytes(refs)``
    bytes (one allocation for many packs; its owner seals it). A new buffer is page-locked when ``pin``: after it
    is filled when any tensor comes from host memory (fill then seal: host memory holds one copy of each tensor,
    never the tensors and the whole locked pack), before it is filled when every tensor is on a CUDA device
    (nothing on the host to free first, and each tensor then crosses once, by DMA, into its final place). Device
    tensors are freed as they are bound to their copies; the constructor returns once the copies are done.
    """

    def __init__(self, refs: list[TensorRef], pin: bool = False, arena: torch.Tensor | None = None):
        self.refs = list(refs)
        self.entries, spans, self.nbytes = _layout(self.refs)
        on_cuda = {ref.get().device for ref in self.refs if ref.get().is_cuda}
        from_device = on_device(self.refs)
        seal = lambda: None  # noqa: E731
        if arena is None:
            self.host, seal = host_buffer(max(self.nbytes, 1), pin)
        else:
            self.host = arena
        if from_device:
            if pin and arena is None:
                prefault(self.host)
            seal()
            seal = lambda: None  # noqa: E731
        views = self.views(self.host)
        span_at = {i: span for span in spans for i in span.members}
        for i, ref in enumerate(self.refs):  # each copy is bound at once: the original can be freed
            span = span_at.get(i)
            if span is None:
                views[i].copy_(ref.get(), non_blocking=True)
                ref.set(views[i])
            elif i == span.members[0]:
                self.host[span.offset:span.offset + span.nbytes].copy_(_storage_bytes(ref.get(), span.lo,
                                                                                      span.nbytes),
                                                                       non_blocking=True)
                for j in span.members:
                    self.refs[j].set(views[j])
        for device in on_cuda:  # device -> host copies are asynchronous into page-locked memory
            torch.cuda.current_stream(device).synchronize()
        seal()

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for e in self.entries:
            raw = flat[e.offset:e.offset + e.extent * e.dtype.itemsize].view(e.dtype)
            out.append(raw.as_strided(e.shape, e.stride))
        return out

    def bind(self, flat: torch.Tensor) -> None:
        """Point every module tensor of the group at its view of ``flat`` (``host`` or a device copy of it)."""
        for ref, view in zip(self.refs, self.views(flat)):
            ref.set(view)

    def bind_host(self) -> None:
        self.bind(self.host)

    def to_device(self, device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
        """The flat buffer copied to ``device`` (into ``out`` when given; non-blocking from pinned memory, which
        then stays alive until the copy is done: ``note_read``)."""
        if out is None:
            out = torch.empty(max(self.nbytes, 1), dtype=torch.uint8, device=device)
        out[:self.nbytes].copy_(self.host[:self.nbytes], non_blocking=True)
        if out.is_cuda:
            note_read(self.host, torch.cuda.current_stream(out.device))
        return out
