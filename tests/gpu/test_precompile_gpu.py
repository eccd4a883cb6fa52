"""The user's job on lightq's Triton kernels with a table of recorded kernel specializations
(``lightq.kernels.precompile``): a job recorded with ``LIGHTQ_SPECIALIZATIONS_DUMP`` in one Triton cache, then the
same job in a fresh process with an empty Triton cache and that table (``LIGHTQ_SPECIALIZATIONS``) compiles every
kernel in the background (none at a launch) and gives bit-identical latents."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import SCHEMES, TRITON

pytestmark = TRITON


def _job(out, env, *overrides):
    proc = subprocess.run([sys.executable, "-m", "lightq", "model=tiny", "quality.compare=false", *overrides,
                           f"hydra.run.dir={out}"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_recorded_table_compiles_the_whole_job_in_the_background(tmp_path, scheme):
    table = tmp_path / "table.json"
    mode = f"dit_quant={scheme}-triton"
    first = _job(tmp_path / "record", {"TRITON_CACHE_DIR": str(tmp_path / "cache1"),
                                        "LIGHTQ_SPECIALIZATIONS_DUMP": str(table)}, mode)
    kind = first["kernels"]["kind"]
    assert kind == f"dit={scheme}-triton@tiny", first["kernels"]
    entries = json.loads(table.read_text())["kinds"][kind]["entries"]
    assert first["kernels"]["compiled_at_launch"] == len(entries) > 0, first["kernels"]

    again = _job(tmp_path / "again", {"TRITON_CACHE_DIR": str(tmp_path / "cache2"),
                                       "LIGHTQ_SPECIALIZATIONS": str(table)}, mode)
    k = again["kernels"]
    assert (k["precompiled"], k["precompile_failed"], k["precompile_stale"], k["compiled_at_launch"]) == \
        (len(entries), 0, 0, 0), k
    assert "kernel_warmup" in again["timings_s"]
    assert torch.equal(torch.load(tmp_path / "record" / "latents.pt"), torch.load(tmp_path / "again" / "latents.pt"))


def test_a_stale_or_broken_entry_only_compiles_at_the_launch(tmp_path):
    table = tmp_path / "table.json"
    first = _job(tmp_path / "record", {"TRITON_CACHE_DIR": str(tmp_path / "cache1"),
                                        "LIGHTQ_SPECIALIZATIONS_DUMP": str(table)}, "dit_quant=int8-triton")
    data = json.loads(table.read_text())
    entries = data["kinds"][first["kernels"]["kind"]]["entries"]
    entries[0][2]["signature"] = {"renamed_" + k: v for k, v in entries[0][2]["signature"].items()}  # stale
    entries[1][2]["constant_vals"] = ["not a value"] * len(entries[1][2]["constant_vals"])  # cannot compile
    table.write_text(json.dumps(data))
    again = _job(tmp_path / "again", {"TRITON_CACHE_DIR": str(tmp_path / "cache2"),
                                       "LIGHTQ_SPECIALIZATIONS": str(table)}, "dit_quant=int8-triton")
    k = again["kernels"]
    assert k["precompile_stale"] == 1 and k["precompile_failed"] == 1, k
    assert k["precompiled"] == len(entries) - 2 and k["compiled_at_launch"] == 2, k
    assert torch.equal(torch.load(tmp_path / "record" / "latents.pt"), torch.load(tmp_path / "again" / "latents.pt"))
