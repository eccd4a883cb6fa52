"""python -m lightq.convert end to end, interrupted writes, Hub offline errors, LightX2V config and file locating."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightq.checkpoints.conventions import open_source
from lightq.checkpoints.locate import NotInFolder, find_component_file
from lightq.errors import CheckpointError, LightqError
from lightq.models.tiny import ensure_tiny

REPO = Path(__file__).resolve().parents[1]


def _convert(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "lightq.convert", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=120)


def _cfg(*args):
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf" / "convert.yaml"), OmegaConf.from_dotlist(list(args)))
    cfg.pop("defaults")
    cfg.pop("hydra")
    return cfg


def test_help_lists_the_converter_options_only(tmp_path):
    proc = _convert("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("python -m lightq.convert: quantize a float Wan2.1 / Wan2.2 checkpoint")
    options = [line.split()[0] for line in proc.stdout.split("Options (key=value):")[1].split("Defaults:")[0]
               .splitlines() if line.startswith("  ") and not line.startswith("   ")]
    assert options == ["component", "scheme", "source", "output", "layout", "skip", "overwrite", "float_dtype",
                       "shard_gb", "progress", "lora"]
    assert set(options) == set(_cfg()), "every converter key is described, and nothing else"
    assert "dit_quant" not in proc.stdout and "powered by Hydra" not in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_cli_converts_and_refuses_to_overwrite(tmp_path):
    from lightq.convert import run

    out = tmp_path / "dit-int8.safetensors"
    r = _convert("component=dit", "scheme=int8", "source=tiny", f"output={out}", "skip=[blocks.0.ffn.2]",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    meta = open_source(out).metadata
    assert meta["lightq.scheme"] == "int8" and meta["lightq.skip"] == '["blocks.0.ffn.2"]'
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # Hydra wrote no outputs/ folder
    before = out.read_bytes()
    r = _convert("component=dit", "scheme=fp8", "source=tiny", f"output={out}", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "overwrite=true" in r.stderr, r.stderr
    assert out.read_bytes() == before
    run(_cfg("component=dit", "scheme=fp8", "source=tiny", f"output={out}", "overwrite=true", "progress=false"))
    assert open_source(out).metadata["lightq.scheme"] == "fp8"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


@pytest.mark.parametrize("args, message", [
    (["scheme=fp4", "source=tiny", "output=x.safetensors"], "scheme 'fp4'"),
    (["layout=lightx2v", "scheme=int4-g128", "source=tiny", "output=x.safetensors"], "fp8 or int8 per-channel"),
    (["source=tiny"], "missing output=..."),
    (["source=/nope/model.safetensors", "output=x.safetensors"], "checkpoint not found"),
    (["layout=comfyui", "scheme=int8", "source=tiny", "output=x.safetensors"], "comfyui is scaled fp8 only"),
    (["layout=chunked", "source=tiny", "output=x.safetensors"], "writes a folder"),
    (["layout=lightx2v", "scheme=fp8-pertensor", "source=tiny", "output=x.safetensors"],
     "LightX2V's fp8-pertensor needs a calibrated input_scale per linear"),
])
def test_cli_errors_are_one_line(tmp_path, monkeypatch, args, message):
    from lightq.convert import run

    monkeypatch.chdir(tmp_path)
    with pytest.raises(LightqError, match=message) as err:
        run(_cfg(*args))
    assert str(err.value).count("\n") == 0
    assert list(tmp_path.iterdir()) == []


SLOW_WRITER = """
import sys, time
from lightq.checkpoints import writers
_write = writers.SafetensorsWriter.write
def slow(self, key, tensor):
    _write(self, key, tensor)
    self._file.flush()
    time.sleep(0.05)
