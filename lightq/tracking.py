"""Experiment tracking: each job becomes one run of an experiment tracker (``tracking=mlflow``).

``start(cfg, job_dir, choices)`` opens the tracker before the job runs, so a missing package or an unusable store
fails the job at its start (a LightqError), before any model loads; it returns a tracker whose
``finish(job_dir, result)`` logs what the job produced, closes the run, and notes the run in ``result["tracking"]``.
``tracking=none`` gives a tracker that records nothing. mlflow is imported only when asked for.

An MLflow run of a job (names are stable, to query on):

- run name: the job's overrides (``dit_quant=int8-torch,model.frames=5``), or the job folder's name
- params: the config-group choices (``model``, ``dit_quant``, ...), ``<component>.mode`` / ``.scheme`` /
  ``.backend`` per component, ``hardware``, ``seed``, ``model.frames`` / ``.height`` / ``.width`` / ``.steps``
- metrics: ``timings_s.<stage>``, ``memory.<field>`` (bytes), ``weight_bytes.<component>``,
  ``quality.<field>`` (psnr_db, ssim, latent_cosine, speedup_denoise against the bf16 baseline)
- tags: ``lightq.status``, ``lightq.reason``, ``lightq.job_dir``, ``lightq.quality_baseline``
- run status: FINISHED (ok), KILLED (skipped: the combination cannot run here), FAILED
- artifacts: result.json, config_resolved.yaml, lightq.log, the ``.hydra/`` folder as ``hydra/``, and video.mp4
  when ``tracking.log_video``
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path

from omegaconf import DictConfig

from . import results, staging
from .errors import LightqError

log = logging.getLogger("lightq")

RUN_STATUS = {"ok": "FINISHED", "skipped": "KILLED", "failed": "FAILED"}
ARTIFACT_FILES = ("result.json", "config_resolved.yaml", "lightq.log")
MODEL_PARAMS = ("frames", "height", "width", "steps")


class NoTracker:
    """``tracking=none``: the job's result.json and the sweep tables are the only record."""

    def finish(self, job_dir: Path, result: dict) -> dict:
        return result


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def run_params(cfg: DictConfig, result: dict) -> dict[str, str]:
    """What identifies the job: choices, per-component mode/scheme/backend, hardware, seed, video shape."""
    params = {k: str(v) for k, v in (result.get("choices") or {}).items() if k != "overrides"}
    for comp, plan in (result.get("components") or {}).items():
        for key in ("mode", "scheme", "backend"):
            if plan.get(key) is not None:
                params[f"{comp}.{key}"] = str(plan[key])
    params["hardware"] = str((result.get("hardware") or {}).get("name", cfg.hardware.name))
    params["seed"] = str(cfg.seed)
    params.update({f"model.{k}": str(cfg.model[k]) for k in MODEL_PARAMS})
    return params


def run_metrics(result: dict) -> dict[str, float]:
    """Every number the job measured: stage timings, memory peaks, weight bytes, quality against bf16."""
    metrics = {}
    for group in ("timings_s", "memory", "quality"):
        for key, value in (result.get(group) or {}).items():
            if _number(value) is not None:
                metrics[f"{group}.{key}"] = _number(value)
    for comp, desc in (result.get("components") or {}).items():
        if _number(desc.get("weight_bytes")) is not None:
            metrics[f"weight_bytes.{comp}"] = _number(desc["weight_bytes"])
    return metrics


class MlflowTracker:
    """One open MLflow run; ``finish`` logs the job's params, metrics and artifacts and terminates the run."""

    def __init__(self, client, run_id: str, experiment_id: str, cfg: DictConfig, lock_path: Path | None):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id
        self.cfg, self.lock_path = cfg, lock_path

    def _log(self, job_dir: Path, result: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        params = [Param(k, v) for k, v in run_params(self.cfg, result).items()]
        metrics = [Metric(k, v, now, 0) for k, v in run_metrics(result).items()]
        tags = [RunTag("lightq.status", str(result.get("status"))),
                RunTag("lightq.reason", str(result.get("reason", ""))[:5000]),
                RunTag("lightq.quality_baseline", str((result.get("quality") or {}).get("baseline", "")))]
        self.client.log_batch(self.run_id, metrics=metrics, params=params, tags=tags)
        for name in ARTIFACT_FILES:
            if (job_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(job_dir / name))
        if (job_dir / ".hydra").is_dir():
            self.client.log_artifacts(self.run_id, str(job_dir / ".hydra"), artifact_path="hydra")
        video = job_dir / ((result.get("outputs") or {}).get("video") or "video.mp4")
        if self.cfg.tracking.log_video and result.get("status") == "ok" and video.is_file():
            self.client.log_artifact(self.run_id, str(video))

    def finish(self, job_dir: Path, result: dict) -> dict:
        job_dir = Path(job_dir)
        result["tracking"] = {"name": "mlflow", "uri": self.cfg.tracking.uri, "experiment_id": self.experiment_id,
                              "run_id": self.run_id}
        results.write_json_atomic(job_dir / results.RESULT_FILE, result)  # the logged result names its run
        try:
            with _lock(self.lock_path):
                self._log(job_dir, result)
                self.client.set_terminated(self.run_id, status=RUN_STATUS.get(result.get("status"), "FAILED"))
        except Exception as exc:  # the job itself is done: keep its status, record why its run is incomplete
            result["tracking"]["error"] = f"{type(exc).__name__}: {exc}"
            log.error("tracking: logging run %s to %s failed: %s", self.run_id, self.cfg.tracking.uri, exc)
            results.write_json_atomic(job_dir / results.RESULT_FILE, result)
        return result


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _lock(lock_path: Path | None):
    """Serialise writers of one local store: concurrent jobs (joblib) would race on its schema and its rows."""
    if lock_path is None:
        return nullcontext()
    return staging.file_lock(lock_path)


def _open_mlflow(cfg: DictConfig, job_dir: Path, choices: dict) -> MlflowTracker:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise LightqError(f"tracking=mlflow needs the mlflow package ({exc}): pip install mlflow, "
                          "or run with tracking=none") from None
    t = cfg.tracking
    if not t.uri:
        raise LightqError("tracking.uri is empty: give an MLflow tracking URI (sqlite:///path/mlflow.db, "
                          "http://host:5000) or use tracking=mlflow's default")
    db = _sqlite_path(t.uri)
    lock_path = None
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        lock_path = db.with_name(db.name + ".lock")
    run_name = ",".join(choices.get("overrides") or []) or Path(job_dir).name
    try:
        with _lock(lock_path):
            client = MlflowClient(tracking_uri=t.uri)
            experiment = client.get_experiment_by_name(t.experiment)
            experiment_id = (experiment.experiment_id if experiment else
                             client.create_experiment(t.experiment, artifact_location=t.artifact_root or None))
            run = client.create_run(experiment_id, run_name=run_name,
                                    tags={"lightq.job_dir": str(Path(job_dir).resolve())})
    except Exception as exc:
        raise LightqError(f"tracking=mlflow: cannot open experiment '{t.experiment}' at {t.uri} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): "
                          "check tracking.uri, or run with tracking=none") from None
    return MlflowTracker(client, run.info.run_id, experiment_id, cfg, lock_path)


def start(cfg: DictConfig, job_dir: Path, choices: dict):
    """The tracker of one job (``cfg`` checked by ``config.validate``, see module doc); raises LightqError when the
    tracker cannot be used."""
    if cfg.tracking.name == "none":
        return NoTracker()
    return _open_mlflow(cfg, job_dir, choices)
