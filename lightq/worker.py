"""One sweep job in a fresh process: ``python -m lightq.worker <job_dir>``.

Contract. Hydra has composed the job and saved it in ``<job_dir>/.hydra/``: ``config.yaml`` (the task config)
and ``hydra.yaml`` (output dir, choices, overrides, logging). The worker rebuilds the job from those two files
alone — the task config merged onto the lightq schema, Hydra's resolvers (``${hydra:...}``) fed the saved Hydra
config, logging appended to the job's ``lightq.log`` — runs ``lightq.job.execute`` and exits with the code a
single run would (0 ok, 2 skipped or bad input, 1 internal failure).

The parent side, ``run_in_subprocess``, marks the job ``running``, starts the worker, waits, and reads the
result back. A worker that dies without a final result (killed by a signal: segfault, out-of-memory kill; or any
exit that left the status ``running``) gets a ``failed`` result carrying its exit code, the signal's name and
the tail of its stderr (kept whole in ``<job_dir>/worker.stderr`` when it wrote any).

With ``sweep.procs_per_job`` above 1 the worker runs under ``torchrun`` (a ``parallel=`` job): rank 0 writes the
job's folder, the other ranks run into temporary folders.

On CUDA (``sweep.isolate=auto``) every job of a sweep runs this way, so peak-memory figures, the caching
allocator's pool and compiled-kernel caches belong to that job alone and a crash takes down only its own job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import config, results
from .errors import LightqError
from .interrupts import Terminated, terminate_gracefully
from .paths import PACKAGE_DIR

STDERR_FILE = "worker.stderr"
STDERR_TAIL_CHARS = 4000
FINAL_STATUSES = ("ok", "skipped", "failed")
SIGNAL_HINTS = {
    "SIGKILL": "killed from outside: out of host memory (see dmesg) or a scheduler limit",
    "SIGSEGV": "a crash in native code (a kernel library or a driver)",
    "SIGABRT": "aborted by native code or a fatal Python error",
    "SIGBUS": "a bad memory access, often a truncated memory-mapped file",
}


def job_choices(hydra_cfg) -> dict:
    """The job's config-group choices (Hydra's own groups left out) and its command-line overrides."""
    choices = {k: v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra")}
    choices["overrides"] = list(hydra_cfg.overrides.task)
    return choices


def should_isolate(cfg: DictConfig) -> bool:
    """``sweep.isolate``: always | never | auto (isolate when the job will run on a CUDA GPU)."""
    mode = cfg.sweep.isolate
    if mode != "auto":
        return mode == "always"
    if cfg.hardware.name == "cpu":
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()  # counts devices without creating a CUDA context in this process


def _set_hydra_config(hydra_yaml: DictConfig) -> DictConfig:
    """Make ``HydraConfig.get()`` and the ``${hydra:...}`` / ``${now:...}`` resolvers answer as in the job."""
    from hydra.conf import HydraConf
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import setup_globals

    setup_globals()
    schema = OmegaConf.structured(HydraConf)
    OmegaConf.set_struct(schema, False)  # plugins and callbacks add keys the schema does not declare
    root = OmegaConf.create({"hydra": OmegaConf.merge(schema, hydra_yaml.hydra)})
    HydraConfig.instance().set_config(root)
    return HydraConfig.get()


def load_job(job_dir: Path) -> tuple[DictConfig, dict, DictConfig]:
    """(typed task config, choices, Hydra config) of the job saved in ``job_dir``."""
    saved = Path(job_dir) / ".hydra"
    missing = [n for n in ("config.yaml", "hydra.yaml") if not (saved / n).is_file()]
    if missing:
        raise LightqError(f"{job_dir} is not a lightq job folder (no .hydra/{missing[0]}): "
                          "give the folder of a job that python -m lightq created")
    hydra_cfg = _set_hydra_config(OmegaConf.load(saved / "hydra.yaml"))
    cfg = OmegaConf.merge(OmegaConf.structured(config.LightqConfig), OmegaConf.load(saved / "config.yaml"))
    return cfg, job_choices(hydra_cfg), hydra_cfg


def _worker_env() -> dict:
    """The parent's environment, with this lightq first on the path so the worker runs the same code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_DIR.parent), env.get("PYTHONPATH")) if p)
    return env


