"""Sweep tables from hand-built job records: a row's speedup comes from the bf16 job that matches it in everything
but the quantization modes, and a damaged result.json is a failed row, never a missing one (issue 15, items 3, 14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightq import report


def _job(sweep: Path, name: str, *, dit: str, overrides: list[str], denoise: float, status: str = "ok",
         **choices) -> None:
    scheme = "none" if dit == "none" else dit.split("-")[0]
    res = {"status": status, "reason": "", "choices": {"model": "tiny", "dit_quant": dit, "t5_quant": "none",
                                                       "offload": "none", **choices,
                                                       "overrides": [f"dit_quant={dit}", *overrides]},
           "components": {"dit": {"mode": dit, "scheme": scheme, "backend": None if dit == "none" else "torch"},
                          "t5": {"mode": "none", "scheme": "none", "backend": None}},
           "timings_s": {"denoise": denoise, "denoise_per_step": denoise / 4, "total": denoise + 1},
           "quality": {"speedup_denoise": 99.0}}
    (sweep / name).mkdir(parents=True)
    (sweep / name / "result.json").write_text(json.dumps(res))


def _rows(sweep: Path) -> dict[str, dict]:
    return {r["job"]: r for r in report.build(sweep)}


def test_speedup_uses_the_baseline_with_the_same_steps(tmp_path):
    """A sweep over sampler.steps: each quantized row is compared with the bf16 row of its own step count."""
    _job(tmp_path, "a", dit="none", overrides=["sampler.steps=2"], denoise=1.0)
    _job(tmp_path, "b", dit="int8-torch", overrides=["sampler.steps=2"], denoise=0.5)
    _job(tmp_path, "c", dit="none", overrides=["sampler.steps=8"], denoise=2.0)
    _job(tmp_path, "d", dit="int8-torch", overrides=["sampler.steps=8"], denoise=4.26)
    rows = _rows(tmp_path)
    assert rows["b"]["speedup"] == 2.0
    assert rows["d"]["speedup"] == round(2.0 / 4.26, 3)
    assert rows["a"]["speedup"] == rows["c"]["speedup"] == 1.0


def test_rows_differing_in_a_group_choice_or_option_do_not_share_a_baseline(tmp_path):
    _job(tmp_path, "a", dit="none", overrides=["offload=block"], denoise=3.0, offload="block")
    _job(tmp_path, "b", dit="fp8-torch", overrides=[], denoise=1.0)
    _job(tmp_path, "c", dit="fp8-torch", overrides=["offload=block", "+dit_quant.options.x=1"], denoise=1.5,
         offload="block")
    rows = _rows(tmp_path)
    assert rows["b"]["speedup"] == 99.0  # no bf16 job without offload: the job's own comparison, not a wrong one
    assert rows["c"]["speedup"] == 2.0  # dit_quant options are part of the mode


def test_order_of_overrides_and_bookkeeping_do_not_matter(tmp_path):
    _job(tmp_path, "a", dit="none", overrides=["seed=1", "model.frames=5", "resume=true"], denoise=1.0)
    _job(tmp_path, "b", dit="int8-torch", overrides=["model.frames=5", "seed=1", "tracking=mlflow"], denoise=0.25)
    assert _rows(tmp_path)["b"]["speedup"] == 4.0


@pytest.mark.parametrize("content", [b"{\"status\": \"ok\", \"timi", b"", b"\xff\xfe not json", b"[1, 2]",
                                     b"{\"reason\": \"no status\"}"])
def test_unreadable_result_is_a_failed_row_and_fails_the_sweep(tmp_path, capsys, content):
    _job(tmp_path, "a", dit="none", overrides=[], denoise=1.0)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "result.json").write_bytes(content)
    rows = _rows(tmp_path)
    assert rows["broken"]["status"] == "failed"
    assert "broken/result.json is unreadable" in rows["broken"]["reason"]
    assert "run the job again" in rows["broken"]["reason"]
    assert "broken" in (tmp_path / "results.md").read_text()
    from omegaconf import OmegaConf

    from lightq.sweep import SweepStatus

    with pytest.raises(SystemExit) as exit_:
        SweepStatus().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert exit_.value.code == 1
    assert "broken" in capsys.readouterr().err
