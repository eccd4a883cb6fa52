"""Experiment tracking: tracking=mlflow logs a job's params, metrics and artifacts; without mlflow, one clear error."""

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from lightq import sweep, tracking
from lightq.config import LightqConfig
from lightq.errors import LightqError


def _cfg(**over):
    return OmegaConf.merge(OmegaConf.structured(LightqConfig), over)


def test_mlflow_run_holds_params_metrics_and_artifacts(tmp_path):
    pytest.importorskip("mlflow", reason="pip install mlflow")
    from mlflow.tracking import MlflowClient

    job = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lightq", "tracking=mlflow", "tracking.experiment=lightq-test",
                           "dit_quant=int8-torch", "model.frames=5", f"hydra.run.dir={job}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((job / "result.json").read_text())
    assert "error" not in result["tracking"], result["tracking"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")  # the default store, under cwd
    experiment = client.get_experiment_by_name("lightq-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == result["tracking"]["run_id"] and run.info.status == "FINISHED"
    assert run.info.run_name == "tracking=mlflow,tracking.experiment=lightq-test,dit_quant=int8-torch,model.frames=5"
    params = run.data.params
    assert params["dit_quant"] == "int8-torch" and params["t5_quant"] == "none" and params["model"] == "tiny"
    assert params["dit.mode"] == "int8-torch" and params["dit.scheme"] == "int8" and params["dit.backend"] == "torch"
    assert params["model.frames"] == "5" and params["seed"] == "42" and params["hardware"] == "cpu"
    metrics = run.data.metrics
    for stage in ("load", "encode_text", "denoise", "denoise_per_step", "decode", "total"):
        assert metrics[f"timings_s.{stage}"] == pytest.approx(result["timings_s"][stage])
    assert metrics["memory.peak_host_bytes"] == result["memory"]["peak_host_bytes"] > 0
    assert metrics["weight_bytes.dit"] == result["components"]["dit"]["weight_bytes"] > 0
    assert metrics["quality.psnr_db"] == pytest.approx(result["quality"]["psnr_db"]) and metrics["quality.ssim"] > 0.9
    assert run.data.tags["lightq.status"] == "ok" and run.data.tags["lightq.job_dir"] == str(job.resolve())
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"result.json", "config_resolved.yaml", "lightq.log", "video.mp4", "hydra"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "hydra")} >= {"hydra/config.yaml"}
    logged = json.loads(open(client.download_artifacts(run.info.run_id, "result.json", str(tmp_path))).read())
    assert logged["tracking"]["run_id"] == run.info.run_id and logged["status"] == "ok"


def test_missing_mlflow_fails_the_job_before_it_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError, as if not installed
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    cfg = _cfg(tracking={"name": "mlflow", "uri": f"sqlite:///{tmp_path}/db"}, model={"frames": 5})
    with pytest.raises(LightqError, match=r"tracking=mlflow needs the mlflow package .*pip install mlflow"):
        tracking.start(cfg, tmp_path, {})
    result = sweep.run_job(cfg, tmp_path / "job", {"dit_quant": "none"}, multirun=True)
    assert result["status"] == "failed" and "pip install mlflow" in result["reason"]
    assert json.loads((tmp_path / "job" / "result.json").read_text())["status"] == "failed"
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == ["result.json"], "the pipeline never started"
    assert isinstance(tracking.start(_cfg(), tmp_path, {}), tracking.NoTracker), "tracking=none needs no mlflow"


def test_unknown_tracker_and_empty_uri_are_errors(tmp_path):
    result = sweep.run_job(_cfg(tracking={"name": "wandb"}), tmp_path / "job", {}, multirun=True)
    assert result["status"] == "failed" and "tracking.name='wandb': choose one of none, mlflow" in result["reason"]
    pytest.importorskip("mlflow", reason="pip install mlflow")
    with pytest.raises(LightqError, match="tracking.uri is empty"):
        tracking.start(_cfg(tracking={"name": "mlflow"}), tmp_path, {})
