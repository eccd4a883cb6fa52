"""``python -m lightq``: compose the config (Hydra), then run the job (lightq.job, through lightq.sweep.run_job).

One job = one output folder (Hydra's run or sweep sub-folder) holding ``.hydra/`` (the composed config and
overrides), ``config_resolved.yaml``, ``lightq.log``, ``result.json``, and the outputs (``video.mp4``,
``latents.pt``). Exit codes of a single run: 0 ok; 2 the combination cannot run here or the input is wrong
(one line on stderr, naming the fix); 1 an unexpected failure (traceback in result.json and the log).
In a sweep (``-m``) a job never stops the sweep: it is recorded as skipped or failed and the next one runs;
the sweep exits non-zero at the end if any job failed.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

from omegaconf import DictConfig

from . import config, results
from .errors import LightqError
from .interrupts import Terminated, terminate_gracefully
from .paths import conf_dir

log = logging.getLogger("lightq")


def _task(cfg: DictConfig) -> int | float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from . import sweep
    from .job import exit_code
    from .parallel.layout import launched_world
    from .worker import job_choices

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    fresh = not (out / results.RESULT_FILE).exists()  # no earlier job's record in this folder
    choices = job_choices(hc)
    multirun = hc.mode == RunMode.MULTIRUN
    previous = results.read_result(out) if cfg.resume else None
    gone = results.missing_outputs(out, previous) if previous and previous.get("status") == "ok" else None
    if gone:
        log.warning("resume: %s succeeded before but %s is gone: running it again", out, ", ".join(gone))
    if gone == []:
        log.info("resume: %s already succeeded, not run again", out)
        result = previous
    else:
        result = sweep.run_job(cfg, out, choices, multirun)
    if multirun:
        sweep.record(Path(hc.sweep.dir), out, result, hc.job.num)
        if cfg.sweep.objective is not None:  # what the sweeper optimizes (a NaN marks a job that measured none)
            return results.objective_value(result, cfg.sweep.objective)
        return exit_code(result)
    code = exit_code(result)
    rank = launched_world()[1]  # a torchrun launch's rank (0 without one)
    if code:
        print(f"lightq{f' (rank {rank})' if rank else ''}: {result['reason']}", file=sys.stderr)
        if code == 2 and fresh:  # the one line says it all: no new folder holding only the record of a job that
            discard_unrun(out)  # never ran (a folder an earlier job wrote to keeps its record)
        sys.exit(code)
    if rank:  # rank 0 reports the job
        return 0
    from .summary import summary

    print(f"lightq: ok -> {out}")
    print(summary(result, out, cfg.model))
    return 0


# What a single run's folder holds before the pipeline writes anything: Hydra's record, its log, lightq's record.
BOOKKEEPING = {".hydra", "lightq.log", "config_resolved.yaml", results.RESULT_FILE}


def discard_unrun(out: Path) -> None:
    """Remove ``out`` if it holds only the bookkeeping of a job that never ran (skipped, or bad input), and the
    folders above it that this leaves empty, up to the working directory. A folder with anything else is kept."""
    try:
        if not out.is_dir() or not {p.name for p in out.iterdir()} <= BOOKKEEPING:
            return
        shutil.rmtree(out)
        cwd = Path.cwd().resolve()
        for parent in out.resolve().parents:
            if parent == cwd or cwd not in parent.parents or any(parent.iterdir()):
                break
            parent.rmdir()
    except OSError:
        pass  # a folder left behind is untidy, not wrong


def main() -> None:
    import hydra

    from .choices import check_choices
    from .overrides import literal_prompts
    from .sweep import check_launcher

    from .lightx2v.cli import expand
    from .teardown import skip_exit_collections

    skip_exit_collections()
    config.register()
    sys.argv = _rank_folders(sys.argv)
    try:
        sys.argv = [sys.argv[0], *literal_prompts(expand(sys.argv[1:]))]
        check_launcher(sys.argv[1:])
        check_choices(sys.argv[1:])
    except LightqError as exc:
        print(f"lightq: {exc}", file=sys.stderr)
        sys.exit(2)
    terminate_gracefully()
    try:
        hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(_task)()
    except (Terminated, KeyboardInterrupt) as exc:  # the job recorded it; its temporaries are gone
        what, code = ("terminated by SIGTERM", Terminated.exit_code) if isinstance(exc, Terminated) else \
            ("interrupted", 130)
        print(f"lightq: {what}; the job's record says so and resume=true runs it again", file=sys.stderr)
        sys.exit(code)
    from .worker import leave_launch

    leave_launch(0)


def _rank_folders(argv: list[str]) -> list[str]:
    """On a rank other than 0 of a ``torchrun`` launch (``lightq.parallel``), Hydra's run and sweep folders go to a
    temporary folder of this process, removed at exit: rank 0 alone writes the outputs and the record."""
    from .parallel.layout import launched_world

    try:
        rank = launched_world()[1]
    except LightqError as exc:
        print(f"lightq: {exc}", file=sys.stderr)
        sys.exit(2)
    if rank == 0:
        return argv
    import atexit
    import tempfile

    tmp = tempfile.mkdtemp(prefix=f"lightq-rank{rank}-")
    atexit.register(shutil.rmtree, tmp, True)
    return [*argv, f"hydra.run.dir={tmp}/run", f"hydra.sweep.dir={tmp}/sweep"]

