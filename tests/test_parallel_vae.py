"""The VAE decode split over processes by latent rows (``parallel.vae=split``, ``lightq.parallel.rows``) on CPU:
``torchrun`` with the gloo backend, the tiny VAEs.

Every rank runs one process's operations on one process's values for its rows (the halo rows of each conv, the
cached frames with their halo, the whole frame at the attention block). A CPU conv kernel may still sum a strip in
another order than the whole frame: oneDNN picks its algorithm by the input's size, and torch's native conv, bit
for bit equal on some machines, differs on others (the 2-core CPU machine of 2026-12-02: up to 1.8e-6, at one
latent row per rank). The split is held to a difference of fp32 rounding, 1e-5 (about 5x the largest measured;
a check, not a derived bound); a wrong halo or cache moves values by the activations' size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightq.parallel.p2p import chain_order

ROUNDING_CHECK = 1e-5


def _torchrun(procs: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
                           *args], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("procs", [2, 3])
def test_split_decode_equals_one_process(tmp_path, procs):
    script = Path(__file__).with_name("vae_split_check.py")
    res = _torchrun(procs, str(script), str(tmp_path / "vae.json"))
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads((tmp_path / "vae.json").read_text())
    assert len(got) == 6, got
    for case, r in got.items():
        vae, rows = case.split()[:2]
        pixels = {"wan2.1": 8, "wan2.2": 16}[vae]
        assert r["shape"] == [1, 3, 9, pixels * int(rows), pixels * 5], case
        assert r["max_diff"] <= ROUNDING_CHECK, (case, r)


def _blocking_run(programs: dict[int, list]) -> bool:
    """True if the ranks' op lists all finish when every send and receive blocks until its partner's is posted."""
    pos = dict.fromkeys(programs, 0)
    progressed = True
    while progressed:
        progressed = False
        for a, ops in programs.items():
            if pos[a] < len(ops):
                kind, _, b = ops[pos[a]]
                other = programs[b][pos[b]] if pos[b] < len(programs[b]) else None
                if other is not None and other[2] == a and {kind, other[0]} == {"send", "recv"}:
                    pos[a] += 1
                    pos[b] += 1
                    progressed = True
    return all(pos[r] == len(ops) for r, ops in programs.items())


@pytest.mark.parametrize("size", range(1, 8))
def test_chain_order_cannot_deadlock(size):
    def ops(r):
        before = (("send", None, r - 1), ("recv", None, r - 1)) if r > 0 else None
        after = (("send", None, r + 1), ("recv", None, r + 1)) if r < size - 1 else None
        return chain_order(r, size, before, after)

    programs = {r: ops(r) for r in range(size)}
    assert all(len(p) == 2 * ((r > 0) + (r < size - 1)) for r, p in programs.items())
    assert _blocking_run(programs)


def test_the_blocking_model_sees_a_deadlock():
    assert not _blocking_run({0: [("recv", None, 1), ("send", None, 1)], 1: [("recv", None, 0), ("send", None, 0)]})


def _frames(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted((folder / "frames").glob("*.png"))]).astype(int)


def test_a_job_decodes_split_says_so_and_leaves_cleanly(tmp_path):
    common = ["quality.compare=false", "model.steps=2", "save_frames=true", "model=tiny-i2v", "model.height=48",
              "model.width=80"]
    one = subprocess.run([sys.executable, "-m", "lightq", "hydra.run.dir=one", *common], cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    scratch = tmp_path / "scratch"  # the ranks' temporary folders
    scratch.mkdir()
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
                          "-m", "lightq", "hydra.run.dir=many", "parallel=allgather", *common], cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)}, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    # the ranks left through parallel.runtime.leave (os._exit): exit handlers ran, the printed summary came out
    assert "lightq: ok ->" in res.stdout and not list(scratch.glob("lightq-rank*")), res.stdout
    record = json.loads((tmp_path / "many" / "result.json").read_text())["parallel"]
    assert record["vae"] == "split" and record["vae_rows"] == [2, 2, 2]
    a, b = _frames(tmp_path / "one"), _frames(tmp_path / "many")
    assert a.shape == b.shape == (9, 48, 80, 3)
    assert np.abs(a - b).max() <= 1  # rounding to 8 bits of videos a few 1e-7 apart
