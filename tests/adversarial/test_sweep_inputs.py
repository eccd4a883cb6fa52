"""Sweeps over free text: job folders stay inside the sweep whatever a prompt holds, prompts are data (never
interpolated), and a comma never silently splits one prompt into two jobs (issue 15, items 5, 12, 14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightq.paths import JOB_NAME_BYTES, job_folder_name

from .conftest import one_line

LONG = "a very long prompt " * 20


@pytest.mark.parametrize("raw", ["prompt=../../escape", "prompt=" + LONG, "prompt=line\nbreak", ".hidden=1",
                                 "dit_quant.ckpt=/models/x.safetensors", "prompt=" + "é" * 200])
def test_job_folder_names_are_one_safe_component(raw):
    name = job_folder_name(raw)
    assert "/" not in name and "\n" not in name and not name.startswith(".")
    assert len(name.encode()) <= JOB_NAME_BYTES and name.encode().decode() == name


def test_plain_names_stay_and_sanitized_ones_never_collide():
    assert job_folder_name("dit_quant=int8-torch,model.frames=5") == "dit_quant=int8-torch,model.frames=5"
    assert job_folder_name("prompt=a/b") != job_folder_name("prompt=a_b")
    assert job_folder_name("prompt=" + LONG + "x") != job_folder_name("prompt=" + LONG + "y")


def test_hostile_prompts_in_a_sweep(lightq_cli, tmp_path, monkeypatch):
    """Every job lands in its own folder inside the sweep, is in the table, and records the prompt as typed."""
    monkeypatch.setenv("LIGHTQ_TEST_SECRET", "hunter2-secret-value")
    prompts = ["../../escape", LONG, "${oc.env:LIGHTQ_TEST_SECRET}", "${no_such_key}"]
    sweep = tmp_path / "sweep"
    arg = "prompt=" + ",".join(json.dumps(p) for p in prompts)
    code, err, out = lightq_cli("-m", arg, "dit_quant=fp8-sgl", f"hydra.sweep.dir={sweep}")
    assert code == 0, err  # fp8-sgl cannot run here: every job is skipped, quickly, which does not fail a sweep
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
    jobs = sorted(p.parent for p in sweep.rglob("result.json"))
    assert len(jobs) == 4 and all(j.parent == sweep for j in jobs)
    rows = (sweep / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and all(",skipped," in r for r in rows[1:])
    import yaml

    typed = sorted(yaml.safe_load((j / "config_resolved.yaml").read_text())["prompt"] for j in jobs)
    assert typed == sorted(prompts)
    for f in sweep.rglob("*"):
        if f.is_file():
            assert "hunter2" not in f.read_text(errors="replace"), f


@pytest.mark.parametrize("multirun", [True, False])
def test_a_comma_in_a_prompt_is_refused_not_split(lightq_cli, tmp_path, monkeypatch, multirun):
    monkeypatch.chdir(tmp_path)
    args = ["-m"] if multirun else []
    code, err, _ = lightq_cli(*args, "prompt=A cat walks on the grass, realistic style.", "dit_quant=fp8-sgl")
    assert code == 2
    one_line(err, "unquoted comma", "2 prompts", "quote it to keep it whole")
    assert list(tmp_path.iterdir()) == []


def test_quoted_prompts_sweep_as_asked(lightq_cli, tmp_path):
    sweep = tmp_path / "sweep"
    code, err, _ = lightq_cli("-m", 'prompt="a, b","c"', "dit_quant=fp8-sgl", f"hydra.sweep.dir={sweep}")
    assert code == 0, err
    import yaml

    assert sorted(yaml.safe_load(f.read_text())["prompt"] for f in sweep.rglob("config_resolved.yaml")) == ["a, b", "c"]
