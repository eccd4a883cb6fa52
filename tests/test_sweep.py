"""Sweeps: every combination runs, unavailable ones are skipped, failures don't stop the sweep, tables rebuilt."""

import csv
import json
import os
import re
import subprocess
import sys

import pytest
import torch


def sweep(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "lightq", "-m", *args, f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def mode_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    proc = sweep(tmp, "dit_quant=none,fp8-torch,int8-torch,int4-g128-torch,fp8-sgl", "model.frames=5")
    return tmp / "sweep", proc


def test_sweep_layout_and_statuses(mode_sweep):
    root, proc = mode_sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == sorted(f"dit_quant={m},model.frames=5" for m in
                          ("none", "fp8-torch", "int8-torch", "int4-g128-torch", "fp8-sgl"))
    status = {}
    for job in jobs:
        res = json.loads((root / job / "result.json").read_text())
        status[res["choices"]["dit_quant"]] = res["status"]
        assert (root / job / "config_resolved.yaml").is_file() and (root / job / ".hydra").is_dir()
        if res["status"] == "ok":
            assert (root / job / "video.mp4").stat().st_size > 0
    assert status == {"none": "ok", "fp8-torch": "ok", "int8-torch": "ok", "int4-g128-torch": "ok",
                      "fp8-sgl": "skipped"}
    for name in ("results.jsonl", "results.csv", "results.md", "results.svg"):
        assert (root / name).stat().st_size > 0
    assert "1 skipped, 0 failed" in proc.stdout
    said = [line for line in proc.stdout.splitlines() if line.startswith("lightq sweep: job ")]
    assert len(said) == 5, proc.stdout  # one line per job, as it ends
    for mode in ("none", "fp8-torch", "int8-torch", "int4-g128-torch"):
        assert any(re.fullmatch(rf"lightq sweep: job \d dit_quant={mode},model.frames=5: ok in [\d.]+ s", s)
                   for s in said), (mode, said)
    assert any(s.startswith("lightq sweep: job 4 dit_quant=fp8-sgl,model.frames=5: skipped (dit_quant=fp8-sgl ")
               for s in said), said


def test_table_quality_ranks_as_the_numerics_imply(mode_sweep):
    root, _ = mode_sweep
    rows = {r["dit_mode"]: r for r in csv.DictReader((root / "results.csv").open())}
    assert rows["none"]["psnr_db"] == "baseline" and float(rows["none"]["speedup"]) == 1.0
    assert rows["fp8-sgl"]["status"] == "skipped" and "dit_quant=fp8-torch" in rows["fp8-sgl"]["reason"]
    assert ("needs a CUDA GPU" if not torch.cuda.is_available() else "install") in rows["fp8-sgl"]["reason"]
    psnr = {m: float(rows[m]["psnr_db"]) for m in ("fp8-torch", "int8-torch", "int4-g128-torch")}
    cos = {m: float(rows[m]["latent_cosine"]) for m in psnr}
    # 8-bit formats lose far less than 4-bit weights; none of them is lossless
    assert min(psnr["fp8-torch"], psnr["int8-torch"]) > psnr["int4-g128-torch"]
    assert min(cos["fp8-torch"], cos["int8-torch"]) > cos["int4-g128-torch"]
    assert max(cos.values()) < 1.0
    for m in psnr:
        assert float(rows[m]["speedup"]) > 0 and float(rows[m]["dit_weight_mib"]) < float(rows["none"]["dit_weight_mib"])
    md = (root / "results.md").read_text()
    assert md.count("\n") == 2 + 5 and "int4-g128-torch" in md


def test_report_rebuilds_tables(mode_sweep):
    root, _ = mode_sweep
    (root / "results.md").unlink()
    proc = subprocess.run([sys.executable, "-m", "lightq.report", str(root)], capture_output=True, text=True)
    assert proc.returncode == 0 and "fp8-torch" in proc.stdout
    assert (root / "results.md").is_file()


def test_failed_job_does_not_stop_the_sweep(tmp_path):
    proc = sweep(tmp_path, "model.frames=5,6")
    assert proc.returncode != 0, "a failed job makes the sweep exit non-zero"
    rows = {r["job"]: r for r in csv.DictReader((tmp_path / "sweep" / "results.csv").open())}
    assert rows["model.frames=5"]["status"] == "ok"
    assert rows["model.frames=6"]["status"] == "failed" and "4k+1" in rows["model.frames=6"]["reason"]
    assert "failed jobs: model.frames=6" in proc.stderr


def test_resume_skips_succeeded_jobs(tmp_path):
    first = sweep(tmp_path, "dit_quant=none,int8-torch", "model.frames=5")
    assert first.returncode == 0, first.stderr[-2000:]
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep").rglob("video.mp4")}
    second = sweep(tmp_path, "dit_quant=none,int8-torch", "model.frames=5", "resume=true")
    assert second.returncode == 0, second.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep").rglob("video.mp4")} == stamp


# Loaded by every Python process of the isolation test through PYTHONPATH: the worker of the job named in
# LIGHTQ_TEST_KILL_JOB writes a line to stderr and SIGKILLs itself as the pipeline starts to load, the way the
# kernel's OOM killer would; other processes and jobs are untouched.
KILL_HOOK = '''
import os, signal, sys

def _kill_worker(event, args):
    if (event == "import" and args[0] == "lightq.pipeline.graph" and sys.argv[0].endswith("worker.py")
            and os.environ["LIGHTQ_TEST_KILL_JOB"] in sys.argv[-1]):
        print("test hook: killing this worker", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(_kill_worker)
'''


def test_isolated_jobs_run_in_fresh_processes_and_a_killed_one_is_recorded(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p),
           "LIGHTQ_TEST_KILL_JOB": "dit_quant=fp8-torch"}
    proc = subprocess.run([sys.executable, "-m", "lightq", "-m", "dit_quant=none,int8-torch,fp8-torch",
                           "model.frames=5", "sweep.isolate=always", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    res = {r["choices"]["dit_quant"]: (p.parent, r) for p in (tmp_path / "sweep").glob("*/result.json")
           for r in [json.loads(p.read_text())]}
    assert sorted(res) == ["fp8-torch", "int8-torch", "none"]
    for mode in ("none", "int8-torch"):
        job, r = res[mode]
        assert r["status"] == "ok" and r["worker"]["exit_code"] == 0, r.get("reason")
        assert "stage times" in (job / "lightq.log").read_text(), "the worker logs into the job's lightq.log"
    assert res["none"][1]["worker"]["pid"] != res["int8-torch"][1]["worker"]["pid"]
    assert res["int8-torch"][1]["quality"]["psnr_db"] > 20, "quality is measured in the worker too"
    job, killed = res["fp8-torch"]
    assert killed["status"] == "failed" and killed["worker"]["signal"] == "SIGKILL"
    assert "killed by SIGKILL" in killed["reason"] and "test hook: killing this worker" in killed["error"]
    assert killed["choices"]["dit_quant"] == "fp8-torch" and not (job / "video.mp4").exists()
    rows = {r["dit_mode"] or r["job"]: r for r in csv.DictReader((tmp_path / "sweep" / "results.csv").open())}
    assert [r["status"] for r in rows.values()].count("ok") == 2 and len(rows) == 3
    assert "failed jobs: dit_quant=fp8-torch" in proc.stderr


def _cfg(**over):
    from omegaconf import OmegaConf

    from lightq.config import LightqConfig

    return OmegaConf.merge(OmegaConf.structured(LightqConfig), over)


def test_isolation_policy(tmp_path):
    from lightq.sweep import run_job
    from lightq.worker import should_isolate

    assert should_isolate(_cfg(sweep={"isolate": "always"}, hardware={"name": "cpu"}))
    assert not should_isolate(_cfg(sweep={"isolate": "never"}))
    assert not should_isolate(_cfg(sweep={"isolate": "auto"}, hardware={"name": "cpu"}))
    result = run_job(_cfg(sweep={"isolate": "sometimes"}), tmp_path / "job", {}, multirun=True)
    assert result["status"] == "failed" and "sweep.isolate='sometimes'" in result["reason"]
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == ["result.json"], "nothing ran"


def test_worker_refuses_a_folder_that_is_not_a_job(tmp_path, capsys):
    from lightq.worker import main

    assert main([str(tmp_path)]) == 2
    assert "not a lightq job folder" in capsys.readouterr().err
