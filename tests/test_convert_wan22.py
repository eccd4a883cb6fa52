"""python -m lightq.convert on Wan2.2 folders: each A14B expert (component=dit / dit_low) and TI2V-5B's DiT, and the
converted files loaded by dit_quant.ckpt / dit_low_quant.ckpt give the latents of quantizing at load."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lightq import config
from lightq.checkpoints.conventions import open_source
from lightq.convert import run
from lightq.errors import LightqError
from lightq.hardware import resolve
from lightq.models.tiny import ensure_tiny
from lightq.paths import conf_dir
from lightq.pipeline.graph import generate
from lightq.plan import plan_run

REPO = Path(__file__).resolve().parents[1]


def _convert(*args):
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf" / "convert.yaml"), OmegaConf.from_dotlist(list(args)))
    cfg.pop("defaults")
    cfg.pop("hydra")
    return run(cfg)


@pytest.fixture(scope="module")
def job():
    config.register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        yield lambda *o: generate(c := compose("config", overrides=list(o)), resolve("cpu"),
                                  plan_run(c, resolve("cpu"))).latents


def _tensors(path):
    src = open_source(path)
    return {k: src.get(k) for k in src}


def test_each_a14b_expert_converts_and_loads_into_its_expert(tmp_path, job):
    folder = ensure_tiny("tiny-t2v-a14b")
    high = _convert("component=dit", "scheme=fp8", f"source={folder}", f"output={tmp_path / 'high.safetensors'}",
                    "progress=false")
    low = _convert("component=dit_low", "scheme=fp8", "source=tiny-t2v-a14b",
                   f"output={tmp_path / 'low.safetensors'}", "progress=false")
    direct = _convert("component=dit", "scheme=fp8", f"source={folder / 'high_noise_model'}",
                      f"output={tmp_path / 'direct.safetensors'}", "progress=false")
    h, lo, d = _tensors(high), _tensors(low), _tensors(direct)
    assert h.keys() == d.keys() and all(torch.equal(h[k], d[k]) for k in h), "dit is the high-noise expert"
    assert h.keys() == lo.keys() and not all(torch.equal(h[k], lo[k]) for k in h), "dit_low is the other expert"
    assert open_source(low).metadata["lightq.scheme"] == "fp8"
    common = ["model=tiny-t2v-a14b", "dit_quant=fp8-torch", "quality.compare=false"]
    at_load = job(*common)
    from_files = job(*common, f"dit_quant.ckpt={high}", f"dit_low_quant.ckpt={low}")
    assert torch.equal(at_load, from_files)
    swapped = job(*common, f"dit_quant.ckpt={low}", f"dit_low_quant.ckpt={high}")
    assert not torch.equal(at_load, swapped), "the experts' files are told apart"


def test_ti2v_dit_converts_and_loads(tmp_path, job):
    out = _convert("component=dit", "scheme=int8", "source=tiny-ti2v-5b", f"output={tmp_path / 'ti2v'}",
                   "layout=blocks", "progress=false")
    common = ["model=tiny-ti2v-5b", "dit_quant=int8-torch", "quality.compare=false"]
    assert torch.equal(job(*common), job(*common, f"dit_quant.ckpt={out}"))


@pytest.mark.parametrize("args, message", [
    (["component=dit_low", "source=tiny"], "no low_noise_model/ folder for dit_low"),
    (["component=vae", "source=tiny-ti2v-5b"], "component=vae: choose one of dit, dit_low, t5, clip"),
    (["component=clip", "source=tiny-i2v-a14b"], "unknown component 'clip': choose dit, dit_low, t5, vae"),  # no CLIP
])
def test_wan22_conversion_errors_are_one_line(tmp_path, args, message):
    with pytest.raises(LightqError, match=message) as err:
        _convert(*args, f"output={tmp_path / 'x.safetensors'}", "progress=false")
    assert "\n" not in str(err.value) and not (tmp_path / "x.safetensors").exists()


def test_a_lora_merges_into_the_expert_it_names(tmp_path):
    from safetensors.torch import save_file

    src = open_source(ensure_tiny("tiny-t2v-a14b") / "low_noise_model")
    n, k = src.shape("blocks.0.ffn.0.weight")
    lora = tmp_path / "l.safetensors"
    save_file({"blocks.0.ffn.0.lora_down.weight": torch.ones(2, k), "blocks.0.ffn.0.lora_up.weight": torch.ones(n, 2)},
              lora)
    base = _tensors(_convert("component=dit_low", "source=tiny-t2v-a14b", "scheme=fp8", "progress=false",
                             f"output={tmp_path / 'base.safetensors'}"))
    merged = _tensors(_convert("component=dit_low", "source=tiny-t2v-a14b", "scheme=fp8", "progress=false",
                               f"output={tmp_path / 'merged.safetensors'}", f"lora=[{{path: {lora}, expert: low}}]"))
    assert not torch.equal(base["blocks.0.ffn.0.weight"], merged["blocks.0.ffn.0.weight"])
    with pytest.raises(LightqError, match="lora= names no LoRA for component=dit_low"):
        _convert("component=dit_low", "source=tiny-t2v-a14b", f"output={tmp_path / 'x.safetensors'}",
                 f"lora=[{{path: {lora}, expert: high}}]")


def test_dit_low_needs_an_a14b_folder_not_a_file(tmp_path):
    single = _convert("component=dit", "scheme=fp8", "source=tiny", f"output={tmp_path / 'd.safetensors'}",
                      "progress=false")
    with pytest.raises(LightqError, match="component=dit_low is the low-noise expert of a Wan2.2 A14B model folder"):
        _convert("component=dit_low", f"source={single}", f"output={tmp_path / 'x.safetensors'}")
