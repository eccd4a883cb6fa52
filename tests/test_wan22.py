"""Wan2.2: the A14B two-expert models (T2V, I2V) and TI2V-5B with the Wan2.2 VAE — official layouts and sizes on
the meta device, the models' numerics contracts, the expert switch, the TI2V kept first frame, the config rules,
and the tiny models end to end."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lightq import config
from lightq.checkpoints.locate import find_component_file
from lightq.errors import CheckpointError, LightqError
from lightq.models.family import WAN22_A14B, WAN22_TI2V
from lightq.models.tiny import DIT_INDEX, ensure_tiny
from lightq.models.vae22 import VAE22_ARCHS, AvgDown, DupUp, Wan22VAE, patchify, unpatchify
from lightq.models.wan_dit import DIT_ARCHS, WanDiT
from lightq.paths import conf_dir
from lightq.pipeline import components as C
from lightq.pipeline.experts import Experts
from lightq.pipeline.sampler import SamplerConfig, guide_scale_of, high_noise, needs_uncond, sample, timesteps

DATA = Path(__file__).parent / "data"


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- official sizes and key layouts (counts from the official wan/modules/model.py and vae2_2.py built on meta) ---

def test_official_dit_sizes_and_keys():
    with torch.device("meta"):
        t2v, i2v, ti2v = (WanDiT(DIT_ARCHS[a]) for a in ("14b", "a14b-i2v", "ti2v-5b"))
    assert (n_params(t2v), n_params(i2v), n_params(ti2v)) == (14_288_491_584, 14_288_901_184, 4_999_787_712)
    assert len(t2v.state_dict()) == len(i2v.state_dict()) == 1095 and len(ti2v.state_dict()) == 825
    keys = set(i2v.state_dict())
    assert not any("img" in k for k in keys), "Wan2.2's I2V expert has no CLIP branch"
    assert i2v.patch_embedding.weight.shape == (5120, 36, 1, 2, 2)
    assert ti2v.patch_embedding.weight.shape == (3072, 48, 1, 2, 2) and ti2v.head.head.weight.shape == (4 * 48, 3072)


def test_wan22_vae_matches_the_official_key_layout():
    official = json.loads((DATA / "wan2.2_vae_keys.json").read_text())
    with torch.device("meta"):
        vae = Wan22VAE(VAE22_ARCHS["wan2.2"])
    ours = {k: list(v.shape) for k, v in vae.state_dict().items()}
    assert ours == official
    assert n_params(vae) == 704_688_668


def test_family_records_and_geometry():
    m = OmegaConf.structured(config.ModelConfig(family="wan2.2-ti2v", dit_arch="ti2v-5b", vae_arch="wan2.2"))
    g = WAN22_TI2V.geometry(m)
    assert (g.channels, g.temporal, g.spatial, g.patch) == (48, 4, 16, (1, 2, 2))
    assert g.latent_shape(121, 704, 1280) == (48, 31, 44, 80)
    g.check(121, 704, 1280)
    with pytest.raises(LightqError, match="multiples of 32"):
        g.check(121, 720, 1280)
    assert WAN22_A14B.pipeline("i2v") == ("t5", "dit", "dit_low", "vae") and WAN22_A14B.experts == ("dit", "dit_low")
    assert WAN22_TI2V.pipeline("i2v") == ("t5", "dit", "vae")
    assert WAN22_A14B.components["dit"].subfolder == "high_noise_model"
    assert WAN22_A14B.components["dit_low"].subfolder == "low_noise_model"
    assert WAN22_TI2V.components["vae"].official == "Wan2.2_VAE.pth"


# --- the DiT's per-token timesteps --------------------------------------------------------------------------------

def test_per_token_timesteps_equal_per_sample_ones_when_uniform():
    torch.manual_seed(0)
    dit = WanDiT(DIT_ARCHS["tiny-ti2v"]).eval()
    x = torch.randn(1, 48, 3, 4, 4)
    ctx = torch.randn(1, 7, 128)
    tokens = 3 * 2 * 2
    with torch.no_grad():
        scalar = dit(x, torch.tensor([700.0]), ctx)
        uniform = dit(x, torch.full((1, tokens), 700.0), ctx)
        first_clean = dit(x, C.token_timesteps(torch.tensor([700.0]), 1, (3, 2, 2)), ctx)
    assert torch.allclose(scalar, uniform, atol=1e-5)
    assert not torch.allclose(scalar, first_clean, atol=1e-3)
    with pytest.raises(LightqError, match=r"per token \(\[1, 12\]\)"):
        dit(x, torch.full((1, 5), 700.0), ctx)


def test_token_timesteps_zero_the_kept_frames():
    t = C.token_timesteps(torch.tensor([500.0]), 1, (3, 2, 2))
    assert t.shape == (1, 12) and t[0, :4].eq(0).all() and t[0, 4:].eq(500).all()


# --- the Wan2.2 VAE -----------------------------------------------------------------------------------------------

def test_patchify_order_and_inverse():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(1, 2, 1, 4, 4)
    p = patchify(x)
    assert p.shape == (1, 8, 1, 2, 2)
    # channel 4 c + 2 r + q holds pixel (2 i + q, 2 j + r) of colour c
    for c in range(2):
        for q in range(2):
            for r in range(2):
                assert torch.equal(p[0, 4 * c + 2 * r + q, 0], x[0, c, 0, q::2, r::2])
    assert torch.equal(unpatchify(p), x)


def test_avg_down_and_dup_up_shortcuts():
    x = torch.randn(1, 4, 3, 4, 4)
    down = AvgDown(4, 8, 2, 2)(x)  # front pad 1 frame: (pad, f0), (f1, f2)
    assert down.shape == (1, 8, 2, 2, 2)
    padded = torch.cat([torch.zeros_like(x[:, :, :1]), x], 2)
    # output channel o averages 4 consecutive (channel, frame, row, col) entries: channel o // 2, frame o % 2
    for o in range(8):
        c, ft = divmod(o, 2)
        want = padded[0, c, ft::2].unflatten(1, (2, 2)).unflatten(3, (2, 2)).mean((2, 4))
        assert torch.allclose(down[0, o], want, atol=1e-6)
    up = DupUp(8, 4, 2, 2)
    y = torch.randn(1, 8, 1, 2, 2)
    assert up(y, first=False).shape == (1, 4, 2, 4, 4) and up(y, first=True).shape == (1, 4, 1, 4, 4)
    assert torch.equal(up(y, first=True), up(y, first=False)[:, :, 1:])


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    return Wan22VAE(VAE22_ARCHS["tiny"]).eval()


def test_vae_shapes_and_causality(tiny_vae):
    video = torch.rand(1, 3, 9, 32, 64) * 2 - 1
    z = tiny_vae.encode(video)
    assert z.shape == (1, 48, 3, 2, 4) and z.dtype == torch.float32
    assert torch.allclose(tiny_vae.encode(video[:, :, :5]), z[:, :, :2], atol=1e-5), "frames never see the future"
    out = tiny_vae.decode(z)
    assert out.shape == (1, 3, 9, 32, 64) and out.abs().max() <= 1.0
    assert torch.allclose(tiny_vae.decode(z[:, :, :2]), out[:, :, :5], atol=1e-5)
    with pytest.raises(LightqError, match="multiples of 16"):
        tiny_vae.encode(video[..., :24])
    with pytest.raises(LightqError, match=r"latents \[batch, 48"):
        tiny_vae.decode(torch.zeros(1, 16, 2, 2, 2))


# --- sampling with two experts and kept frames --------------------------------------------------------------------

def test_guide_scale_and_expert_per_step():
    cfg = SamplerConfig(steps=40, shift=12.0, guide_scale=4.0, guide_scale_low=3.0, boundary=0.875)
    ts = timesteps(cfg).timesteps.tolist()
    high = [high_noise(cfg, t) for t in ts]
    assert high == sorted(high, reverse=True) and 0 < sum(high) < len(ts)
    assert all(t >= 875 for t, h in zip(ts, high) if h) and all(t < 875 for t, h in zip(ts, high) if not h)
    assert guide_scale_of(cfg, True) == 4.0 and guide_scale_of(cfg, False) == 3.0 and needs_uncond(cfg)
    assert not needs_uncond(SamplerConfig(guide_scale=1.0, guide_scale_low=1.0, boundary=0.9))
    assert needs_uncond(SamplerConfig(guide_scale=1.0, guide_scale_low=3.0, boundary=0.9))


def test_sample_uses_each_experts_guide_scale_and_keeps_frames():
    cfg = SamplerConfig(name="euler", steps=4, shift=5.0, guide_scale=2.0, guide_scale_low=7.0, boundary=0.9)
    seen = []

    def model_fn(x, t, c):
        seen.append((float(t[0]), c, x[:, :, :1].clone()))
        return torch.full_like(x, c)

    keep = torch.full((1, 2, 1, 2, 2), 0.25)
    noise = torch.randn(1, 2, 3, 2, 2)
    out = sample(model_fn, noise, cfg, 1.0, 0.0, progress=False, keep=keep)
    assert torch.equal(out[:, :, :1], keep) and all(torch.equal(x0, keep) for _, _, x0 in seen)
    sched = timesteps(cfg)
    # v = uncond + s * (cond - uncond) = s: the rest of the latents moved by sum((s_next - s) * scale_of_step)
    expect = noise[:, :, 1:].clone()
    for i, t in enumerate(sched.timesteps.tolist()):
        scale = 2.0 if t >= 900 else 7.0
        expect += (sched.sigmas[i + 1] - sched.sigmas[i]) * scale
    assert torch.allclose(out[:, :, 1:], expect, atol=1e-6)


class RecordingOffload:
    def __init__(self, mode="none", room=0):
        self.calls, self.mode, self.room = [], mode, room

    def start(self, module):
        self.calls.append(("start", module))

    def release(self, module):
        self.calls.append(("release", module))

    def room_for(self, module):
        return 10, self.room, "test"

    def prefetch(self, module):
        self.calls.append(("prefetch", module))

    def drop_prefetched(self):
        self.calls.append(("drop",))


def test_experts_switch_once_at_the_boundary_and_only_one_is_active():
    cfg = SamplerConfig(steps=6, shift=5.0, boundary=0.9)
    offload = RecordingOffload()
    experts = Experts(["high", "low"], cfg, offload)
    picked = [experts.at(t) for t in timesteps(cfg).timesteps.tolist()]
    experts.close()
    assert picked == ["high"] * picked.count("high") + ["low"] * picked.count("low") and "low" in picked
    assert offload.calls == [("start", "high"), ("release", "high"), ("start", "low"), ("release", "low")]


def test_boundary_step_picks_experts_by_index_and_wins_over_the_boundary():
    cfg = SamplerConfig(steps=6, shift=5.0, boundary=0.1, boundary_step=2)  # the timestep rule: all six high
    offload = RecordingOffload()
    experts = Experts(["high", "low"], cfg, offload)
    picked = [experts.at(t) for t in timesteps(cfg).timesteps.tolist()]
    assert picked == ["high"] * 2 + ["low"] * 4
    assert offload.calls == [("start", "high"), ("release", "high"), ("start", "low")]
    assert all(high_noise(SamplerConfig(steps=6, boundary=0.9, boundary_step=6), t)
               for t in timesteps(cfg).timesteps.tolist())
    with pytest.raises(LightqError, match="boundary_step=7: give an integer from 0 to 6"):
        timesteps(SamplerConfig(steps=6, boundary=0.9, boundary_step=7))
    with pytest.raises(LightqError, match="this model has one DiT"):
        timesteps(SamplerConfig(steps=6, boundary_step=2))
    many = SamplerConfig(steps=2000, shift=1.0, boundary=0.5, boundary_step=1)  # integer t, 2 steps per value
    ts = timesteps(many).timesteps.tolist()
    k = next(i for i in range(1, len(ts)) if ts[i] == ts[i - 1])
    many.boundary_step = k
    with pytest.raises(LightqError, match=f"steps {k - 1} and {k} share timestep"):
        high_noise(many, ts[0])


@pytest.mark.parametrize("room, prefetch", [(10, True), (9, False)])
def test_the_low_noise_expert_is_prefetched_during_the_last_high_noise_step_when_it_fits(room, prefetch):
    cfg = SamplerConfig(steps=6, shift=5.0, boundary=0.9)
    ts = timesteps(cfg).timesteps.tolist()
    last_high = max(i for i, t in enumerate(ts) if high_noise(cfg, t))
    offload = RecordingOffload("model", room)
    experts = Experts(["high", "low"], cfg, offload)
    for i, t in enumerate(ts):
        for _ in range(2):  # CFG: two passes per step, one prefetch
            experts.at(t)
        if i == last_high - 1:
            assert ("prefetch", "low") not in offload.calls, "not before the last high-noise step"
    experts.close()
    pre = [("prefetch", "low")] if prefetch else []
    assert offload.calls == [("start", "high"), *pre, ("release", "high"), ("start", "low"), ("release", "low"),
                             ("drop",)]
    assert experts.record() == {"prefetched": prefetch, "step": last_high, "need_bytes": 10, "room_bytes": room,
                                "why": "test"}
    off = Experts(["high", "low"], cfg, RecordingOffload("model", 10), prefetch=False)
    for t in ts:
        off.at(t)
    assert ("prefetch", "low") not in off.offload.calls and off.record() == {"prefetched": False,
                                                                             "why": "offload.prefetch=false"}


def test_prefetch_is_bit_identical_to_the_swap(hydra_ctx):
    from lightq.hardware import resolve
    from lightq.pipeline.graph import generate
    from lightq.plan import plan_run

    def run(*o):
        cfg = compose("config", overrides=["model=tiny-t2v-a14b", "dit_quant=fp8-torch", "dit_low_quant=int8-torch",
                                           *o])
        return generate(cfg, resolve("cpu"), plan_run(cfg, resolve("cpu")))

    ahead, swap, resident = run("offload=model"), run("offload=model", "offload.prefetch=false"), run()
    assert ahead.expert_prefetch["prefetched"] and ahead.expert_prefetch["step"] == 2
    assert swap.expert_prefetch == {"prefetched": False, "why": "offload.prefetch=false"}
    assert resident.expert_prefetch["why"].startswith("offload=none")
    assert torch.equal(ahead.latents, swap.latents) and torch.equal(ahead.latents, resident.latents)


# --- config rules --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hydra_ctx():
    config.register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        yield


def test_low_noise_expert_runs_dit_quant_unless_overridden(hydra_ctx):
    cfg = compose("config", overrides=["model=tiny-t2v-a14b", "dit_quant=fp8-torch", "dit_quant.skip=[blocks.0.*]",
                                       "dit_low_quant.ckpt=/low.safetensors"])
    config.validate(cfg)
    low = config.quant_of(cfg, "dit_low")
    assert (low.name, low.scheme, list(low.skip), low.ckpt) == ("fp8-torch", "fp8", ["blocks.0.*"], "/low.safetensors")
    assert config.quant_of(cfg, "dit") is cfg.dit_quant
    cfg = compose("config", overrides=["model=tiny-t2v-a14b", "dit_quant=fp8-triton", "dit_low_quant=int8-torch"])
    assert config.quant_of(cfg, "dit_low").name == "int8-torch"
    cfg = compose("config", overrides=["model=tiny-t2v-a14b", "dit_low_quant=fp8-triton"])
    assert dict(config.quant_of(cfg, "dit_low").options) == {"fuse": True, "fast_accum": True}


@pytest.mark.parametrize("overrides,message", [
    (["dit_low_quant=fp8-torch"], "dit_low_quant=fp8-torch quantizes the low-noise expert"),
    (["model=tiny-t2v-a14b", "model.boundary=null"], "set model.dit_low_arch and model.boundary"),
    (["model=tiny-t2v-a14b", "model.boundary=1.5"], "model.boundary=1.5: choose a value between 0 and 1"),
    (["model.boundary=0.9"], "belong to two-expert models"),
    (["sampler.boundary_step=1"], "belong to two-expert models"),
    (["model=tiny-t2v-a14b", "sampler.boundary_step=5"], "boundary_step=5: give an integer from 0 to 4"),
    (["model=tiny-i2v-a14b", "clip_quant=fp8-torch"], "clip_quant=fp8-torch quantizes a CLIP image encoder"),
    (["model=tiny-ti2v-5b", "model.height=48"], "multiples of 32"),
])
def test_bad_two_expert_configs_are_one_line(hydra_ctx, overrides, message):
    cfg = compose("config", overrides=overrides)
    with pytest.raises(LightqError, match=message):
        config.validate(cfg)


def test_the_official_defaults_are_in_the_model_files():
    t2v = OmegaConf.load(conf_dir() / "model" / "wan2.2-t2v-a14b.yaml")
    i2v = OmegaConf.load(conf_dir() / "model" / "wan2.2-i2v-a14b.yaml")
    ti2v = OmegaConf.load(conf_dir() / "model" / "wan2.2-ti2v-5b.yaml")
    assert (t2v.boundary, t2v.guide_scale, t2v.guide_scale_low, t2v.shift, t2v.steps) == (0.875, 4.0, 3.0, 12.0, 40)
    assert (i2v.boundary, i2v.guide_scale, i2v.guide_scale_low, i2v.shift, i2v.dit_arch) == (0.9, 3.5, 3.5, 5.0,
                                                                                             "a14b-i2v")
    assert (ti2v.frames, ti2v.height, ti2v.width, ti2v.fps, ti2v.vae_arch) == (121, 704, 1280, 24, "wan2.2")


def test_plans_and_budget_know_both_experts(hydra_ctx):
    from lightq.hardware import resolve
    from lightq.offload import gpu_weight_need
    from lightq.plan import plan_run

    cfg = compose("config", overrides=["model=tiny-t2v-a14b", "dit_quant=fp8-torch", "dit_low_quant=none"])
    plans = plan_run(cfg, resolve(cfg.hardware.name))
    assert (plans["dit"].mode, plans["dit_low"].mode) == ("fp8-torch", "none") and "clip" not in plans
    both, _ = gpu_weight_need(cfg)
    cfg.offload.mode = "model"
    one, detail = gpu_weight_need(cfg)
    assert one < both and "dit_low" in detail


# --- the tiny models in the official folder layouts, end to end -------------------------------------------------

def test_tiny_a14b_folder_has_one_chunked_set_per_expert():
    folder = ensure_tiny("tiny-i2v-a14b")
    for sub in ("high_noise_model", "low_noise_model"):
        assert (folder / sub / DIT_INDEX).is_file()
    assert find_component_file(folder, "dit_low", None, WAN22_A14B) == folder / "low_noise_model"
    assert find_component_file(folder, "vae", None, WAN22_A14B).name == "Wan2.1_VAE.pth"
    assert (ensure_tiny("tiny-ti2v-5b") / "Wan2.2_VAE.pth").is_file()
    with pytest.raises(CheckpointError, match="no low_noise_model/ folder for dit_low"):
        find_component_file(ensure_tiny("tiny"), "dit_low", None, WAN22_A14B)


@pytest.mark.parametrize("model,extra", [("tiny-t2v-a14b", ["dit_quant=fp8-torch", "dit_low_quant=int8-torch"]),
                                         ("tiny-i2v-a14b", ["dit_quant=fp8-torch", "offload=model"])])
def test_tiny_wan22_runs_record_each_expert(run_lightq, tmp_path, model, extra):
    proc = run_lightq(f"model={model}", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(next((tmp_path / "outputs").rglob("result.json")).read_text())
    comps = res["components"]
    low = "int8-torch" if "dit_low_quant=int8-torch" in extra else "fp8-torch"
    assert (comps["dit"]["mode"], comps["dit_low"]["mode"]) == ("fp8-torch", low) and "clip" not in comps
    assert comps["dit"]["backend"] == comps["dit_low"]["backend"] == "torch"
    assert comps["dit_low"]["quantized_layers"] == comps["dit"]["quantized_layers"] > 0
    assert res["quality"]["latent_cosine"] > 0.99, res["quality"]  # against the bf16 run of the same model
    assert res["memory"]["expert_prefetch"]["prefetched"] == ("offload=model" in extra), res["memory"]


def test_ti2v_image_to_video_keeps_the_image_latents(hydra_ctx):
    from lightq.hardware import resolve
    from lightq.pipeline.graph import generate
    from lightq.plan import plan_run

    cfg = compose("config", overrides=["model=tiny-ti2v-5b", "model.task=i2v"])
    gen = generate(cfg, resolve(cfg.hardware.name), plan_run(cfg, resolve(cfg.hardware.name)))
    vae = C.load_vae(cfg, C.model_folder(cfg), torch.device("cpu"))
    image = C.input_image(cfg, cfg.model.height, cfg.model.width)
    assert torch.equal(gen.latents[:, :1], C.first_frame_latents(vae, image)[0])
    assert gen.latents.shape == (48, 3, 4, 4) and gen.video.shape == (9, 3, 64, 64)


def test_each_expert_streams_its_own_block_split_from_disk(hydra_ctx, tmp_path):
    from lightq.checkpoints.conventions import open_source
    from lightq.checkpoints.conversion import convert
    from lightq.hardware import resolve
    from lightq.pipeline.graph import generate
    from lightq.plan import plan_run

    folder = ensure_tiny("tiny-t2v-a14b")
    splits = [convert(open_source(folder / sub), component="dit", scheme="fp8", output=tmp_path / sub,
                      layout="blocks", progress=False) for sub in ("high_noise_model", "low_noise_model")]

    def latents(*extra):
        cfg = compose("config", overrides=["model=tiny-t2v-a14b", "dit_quant=fp8-torch", *extra])
        return generate(cfg, resolve("cpu"), plan_run(cfg, resolve("cpu"))).latents

    lazy = latents("offload=block", "offload.lazy_load=true", f"dit_quant.ckpt={splits[0]}",
                   f"dit_low_quant.ckpt={splits[1]}")
    assert torch.equal(lazy, latents()), "the converted splits and load-time quantization agree bit for bit"


@pytest.mark.parametrize("model", ["wan2.2-ti2v-5b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.1-t2v-14b"])
def test_random_weights_baseline_key_names_every_expert_and_vae(hydra_ctx, model):
    """The bf16 baseline of a weights=random job is keyed by every component's architecture, from the family's
    own tables (the Wan2.2 VAE is not in Wan2.1's; a KeyError here once failed every random TI2V job on the GPU)."""
    from lightq.pipeline.baseline import key, weights_identity

    cfg = compose("config", overrides=[f"model={model}", "model.weights=random"])
    identity = repr(weights_identity(cfg))
    assert "dit" in identity and "vae" in identity and (("dit_low" in identity) == ("a14b" in model))
    other = compose("config", overrides=[f"model={model}", "model.weights=random", "seed=7"])
    assert key(cfg, "cuda") != key(other, "cuda")
