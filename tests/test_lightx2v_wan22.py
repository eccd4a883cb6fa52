"""``from_lightx2v=`` with LightX2V's Wan2.2 classes (wan2.2, wan2.2_moe, wan2.2_moe_distill): each key with the
meaning LightX2V's Wan2.2 runners give it (lightq.lightx2v.wan22), and the expert each step runs."""

import json

import pytest
from hydra import compose as hydra_compose, initialize_config_dir
from hydra.core.config_store import ConfigStore

from lightq import config
from lightq.errors import LightqError
from lightq.lightx2v.cli import GROUP, node
from lightq.lightx2v.importer import LightX2VError, import_config
from lightq.lightx2v.survey import compose
from lightq.paths import conf_dir
from lightq.pipeline.sampler import high_noise, sampler_config, timesteps

DISTILL = {"denoising_step_list": [1000, 750, 500, 250], "sample_shift": 5.0, "boundary_step_index": 2,
           "sample_guide_scale": [4.0, 3.0], "enable_cfg": False}
TI2V = {"num_channels_latents": 48, "vae_stride": [4, 16, 16], "sample_guide_scale": 5.0, "enable_cfg": True}


def _imp(tmp_path, cfg, model_cls=None):
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(cfg))
    return import_config(p, model_cls)


def _job(imported, model):
    """The composed, validated job config of ``imported`` on ``model``."""
    config.register()
    ConfigStore.instance().store(group=GROUP, name="t", node=node(imported), package="_global_")
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="t"):
        cfg = hydra_compose("config", overrides=[f"{GROUP}=t", f"model={model}"])
    config.validate(cfg)
    return cfg


def _experts_per_step(job) -> list[str]:
    scfg = sampler_config(job)
    return ["high" if high_noise(scfg, t) else "low" for t in timesteps(scfg).timesteps.tolist()]


# --- wan2.2_moe: the boundary timestep and one guide scale per expert ----------------------------------------------

def test_moe_boundary_and_guide_scales_high_then_low(tmp_path):
    got = _imp(tmp_path, {"boundary": 0.875, "sample_guide_scale": [4.0, 3.0], "enable_cfg": True, "infer_steps": 40,
                          "sample_shift": 12.0}, "wan2.2_moe")
    assert (got.values["model.boundary"], got.values["sampler.guide_scale"], got.values["sampler.guide_scale_low"]) \
        == (0.875, 4.0, 3.0), "LightX2V: sample_guide_scale[0] while t >= boundary * 1000, [1] after"
    job = _job(got, "tiny-t2v-a14b")
    scfg = sampler_config(job)
    experts = _experts_per_step(job)
    ts = timesteps(scfg).timesteps.tolist()
    assert experts == ["high"] * experts.count("high") + ["low"] * experts.count("low") and "low" in experts
    assert all((t >= 875) == (e == "high") for t, e in zip(ts, experts))
    assert (scfg.guide_scale, scfg.guide_scale_low) == (4.0, 3.0)


def test_moe_without_cfg_runs_one_pass_per_expert(tmp_path):
    got = _imp(tmp_path, {"boundary": 0.9, "sample_guide_scale": [3.5, 3.5], "enable_cfg": False,
                          "boundary_step_index": 2, "denoising_step_list": [1000, 750, 500, 250]}, "wan2.2_moe")
    scfg = sampler_config(_job(got, "tiny-i2v-a14b"))
    assert (scfg.guide_scale, scfg.guide_scale_low, scfg.boundary_step) == (1.0, 1.0, None)
    notes = " | ".join(got.notes)
    assert "sample_guide_scale=[3.5, 3.5] is unused" in notes and "boundary_step_index is unused" in notes
    assert "denoising_step_list is unused with model class wan2.2_moe" in notes and "sampler" not in got.choices


