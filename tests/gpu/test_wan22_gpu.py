"""Wan2.2 on CUDA: the two experts and TI2V under every offload mode give the latents of offload=none, fp8-triton
runs both experts on its own kernels, offload=model holds one expert on the GPU at a time without prefetch, and its
prefetch (a side-stream copy during the last high-noise step, when there is room) gives the same outputs.

Run on the GPU machine: ``python -m pytest tests/gpu/test_wan22_gpu.py -q -n 0``. Skipped without CUDA.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lightq.config import OffloadConfig
from lightq.models.wan_dit import DiTArch, random_dit
from lightq.pipeline import components as C
from lightq.pipeline.experts import Experts
from lightq.pipeline.sampler import SamplerConfig, timesteps

from .conftest import DEV, GPU, latents_of

pytestmark = GPU


@pytest.mark.parametrize("model", [["model=tiny-t2v-a14b"], ["model=tiny-i2v-a14b"],
                                   ["model=tiny-ti2v-5b", "model.task=i2v"]])
def test_offload_modes_keep_the_latents(cfg_of, model):
    common = [*model, "dit_quant=fp8-torch", "dit_low_quant=int8-torch"] if "a14b" in model[0] else \
        [*model, "dit_quant=fp8-torch"]
    reference = latents_of(cfg_of(*common))
    for v in (["offload=model"], ["offload=block"], ["offload=phase"], ["offload=block", "offload.buffers=1"]):
        assert torch.equal(latents_of(cfg_of(*common, *v)), reference), f"{v} changed the latents"


def test_fp8_triton_runs_both_experts(tmp_path):
    for extra in ([], ["offload=model"]):
        out = tmp_path / ("model" if extra else "none")
        proc = subprocess.run([sys.executable, "-m", "lightq", "model=tiny-t2v-a14b", "dit_quant=fp8-triton",
                               *extra, f"hydra.run.dir={out}"], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        res = json.loads((out / "result.json").read_text())
        for expert in ("dit", "dit_low"):
            assert res["components"][expert]["mode"] == "fp8-triton"
            assert res["components"][expert]["backend"] == "triton", res["components"][expert]
        assert res["quality"]["latent_cosine"] > 0.99, res["quality"]


def test_ti2v_image_to_video_with_a_fusing_mode_runs_unfused(cfg_of):
    fused = latents_of(cfg_of("model=tiny-ti2v-5b", "model.task=i2v", "dit_quant=fp8-triton"))
    assert torch.isfinite(fused).all()


def expert(seed: int):
    arch = DiTArch(dim=1024, ffn_dim=4096, num_heads=8, num_layers=12, text_dim=1024)
    return random_dit(arch, "cpu", seed=seed)


def _denoise_with_experts(high, low, mode, prefetch, **offload):
    """(each step's output, peak GPU bytes over the run, the prefetch record) of both experts under ``mode``."""
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 16, 3, 16, 16, generator=g).to(DEV), torch.randn(1, 12, 1024, generator=g).to(DEV)
    scfg = SamplerConfig(steps=6, shift=5.0, boundary=0.9)
    placement = C.Offload(OffloadConfig(mode=mode, **offload), DEV)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    experts = Experts([high, low], scfg, placement, prefetch)
    outs = [experts.at(t)(x, torch.tensor([t], device=DEV), ctx) for t in timesteps(scfg).timesteps.tolist()]
    experts.close()
    torch.cuda.synchronize()
    return outs, torch.cuda.max_memory_allocated() - base, experts.record(), (x, ctx, scfg)


@pytest.mark.parametrize("mode", ["model", "block"])
def test_one_expert_on_the_gpu_at_a_time(mode):
    high, low = expert(0), expert(1)
    size = sum(p.numel() * p.element_size() for p in high.parameters())
    outs, peak, _, (x, ctx, scfg) = _denoise_with_experts(high, low, mode, prefetch=False)
    assert peak < 1.5 * size, f"offload={mode}: peak {peak / 2**20:.0f} MiB for experts of {size / 2**20:.0f} MiB"
    resident_low = low.to(DEV)
    assert torch.equal(outs[-1], resident_low(x, torch.tensor([timesteps(scfg).timesteps[-1].item()], device=DEV), ctx))


def test_prefetched_expert_gives_the_swaps_outputs_bit_for_bit():
    """The low-noise expert copied on a side stream during the last high-noise step: the same outputs as the copy
    at the switch (the compute stream waits for the copy's event), both experts on the GPU only then."""
    high, low = expert(0), expert(1)
    size = sum(p.numel() * p.element_size() for p in high.parameters())
    swap, _, swap_record, _ = _denoise_with_experts(high, low, "model", prefetch=False)
    ahead, peak, record, _ = _denoise_with_experts(high, low, "model", prefetch=True)
    assert swap_record == {"prefetched": False, "why": "offload.prefetch=false"}
    assert record["prefetched"] and record["need_bytes"] >= size and record["step"] == 2, record
    assert all(torch.equal(a, b) for a, b in zip(ahead, swap)), "prefetch changed an output"
    assert 1.5 * size < peak < 2.5 * size, f"peak {peak / 2**20:.0f} MiB: both experts only during the prefetch"
    assert all(not p.is_cuda for p in low.parameters()), "released to the host after the run"


def test_no_prefetch_without_room_for_both():
    high, low = expert(0), expert(1)
    size = sum(p.numel() * p.element_size() for p in high.parameters())
    outs, peak, record, _ = _denoise_with_experts(high, low, "model", prefetch=True, max_gpu_gib=1.2 * size / 2**30)
    assert not record["prefetched"] and record["room_bytes"] < record["need_bytes"], record
    assert "offload.max_gpu_gib" in record["why"] and peak < 1.5 * size
