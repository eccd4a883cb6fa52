"""Packs store each storage once (views of one storage stay views of one span), and pinned host buffers are
page-locked at their exact size, unregistered only after every view and recorded copy is done (CPU: a fake cudart
stands in for CUDA's)."""

from __future__ import annotations

import ctypes
import gc
import threading

import pytest
import torch
from torch import nn

from lightq.errors import LightqError
from lightq.offload import binding
from lightq.offload.binding import ALIGN, PAGE, Pack, layout_bytes, pinned_empty, refs_of
from lightq.offload.placement import BlockOffload, WholeOffload

CPU = torch.device("cpu")


class FusedLike(nn.Module):
    """q/k/v codes as row views of one concatenated buffer (as ``FusedBlock.convert`` leaves them), a scale
    concatenation viewed the same way, and an unrelated weight."""

    def __init__(self, dim: int = 40, k: int = 24):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        data = torch.randint(-128, 127, (3 * dim, k), dtype=torch.int8, generator=g)
        scale = torch.rand(3 * dim, 1, generator=g)
        self.register_buffer("qkv_data", data)
        self.register_buffer("qkv_scale", scale)
        self.parts = nn.ModuleList(nn.Module() for _ in range(3))
        for i, part in enumerate(self.parts):
            part.register_buffer("data", data[i * dim:(i + 1) * dim])
            part.register_buffer("scale", scale[i * dim:(i + 1) * dim])
        self.other = nn.Parameter(torch.randn(7, 5, generator=g), requires_grad=False)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _values(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones included), copied."""
    return {f"{m}.{r.name}": r.get().clone() for m, mod in module.named_modules() for r in refs_of(mod, False)}


def _unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = _values(module)
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in now)


def _assert_fused_views(m: FusedLike, dim: int = 40, k: int = 24) -> None:
    """Each part's tensors are views at their row offset in the concatenations (pointer arithmetic)."""
    for i, part in enumerate(m.parts):
        assert part.data.data_ptr() == m.qkv_data.data_ptr() + i * dim * k
        assert part.scale.data_ptr() == m.qkv_scale.data_ptr() + i * dim * 4
        assert part.data.untyped_storage().data_ptr() == m.qkv_data.untyped_storage().data_ptr()


def test_views_of_one_storage_are_stored_once_and_still_alias():
    m = FusedLike()
    before = _values(m)
    refs = refs_of(m)
    # the concatenations once each (120 x 24 int8, 120 fp32) and the other weight; the six views add nothing
    assert layout_bytes(refs) == _aligned(120 * 24) + _aligned(120 * 4) + _aligned(7 * 5 * 4)
    pack = Pack(refs)
    assert pack.nbytes == layout_bytes(refs)
    assert _unchanged(m, before)
    _assert_fused_views(m)
    assert m.qkv_data.untyped_storage().data_ptr() == pack.host.untyped_storage().data_ptr()
    # a write through the flat buffer is seen by the concatenation and by the view
    at = m.parts[1].data.data_ptr() - pack.host.data_ptr() + 3
    pack.host[at] = pack.host[at] ^ 0x55
    assert m.parts[1].data.view(-1)[3] == m.qkv_data[40:80].reshape(-1)[3] != before["parts.1.data"].view(-1)[3]


def test_shared_storage_round_trips_bit_identical_through_a_device_copy():
    m = FusedLike()
    before = _values(m)
    pack = Pack(refs_of(m))
    device_copy = pack.to_device(CPU)
    assert device_copy.data_ptr() != pack.host.data_ptr()
    pack.bind(device_copy)
    assert m.qkv_data.untyped_storage().data_ptr() == device_copy.untyped_storage().data_ptr()
    _assert_fused_views(m)
    assert _unchanged(m, before)
    pack.bind_host()
    _assert_fused_views(m)
    assert m.qkv_data.untyped_storage().data_ptr() == pack.host.untyped_storage().data_ptr()
    assert _unchanged(m, before)


def test_layout_is_deterministic():
    a, b = Pack(refs_of(FusedLike())), Pack(refs_of(FusedLike()))
    assert a.entries == b.entries and a.nbytes == b.nbytes
    assert all(torch.equal(x, y) for x, y in zip(a.views(a.host), b.views(b.host)))


