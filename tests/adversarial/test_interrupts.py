"""Kills, SIGTERM, full disks, planted symlinks and deleted outputs around a job or a conversion: the record says
what happened, nothing is half-written, nothing outside the job is touched (issue 15, items 6, 9, 10, 14)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lightq import staging

from .conftest import input_error, no_partials, one_line, run_job

SKIPPED = "dit_quant=fp8-sgl"  # cannot run on a CPU: the job is planned, recorded and skipped in milliseconds


@pytest.fixture
def sigterm_restored():
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


def _terminate_self(tmp) -> None:
    tmp.write_bytes(b"\0" * 4096)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)  # the handler raises in the main thread long before this ends


def test_sigterm_while_writing_the_video_is_recorded_and_leaves_no_partial(lightq_cli, tmp_path, fake_ffmpeg,
                                                                         sigterm_restored):
    # an encoder that has begun its output file when the job is terminated, then would run on
    fake_ffmpeg('for last; do :; done; printf partial > "$last"; kill -TERM $PPID; exec sleep 60')
    run = tmp_path / "run"
    start = time.perf_counter()
    code, err, _ = lightq_cli("model.frames=5", "sampler.steps=1", "model.height=32", "model.width=32",
                              "quality.baseline=never", f"hydra.run.dir={run}")
    assert code == 143 and time.perf_counter() - start < 50, "the encoder was stopped, not waited for"
    one_line(err, "terminated by SIGTERM", "resume=true")
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "failed" and result["error_kind"] == "interrupted"
    assert "terminated by SIGTERM" in result["reason"]
    assert not (run / "video.mp4").exists() and not no_partials(tmp_path)


def test_sigterm_during_a_conversion_leaves_nothing(convert_cli, tmp_path, monkeypatch, sigterm_restored):
    from lightq.checkpoints import writers
    from lightq.interrupts import terminate_gracefully

    write = writers.SafetensorsWriter.write

    def write_then_terminated(self, key, tensor):
        write(self, key, tensor)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)

    monkeypatch.setattr(writers.SafetensorsWriter, "write", write_then_terminated)
    terminate_gracefully()  # what lightq.convert's main does before Hydra runs the task
    code, err, _ = convert_cli("source=tiny", f"output={tmp_path / 'q'}", "layout=blocks")
    assert code == 143
    one_line(err, "terminated by SIGTERM", "nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_a_killed_jobs_temporaries_are_removed_when_it_runs_again(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f".latents.pt.{staging.HOST}-{dead.pid}.k9k9k9.partial"
    left.write_bytes(b"\0" * 1000)
    run_job(tmp_path, SKIPPED)
    assert not left.exists()


def test_a_planted_symlink_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine\n")
    job = tmp_path / "job"
    job.mkdir()
    for name in ("config_resolved.yaml", "result.json"):
        (job / name).symlink_to(victim)
    result = run_job(job, SKIPPED)
    assert result["status"] == "skipped"
    assert victim.read_text() == "mine\n"
    assert not (job / "config_resolved.yaml").is_symlink() and "prompt:" in (job / "config_resolved.yaml").read_text()


@pytest.mark.parametrize("err_no, fix", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only")])
def test_a_full_disk_during_a_job_is_one_line(tmp_path, monkeypatch, err_no, fix):
    write = staging.write_atomic

    def failing(path, fill):
        if path.name == "config_resolved.yaml":
            raise OSError(err_no, os.strerror(err_no), str(path))
        return write(path, fill)

    monkeypatch.setattr(staging, "write_atomic", failing)
    result = run_job(tmp_path, SKIPPED)
    input_error(result, "the job failed at", fix)
    assert not no_partials(tmp_path)


def _ok_record(run, *, video: bool) -> None:
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({"status": "ok", "reason": "", "outputs": {"video": "video.mp4"}}))
    if video:
        (run / "video.mp4").write_bytes(b"\0")


def test_resume_runs_again_a_job_whose_video_was_deleted(lightq_cli, tmp_path):
    run = tmp_path / "run"
    _ok_record(run, video=False)
    code, err, _ = lightq_cli(SKIPPED, "resume=true", f"hydra.run.dir={run}")
    assert code == 2 and json.loads((run / "result.json").read_text())["status"] == "skipped"  # it ran again


def test_resume_keeps_a_job_whose_outputs_are_there(lightq_cli, tmp_path):
    run = tmp_path / "run"
    _ok_record(run, video=True)
    code, err, _ = lightq_cli(SKIPPED, "resume=true", f"hydra.run.dir={run}")
    assert code == 0 and json.loads((run / "result.json").read_text())["status"] == "ok"


def test_a_terminated_sweep_terminates_its_jobs_worker_and_waits_for_its_record(tmp_path, monkeypatch):
    """The sweep process gets SIGTERM while an isolated job runs: the worker is sent SIGTERM too (it records the
    job as terminated, see above) and is waited for, never left running alone."""
    from lightq import worker
    from lightq.interrupts import Terminated

    calls = []

    class Worker:
        pid = 12345

        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            calls.append("waited")

        def wait(self):
            raise Terminated()

        def terminate(self):
            calls.append("terminate")

    monkeypatch.setattr(worker.subprocess, "Popen", Worker)
    with pytest.raises(Terminated):
        worker.run_in_subprocess(tmp_path, {})
    assert calls == ["terminate", "waited"]
