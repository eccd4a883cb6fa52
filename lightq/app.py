"""``python -m lightq``: compose the config, plan every component, run the pipeline graph, record the job.

One job = one output folder (Hydra's run or sweep sub-folder) holding ``.hydra/`` (the composed config and
overrides), ``config_resolved.yaml``, ``lightq.log``, ``result.json``, and the outputs (``video.mp4``,
``latents.pt``). Exit codes of a single run: 0 ok; 2 the combination cannot run here or the input is wrong
(one line on stderr, naming the fix); 1 an unexpected failure (traceback in result.json and the log).
In a sweep (``-m``) a job never stops the sweep: it is recorded as skipped or failed and the next one runs;
the sweep exits non-zero at the end if any job failed.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import __version__, config, hardware, plan, results
from .errors import LightqError
from .paths import conf_dir

log = logging.getLogger("lightq")


def execute(cfg: DictConfig, out: Path, choices: dict | None = None) -> dict:
    """Run one job described by ``cfg`` into folder ``out``; always leaves a complete result.json there."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict = {"status": "running", "reason": "", "choices": choices or {}, "versions": {"lightq": __version__}}
    results.write_json_atomic(out / results.RESULT_FILE, result)
    try:
        (out / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        config.validate(cfg)
        hw = hardware.resolve(cfg.hardware.name)
        result["hardware"] = {"name": hw.name, "device": hw.device, "capability": hw.capability,
                              "gpu": hw.gpu_name}
        plans = plan.plan_run(cfg, hw)
        result["components"] = {c: p.as_dict() for c, p in plans.items()}
        problem = plan.first_problem(plans)
        if problem:
            result.update(status="skipped", reason=problem)
            log.info("skipped: %s", problem)
            return result
        from .pipeline.graph import run_pipeline  # torch and the models load only for a job that runs

        run_pipeline(cfg, hw, plans, out, result)
        result["status"] = "ok"
    except LightqError as exc:
        result.update(status="failed", reason=str(exc), error_kind="input")
        log.info("failed: %s", exc)  # the console gets it once, as the exit line
    except Exception as exc:  # unexpected: keep the traceback for the record
        result.update(status="failed", reason=f"{type(exc).__name__}: {exc}", error=traceback.format_exc(),
                      error_kind="internal")
        log.exception("job failed")
    finally:
        result.setdefault("timings_s", {})["total"] = round(time.perf_counter() - t0, 4)
        result.setdefault("memory", {})["peak_host_bytes"] = results.peak_host_bytes()
        results.write_json_atomic(out / results.RESULT_FILE, result)
    return result


def exit_code(result: dict) -> int:
    if result["status"] == "ok":
        return 0
    return 1 if result.get("error_kind") == "internal" else 2


def _task(cfg: DictConfig) -> int:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from . import sweep
    from .worker import job_choices

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    choices = job_choices(hc)
    multirun = hc.mode == RunMode.MULTIRUN
    previous = results.read_result(out) if cfg.resume else None
    if previous and previous.get("status") == "ok":
        log.info("resume: %s already succeeded, not run again", out)
        result = previous
    else:
        result = sweep.run_job(cfg, out, choices, multirun)
    if multirun:
        sweep.record(Path(hc.sweep.dir), out, result)
        return exit_code(result)
    code = exit_code(result)
    if code:
        print(f"lightq: {result['reason']}", file=sys.stderr)
        sys.exit(code)
    print(f"lightq: ok -> {out}")
    return 0


def main() -> None:
    import hydra

    from .sweep import check_launcher

    config.register()
    sys.argv = _expand_lightx2v(sys.argv)
    try:
        check_launcher(sys.argv[1:])
    except LightqError as exc:
        print(f"lightq: {exc}", file=sys.stderr)
        sys.exit(2)
    hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(_task)()


def _expand_lightx2v(argv: list[str]) -> list[str]:
    """``from_lightx2v=cfg.json`` becomes the equivalent lightq overrides (unsupported keys are errors)."""
    hits = [a for a in argv[1:] if a.startswith("from_lightx2v=")]
    if not hits:
        return argv
    from .checkpoints.lightx2v_config import overrides_from_lightx2v

    try:
        extra = [o for h in hits for o in overrides_from_lightx2v(h.split("=", 1)[1])]
    except LightqError as exc:
        print(f"lightq: {exc}", file=sys.stderr)
        sys.exit(2)
    return argv + extra