@pytest.mark.parametrize("cfg, message", [
    ({"sample_guide_scale": [4.0, 3.0]}, "model class wan2.2_moe needs boundary"),
    ({"boundary": 0.875, "sample_guide_scale": 5.0}, "sample_guide_scale=5.0: LightX2V's wan2.2_moe picks "
                                                     "sample_guide_scale\\[0\\] at the high-noise steps"),
    ({"boundary": 0.875, "sample_guide_scale": [4.0, 3.0, 2.0]}, "give \\[high-noise, low-noise\\]"),
    ({"boundary": 1.5, "sample_guide_scale": [4.0, 3.0]}, "boundary=1.5: give a number between 0 and 1"),
    ({"boundary": 0.875, "sample_guide_scale": [4.0, 3.0], "dit_original_ckpt": "/m/x.safetensors"},
     "dit_original_ckpt: LightX2V's WanModel reads it for both experts"),
    ({"boundary": 0.875, "sample_guide_scale": [4.0, 3.0], "use_image_encoder": True},
     "use_image_encoder=true: lightq's Wan2.2 models have no CLIP image encoder"),
    ({"boundary": 0.875, "sample_guide_scale": [4.0, 3.0],
      "lora_configs": [{"path": "/l.safetensors"}]}, r"lora_configs\[0\]\.name=None: a wan2\.2_moe\w* LoRA names its expert"),
])
def test_moe_refusals_are_one_line(tmp_path, cfg, message):
    with pytest.raises(LightX2VError, match=message) as err:
        _imp(tmp_path, cfg, "wan2.2_moe")
    assert "\n" not in str(err.value) and str(tmp_path / "cfg.json") in str(err.value)


# --- wan2.2_moe_distill: the expert by step index ------------------------------------------------------------------

def test_distill_switches_experts_at_boundary_step_index(tmp_path):
    got = _imp(tmp_path, {**DISTILL, "boundary": 0.5}, "wan2.2_moe_distill")
    assert got.choices["sampler"] == "distill" and got.values["sampler.boundary_step"] == 2
    assert any("boundary=0.5 is unused" in n for n in got.notes)
    job = _job(got, "tiny-t2v-a14b")
    # LightX2V's MultiDistillModelStruct: step_index < boundary_step_index -> high-noise
    assert _experts_per_step(job) == ["high", "high", "low", "low"]
    assert sampler_config(job).guide_scale == 1.0 and any("sample_guide_scale=[4.0, 3.0] is unused" in n
                                                            for n in got.notes)
    # by index, not by timestep: with shift 5 the third step's t is 1000 * 0.8333 = 833, below the model's
    # boundary 0.875 * 1000, yet with boundary_step_index 3 it is still the high-noise expert's
    got = _imp(tmp_path, {**DISTILL, "boundary_step_index": 3}, "wan2.2_moe_distill")
    job = _job(got, "tiny-t2v-a14b")
    assert int(timesteps(sampler_config(job)).timesteps[2]) == 833 and job.model.boundary == 0.875
    assert _experts_per_step(job) == ["high", "high", "high", "low"]
    got = _imp(tmp_path, {**DISTILL, "boundary_step_index": 0}, "wan2.2_moe_distill")
    assert _experts_per_step(_job(got, "tiny-t2v-a14b")) == ["low"] * 4


def test_distill_cfg_takes_one_scale_for_both_experts(tmp_path):
    got = _imp(tmp_path, {**DISTILL, "sample_guide_scale": 2.5, "enable_cfg": True}, "wan2.2_moe_distill")
    scfg = sampler_config(_job(got, "tiny-t2v-a14b"))
    assert (scfg.guide_scale, scfg.guide_scale_low) == (2.5, 2.5)


@pytest.mark.parametrize("cfg, message", [
    ({**DISTILL, "boundary_step_index": None}, "model class wan2.2_moe_distill needs boundary_step_index"),
    ({**DISTILL, "boundary_step_index": 4}, "boundary_step_index=4: give an integer from 0 to 3"),
    ({**DISTILL, "boundary_step_index": 1.5}, "boundary_step_index=1.5: give an integer"),
    ({**DISTILL, "enable_cfg": True}, "sample_guide_scale=\\[4.0, 3.0\\] with enable_cfg: LightX2V's "
                                      "wan2.2_moe_distill applies sample_guide_scale as one number"),
])
def test_distill_refusals_are_one_line(tmp_path, cfg, message):
    with pytest.raises(LightX2VError, match=message) as err:
        _imp(tmp_path, cfg, "wan2.2_moe_distill")
    assert "\n" not in str(err.value)


# --- the experts' checkpoints, by LightX2V's Wan22MoeRunner rules --------------------------------------------------

HQ, HO, LQ, LO = "/q/high.safetensors", "/o/high.safetensors", "/q/low.safetensors", "/o/low.safetensors"


