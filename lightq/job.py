"""One job: plan every component of a composed config, run the pipeline graph, leave a complete result.json.

``execute(cfg, out, choices)`` is what every way of running a job ends in: a single run and an in-process sweep
job (through ``lightq.sweep.run_job``) and an isolated sweep job (``python -m lightq.worker``). ``exit_code`` maps
its result to the process exit code: 0 ok; 2 the combination cannot run here or the input is wrong; 1 an
unexpected failure (traceback in result.json and the log).
"""

from __future__ import annotations

import logging
import os
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import __version__, hardware, plan, results, staging
from .errors import LightqError, from_os_error
from .interrupts import Terminated

log = logging.getLogger("lightq")


def execute(cfg: DictConfig, out: Path, choices: dict | None = None) -> dict:
    """Run one job described by ``cfg`` (already checked by ``config.validate``) into folder ``out``; always leaves
    a complete result.json there."""
    out.mkdir(parents=True, exist_ok=True)
    staging.remove_stale(out)  # temporaries of an earlier run of this job that was killed
    timer = results.StageTimer()
    result: dict = {"status": "running", "reason": "", "choices": choices or {}, "versions": {"lightq": __version__},
                    "process": {"before_job_s": results.process_age_s()}}
    results.write_json_atomic(out / results.RESULT_FILE, result)
    try:
        with timer("setup"):
            text = OmegaConf.to_yaml(cfg, resolve=True)
            staging.write_atomic(out / "config_resolved.yaml", lambda tmp: tmp.write_text(text))
            if cfg.from_lightx2v.config:
                result["from_lightx2v"] = OmegaConf.to_container(cfg.from_lightx2v)
            hw = hardware.resolve(cfg.hardware.name)
            result["hardware"] = {"name": hw.name, "device": hw.device, "capability": hw.capability,
                                  "gpu": hw.gpu_name, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
            if cfg.offload.mode != "none" and not hw.is_cuda:
                note = (f"offload={cfg.offload.mode} moves weights between host and GPU memory; this run is on the "
                        "CPU, where everything is in host memory already: it runs, with the same results, and saves "
                        "nothing")
                result.setdefault("warnings", []).append(note)
                log.warning(note)
            plans = plan.plan_run(cfg, hw)
            result["components"] = {c: p.as_dict() for c, p in plans.items()}
            problem = plan.first_problem(plans)
            if not problem:
                from .pipeline.components import parallel_layout  # torch and the models load
                from .pipeline.graph import run_pipeline  # only for a job that runs
                from .pipeline.sampler import sampler_config, timesteps

                timesteps(sampler_config(cfg))  # the sampler's settings are checked before any model loads
                parallel_layout(cfg)  # and the parallel layout against the launch
        if problem:
            result.update(status="skipped", reason=problem)
            log.info("skipped: %s", problem)
            return result
        run_pipeline(cfg, hw, plans, out, result, timer)
        result["status"] = "ok"
    except LightqError as exc:
        result.update(status="failed", reason=str(exc), error_kind="input")
        log.info("failed: %s", exc)  # the console gets it once, as the exit line
    except (Terminated, KeyboardInterrupt) as exc:  # recorded, then the process ends (see lightq.interrupts)
        what = "terminated by SIGTERM" if isinstance(exc, Terminated) else "interrupted (Ctrl-C)"
        result.update(status="failed", reason=f"the job was {what} before it finished; resume=true runs it again",
                      error_kind="interrupted")
        log.info("failed: %s", result["reason"])
        raise
    except Exception as exc:
        user = from_os_error(exc, "the job") if isinstance(exc, OSError) else None
        if user is not None:  # a full disk, a read-only folder: the user's to fix, one line
            result.update(status="failed", reason=str(user), error_kind="input")
            log.info("failed: %s", user)
        else:  # unexpected: keep the traceback for the record
            result.update(status="failed", reason=f"{type(exc).__name__}: {exc}", error=traceback.format_exc(),
                          error_kind="internal")
            log.exception("job failed")
    finally:
        stages = timer.summary()  # the stage times come from the timer; the pipeline adds per-step detail
        detail = {k: v for k, v in result.get("timings_s", {}).items() if k not in stages and k not in results.STAGES}
        result["timings_s"] = {**stages, **detail}
        memory = result.setdefault("memory", {})
        memory["peak_host_bytes"] = results.peak_host_bytes()
        memory["peak_host_bytes_by_stage"] = dict(timer.peak_host)
        results.write_json_atomic(out / results.RESULT_FILE, result)
    return result


def exit_code(result: dict) -> int:
    """0 ok; 1 an internal failure; 2 skipped (cannot run here) or bad input."""
    if result["status"] == "ok":
        return 0
    return 1 if result.get("error_kind") == "internal" else 2
