"""``sweep.objective``: each sweep job returns that number of its result.json to Hydra (what Optuna-style sweepers
optimize), NaN when it measured none; the shipped Optuna example is a valid sweep of valid lightq overrides."""

import importlib.util
import json
import math
import os
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lightq import config
from lightq.errors import LightqError
from lightq.paths import conf_dir
from lightq.results import check_objective, objective_value

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "examples" / "optuna-psnr.yaml"
RECORDER = '''
import json, os
from hydra.experimental.callback import Callback

class Record(Callback):
    def on_job_end(self, config, job_return, **kwargs):
        with open(os.environ["RECORD_TO"], "a") as f:
            f.write(json.dumps({"dir": str(config.hydra.runtime.output_dir),
                                "value": job_return.return_value}) + "\\n")
'''


def test_objective_value_and_check():
    result = {"quality": {"psnr_db": 31.5, "baseline": "bf16 baseline computed in this job"},
              "timings_s": {"denoise": 2.0}}
    assert objective_value(result, "quality.psnr_db") == 31.5
    assert objective_value(result, "timings_s.denoise") == 2.0
    assert math.isnan(objective_value(result, "quality.ssim"))
    assert math.isnan(objective_value({"status": "skipped"}, "quality.psnr_db"))
    check_objective("memory.peak_gpu_bytes")
    with pytest.raises(LightqError, match="sweep.objective='quality.psnr' is not a number a job records"):
        check_objective("quality.psnr")


def test_sweep_returns_the_objective_to_hydra(run_lightq, tmp_path):
    (tmp_path / "record_returns.py").write_text(RECORDER)
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', REPO)}",
           "RECORD_TO": str(tmp_path / "returns.jsonl")}
    proc = run_lightq("-m", "dit_quant=fp8-torch,int8-torch", "sweep.objective=quality.psnr_db", "model.frames=5",
                      "sampler.steps=3", "+hydra.callbacks.record._target_=record_returns.Record",
                      "hydra.sweep.dir=sweep", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    returns = [json.loads(line) for line in (tmp_path / "returns.jsonl").read_text().splitlines()]
    assert len(returns) == 2
    for r in returns:
        psnr = json.loads((Path(r["dir"]) / "result.json").read_text())["quality"]["psnr_db"]
        assert r["value"] == psnr and 10 < psnr < 90


def test_a_bad_objective_is_one_line(run_lightq):
    proc = run_lightq("sweep.objective=quality.psnr")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("lightq: sweep.objective='quality.psnr' is not a number")


def _choices(spec: str) -> list[str]:
    m = re.fullmatch(r"choice\((.*)\)", spec.strip())
    assert m, spec
    return [c.strip() for c in m.group(1).split(",")]


def test_the_optuna_example_is_a_valid_sweep():
    example = OmegaConf.load(EXAMPLE)
    assert list(example.defaults) == ["config", {"override hydra/sweeper": "optuna"}, "_self_"]
    assert example.hydra.sweeper.direction == "maximize" and example.sweep.objective == "quality.psnr_db"
    config.register()
    base = [f"model.frames={example.model.frames}", f"sweep.objective={example.sweep.objective}"]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for group, spec in example.hydra.sweeper.params.items():
            for choice in _choices(spec):
                config.validate(compose("config", overrides=[*base, f"{group}={choice}"]))
    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None:
        with initialize_config_dir(config_dir=str(EXAMPLE.parent), version_base="1.3"):
            cfg = compose("optuna-psnr", return_hydra_config=True)
            assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
