"""Running jobs and sweeps (``python -m lightq -m ...``): where a job runs, its tracking, the tables, the exit.

- ``run_job`` runs one job: it opens the job's tracker (``tracking=``), then runs the pipeline in this process,
  or, in a sweep with ``sweep.isolate`` (auto: on CUDA), in a fresh ``python -m lightq.worker`` process; it
  returns the job's result (a setup error becomes a ``failed`` result.json like any other).
- After every job, ``record`` rebuilds the sweep's tables (lightq.report, under the sweep's file lock, so jobs
  finishing at once in other processes cannot lose a row), so they are whole even when a job failed, and prints
  one line saying how the job ended (ok and its time, or skipped / failed and why).
- ``SweepStatus`` is a Hydra callback: at the end of a multirun (in the launching process, whichever launcher ran
  the jobs) it rebuilds the tables once more and exits 1 if any job failed (skipped jobs — combinations that
  cannot run here — do not fail the sweep).
- ``check_launcher`` turns ``hydra/launcher=<lightq launcher>`` without its Hydra plugin (or a SLURM launcher
  without ``sbatch``) into one clear error.
- ``resume=true`` skips jobs whose folder already holds a successful result (see ``lightq.app``).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from . import report, results
from .errors import LightqError

# launcher option (conf/hydra/launcher/ or the plugin's own) -> (the Hydra plugin's module, its pip package)
LAUNCHER_PLUGINS = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "joblib_local": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
}


SLURM_LAUNCHERS = ("slurm", "submitit_slurm")


def check_launcher(argv: list[str]) -> None:
    """Raise LightqError when the command line picks a launcher whose Hydra plugin is not installed, or a SLURM
    launcher on a machine without SLURM."""
    for arg in argv:
        key, _, option = arg.lstrip("+~").partition("=")
        if key != "hydra/launcher" or option not in LAUNCHER_PLUGINS:
            continue
        module, package = LAUNCHER_PLUGINS[option]
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            raise LightqError(f"hydra/launcher={option} needs the Hydra plugin {module.split('.')[-1]}: "
                              f"pip install {package}")
        if option in SLURM_LAUNCHERS and shutil.which("sbatch") is None:
            raise LightqError(f"hydra/launcher={option} submits the sweep with SLURM's sbatch, which is not on this "
                              "machine's PATH: run it on the cluster's login node, or use hydra/launcher=joblib_local "
                              "(parallel jobs here) or no launcher (one job after another)")


def run_job(cfg: DictConfig, out: Path, choices: dict, multirun: bool) -> dict:
    """Run one job into ``out`` (see module doc) and return its result, always also left in out/result.json."""
    from . import config, tracking, worker
    from .job import execute

    try:
        config.validate(cfg)  # once, before anything reads the config
        isolated = multirun and worker.should_isolate(cfg)
        tracker = tracking.start(cfg, out, choices)
    except LightqError as exc:
        return _setup_failure(out, choices, exc)
    placed = cfg.sweep.gpus is not None or cfg.sweep.procs_per_job != 1
    if isolated and placed:
        result = _on_free_gpus(cfg, out, choices)
    elif placed and multirun:
        result = _setup_failure(out, choices, LightqError(
            "sweep.gpus / sweep.procs_per_job place each job in its own processes, but this sweep's jobs run in this "
            "process (sweep.isolate=never, or a CPU run): set sweep.isolate=always or drop them"))
    else:
        result = worker.run_in_subprocess(out, choices) if isolated else execute(cfg, out, choices)
    return tracker.finish(out, result)


def _on_free_gpus(cfg: DictConfig, out: Path, choices: dict) -> dict:
    """Run the isolated job in ``sweep.procs_per_job`` processes, on as many GPUs of ``sweep.gpus`` as no other job
    holds (``lightq.gpu_slots``), or without a GPU assignment when ``sweep.gpus`` is null."""
    from contextlib import nullcontext

    from . import worker
    from .gpu_slots import gpu_slot, parse_gpus

    procs = cfg.sweep.procs_per_job
    try:
        if not isinstance(procs, int) or procs < 1:
            raise LightqError(f"sweep.procs_per_job={procs}: give a positive process count")
        if cfg.sweep.gpus is not None:
            import torch

            gpus = parse_gpus(cfg.sweep.gpus, torch.cuda.device_count())
    except LightqError as exc:
        return _setup_failure(out, choices, exc)
    with gpu_slot(gpus, procs) if cfg.sweep.gpus is not None else nullcontext(None) as held:
        env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, held))} if held else {}
        result = worker.run_in_subprocess(out, choices, env=env, procs=procs)
    result["device_assignment"] = {"processes": procs, "gpus": held, "CUDA_VISIBLE_DEVICES": env.get(
        "CUDA_VISIBLE_DEVICES")}
    results.write_json_atomic(out / results.RESULT_FILE, result)
    return result


def _setup_failure(out: Path, choices: dict, exc: LightqError) -> dict:
    """The job could not start (a bad config value, tracker unavailable): a failed result, nothing else ran."""
    out.mkdir(parents=True, exist_ok=True)
    result = {"status": "failed", "reason": str(exc), "error_kind": "input", "choices": choices,
              "timings_s": {"total": 0.0}, "memory": {"peak_host_bytes": results.peak_host_bytes()}}
    results.write_json_atomic(out / results.RESULT_FILE, result)
    return result


def record(sweep_dir: Path, job_dir: Path, result: dict, number: int | None = None) -> None:
    """Rebuild the sweep's tables, then say on stdout how job ``number`` (Hydra's job.num) ended."""
    report.build(sweep_dir)
    print(job_line(sweep_dir, job_dir, result, number), flush=True)


def job_line(sweep_dir: Path, job_dir: Path, result: dict, number: int | None = None) -> str:
    """``lightq sweep: job 3 dit_quant=fp8-sgl: skipped (<reason>)``; ok jobs give their time instead."""
    try:
        name = str(Path(job_dir).resolve().relative_to(Path(sweep_dir).resolve()))
    except ValueError:
        name = str(job_dir)
    status = result.get("status", "?")
    total = (result.get("timings_s") or {}).get("total")
    reason = result.get("reason") or ""
    detail = f"in {total:.1f} s" if status == "ok" and total is not None else f"({reason})" if reason else ""
    return f"lightq sweep: job {'' if number is None else f'{number} '}{name}: {status} {detail}".rstrip()


class SweepStatus(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig

        sweep_dir = Path(HydraConfig.get().sweep.dir if HydraConfig.initialized() else config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = report.build(sweep_dir)
        failed = [r["job"] for r in rows if r["status"] == "failed"]
        counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
        print(f"lightq sweep: {counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed -> "
              f"{sweep_dir / 'results.md'}")
        if failed:
            print(f"lightq sweep: failed jobs: {', '.join(failed)}", file=sys.stderr)
            sys.exit(1)
