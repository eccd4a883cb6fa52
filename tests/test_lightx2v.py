"""``from_lightx2v=``: LightX2V's JSON keys as lightq settings with LightX2V's meaning (lightq.lightx2v)."""

import json
import math
import os

import pytest
import yaml

from lightq.lightx2v.cli import expand
from lightq.lightx2v.importer import LightX2VError, import_config
from lightq.models.family import WAN21


def _imp(tmp_path, cfg, model_cls=None, name="cfg.json"):
    p = tmp_path / name
    p.write_text(json.dumps(cfg))
    return import_config(p, model_cls)


def test_mapping_keeps_lightx2v_meaning(tmp_path):
    cfg = {"infer_steps": 40, "target_video_length": 81, "target_height": 480, "target_width": 832, "seed": 42,
           "sample_shift": 5.0, "sample_guide_scale": 5, "enable_cfg": True, "fps": 24,
           "dit_quantized": True, "dit_quant_scheme": "fp8-sgl", "dit_quantized_ckpt": "/m/wan fp8.safetensors",
           "t5_quantized": True, "t5_quant_scheme": "fp8", "clip_quantized": True, "clip_quant_scheme": "int8",
           "cpu_offload": True, "offload_granularity": "phase", "lazy_load": True, "self_attn_1_type": "sage_attn2",
           "cross_attn_1_type": "flash_attn3", "cross_attn_2_type": "sage_attn2", "rope_type": "torch_real_rope",
           "text_len": 512, "use_31_block": True, "t5_cpu_offload": True, "feature_caching": "NoCaching",
           "use_tiling_vae": True, "parallel": {}, "lora_configs": None}
    got = _imp(tmp_path, cfg)
    assert got.model_cls == "wan2.1"
    assert got.choices == {"dit_quant": "fp8-sgl", "t5_quant": "fp8-sgl", "clip_quant": "int8-vllm",
                           "attn_quant": "int8fp8-sage2-auto", "offload": "phase"}
    assert got.values == {"dit_quant.ckpt": "/m/wan fp8.safetensors", "offload.lazy_load": True,
                          "sampler.steps": 40, "sampler.shift": 5.0, "sampler.guide_scale": 5, "model.frames": 81,
                          "model.height": 480, "model.width": 832, "model.fps": 24, "seed": 42,
                          "model.i2v_size": "max_area"}
    assert got.kernels["self_attn_1_type"] == "sage_attn2" and got.kernels["rope_type"] == "torch_real_rope"
    notes = " | ".join(got.notes)
    for said in ("per thread", "cross-attention is always bf16", "decodes the VAE in tiles", "t5_cpu_offload",
                 "clip linear is its int8-vllm", "model class wan2.1"):
        assert said in notes, said


def test_fp8_pertensor_maps_to_the_torch_scaled_mm_mode(tmp_path):
    got = _imp(tmp_path, {"dit_quantized": True, "dit_quant_scheme": "fp8-pertensor", "weight_auto_quant": True,
                          "dit_quantized_ckpt": "/m/wan-fp8-pertensor.safetensors"})
    assert got.choices["dit_quant"] == "fp8-pertensor-torch"
    assert got.values["dit_quant.ckpt"] == "/m/wan-fp8-pertensor.safetensors"
    notes = " | ".join(got.notes)
    for said in ("LightX2V's fp8-pertensor is torch._scaled_mm", "use_fast_accum", "runs dynamic per tensor",
                 "weight_auto_quant is unused (LightX2V's Wan DiT does not pass it to its linears"):
        assert said in notes, said


@pytest.mark.parametrize("cfg, guide, note", [
    ({"sample_guide_scale": 5}, 1.0, "enable_cfg is absent (LightX2V's default: false); sample_guide_scale=5 is unused"),
    ({"sample_guide_scale": 5, "enable_cfg": False}, 1.0, "enable_cfg is false"),
    ({"sample_guide_scale": 6, "enable_cfg": True}, 6, None),
])
def test_cfg_is_off_unless_enabled(tmp_path, cfg, guide, note):
    got = _imp(tmp_path, cfg)
    assert got.values["sampler.guide_scale"] == guide
    assert note is None or any(note in n for n in got.notes)


