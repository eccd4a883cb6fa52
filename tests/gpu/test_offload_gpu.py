"""Offload on CUDA: bit-identical latents to offload=none on the tiny models, asynchronous streaming (no global
synchronize per block, pinned host memory), less peak GPU memory with block streaming than without, pinned
buffers page-locked at their exact size, the fused triton block streamed with its q/k/v views intact, packs of
device tensors page-locked before their DMA fill, and a DiT loaded for block offload one block at a time on the GPU
and once on the host.

Run on the GPU machine: ``python -m pytest tests/gpu/test_offload_gpu.py -q -n 0``. Skipped without CUDA.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from lightq import hardware, plan
from lightq.checkpoints.conversion import convert
from lightq.config import OffloadConfig
from lightq.convert import open_component_source
from lightq.models.wan_dit import DiTArch, random_dit
from lightq.pipeline import components as C

from .conftest import DEV, GPU, compose_job, latents_of

pytestmark = GPU


@pytest.fixture(scope="module")
def cfg_of():
    yield from compose_job("model.frames=5", "sampler.steps=2")


@pytest.mark.parametrize("model", ["tiny", "tiny-i2v"])
@pytest.mark.parametrize("mode", ["none", "fp8-torch", "int8-torch"])
def test_latents_bit_identical_on_cuda(cfg_of, tmp_path, model, mode):
    common = [f"model={model}", f"dit_quant={mode}", f"t5_quant={mode}"]
    reference = latents_of(cfg_of(*common))
    variants = [["offload=model"], ["offload=block"], ["offload=phase"], ["offload=block", "offload.buffers=1"]]
    if mode != "none":
        split = convert(open_component_source(model, "dit"), component="dit", scheme=mode.split("-")[0],
                        output=tmp_path / "blocks", layout="blocks", progress=False)
        variants += [["offload=block", "offload.lazy_load=true", f"dit_quant.ckpt={split}"],
                     ["offload=phase", "offload.lazy_load=true", f"dit_quant.ckpt={split}"]]
    for v in variants:
        assert torch.equal(latents_of(cfg_of(*common, *v)), reference), f"{v} changed the latents"


def streamed_dit(layers: int, dim: int = 512, ffn: int = 2048):
    arch = DiTArch(dim=dim, ffn_dim=ffn, num_heads=8, num_layers=layers, text_dim=dim)
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 16, 3, 16, 16, generator=g), torch.tensor([600.0]), torch.randn(1, 12, dim, generator=g))
    return random_dit(arch, "cpu"), tuple(t.to(DEV) for t in inputs)


def test_block_offload_never_synchronizes_per_block(monkeypatch):
    dit, inputs = streamed_dit(layers=8)
    offload = C.Offload(OffloadConfig(mode="block", buffers=2), DEV)
    calls = []
    real_sync = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: (calls.append(1), real_sync(*a, **k))[1])
    with offload.active(dit):
        out = dit(*inputs)
        out = dit(*inputs)
    offload.release(dit)
    assert calls == [], f"torch.cuda.synchronize called {len(calls)} times while streaming 8 blocks"
    placement = offload._placement(dit)
    assert all(p.host.is_pinned() for p in placement.resident.packs)
    assert placement.outside.host.is_pinned()
    monkeypatch.undo()
    resident, _ = streamed_dit(layers=8)
    assert torch.equal(out, resident.to(DEV)(*inputs))


@pytest.mark.parametrize("mode", ["block", "phase"])
def test_block_offload_peak_memory_below_no_offload(mode):
    def peak(offload_mode: str) -> int:
        dit, inputs = streamed_dit(layers=12, dim=1024, ffn=4096)
        offload = C.Offload(OffloadConfig(mode=offload_mode), DEV)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if offload_mode == "none":
            dit = dit.to(DEV)
        with offload.active(dit):
            dit(*inputs)
        offload.release(dit)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    none, streamed = peak("none"), peak(mode)
    # 12 blocks of ~17M bf16 parameters (~32 MiB each): streaming holds 2 of them
    assert streamed < none / 2, f"offload={mode} peak {streamed / 2**20:.0f} MiB vs none {none / 2**20:.0f} MiB"


def test_model_offload_moves_pinned_copies():
    dit, inputs = streamed_dit(layers=2)
    offload = C.Offload(OffloadConfig(mode="model"), DEV)
    with offload.active(dit):
        assert dit.blocks[0].ffn[0].weight.is_cuda
        out = dit(*inputs)
    offload.release(dit)
    assert not dit.blocks[0].ffn[0].weight.is_cuda and offload._placement(dit).pack.host.is_pinned()
    resident, _ = streamed_dit(layers=2)
    assert torch.equal(out, resident.to(DEV)(*inputs))


def _tensors(model) -> list[torch.Tensor]:
    return [t for t in [*model.parameters(), *model.buffers()] if t.numel()]


@pytest.mark.parametrize("placement", ["whole", "block", "phase"])
def test_packs_of_device_tensors_are_page_locked_first_and_filled_by_dma(monkeypatch, placement):
    """A module on the GPU, packed: each host buffer is page-locked before any tensor is copied in (the copies go
    device -> pinned, straight into the pack), the module then lives in pinned host memory only, the device
    memory it held is freed, and it runs bit-identical to the resident module."""
    from lightq.offload import binding
    from lightq.offload.placement import BlockOffload, WholeOffload

    dit, inputs = streamed_dit(layers=4)
    with torch.no_grad():
        reference = copy.deepcopy(dit).to(DEV)(*inputs)
    model = dit.to(DEV)
    real, inside = binding._cudart(), []

    class Recording:  # cudart, noting at each registration how many module tensors already live in the range
        def __getattr__(self, name):
            return getattr(real, name)

        def cudaHostRegister(self, ptr, nbytes, flags):
            inside.append(sum(ptr <= t.data_ptr() < ptr + nbytes for t in _tensors(model)))
            return real.cudaHostRegister(ptr, nbytes, flags)

    monkeypatch.setattr(binding, "_cudart", Recording)
    torch.cuda.synchronize()
    before, held = torch.cuda.memory_allocated(), sum(t.numel() * t.element_size() for t in _tensors(model))
    placed = WholeOffload(model, DEV, True) if placement == "whole" else BlockOffload(model, placement, DEV, 2, True)
    assert inside and not any(inside), f"a buffer was page-locked after tensors were copied into it: {inside}"
    assert all(not t.is_cuda and t.is_pinned() for t in _tensors(model))
    assert torch.cuda.memory_allocated() <= before - 0.99 * held, "the device tensors were not freed"
    placed.start()
    with torch.no_grad():
        out = model(*inputs)
    placed.stop()
    assert torch.equal(out, reference)


def _peak_rss_during(fn):
    """(fn's result, the resident set's peak while it ran, sampled every millisecond)."""
    import threading

    peak, done = [_rss()], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            done.wait(0.001)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        out = fn()
    finally:
        done.set()
        watcher.join()
    return out, max(peak[0], _rss())


FAST_DIT_MODES = ["none", "fp8-triton", "int8-triton", "fp8-vllm", "fp8-sgl"]


def _backend_or_skip(mode: str) -> None:
    from lightq.backends.registry import specs
    from lightq.hardware import detect

    if mode == "none":
        return
    backend = mode.split("-", 1)[1]
    found = specs().get(backend)
    ok, why = found.is_available(detect()) if found is not None else (False, f"no backend '{backend}' installed")
    if not ok:
        pytest.skip(f"dit_quant={mode}: {why}")


@pytest.fixture(scope="module")
def cfg_13b():
    yield from compose_job("model=wan2.1-t2v-1.3b", "model.weights=random", "model.frames=5", "sampler.steps=1")


@pytest.mark.parametrize("mode", FAST_DIT_MODES)
def test_every_offload_mode_matches_no_offload_at_1_3b(cfg_13b, tmp_path, mode):
    """Wan2.1-1.3B (random weights, 5 frames, one step): offload model / block / phase / block + lazy_load give the
    latents of offload=none bit for bit with every fast DiT mode (the same kernels on the same data; the fused
    triton block included, whose phases are calls of its own sub-modules)."""
    from lightq.bench.offload import write_block_split

    _backend_or_skip(mode)
    common = [f"dit_quant={mode}"]
    cfg = cfg_13b(*common)
    reference = latents_of(cfg)
    hw = hardware.resolve(cfg.hardware.name)
    method = C.quant_methods(cfg, plan.plan_run(cfg, hw))["dit"]
    dit = C.load_dit(cfg, method, None, DEV, torch.bfloat16, False)
    split = write_block_split(dit, tmp_path / "blocks", None if mode == "none" else mode.split("-")[0])
    del dit
    for v in (["offload=model"], ["offload=block"], ["offload=phase"],
              ["offload=block", "offload.lazy_load=true", f"dit_quant.ckpt={split}"]):
        got = latents_of(cfg_13b(*common, *v))
        assert torch.equal(got, reference), f"dit_quant={mode} {v}: latents differ from offload=none " \
                                            f"(max |diff| {(got - reference).abs().max().item():.3g})"


@pytest.mark.parametrize("mode", ["none", "fp8-triton"])
def test_loading_for_block_offload_holds_one_copy_and_a_block_at_a_time(cfg_13b, mode):
    """Wan2.1-1.3B's DiT loaded for offload=block (random weights drawn on the GPU): the GPU peaks at under half
    of what loading it resident takes (a block at a time, not the model), the host at the packs (plus a small
    working set), every tensor ends in a pinned pack, and the latents equal offload=none's."""
    _backend_or_skip(mode)
    cfg = cfg_13b(f"dit_quant={mode}", "offload=block")
    hw = hardware.resolve(cfg.hardware.name)
    method = C.quant_methods(cfg, plan.plan_run(cfg, hw))["dit"]

    def load_peak(offload):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base_gpu, base_rss = torch.cuda.memory_allocated(), _rss()
        dit, peak_rss = _peak_rss_during(lambda: C.load_dit(cfg, method, None, DEV, torch.bfloat16, False,
                                                            offload=offload))
        return dit, torch.cuda.max_memory_allocated() - base_gpu, peak_rss - base_rss

    resident, resident_gpu, _ = load_peak(None)
    del resident
    offload = C.Offload(cfg.offload, DEV, cfg)
    dit, peak_gpu, grown = load_peak(offload)
    placement = offload._placement(dit)
    packed = sum(p.nbytes for p in placement.resident.packs) + placement.outside.nbytes
    assert peak_gpu < resident_gpu / 2, \
        f"loading for offload peaked at {peak_gpu / 2**20:.0f} MiB on the GPU, resident {resident_gpu / 2**20:.0f} MiB"
    assert grown < packed + 256 * 2**20, \
        f"host memory grew by {grown / 2**30:.2f} GiB for {packed / 2**30:.2f} GiB of packs"
    assert all(not t.is_cuda and t.is_pinned() for t in _tensors(dit))
    del dit, placement, offload
    assert torch.equal(latents_of(cfg), latents_of(cfg_13b(f"dit_quant={mode}")))


