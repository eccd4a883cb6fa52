"""Hydra launchers for sweeps: joblib runs jobs in parallel processes, the SLURM config composes into sbatch.

Also: table rebuilds from concurrently finishing jobs keep every job, and a launcher picked without its plugin
is one clear error.
"""

import csv
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lightq import config, report, results, sweep
from lightq.errors import LightqError
from lightq.paths import conf_dir


def test_joblib_sweep_runs_jobs_in_parallel_and_fails_at_the_end(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install hydra-joblib-launcher")
    root = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "lightq", "-m", "hydra/launcher=joblib_local",
                           "hydra.launcher.n_jobs=2", "dit_quant=none,int8-torch", "model.frames=5,6",
                           f"hydra.sweep.dir={root}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.returncode == 1, "frames=6 jobs failed: the sweep exits non-zero after all jobs ran"
    rows = {r["job"]: r for r in csv.DictReader((root / "results.csv").open())}
    assert {job: r["status"] for job, r in rows.items()} == {
        "dit_quant=none,model.frames=5": "ok", "dit_quant=int8-torch,model.frames=5": "ok",
        "dit_quant=none,model.frames=6": "failed", "dit_quant=int8-torch,model.frames=6": "failed"}
    assert float(rows["dit_quant=int8-torch,model.frames=5"]["latent_cosine"]) > 0.99
    assert len((root / "results.jsonl").read_text().splitlines()) == 4
    assert (root / "results.md").read_text().count("\n") == 2 + 4
    assert "failed jobs: dit_quant=int8-torch,model.frames=6, dit_quant=none,model.frames=6" in proc.stderr


def _finish_job(sweep_dir: str, index: int, barrier) -> None:
    job = Path(sweep_dir) / f"job={index}"
    job.mkdir()
    barrier.wait()  # every process writes its result and rebuilds at the same moment
    results.write_json_atomic(job / results.RESULT_FILE, {"status": "ok", "reason": "", "choices": {"model": "tiny"}})
    report.build(Path(sweep_dir))


def test_concurrent_rebuilds_keep_every_job(tmp_path):
    for k in range(100):  # earlier jobs make each rescan long enough for rebuilds to overlap
        (tmp_path / f"old={k}").mkdir()
        results.write_json_atomic(tmp_path / f"old={k}" / results.RESULT_FILE, {"status": "ok", "choices": {}})
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(6)
    procs = [ctx.Process(target=_finish_job, args=(str(tmp_path), i, barrier)) for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    jobs = [json.loads(line)["job"] for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(jobs) == 106 and {f"job={i}" for i in range(6)} <= set(jobs)
    assert len(list(csv.DictReader((tmp_path / "results.csv").open()))) == 106
    assert not list(tmp_path.glob(".results.*.*")), "no temporary table left behind"


def _slurm_launcher_params(*overrides):
    config.register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    return cfg.hydra.launcher


def test_slurm_launcher_config_composes_into_an_sbatch_script(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher")
    import submitit
    from hydra.utils import instantiate
    from submitit.slurm import slurm

    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    launcher = _slurm_launcher_params("hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30")
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    built = instantiate(launcher)  # what Hydra does with the config before launching
    assert type(built).__name__ == "SlurmLauncher" and built.params["gpus_per_node"] == 1
    # submitit refuses to build a SLURM executor where no srun exists: give it one that is never run
    (tmp_path / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    params = OmegaConf.to_container(launcher, resolve=False)
    params.pop("_target_")
    folder = tmp_path / "submitit"
    params.pop("submitit_folder")
    executor = submitit.AutoExecutor(cluster="slurm", folder=folder,
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params["name"] = "lightq"  # ${hydra.job.name}, resolved by Hydra at launch
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = slurm._make_sbatch_string(command="python -m lightq", folder=folder, **executor._executor.parameters)
    for line in ("--gpus-per-node=1", "--partition=gpu", "--time=30", "--cpus-per-task=8", "--mem=96GB",
                 "--ntasks-per-node=1", "--job-name=lightq"):
        assert f"#SBATCH {line}\n" in script


def test_launcher_without_its_plugin_is_one_clear_error(monkeypatch):
    import importlib.util

    sweep.check_launcher(["-m", "hydra/launcher=basic", "dit_quant=none"])  # Hydra's own: nothing to check
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.hydra_submitit") else real(name, *a))
    with pytest.raises(LightqError, match=r"hydra/launcher=slurm needs .*pip install hydra-submitit-launcher"):
        sweep.check_launcher(["-m", "hydra/launcher=slurm"])


def test_slurm_launcher_without_sbatch_is_one_clear_error(monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher")
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    for option in ("slurm", "submitit_slurm"):
        with pytest.raises(LightqError, match=rf"hydra/launcher={option} submits the sweep with SLURM's sbatch, "
                                              "which is not on this machine's PATH"):
            sweep.check_launcher(["-m", f"hydra/launcher={option}"])
    sweep.check_launcher(["-m", "hydra/launcher=submitit_local"])  # runs here: no SLURM needed
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: f"/usr/bin/{name}")
    sweep.check_launcher(["-m", "hydra/launcher=slurm"])
