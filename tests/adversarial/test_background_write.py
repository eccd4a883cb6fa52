"""The mp4 is encoded in the background, fed by the VAE decode chunk by chunk and running on while the quality stage
runs: ffmpeg gets the pixels of the whole decoded video, a failed encode is the job's error (exit 2, no video under
its name, nothing half-written), a failed decode or an interrupt during it stops the encode and leaves no video, a
failed comparison still leaves the whole video, and the stages still sum to the job's total with the encode's own
time beside them, not in the sum."""

from __future__ import annotations

import os
import time

import pytest
import torch

from lightq.models import vae
from lightq.paths import cache_dir
from lightq.pipeline import baseline, quality, video
from lightq.pipeline.video import read_mp4
from lightq.results import STAGES

from .conftest import FAST, compose, input_error, no_partials, run_job


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
    # and the encode is not hidden outside the stages (it starts with the decode's first frame)
    assert t["decode"] + t["write"] + t["quality"] >= t["write_background"]
    _stages_sum_to_total(t)
    assert read_mp4(tmp_path / "job" / "video.mp4").shape[0] == 5


def _decoder_calls(monkeypatch, each=None) -> list[int]:
    """Count the tiny VAE decoder's calls (one per latent frame); ``each(n)`` runs before the n-th (from 1)."""
    calls, real = [], vae.Decoder3d.forward

    def counted(self, *args):
        calls.append(len(calls) + 1)
        if each is not None:
            each(calls[-1])
        return real(self, *args)

    monkeypatch.setattr(vae.Decoder3d, "forward", counted)
    return calls


def test_the_decode_feeds_ffmpeg_the_whole_videos_pixels(tmp_path, monkeypatch, fake_ffmpeg):
    """Each latent frame's frames go to the encoder as soon as they are decoded, and ffmpeg gets exactly the bytes
    of the whole decoded video (the one cached as the bf16 baseline) converted at once."""
    fake_ffmpeg('for last; do :; done; cat > "$last"')  # the raw rgb24 input, as the output file
    calls, fed, real_feed = _decoder_calls(monkeypatch), [], video.Mp4Writer.feed
    monkeypatch.setattr(video.Mp4Writer, "feed", lambda self, f: (fed.append((len(calls), f.shape[0])),
                                                                   real_feed(self, f))[1])
    out = tmp_path / "job"
    result = run_job(out, *FAST, "model.height=48")
    assert result["status"] == "ok", result["reason"]
    assert fed == [(1, 1), (2, 4)]  # 5 frames: 1 after the first latent, 4 after the second
    cached = torch.load(cache_dir() / "baselines" / f"{baseline.key(compose(*FAST, 'model.height=48'), 'cpu')}.pt")
    assert (out / "video.mp4").read_bytes() == video.uint8_frames(cached["video"], pad_to_even=True).tobytes()
    _stages_sum_to_total(result["timings_s"])


def test_a_slow_decode_is_counted_as_decode_while_the_encode_runs(tmp_path, monkeypatch):
    _decoder_calls(monkeypatch, lambda n: time.sleep(0.7))  # two latents: a decode of 1.4 s or more
    result = run_job(tmp_path / "job", *FAST, "quality.baseline=never")
    assert result["status"] == "ok", result["reason"]
    t = result["timings_s"]
    assert t["decode"] >= 1.4 and t["write"] < 1.0, t  # the decode's time is not the write's
    assert t["decode"] + t["write"] + t["quality"] >= t["write_background"], t
    _stages_sum_to_total(t)


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_a_failed_or_interrupted_decode_stops_the_encode_and_leaves_no_video(tmp_path, monkeypatch, fake_ffmpeg,
                                                                         failure):
    pid = tmp_path / "ffmpeg.pid"
    fake_ffmpeg(f'echo $$ > {pid}; exec sleep 60')  # an encoder that has started and would run on

    def second(n):
        if n == 2:  # once the encoder the first chunk started runs
            deadline = time.perf_counter() + 20
            while not pid.exists() and time.perf_counter() < deadline:
                time.sleep(0.01)
            raise failure("decode broke")

    _decoder_calls(monkeypatch, second)
    out, start = tmp_path / "job", time.perf_counter()
    if failure is KeyboardInterrupt:
        with pytest.raises(KeyboardInterrupt):
            run_job(out, *FAST, "quality.baseline=never")
    else:
        result = run_job(out, *FAST, "quality.baseline=never")
        assert result["status"] == "failed" and "decode broke" in result["reason"]
    assert time.perf_counter() - start < 30, "the encoder was stopped, not waited for"
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid.read_text()), 0)  # ffmpeg was stopped and reaped
    assert not (out / "video.mp4").exists() and not (out / "latents.pt").exists() and no_partials(out) == []
