"""The mp4 is encoded in the background while the quality stage runs: a failed encode is the job's error (exit 2,
no video under its name, nothing half-written), a failed comparison still leaves the whole video, and the stages
still sum to the job's total with the encode's own time beside them, not in the sum."""

from __future__ import annotations

import time

import pytest

from lightq.pipeline import quality
from lightq.pipeline.video import read_mp4
from lightq.results import STAGES

from .conftest import FAST, input_error, no_partials, run_job


def _stages_sum_to_total(t: dict) -> None:
    assert sum(t[s] for s in STAGES if s in t) + t["unaccounted"] == pytest.approx(t["total"], abs=1e-3)


def test_a_failed_background_encode_fails_the_job(tmp_path, fake_ffmpeg):
    fake_ffmpeg("cat > /dev/null; echo 'No space left on device' >&2; exit 1")
    out = tmp_path / "job"
    result = run_job(out, "dit_quant=int8-torch", *FAST)
    input_error(result, "ffmpeg could not write", "No space left on device", "disk is not full")
    assert not (out / "video.mp4").exists() and no_partials(out) == []
    assert "video" not in result["outputs"] and result["outputs"]["latents"] == "latents.pt"
    assert "psnr_db" in result["quality"], "the comparison ran while the encode failed"
    _stages_sum_to_total(result["timings_s"])


def test_a_failed_comparison_keeps_the_whole_video(tmp_path, monkeypatch):
    run_job(tmp_path / "bf16", *FAST)  # the baseline to compare with

    def broken(*args, **kwargs):
        raise RuntimeError("comparison broke")

    monkeypatch.setattr(quality, "compare", broken)
    out = tmp_path / "job"
    result = run_job(out, "dit_quant=int8-torch", *FAST)
    assert result["status"] == "failed" and "comparison broke" in result["reason"]
    assert result["outputs"]["video"] == "video.mp4" and read_mp4(out / "video.mp4").shape[0] == 5
    assert no_partials(out) == []


def test_the_encode_overlaps_quality_and_is_counted_once(tmp_path, monkeypatch, fake_ffmpeg):
    run_job(tmp_path / "bf16", *FAST)  # the baseline to compare with
    fake_ffmpeg('sleep 2; exec "$REAL" "$@"')  # an encode of two seconds or more
    real = quality.compare

    def slow(*args, **kwargs):
        time.sleep(1.0)  # a comparison of a second or more, while the encode runs
        return real(*args, **kwargs)

    monkeypatch.setattr(quality, "compare", slow)
    result = run_job(tmp_path / "job", "dit_quant=int8-torch", *FAST)
    assert result["status"] == "ok", result["reason"]
    t = result["timings_s"]
    assert t["write_background"] >= 2.0 and t["quality"] >= 1.0
    assert t["write"] <= t["write_background"] - 0.8  # the second of quality is not counted in write again
    assert t["write"] + t["quality"] >= t["write_background"]  # and the encode is not hidden outside the stages
    _stages_sum_to_total(t)
    assert read_mp4(tmp_path / "job" / "video.mp4").shape[0] == 5