def test_views_are_shared_only_when_that_saves_bytes():
    m = nn.Module()
    m.register_buffer("alone", torch.randn(1000, 64)[5:7])  # the only user of its storage in the pack
    wide = torch.randn(1000, 64)
    m.register_buffer("first", wide[:1])  # two far-apart users: their span would outweigh them
    m.register_buffer("last", wide[-1:])
    m.register_buffer("expanded", torch.randn(1, 64).expand(50, 64))
    before = _values(m)
    pack = Pack(refs_of(m))
    assert pack.nbytes == _aligned(2 * 64 * 4) + 2 * _aligned(64 * 4) + _aligned(50 * 64 * 4)
    assert _unchanged(m, before)
    assert m.expanded.is_contiguous() and m.first.untyped_storage().nbytes() == pack.host.numel()


def test_mixed_dtype_views_of_one_storage_keep_their_byte_offsets():
    raw = torch.arange(64, dtype=torch.uint8)
    m = nn.Module()
    m.register_buffer("bytes", raw)
    m.register_buffer("words", raw[8:40].view(torch.float32))  # bytes 8 .. 40 read as 8 floats
    m.register_buffer("odd", raw[3:5])
    before = _values(m)
    pack = Pack(refs_of(m))
    assert pack.nbytes == _aligned(64)
    assert _unchanged(m, before)
    assert m.words.data_ptr() == m.bytes.data_ptr() + 8 and m.odd.data_ptr() == m.bytes.data_ptr() + 3


def test_fused_dit_block_packs_its_qkv_once_and_runs_the_same():
    from lightq.backends.registry import specs
    from lightq.backends.triton_backend import TritonBackend
    from lightq.checkpoints.loader import load_component
    from lightq.fused.wan_block import fuse_dit_blocks
    from lightq.models.family import QUANTIZABLE
    from lightq.models.wan_dit import DiTArch, WanDiT
    from lightq.quant.method import QuantMethod

    arch = DiTArch(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_dim=128)
    model = load_component(lambda: WanDiT(arch), "random", include=QUANTIZABLE["dit"],
                           method=QuantMethod("int8", TritonBackend(specs()["triton"])), dtype=torch.bfloat16,
                           progress=False)
    assert fuse_dit_blocks(model) == 2
    before = _values(model)
    attn = model.blocks[0].self_attn
    qkv = attn.qkv_data.numel() + attn.qkv_scale.numel() * 4
    separate = sum(_aligned(r.get().numel() * r.get().element_size()) for r in refs_of(model.blocks[0]))
    offload = BlockOffload(model, "block", CPU, buffers=2, pin=False)
    block_pack = offload.resident.packs[0]
    assert separate - block_pack.nbytes >= qkv  # the q/k/v codes and scales are not stored a second time
    for block in model.blocks:
        a = block.self_attn
        assert a.q.data.data_ptr() == a.qkv_data.data_ptr()
        assert a.v.scale.data_ptr() == a.qkv_scale.data_ptr() + 2 * arch.dim * 4
    assert _unchanged(model, before)