def test_random_weights_are_the_same_bits_on_cpu_and_gpu():
    from lightq.checkpoints.loader import random_tensor

    for shape, stream in (((5120, 13824), 7), ((3, 5), 0), ((1536, 16, 1, 2, 2), 2**32 - 1)):
        cpu = random_tensor(shape, stream, 0.01, torch.device("cpu"))
        assert torch.equal(random_tensor(shape, stream, 0.01, DEV).cpu(), cpu), shape


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_pinned_buffers_are_page_locked_at_their_exact_size():
    """1.5 GiB pinned: resident and page-locked at 1.5 GiB (PyTorch's pinned allocator would round to 2 GiB), and
    a non-blocking copy from it stays correct when the host buffer is dropped right after the copy is issued."""
    from lightq.offload.binding import note_read, pinned_empty

    nbytes = 3 << 29
    torch.empty(1, device=DEV)  # the CUDA context exists before the resident set is measured
    before = _rss()
    host = pinned_empty(nbytes)
    grown = _rss() - before
    assert host.is_pinned() and host.numel() == nbytes
    assert nbytes <= grown < 1.6 * 2**30, f"pinning 1.5 GiB grew the resident set by {grown / 2**30:.2f} GiB"
    host.view(torch.int32).copy_(torch.arange(nbytes // 4, dtype=torch.int32))
    out = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # the copy starts well after the host buffer is dropped
        out.copy_(host, non_blocking=True)
        note_read(host, side)
    del host  # unregistering and freeing wait for the copy
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out.view(torch.int32), torch.arange(nbytes // 4, dtype=torch.int32, device=DEV))
    assert _rss() - before < 0.1 * 2**30, "the pinned buffer was not freed"


@pytest.mark.parametrize("mode", ["block", "phase"])
def test_streamed_fused_triton_dit_matches_no_offload(mode):
    """A fused fp8-triton DiT streamed block by block (or phase by phase): its q/k/v codes stay views of the one
    concatenated buffer in every device slot, and the output is bit-identical to the model on the device."""
    _backend_or_skip("fp8-triton")
    from lightq.backends.registry import specs
    from lightq.backends.triton_backend import TritonBackend
    from lightq.checkpoints.loader import load_component
    from lightq.fused.wan_block import FusedBlock, fuse_dit_blocks
    from lightq.models.family import QUANTIZABLE
    from lightq.models.wan_dit import WanDiT
    from lightq.quant.method import QuantMethod

    dim = 512
    arch = DiTArch(dim=dim, ffn_dim=2048, num_heads=8, num_layers=4, text_dim=dim)
    dit = load_component(lambda: WanDiT(arch), "random", include=QUANTIZABLE["dit"],
                         method=QuantMethod("fp8", TritonBackend(specs()["triton"])), dtype=torch.bfloat16,
                         progress=False)
    assert fuse_dit_blocks(dit) == 4
    g = torch.Generator().manual_seed(0)
    inputs = tuple(t.to(DEV) for t in (torch.randn(1, 16, 3, 16, 16, generator=g), torch.tensor([600.0]),
                                       torch.randn(1, 12, dim, generator=g)))
    with torch.no_grad():
        reference = copy.deepcopy(dit).to(DEV)(*inputs)
    seen = []

    def check(attn, args):
        assert attn.qkv_data.is_cuda and attn.q.data.data_ptr() == attn.qkv_data.data_ptr()
        assert attn.v.scale.data_ptr() == attn.qkv_scale.data_ptr() + 2 * dim * 4
        seen.append(1)

    hooks = [b.self_attn.register_forward_pre_hook(check) for b in dit.blocks if isinstance(b, FusedBlock)]
    offload = C.Offload(OffloadConfig(mode=mode), DEV)
    with torch.no_grad(), offload.active(dit):
        out = dit(*inputs)
    offload.release(dit)
    for h in hooks:
        h.remove()
    assert len(seen) == 4
    assert torch.equal(out, reference), f"offload={mode}: max |diff| {(out - reference).abs().max().item():.3g}"
