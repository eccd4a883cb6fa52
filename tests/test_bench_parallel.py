"""``python -m lightq.bench parallel``: its arguments, and a run of the tiny job on one process and on two gloo
processes side by side (CPU)."""

from __future__ import annotations

import json
import math
import re

import pytest

from lightq.bench.__main__ import main, parse
from lightq.bench.parallel import SINGLE, parse_layouts, run
from lightq.errors import LightqError


def test_layouts_parse_into_jobs_after_the_one_process_job():
    args = parse(["parallel", "model=tiny", "--layouts", "ulysses:4; cfg-ulysses:8 parallel.vae=rank0", "--json", "x"])
    assert args.layouts == ["ulysses:4", "cfg-ulysses:8 parallel.vae=rank0"] and args.overrides == ["model=tiny"]
    jobs = parse_layouts(args.layouts, args.overrides)
    assert [(j.label, j.overrides, j.procs) for j in jobs] == [
        (SINGLE, ["parallel=none"], 1), ("ulysses x4", ["parallel=ulysses"], 4),
        ("cfg-ulysses x8 parallel.vae=rank0", ["parallel=cfg-ulysses", "parallel.vae=rank0"], 8)]
    assert parse(["parallel"]).layouts == ["ulysses:4", "ulysses:8", "cfg-ulysses:8"]


@pytest.mark.parametrize("layouts, common, words", [
    (["zigzag:4"], [], "'zigzag' is not a parallel layout; choose one of allgather"),
    (["ulysses"], [], "give the process count (2 or more) after the colon, e.g. ulysses:4"),
    (["ulysses:1"], [], "give the process count"),
    (["none:2"], [], "'none' is not a parallel layout"),
    (["ulysses:2 vae"], [], "'vae' is no override"),
    (["ulysses:2"], ["parallel.vae=rank0"], "give layouts with --layouts"),
    (["ulysses:2"], ["hydra.run.dir=x"], "leave them out of the common overrides"),
    ([], [], "--layouts is empty"),
])
def test_layouts_that_cannot_run_say_why(layouts, common, words):
    with pytest.raises(LightqError, match=re.escape(words)):
        parse_layouts(layouts, common)


def test_bad_arguments_end_with_one_line_and_exit_2(capsys, tmp_path):
    assert main(["parallel", "--layouts", "ring:0", "--work", str(tmp_path)]) == 2
    assert main(["parallel", "--cache", "cold", "--work", str(tmp_path)]) == 2
    assert main(["parallel", "--repeat", "0", "--work", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "ring:0" in err[0] and "--cache cold" in err[1] and "--repeat 0" in err[2]
    assert not (tmp_path / "jobs").exists()


def test_two_gloo_processes_beside_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's ranks run so; the same GEMM order gives the same bits
    rows = run(["ulysses:2"], ["model.steps=2"], "keep", tmp_path / "work", str(tmp_path / "rows.json"))
    one, two = rows
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    assert (one["procs"], two["procs"], two["layout"], two["vae"]) == (1, 2, "ulysses 2", "split")
    assert two["latent_max_abs_diff"] == 0.0 and two["latent_cosine"] == pytest.approx(1.0)
    assert two["video_psnr_db"] == math.inf
    assert len(two["peak_gpu_gib_per_rank"]) == 2 and len(one["peak_gpu_gib_per_rank"]) == 1
    assert one["speedup_denoise"] == 1.0 and two["speedup_denoise"] > 0 and two["speedup_step"] > 0
    assert two["efficiency_denoise"] == pytest.approx(two["speedup_denoise"] / 2, abs=1e-3)
    assert {"load", "denoise", "decode"} <= set(two["stages_s"])
    assert json.loads((tmp_path / "rows.json").read_text())["rows"] == rows
    table = capsys.readouterr().out
    assert "| ulysses x2 | 2 |" in table and "x denoise" in table