def _launcher(procs: int) -> list[str]:
    """The interpreter arguments that start ``procs`` processes of the worker (torchrun above one)."""
    return [] if procs == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]


def _tail(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-STDERR_TAIL_CHARS:].decode(errors="replace")


def _death(returncode: int) -> tuple[str, str | None]:
    """(one-line reason, signal name or None) for a worker that exited without a final result."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = SIGNAL_HINTS.get(name, "")
        return f"the job's worker process was killed by {name}" + (f" ({hint})" if hint else ""), name
    return f"the job's worker process exited with code {returncode} before writing its result", None


def run_in_subprocess(job_dir: Path, choices: dict, env: dict | None = None, procs: int = 1) -> dict:
    """Run the job saved in ``job_dir`` as ``python -m lightq.worker`` (``env``: variables set for it, e.g. its
    ``CUDA_VISIBLE_DEVICES``; ``procs`` > 1: under ``torchrun`` with that many processes, for a ``parallel=``
    job) and return its result (see module doc)."""
    job_dir = Path(job_dir)
    results.write_json_atomic(job_dir / results.RESULT_FILE, {"status": "running", "reason": "", "choices": choices})
    t0 = time.perf_counter()
    stderr_path = job_dir / STDERR_FILE
    with open(stderr_path, "wb") as err, subprocess.Popen(
            [sys.executable, *_launcher(procs), "-m", "lightq.worker", str(job_dir)], stderr=err,
            env={**_worker_env(), **(env or {})}) as proc:
        try:
            returncode = proc.wait()
        except BaseException:  # this process is being interrupted or terminated: so is the job's worker
            proc.terminate()
            raise
    tail = _tail(stderr_path)
    if tail:
        sys.stderr.write(tail if tail.endswith("\n") else tail + "\n")
    else:
        stderr_path.unlink(missing_ok=True)
    result = results.read_result(job_dir) or {"choices": choices}
    result["worker"] = {"pid": proc.pid, "exit_code": returncode}
    if result.get("status") not in FINAL_STATUSES:
        reason, signal_name = _death(returncode)
        result.update(status="failed", reason=reason, error_kind="internal", error=tail)
        result["worker"]["signal"] = signal_name
        result.setdefault("timings_s", {})["total"] = round(time.perf_counter() - t0, 4)
    results.write_json_atomic(job_dir / results.RESULT_FILE, result)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m lightq.worker <job folder>", file=sys.stderr)
        return 2
    job_dir = Path(argv[0]).resolve()
    try:
        cfg, choices, hydra_cfg = load_job(job_dir)
        config.validate(cfg)
    except LightqError as exc:
        print(f"lightq.worker: {exc}", file=sys.stderr)
        return 2
    from hydra.core.utils import configure_log

    from .job import execute, exit_code
    from .parallel.layout import launched_world

    terminate_gracefully()
    if launched_world()[1]:  # a rank other than 0 of a parallel job: rank 0 writes the job's folder and log
        with tempfile.TemporaryDirectory(prefix="lightq-rank-") as scratch:
            return exit_code(execute(cfg, Path(scratch), choices))
    configure_log(hydra_cfg.job_logging, hydra_cfg.verbose)
    try:
        return exit_code(execute(cfg, job_dir, choices))
    except Terminated:  # recorded in result.json by execute
        return Terminated.exit_code


def leave_launch(code: int) -> None:
    """A ``torchrun`` rank whose work ended with ``code`` 0 leaves through ``parallel.runtime.leave`` (a barrier, the
    process group destroyed, ``os._exit``); any other process returns and exits as usual."""
    if "torch" in sys.modules:  # a job that joined a process group imported it
        from .parallel.runtime import leave

        leave(code)


if __name__ == "__main__":
    from .teardown import skip_exit_collections

    skip_exit_collections()
    status = main()
    leave_launch(status)
    sys.exit(status)