@pytest.mark.parametrize("quantized, given, high, low, said", [
    (True, dict(HQ=HQ, HO=HO, LQ=LQ, LO=LO), HQ, LQ, "high_noise_original_ckpt is unused"),
    (False, dict(HQ=HQ, HO=HO, LQ=LQ, LO=LO), HO, LO, "low_noise_quantized_ckpt is unused"),
    # quantized without a quantized high-noise file: LightX2V loads the original one as the quantized expert
    (True, dict(HO=HO, LQ=LQ), HO, LQ, "high_noise_original_ckpt is the quantized high-noise expert's file"),
    # ... but the low-noise original only when not quantized: the low-noise expert is the model folder's
    (True, dict(HQ=HQ, LO=LO), HQ, None, "the low-noise expert comes from the model folder's low_noise_model/"),
    (False, dict(), None, None, None),
])
def test_expert_checkpoints_follow_lightx2v(tmp_path, quantized, given, high, low, said):
    names = {"HQ": "high_noise_quantized_ckpt", "HO": "high_noise_original_ckpt", "LQ": "low_noise_quantized_ckpt",
             "LO": "low_noise_original_ckpt"}
    cfg = {**DISTILL, **{names[k]: v for k, v in given.items()}}
    if quantized:
        cfg.update(dit_quantized=True, dit_quant_scheme="fp8-sgl")
    got = _imp(tmp_path, cfg, "wan2.2_moe_distill")
    assert (got.values.get("dit_quant.ckpt"), got.values.get("dit_low_quant.ckpt")) == (high, low)
    assert said is None or any(said in n for n in got.notes), got.notes
    job = _job(got, "tiny-i2v-a14b")
    assert (config.quant_of(job, "dit").ckpt, config.quant_of(job, "dit_low").ckpt) == (high, low)
    assert config.quant_of(job, "dit_low").name == ("fp8-sgl" if quantized else "none"), "one mode for both experts"


# --- wan2.2 (TI2V-5B): its VAE's constants --------------------------------------------------------------------------

def test_ti2v_constants_and_frames(tmp_path):
    got = _imp(tmp_path, {**TI2V, "target_video_length": 120, "target_height": 704, "target_width": 1280,
                          "use_image_encoder": False}, "wan2.2")
    # LightX2V: (120 - 1) // 4 + 1 = 30 latent frames, decoded to 4 * 29 + 1 = 117 video frames
    assert got.values["model.frames"] == 117 and "model.i2v_size" not in got.values
    notes = " | ".join(got.notes)
    assert "decode to 117" in notes and "best_output_size" in notes and "no CLIP image encoder" in notes
    job = _job(got, "tiny-ti2v-5b")
    assert job.model.frames == 117 and job.sampler.guide_scale == 5.0


@pytest.mark.parametrize("cfg, model_cls, message", [
    ({"sample_guide_scale": 5.0, "vae_stride": [4, 16, 16]}, "wan2.2",
     "model class wan2.2 needs num_channels_latents=48: LightX2V's default is Wan2.1's 16"),
    ({**TI2V, "vae_stride": [4, 8, 8]}, "wan2.2", "vae_stride=\\[4, 8, 8\\]: lightq's model of class wan2.2 has "
                                                  "\\[4, 16, 16\\]"),
    ({"num_channels_latents": 48}, "wan2.1", "num_channels_latents=48: lightq's model of class wan2.1 has 16"),
    ({"boundary": 0.9}, "wan2.1", "boundary=0.9: a key of LightX2V's Wan2.2 MoE classes"),
    ({**TI2V, "boundary_step_index": 2}, "wan2.2", "model class wan2.2 has one DiT and would ignore it"),
])
def test_class_keys_are_refused_elsewhere(tmp_path, cfg, model_cls, message):
    with pytest.raises(LightX2VError, match=message):
        _imp(tmp_path, cfg, model_cls)


# --- the class: guessed from the keys, and its model family -------------------------------------------------------

@pytest.mark.parametrize("cfg, guessed", [
    (DISTILL, "wan2.2_moe_distill"),
    ({"boundary": 0.875, "sample_guide_scale": [4.0, 3.0]}, "wan2.2_moe"),
    (TI2V, "wan2.2"),
    ({"denoising_step_list": [1000, 500]}, "wan2.1_distill"),
])
def test_class_is_guessed_from_the_keys(tmp_path, cfg, guessed):
    got = _imp(tmp_path, cfg)
    assert got.model_cls == guessed and any("guessed from its keys" in n for n in got.notes)
    compose(got)


def test_a_class_runs_only_on_its_model_family(tmp_path):
    got = _imp(tmp_path, DISTILL, "wan2.2_moe_distill")
    with pytest.raises(LightqError, match="LightX2V's model class wan2.2_moe_distill runs a wan2.2-a14b model; "
                                          "model=tiny-i2v is wan2.1"):
        _job(got, "tiny-i2v")
    with pytest.raises(LightqError, match="class wan2.1 runs a wan2.1 model; model=tiny-t2v-a14b"):
        _job(_imp(tmp_path, {"infer_steps": 4}, "wan2.1"), "tiny-t2v-a14b")