def test_distill_step_list_follows_the_model_class(tmp_path):
    cfg = {"infer_steps": 4, "denoising_step_list": [1000, 750, 500, 250], "sample_shift": 5,
           "sample_guide_scale": 6, "enable_cfg": True}
    distill = _imp(tmp_path, cfg)  # no class given: a step list means LightX2V's wan2.1_distill
    assert distill.model_cls == "wan2.1_distill" and distill.choices["sampler"] == "distill"
    assert distill.values["sampler.denoising_steps"] == [1000, 750, 500, 250]
    assert distill.values["sampler.guide_scale"] == 6, "CFG with a distill step list when the config asks for it"
    plain = _imp(tmp_path, cfg, "wan2.1")  # LightX2V's WanScheduler ignores the list
    assert "sampler" not in plain.choices and plain.values["sampler.steps"] == 4
    assert any("denoising_step_list is unused" in n for n in plain.notes)


def test_relative_checkpoint_is_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    got = _imp(tmp_path, {"dit_quantized": True, "dit_quant_scheme": "fp8-triton",
                          "dit_quantized_ckpt": "lightx2v/Wan2.1-Distill-Models/x.safetensors"})
    assert got.choices["dit_quant"] == "fp8-triton", "LightX2V's triton mode is lightq's triton mode"
    assert got.values["dit_quant.ckpt"] == os.path.join(str(tmp_path), "lightx2v/Wan2.1-Distill-Models/x.safetensors")
    assert any("not from the Hub; it does not exist there" in n for n in got.notes)


