"""``sweep.gpus``: concurrent sweep jobs share a machine's GPUs one job per GPU (``lightq.gpu_slots``).

The pool's exclusivity is checked with real lock files and threads; the plumbing into the isolated worker with a
real ``python -m lightq.worker`` running a CPU job. A CPU machine has no GPU, so there ``torch.cuda.device_count``
is replaced by a stand-in saying two: only the count is faked, the job and its worker are real.
"""

from __future__ import annotations

import threading
import time

import pytest

from lightq.errors import LightqError
from lightq.gpu_slots import gpu_slot, parse_gpus


@pytest.mark.parametrize("spec, picked", [("all", [0, 1, 2, 3]), ("0,2", [0, 2]), ([3, 1], [3, 1]), (2, [2])])
def test_gpu_lists(spec, picked):
    assert parse_gpus(spec, 4) == picked


@pytest.mark.parametrize("spec, visible, words", [
    ("all", 0, "shows no CUDA GPU"), ([0, 4], 4, "GPUs 0..3"), ([1, 1], 4, "each once"), ("x", 4, "GPU indices"),
    ([], 4, "names no GPU"),
])
def test_gpu_lists_that_cannot_be(spec, visible, words):
    with pytest.raises(LightqError, match=words):
        parse_gpus(spec, visible)


def test_a_job_takes_all_its_gpus_or_none():
    with gpu_slot([0, 1, 2], 2) as first:
        assert first == [0, 1]
        got = []

        def second_job():
            with gpu_slot([0, 1, 2], 2) as gpus:
                got.append(gpus)

        t = threading.Thread(target=second_job)
        t.start()
        time.sleep(0.5)
        assert got == []  # only GPU 2 is free: the second job waits instead of taking half
    t.join(5)
    assert got and sorted(got[0]) in ([0, 1], [0, 2], [1, 2])
    with pytest.raises(LightqError, match="needs 4 GPUs"):
        with gpu_slot([0, 1], 4):
            pass


def test_each_gpu_has_one_job_at_a_time():
    held, order, lock = [], [], threading.Lock()

    def job(n):
        with gpu_slot([0, 1]) as (gpu,):
            with lock:
                assert gpu not in held, f"GPU {gpu} given to two jobs"
                held.append(gpu)
                order.append((n, gpu))
            time.sleep(0.3)
            with lock:
                held.remove(gpu)

    threads = [threading.Thread(target=job, args=(n,)) for n in range(4)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(order) == 4 and {g for _, g in order} == {0, 1}
    assert time.perf_counter() - t0 >= 0.6  # four jobs, two GPUs: two rounds


def test_an_isolated_job_runs_with_its_gpu_visible(tmp_path, monkeypatch, run_lightq):
    import torch

    from lightq import sweep
    from lightq.worker import load_job

    res = run_lightq("-m", "hardware=cpu", "sweep.isolate=always", "quality.compare=false", "model.steps=1",
                     "hydra.sweep.dir=sw", "seed=1")  # a real job folder, run in a worker
    assert res.returncode == 0, res.stderr[-2000:]
    job = next(p.parent for p in (tmp_path / "sw").glob("*/result.json"))
    cfg, choices, _ = load_job(job)
    cfg.sweep.gpus = [1]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # the one stand-in: a CPU machine has no GPU
    result = sweep._on_free_gpus(cfg, job, choices)  # the job again, in a real worker, on "GPU 1"
    assert result["status"] == "ok", result.get("reason")
    assert result["device_assignment"] == {"processes": 1, "gpus": [1], "CUDA_VISIBLE_DEVICES": "1"}
    assert result["hardware"]["cuda_visible_devices"] == "1"  # as the worker process saw it


def test_gpus_without_isolated_jobs_is_refused(run_lightq, tmp_path):
    res = run_lightq("-m", "hardware=cpu", "sweep.isolate=never", "sweep.gpus=all", "quality.compare=false",
                     "model.steps=1", "hydra.sweep.dir=sw", "seed=1")
    assert res.returncode != 0
    record = next((tmp_path / "sw").glob("*/result.json")).read_text()
    assert "place each job in its own processes" in record


def test_a_sweep_job_runs_in_several_processes(run_lightq, tmp_path):
    """sweep.procs_per_job=2: each isolated job is a torchrun launch of two (CPU, gloo) processes."""
    res = run_lightq("-m", "hardware=cpu", "sweep.isolate=always", "sweep.procs_per_job=2", "parallel=ulysses",
                     "quality.compare=false", "model.steps=1", "hydra.sweep.dir=sw", "seed=1")
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    record = json.loads(next((tmp_path / "sw").glob("*/result.json")).read_text())
    assert record["status"] == "ok" and record["parallel"]["world_size"] == 2
    assert record["device_assignment"] == {"processes": 2, "gpus": None, "CUDA_VISIBLE_DEVICES": None}