def test_pinned_empty_without_cuda_is_ordinary_memory_of_the_exact_size(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for pin in (False, True):
        buf = pinned_empty(12345, pin)
        assert buf.dtype == torch.uint8 and buf.shape == (12345,) and buf.device == CPU
        assert buf.untyped_storage().nbytes() == 12345 and not buf.is_pinned()


class FakeCudart:
    """Records cudaHostRegister / cudaHostUnregister; at unregister checks the memory is still mapped and holds
    what was written (a read of freed, unmapped memory would crash the test)."""

    def __init__(self, rc: int = 0):
        self.rc, self.registered, self.unregistered, self.log = rc, {}, [], []
        self.on_register = lambda ptr, nbytes: None

    def cudaHostRegister(self, ptr, nbytes, flags):
        assert flags == binding.HOST_REGISTER_PORTABLE
        self.on_register(ptr, nbytes)
        self.registered[ptr] = nbytes
        return self.rc

    def cudaHostUnregister(self, ptr):
        nbytes = self.registered[ptr]
        self.unregistered.append((ptr, ctypes.string_at(ptr, 1), ctypes.string_at(ptr + nbytes - 1, 1)))
        self.log.append("unregister")
        return 0


class FakeEvent:
    def __init__(self, log):
        self.log = log

    def synchronize(self):
        self.log.append("copy done")


@pytest.fixture()
def cudart(monkeypatch):
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(binding, "_cudart", lambda: fake)
    yield fake
    gc.collect()  # every buffer the fake registered dies while it still stands in for cudart
    assert not binding._PINNED, "a fake-pinned buffer outlived its test"


def test_pinned_empty_registers_exactly_and_unregisters_after_the_last_view(cudart):
    nbytes = 64 << 20  # above malloc's mmap threshold: freed memory is unmapped, so a late read would crash
    buf = pinned_empty(nbytes)
    ptr = buf.data_ptr()
    assert cudart.registered == {ptr: nbytes} and ptr % PAGE == 0
    assert buf.shape == (nbytes,) and buf.dtype == torch.uint8
    buf[0], buf[-1] = 7, 9
    binding._PINNED[ptr].reads["side stream"] = FakeEvent(cudart.log)  # a copy from it was issued
    tail = buf[-10:]
    del buf
    gc.collect()
    assert cudart.unregistered == [] and ptr in binding._PINNED  # a view still lives
    del tail
    gc.collect()
    assert cudart.unregistered == [(ptr, b"\x07", b"\x09")]
    assert cudart.log == ["copy done", "unregister"] and ptr not in binding._PINNED


def test_failed_registration_is_one_clear_error(cudart):
    cudart.rc = 2
    with pytest.raises(LightqError, match=r"cannot page-lock .*cudaHostRegister error 2.*offload.pin_memory=false"):
        pinned_empty(1 << 20)
    assert not binding._PINNED


def test_offload_pins_each_buffer_at_its_exact_size(cudart):
    m = nn.Sequential(nn.Linear(16, 48), nn.Linear(48, 8))
    whole = WholeOffload(m, CPU, pin=True)
    assert cudart.registered == {whole.pack.host.data_ptr(): layout_bytes(refs_of(m))}

    model = _tiny_dit()
    offload = BlockOffload(model, "phase", CPU, buffers=2, pin=True)
    sizes = sorted(n for ptr, n in cudart.registered.items() if ptr != whole.pack.host.data_ptr())
    arena = sum(p.nbytes for p in offload.resident.packs)
    assert sizes == sorted([arena, offload.outside.nbytes]), "one arena for the blocks, one buffer outside"
    del whole, m, offload, model


@pytest.mark.parametrize("placement", ["whole", "block"])
def test_packs_are_page_locked_only_once_filled(cudart, placement):
    """Page-locking commits every page at once: registering a pack before it is filled would hold the whole pack
    resident beside the model's originals (host memory twice the model). At each registration every tensor of the
    module must already live in the registered range (its original freed)."""
    model = _tiny_dit()
    tensors = [t for _, t in list(model.named_parameters()) + list(model.named_buffers())]
    seen = []

    def inside(ptr, nbytes):
        seen.append(sum(ptr <= t.data_ptr() < ptr + nbytes
                        for _, t in list(model.named_parameters()) + list(model.named_buffers())))

    cudart.on_register = inside
    placed = WholeOffload(model, CPU, pin=True) if placement == "whole" else BlockOffload(model, "block", CPU, 2, True)
    assert seen and all(seen), f"a buffer was page-locked before any tensor was copied into it: {seen}"
    assert sum(seen) == len(tensors), "every tensor lives in exactly one buffer when that buffer is page-locked"
    del placed, model, tensors


def _tiny_dit():
    from lightq.models.wan_dit import DiTArch, random_dit

    return random_dit(DiTArch(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=64), "cpu")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "malloc_trim"), reason="needs glibc (malloc_trim)")