def test_max_area_size_is_lightx2vs_rule():
    geometry = WAN21.geometry(type("M", (), {"vae_arch": "wan2.1", "dit_arch": "14b"})())
    for (img_h, img_w), area in [((720, 1280), (480, 832)), ((1024, 768), (480, 832)), ((333, 1000), (720, 1280))]:
        a = img_h / img_w  # LightX2V: round(sqrt(A * a) // 8 // 2 * 2) latent rows, then * 8 pixels
        want = (round(math.sqrt(area[0] * area[1] * a) // 8 // 2 * 2) * 8,
                round(math.sqrt(area[0] * area[1] / a) // 8 // 2 * 2) * 8)
        assert geometry.max_area(*area, a) == want
    assert geometry.max_area(480, 832, 720 / 1280) == (464, 832)  # by hand: sqrt(399360 * 0.5625) = 473.96 -> 58 rows of 8


@pytest.mark.parametrize("par, mode, cfg_p, world, said", [
    ({"seq_p_size": 4, "seq_p_attn_type": "ulysses", "cfg_p_size": 2}, "ulysses", 2, 8, None),
    ({"seq_p_size": 8, "seq_p_attn_type": "ring"}, "ring", 1, 8, "merge the partial softmaxes"),
    ({"seq_p_size": 8, "seq_p_attn_type": "ring", "self_attn_1_type": "sage_attn2"}, "allgather", 1, 8,
     "all-gathered instead"),
    ({"seq_p_size": 2, "seq_p_attn_type": "ulysses-4090", "seq_p_fp8_comm": True}, "ulysses", 1, 2, "in fp8"),
    ({"cfg_p_size": 2}, "none", 2, 2, "CFG 2"),
])
def test_parallel_maps_onto_the_parallel_group(tmp_path, par, mode, cfg_p, world, said):
    extra = {k: par.pop(k) for k in list(par) if not k.startswith(("seq_p", "cfg_p"))}
    got = _imp(tmp_path, {"parallel": par, "enable_cfg": True, "sample_guide_scale": 5, **extra})
    assert (got.values["parallel.mode"], got.values["parallel.cfg"], got.values["parallel.world"]) == \
        (mode, cfg_p, world)
    notes = " | ".join(got.notes)
    assert f"torchrun --nproc-per-node {world}" in notes and (said is None or said in notes)


def test_a_parallel_config_refuses_a_launch_of_another_size(tmp_path, run_lightq):
    cfg = tmp_path / "sp.json"
    cfg.write_text(json.dumps({"parallel": {"seq_p_size": 4, "seq_p_attn_type": "ulysses"}}))
    res = run_lightq(f"from_lightx2v={cfg}")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].endswith("torchrun --nproc-per-node 4 -m lightq ...")


@pytest.mark.parametrize("cfg, model_cls, feature, message", [
    ({"lora_configs": [{"path": "l.safetensors", "strength": "high"}]}, None, None,
     "cfg.json: lora_configs\\[0\\].strength='high': give a number"),
    ({"lora_configs": [{"path": "l.safetensors", "weight": 1.0}]}, None, None,
     "cfg.json: lora_configs\\[0\\] has key weight: lightq knows path, strength, name"),
    ({"lora_configs": [{"strength": 1.0}]}, None, None, "cfg.json: lora_configs\\[0\\]=.*give"),
    ({"lora_configs": [{"path": "l.safetensors"}], "lora_dynamic_apply": "yes"}, None, None,
     "cfg.json: lora_dynamic_apply='yes': give true or false"),
    ({"boundary": 0.875, "feature_caching": "Tea"}, None, "feature caching",
     "feature_caching=\"Tea\" asks for feature caching"),
    ({"parallel": {"seq_p_size": 2, "tensor_p_size": 2}}, None, "tensor parallelism", "parallel.tensor_p_size=2"),
    ({"parallel": {"seq_p_size": 4, "seq_p_attn_type": "zigzag"}}, None, "sequence-parallel attention zigzag",
     "seq_p_attn_type='zigzag'"),
    ({"parallel": {"seq_p_size": 4, "seq_p_frob": 1}}, None, None, "parallel.seq_p_frob: not a LightX2V parallel key"),
    ({"parallel": {"cfg_p_size": 3}}, None, None, "cfg_p_size=3: CFG has two passes"),
    ({"feature_caching": "Tea"}, None, "feature caching", "feature_caching=\"Tea\""),
    ({}, "wan2.2_moe_vace", "model class wan2.2_moe_vace", "model class 'wan2.2_moe_vace' "
     "\\(from_lightx2v.model_cls\\) is not in lightq"),
    ({"model_cls": "qwen_image"}, "wan2.1", "model class qwen_image", "the JSON's model_cls"),
    ({"sample_guide_scale": [3.5, 3.5], "enable_cfg": True}, "wan2.1", None,
     "cfg.json: sample_guide_scale=\\[3.5, 3.5\\]: give a number \\(a list, one value per expert, is read by "
     "LightX2V's wan2.2_moe only"),
    ({"self_attn_1_type": "sage_attn3"}, None, "kernel self_attn_1_type=sage_attn3", "self_attn_1_type='sage_attn3'"),
    ({"dit_quantized": True, "dit_quant_scheme": "nvfp4"}, None, "quantization scheme nvfp4", "dit_quant_scheme='nvfp4'"),
    ({"vae_stride": [4, 16, 16]}, None, "constant vae_stride", "vae_stride=\\[4, 16, 16\\]: lightq's model of class wan2.1 has "
     "\\[4, 8, 8\\]"),
    ({"frobnicate": 1, "audio_x": 2}, None, "audio-driven", "audio_x=2 asks for audio-driven video"),
    ({"frobnicate": 1}, None, None, "cfg.json: key frobnicate: not in the LightX2V wan2.1 keys lightq knows"),
    ({"dit_quantized": True}, None, None, "dit_quantized is true but dit_quant_scheme is missing"),
    ({"lazy_load": True}, None, None, "lazy_load: true needs cpu_offload: true"),
    ({"cpu_offload": True, "offload_granularity": "layer"}, None, "offload granularity layer",
     "offload_granularity='layer'"),
    ({"enable_cfg": True}, None, None, "enable_cfg is true but sample_guide_scale is missing"),
])
def test_refusals_are_one_line_naming_key_and_file(tmp_path, cfg, model_cls, feature, message):
    with pytest.raises(LightX2VError, match=message) as err:
        _imp(tmp_path, cfg, model_cls)
    assert "\n" not in str(err.value) and str(tmp_path / "cfg.json") in str(err.value)
    assert (err.value.feature or "").startswith(feature or "")


@pytest.mark.parametrize("dynamic, mode", [(None, "merged"), (False, "merged"), (True, "unmerged")])
def test_lora_configs_map_to_lora_and_its_mode(tmp_path, monkeypatch, dynamic, mode):
    """lora_configs -> lora (paths local as LightX2V reads them, LightX2V's default strength 1), lora_dynamic_apply
    -> lora_mode; the job composes and validates."""
    from lightq.lightx2v.survey import compose

    monkeypatch.chdir(tmp_path)
    cfg = {"denoising_step_list": [1000, 750, 500, 250], "lora_configs": [
        {"path": "lightx2v/Wan2.1-Distill-Loras/wan2.1_t2v_14b_lora_rank64_lightx2v_4step.safetensors",
         "strength": 0.5}, {"name": "wan2.1", "path": "/loras/style.safetensors"}]}
    if dynamic is not None:
        cfg["lora_dynamic_apply"] = dynamic
    got = _imp(tmp_path, cfg)
    assert got.values["lora"] == [
        {"path": str(tmp_path / "lightx2v/Wan2.1-Distill-Loras/wan2.1_t2v_14b_lora_rank64_lightx2v_4step.safetensors"),
         "strength": 0.5}, {"path": "/loras/style.safetensors", "strength": 1.0}]
    assert got.values["lora_mode"] == mode
    notes = " | ".join(got.notes)
    assert "lora_configs[0].path=lightx2v/" in notes and "lora_configs[1].name='wan2.1' is unused" in notes
    compose(got)


def test_values_are_data(tmp_path):
    """A path with ``${...}``, quotes and backslashes reaches the job config exactly (never interpolated)."""
    from hydra import compose, initialize_config_dir

    from lightq import config
    from lightq.paths import conf_dir

    path = "/m/${oc.env:HOME}/it's a \\dir\\${x}"
    cfg = tmp_path / "x.json"
    cfg.write_text(json.dumps({"dit_quantized": True, "dit_quant_scheme": "fp8-torch", "dit_quantized_ckpt": path}))
    config.register()
    argv = expand([f"from_lightx2v={cfg}", "sampler.steps=3"])
    assert argv == ["lightx2v=x", "sampler.steps=3"]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="t"):
        job = compose("config", overrides=argv)
    assert job.dit_quant.ckpt == path and job.dit_quant.name == "fp8-torch" and job.from_lightx2v.config == str(cfg)


def test_command_line_wins_in_any_order_and_flags_after(run_lightq, tmp_path):
    cfg = tmp_path / "wan.json"
    cfg.write_text(json.dumps({"infer_steps": 40, "sample_shift": 5, "dit_quantized": True,
                               "dit_quant_scheme": "int8-vllm", "self_attn_1_type": "flash_attn3"}))
    r = run_lightq("sampler.steps=7", f"from_lightx2v={cfg}", "dit_quant=fp8-torch", "from_lightx2v.model_cls=wan2.1",
                   "--cfg", "job")
    assert r.returncode == 0, r.stderr
    job = yaml.safe_load(r.stdout)
    assert job["sampler"]["steps"] == 7 and job["sampler"]["shift"] == 5 and job["dit_quant"]["name"] == "fp8-torch"
    assert job["sampler"]["guide_scale"] == 1.0 and job["from_lightx2v"]["kernels"] == {"self_attn_1_type": "flash_attn3"}
    bad = run_lightq(f"from_lightx2v={cfg}", "from_lightx2v.model_cls=hunyuan_video_1.5", "--cfg", "job")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "model class 'hunyuan_video_1.5'" in bad.stderr


def test_sweep_over_configs_records_each_import(run_lightq, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"infer_steps": 2, "enable_cfg": True, "sample_guide_scale": 4}))
    b.write_text(json.dumps({"denoising_step_list": [1000, 500], "sample_shift": 5, "seed": 3}))
    small = ["model.frames=5", "model.height=32", "model.width=32", "quality.compare=false"]
    r = run_lightq("-m", f"from_lightx2v={a},{b}", *small, "hydra.sweep.dir=sweep", timeout=600)
    assert r.returncode == 0, r.stderr
    results = {json.loads(p.read_text())["from_lightx2v"]["config"]: json.loads(p.read_text())
               for p in (tmp_path / "sweep").rglob("result.json")}
    assert set(results) == {str(a), str(b)} and all(r["status"] == "ok" for r in results.values())
    assert results[str(b)]["from_lightx2v"]["model_cls"] == "wan2.1_distill"
    resolved = {p.parent.name.split(",")[0]: yaml.safe_load(p.read_text())
                for p in (tmp_path / "sweep").rglob("config_resolved.yaml")}  # folders: lightx2v=<stem>,<overrides>
    assert {k: (v["sampler"]["name"], v["sampler"]["guide_scale"]) for k, v in resolved.items()} == \
        {"lightx2v=a": ("unipc", 4), "lightx2v=b": ("distill", 1.0)}


def test_i2v_max_area_keeps_the_pictures_aspect(tmp_path):
    from omegaconf import OmegaConf
    from PIL import Image

    from lightq.config import LightqConfig
    from lightq.pipeline.components import input_image, video_size

    Image.new("RGB", (64, 32), (200, 10, 10)).save(tmp_path / "wide.png")  # 64 wide, 32 high
    cfg = OmegaConf.merge(OmegaConf.structured(LightqConfig), {"image": str(tmp_path / "wide.png"), "model": {
        "name": "tiny-i2v", "task": "i2v", "clip_arch": "tiny", "height": 64, "width": 64, "i2v_size": "max_area"}})
    # 4096 pixels at aspect 1/2: sqrt(2048) = 45.3 -> 5 latent rows of 8 -> 4 (patch 2) -> 32; sqrt(8192) -> 80
    assert video_size(cfg) == (32, 80)
    assert input_image(cfg, 32, 80).shape == (3, 32, 80)
    cfg.model.i2v_size = "crop"
    assert video_size(cfg) == (64, 64)
