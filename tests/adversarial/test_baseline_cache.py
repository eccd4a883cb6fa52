"""The cached bf16 baseline is keyed by what the weights are, and a damaged cache file never fails a job
(issue 15, items 2 and 7)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from lightq.pipeline import baseline

from .conftest import FAST, compose, run_job


@pytest.fixture
def model(tmp_path, tiny_dit_folder):
    folder = tmp_path / "model"
    shutil.copytree(tiny_dit_folder, folder)
    return folder


def _key(*overrides):
    return baseline.key(compose(*overrides), "cpu")


def test_key_follows_the_weights_not_their_path(model):
    from lightq.models.tiny import T5_FILE

    before = _key(f"model.weights={model}")
    assert _key(f"model.weights={model}") == before
    t5 = model / T5_FILE
    stat = t5.stat()
    data = bytearray(t5.read_bytes())
    data[100] ^= 0xFF  # same size, same modification time, other bytes in the first MiB
    t5.write_bytes(bytes(data))
    os.utime(t5, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _key(f"model.weights={model}") != before
    touched = _key(f"model.weights={model}")
    os.utime(t5, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # rewritten in place with a new mtime
    assert _key(f"model.weights={model}") != touched
    (model / "new.safetensors").write_bytes(b"x")
    assert len(baseline.files_identity(model)) == len(list(model.iterdir()))


def test_key_of_synthetic_and_random_weights(monkeypatch):
    from lightq.models import tiny

    synthetic = _key()
    monkeypatch.setattr(tiny, "version", lambda name: "another generator")
    assert _key() != synthetic
    random = _key("model.weights=random")
    assert _key("model.weights=random", "seed=7") != random
    assert _key("model.weights=random", "model.dit_arch=tiny-i2v") != random


def test_baseline_config_quantizes_nothing():
    cfg = baseline.bf16_config(compose("dit_quant=int8-torch", "dit_quant.skip=[blocks.0.ffn.2]", "t5_quant=fp8-torch",
                                       "attn_quant=int8-sage-torch", "offload=block", "offload.lazy_load=true"))
    for group in ("dit_quant", "t5_quant", "clip_quant", "attn_quant"):
        assert cfg[group].scheme == "none" and cfg[group].name == "none" and not cfg[group].options, group
    assert cfg.dit_quant.ckpt is None and not cfg.dit_quant.skip
    assert cfg.offload.mode == "block" and not cfg.offload.lazy_load


def test_key_ignores_the_quantization_modes_only():
    base = _key(*FAST)
    assert _key(*FAST, "dit_quant=int8-torch", "t5_quant=fp8-torch", "dit_quant.skip=[blocks.0.ffn.2]",
                "attn_quant=int8-sage-torch") == base
    assert _key(*FAST, "offload=block") == base
    assert _key(*FAST, "sampler.steps=2") != base and _key(*FAST, "prompt=another") != base


def test_a_changed_checkpoint_is_not_compared_with_the_old_baseline(tmp_path, model):
    from lightq.models.tiny import T5_FILE

    first = run_job(tmp_path / "bf16", f"model.weights={model}", *FAST)
    assert first["status"] == "ok" and first["quality"]["baseline"] == "this run is the bf16 baseline"
    state = torch.load(model / T5_FILE, weights_only=True)
    torch.save({k: v * 1.5 if v.is_floating_point() else v for k, v in state.items()}, model / T5_FILE)
    second = run_job(tmp_path / "int8", f"model.weights={model}", "dit_quant=int8-torch", *FAST)
    assert second["status"] == "ok"
    assert "psnr_db" not in second["quality"] and "no bf16 baseline cached" in second["quality"]["baseline"]


def _damage(path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if content == "nan":
        torch.save({"latents": torch.full((2,), float("nan")), "video": torch.zeros(2), "timings": {"denoise": 1.0}},
                   path)
    elif content == "wrong":
        torch.save({"latents": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)


@pytest.mark.parametrize("content", [b"\x00garbage", b"", b"PK\x03\x04truncated zip", "nan", "wrong"])
def test_a_damaged_cache_file_is_refused_and_removed(tmp_path, content):
    path = tmp_path / "k.pt"
    _damage(path, content)
    data, why = baseline.load(path)
    assert data is None and "was unreadable" in why and "removed" in why and not path.exists()


def test_a_damaged_cache_file_never_fails_a_job(tmp_path):
    from lightq.paths import cache_dir

    path = cache_dir() / "baselines" / f"{_key(*FAST, 'seed=5')}.pt"
    _damage(path, b"\x00garbage")
    result = run_job(tmp_path, "dit_quant=int8-torch", "seed=5", *FAST)
    assert result["status"] == "ok", result.get("reason")
    q = result["quality"]
    assert "was unreadable" in q["baseline"] and "removed" in q["baseline"] and "computed in this job" in q["baseline"]
    assert q["psnr_db"] > 20
    data, why = baseline.load(path)  # replaced by the recomputed one
    assert data is not None and why == ""