writers.SafetensorsWriter.write = slow
from lightq.convert import main
sys.argv = ["lightq.convert"] + sys.argv[1:]
main()
"""


def test_killed_conversion_leaves_nothing_that_looks_complete(tmp_path, layout="blocks", name="m_blocks"):
    """SIGKILL in the middle of writing (the writer is slowed down by the test, not by lightq)."""
    script = tmp_path / "slow_convert.py"
    script.write_text(SLOW_WRITER)
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen([sys.executable, str(script), "component=dit", "scheme=fp8", "source=tiny",
                             f"layout={layout}", f"output={work / name}"], cwd=work,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:
        partial = [p for p in work.rglob("*.partial") if p.is_file() and p.stat().st_size > 0]
        if partial:
            break
        time.sleep(0.01)
    else:
        proc.kill()
        pytest.fail("the conversion never started writing")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / name).exists()
    leftovers = [p.name for p in work.iterdir()]
    assert leftovers and all(n.startswith(".") and n.endswith(".partial") for n in leftovers)
    with pytest.raises(CheckpointError):
        open_source(work / name)


def test_hub_offline_uncached_is_one_clear_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = ("from lightq.checkpoints.hub import resolve\n"
            "try:\n    resolve('lightx2v/Encoders-Lightx2v/models_t5_umt5-xxl-enc-fp8.pth')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.stdout.startswith("CheckpointError 'lightx2v/Encoders-Lightx2v/models_t5_umt5-xxl-enc-fp8.pth' is not "
                               "in the Hugging Face cache and offline mode is on"), r.stdout + r.stderr
    assert "hf download lightx2v/Encoders-Lightx2v models_t5_umt5-xxl-enc-fp8.pth" in r.stdout


def test_hub_cached_file_resolves_offline(tmp_path):
    """A file already in the HF cache layout is found with HF_HUB_OFFLINE=1."""
    hub = tmp_path / "hf" / "hub" / "models--me--enc"
    snap = hub / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("a" * 40)
    torch.save({"x": torch.ones(2)}, snap / "enc.pth")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = "from lightq.checkpoints.hub import resolve; print(resolve('me/enc/enc.pth'))"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip().endswith("enc.pth"), r.stderr


def test_find_component_file_like_lightx2v(tmp_path):
    tiny = ensure_tiny("tiny-i2v")
    folder = tmp_path / "model"
    folder.mkdir()
    for f in tiny.iterdir():
        (folder / f.name).symlink_to(f)
    assert find_component_file(folder, "dit", None) == folder
    assert find_component_file(folder, "t5", None).name == "models_t5_umt5-xxl-enc-bf16.pth"
    assert find_component_file(folder, "vae", None).name == "Wan2.1_VAE.pth"
    with pytest.raises(NotInFolder, match="no DiT checkpoint holds fp8 .*found: model \\(bf16\\)"):
        find_component_file(folder, "dit", "fp8")
    with pytest.raises(NotInFolder, match="models_t5_umt5-xxl-enc-int8.pth"):
        find_component_file(folder, "t5", "int8")
    from lightq.convert import run
    run(_cfg("component=dit", "scheme=fp8", f"source={folder}", f"output={folder / 'wan_fp8.safetensors'}"))
    assert find_component_file(folder, "dit", "fp8").name == "wan_fp8.safetensors"
    run(_cfg("component=t5", "scheme=int8", f"source={folder}", "layout=lightx2v", f"output={folder}"))
    assert find_component_file(folder, "t5", "int8").name == "models_t5_umt5-xxl-enc-int8.pth"
    src = open_source(folder / "wan_fp8.safetensors")
    save_file({k: src[k] for k in src}, folder / "copy_fp8.safetensors")  # a second fp8 file: ambiguous
    with pytest.raises(CheckpointError, match="2 DiT checkpoints hold fp8 weights") as ambiguous:
        find_component_file(folder, "dit", "fp8")
    assert not isinstance(ambiguous.value, NotInFolder), "an ambiguous folder never falls back to the bf16 file"


def test_model_folder_like_lightx2v_subfolders_other_files_and_config(tmp_path):
    """LightX2V's fp8/ int8/ original/ ... subfolders are looked in first; a LoRA or VAE .safetensors beside the DiT
    is passed over; the pre-quantized file in a subfolder is used, never the bf16 one quantized instead; the
    folder's config.json must describe the chosen DiT."""
    import json

    from omegaconf import OmegaConf

    from lightq.checkpoints.locate import find_component
    from lightq.config import LightqConfig
    from lightq.models.wan_dit import DIT_ARCHS
    from lightq.pipeline import components as C
    from lightq.quant.method import QuantMethod

    from lightq.convert import run
    tiny = ensure_tiny("tiny-i2v")
    folder = tmp_path / "model"
    folder.mkdir()
    for f in tiny.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "fp8").mkdir()
    run(_cfg("component=dit", "scheme=fp8", f"source={folder}", f"output={folder / 'fp8' / 'dit_fp8.safetensors'}"))
    (folder / "int8").mkdir()
    run(_cfg("component=t5", "scheme=int8", f"source={folder}", "layout=lightx2v", f"output={folder / 'int8'}"))
    save_file({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 8)}, folder / "style_lora.safetensors")
    save_file({"decoder.conv.weight": torch.zeros(2, 2)}, folder / "vae.safetensors")
    found = find_component(folder, "dit", "fp8")
    assert found.path == folder / "fp8" / "dit_fp8.safetensors" and "in fp8/" in found.why
    assert find_component_file(folder, "t5", "int8") == folder / "int8" / "models_t5_umt5-xxl-enc-int8.pth"
    assert find_component_file(folder, "dit", None) == folder, "the bf16 DiT beside a LoRA and a VAE file"
    with pytest.raises(NotInFolder, match="not DiT checkpoints: style_lora.safetensors, vae.safetensors"):
        find_component_file(folder, "dit", "int8")
    # result.json's file record: which file and why, the fallback said as such
    _, used = C._source("dit", QuantMethod.portable("fp8"), folder, C.family("wan2.1"))
    assert used["path"] == str(folder / "fp8" / "dit_fp8.safetensors") and used["why"].startswith("pre-quantized")
    _, fallback = C._source("dit", QuantMethod.portable("int8"), folder, C.family("wan2.1"))
    assert fallback["path"] == str(folder) and "quantized at load" in fallback["why"]
    # config.json: LightX2V's record of the DiT's size
    cfg = OmegaConf.merge(OmegaConf.structured(LightqConfig), {"model": {"name": "tiny-i2v", "task": "i2v",
                                                                         "dit_arch": "tiny-i2v", "clip_arch": "tiny"}})
    arch = DIT_ARCHS["tiny-i2v"]
    (folder / "config.json").write_text(json.dumps({"dim": arch.dim, "num_layers": arch.num_layers}))
    C.check_folder_config(folder, "tiny-i2v", arch)
    (folder / "config.json").write_text(json.dumps({"dim": 5120, "num_layers": 40, "model_type": "i2v"}))
    with pytest.raises(LightqError, match="describes another DiT than the chosen model: dim=5120 "):
        C.load_dit(cfg, QuantMethod.portable(None), folder, "cpu", torch.bfloat16, False)