def test_packing_leaves_no_copy_of_the_model_in_the_heap():
    """Heap-sized tensors (below glibc's mmap threshold) with other live data between them: once packed, their
    freed chunks go back to the OS, so the resident set grows by the pack alone, not pack + model."""
    big = torch.empty(30 << 20, dtype=torch.uint8)
    big.fill_(1)
    del big  # freeing an mmapped 30 MiB chunk raises glibc's mmap threshold: 4 MiB tensors become heap chunks
    before = _rss()
    m, others = nn.Module(), []
    for i in range(64):
        m.register_buffer(f"b{i}", torch.ones(1 << 20))
        others.append(torch.ones(256))
    whole = WholeOffload(m, CPU, pin=False)
    grown = _rss() - before
    assert whole.pack.nbytes == 256 << 20
    assert grown < (256 + 64) << 20, f"the resident set grew by {grown >> 20} MiB for a 256 MiB pack"


def _resident_pages(buf: torch.Tensor) -> tuple[int, int]:
    """(how many of the pages ``buf`` spans are in memory, how many it spans) by ``mincore``: an anonymous page is
    in memory only once written."""
    libc = ctypes.CDLL(None, use_errno=True)
    start = buf.data_ptr() // PAGE * PAGE
    length = buf.data_ptr() + buf.numel() - start
    pages = -(-length // PAGE)
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec) == 0
    return sum(v & 1 for v in vec), pages


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mincore"), reason="needs mincore (Linux)")
def test_prefault_maps_every_page():
    buf = torch.empty(33 << 20, dtype=torch.uint8)  # above glibc's largest mmap threshold: a fresh mapping
    resident, pages = _resident_pages(buf)
    assert resident < pages // 2  # untouched, but for malloc's header
    binding.prefault(buf)
    assert _resident_pages(buf) == (pages, pages)


def test_host_buffers_are_made_ahead_and_prefaulted_once(cudart, monkeypatch):
    """``take`` page-locks buffers of exactly the asked sizes, each prefaulted before it is locked; the next
    ``take`` of the same sizes gets the ones made (and prefaulted) ahead on the background thread; other sizes are
    made at once (what was made ahead is dropped, never locked); an error on the thread is raised by the next
    call."""
    made, faulted = [], []  # (buffer, thread name); holding every buffer keeps their addresses distinct
    real = binding.host_buffer

    def recording(nbytes, pin=True):
        buf, seal = real(nbytes, pin)
        made.append((buf, threading.current_thread().name))

        def recorded_seal():
            assert any(b is buf for b, _ in faulted), "page-locked before it was prefaulted"
            seal()
        return buf, recorded_seal

    def prefault(buf):
        assert not any(b is buf for b, _ in faulted), "prefaulted twice"
        faulted.append((buf, threading.current_thread().name))

    def where(records, buf):
        return next(name for b, name in records if b.data_ptr() == buf.data_ptr())

    monkeypatch.setattr(binding, "host_buffer", recording)
    monkeypatch.setattr(binding, "prefault", prefault)
    sizes = [3 << 20, 5 << 20]
    main = threading.current_thread().name
    hb = binding.HostBuffers(pin=True)
    first = hb.take(sizes)
    assert [b.numel() for b in first] == sizes and all(cudart.registered[b.data_ptr()] == b.numel() for b in first)
    assert all(where(made, b) == where(faulted, b) == main for b in first)
    second = hb.take(sizes)
    assert [b.numel() for b in second] == sizes
    assert all(where(made, b) == where(faulted, b) == "lightq-host-buffers" for b in second)
    third = hb.take([7 << 20])
    assert where(made, third[0]) == main and third[0].numel() == 7 << 20
    registered = set(cudart.registered)
    hb.close()
    assert set(cudart.registered) == registered == {b.data_ptr() for b in (*first, *second, *third)}
    del made, faulted

    def failing(nbytes, pin=True):
        if threading.current_thread().name == "lightq-host-buffers":
            raise MemoryError("no room")
        return real(nbytes, pin)

    monkeypatch.setattr(binding, "host_buffer", failing)
    monkeypatch.setattr(binding, "prefault", lambda buf: None)  # freed buffers' addresses come back
    hb = binding.HostBuffers(pin=True)
    hb.take([1 << 20])
    with pytest.raises(MemoryError, match="no room"):
        hb.take([1 << 20])
    del first, second, third, hb
