"""Where a ``python -m lightq`` process spends the time outside its job: start-up phases, the job, and the exit.

    python scripts/diag/process_phases.py [--runs 3] [--out /tmp/phases] [OVERRIDES ...]

Each run is a fresh process running lightq's ``__main__`` (as ``python -m lightq OVERRIDES hydra.run.dir=...``
does) under a harness that timestamps, on the process's own clock (seconds since it started, as result.json's
``process.before_job_s``): the harness starting (interpreter and site), Hydra and ``lightq.app`` imported, each
Hydra compose (Hydra composes twice: once to read the run mode, once to run), the task starting, ``config.validate``
(where torch is first imported), ``job.execute``, ``main`` returning and the last atexit handler; the parent adds
the process's exit. ``cpu_before_job`` / ``cpu_after_job`` are the process's CPU seconds (all threads) before the
job and after its end: steadier than wall time on a shared machine. Then ``python -X importtime -c 'import torch'``
gives torch's import alone. Prints one line per run and the median of each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HARNESS = r'''
import atexit, json, os, sys, time

def _age():
    with open("/proc/self/stat") as f:
        start = int(f.read().rpartition(")")[2].split()[19]) / os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) - start

_m0, _a0 = time.monotonic(), _age()
marks, cpu = {}, {}

def mark(name):
    marks[name] = _a0 + time.monotonic() - _m0
    cpu[name] = time.process_time()

def _dump():  # registered first: runs after every other atexit handler
    mark("atexit_done")
    marks["monotonic_at_atexit_done"] = time.monotonic()
    with open(os.environ["PHASES_FILE"], "w") as f:
        json.dump({"marks": marks, "cpu": cpu}, f)

atexit.register(_dump)
mark("harness")
import hydra
mark("hydra_imported")
import lightq.app, lightq.config, lightq.job, lightq.sweep
from hydra._internal.hydra import Hydra
mark("lightq_imported")

def wrap(owner, attr, name):
    f = getattr(owner, attr)
    def w(*a, **k):
        n = sum(1 for key in marks if key.startswith(name + "#") and key.endswith("start"))
        mark(f"{name}#{n}_start")
        try:
            return f(*a, **k)
        finally:
            mark(f"{name}#{n}_end")
    setattr(owner, attr, w)

wrap(Hydra, "compose_config", "compose")
wrap(lightq.app, "_task", "task")
wrap(lightq.config, "validate", "validate")
wrap(lightq.job, "execute", "execute")
import runpy
sys.argv = ["lightq", *sys.argv[1:]]
try:
    runpy.run_module("lightq", run_name="__main__", alter_sys=True)
finally:
    mark("main_returned")
'''

# (phase, from mark, to mark)
PHASES = (("interpreter", None, "harness"), ("import_hydra", "harness", "hydra_imported"),
          ("import_lightq", "hydra_imported", "lightq_imported"),
          ("main_to_compose", "lightq_imported", "compose#0_start"),
          ("compose_mode", "compose#0_start", "compose#0_end"),
          ("compose_run", "compose#1_start", "compose#1_end"), ("hydra_job_setup", "compose#1_end", "task#0_start"),
          ("validate_torch", "validate#0_start", "validate#0_end"), ("to_execute", "validate#0_end", "execute#0_start"),
          ("job", "execute#0_start", "execute#0_end"), ("job_end_to_main_end", "execute#0_end", "main_returned"),
          ("atexit", "main_returned", "atexit_done"), ("teardown", "atexit_done", "exit"))


def run_once(overrides: list[str], out: Path) -> dict:
    """One run's phases (wall seconds), its wall time, result.json's ``before_job_s`` and job total, the wall time
    after the job's end, and the CPU seconds (all threads) before the job and after its end."""
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        phases_file = f.name
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", HARNESS, *overrides, f"hydra.run.dir={out}"],
                            env={**os.environ, "PHASES_FILE": phases_file}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    end = time.monotonic()
    proc.returncode = os.waitstatus_to_exitcode(status)
    saved = json.loads(Path(phases_file).read_text())
    os.unlink(phases_file)
    marks, cpu = saved["marks"], saved["cpu"]
    marks["exit"] = marks["atexit_done"] + end - marks.pop("monotonic_at_atexit_done")
    result = json.loads((out / "result.json").read_text())
    row = {name: round(marks[b] - (marks[a] if a else 0.0), 3) for name, a, b in PHASES if b in marks and
           (a is None or a in marks)}
    row.update(rc=proc.returncode, wall=round(end - t0, 3), before_job_s=result["process"]["before_job_s"],
               job_total=result["timings_s"]["total"], after_job=round(marks["exit"] - marks["execute#0_end"], 3),
               cpu_before_job=round(cpu["execute#0_start"], 3),
               cpu_after_job=round(usage.ru_utime + usage.ru_stime - cpu["execute#0_end"], 3))
    return row


def torch_import_s() -> float | None:
    """torch's cumulative import time from ``python -X importtime -c 'import torch'``."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch"], capture_output=True,
                         text=True).stderr
    found = re.search(r"\|\s*(\d+)\s*\| torch$", err, re.M)
    return int(found.group(1)) / 1e6 if found else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="/tmp/phases")
    args, overrides = ap.parse_known_args()
    rows = []
    for i in range(args.runs):
        rows.append(run_once(overrides, Path(args.out) / f"run{i}"))
        print(json.dumps(rows[-1]), flush=True)
    keys = [k for k in rows[0] if k != "rc"]
    print("median:", json.dumps({k: round(statistics.median(r[k] for r in rows if k in r), 3) for k in keys}))
    print("import torch alone:", torch_import_s(), "s")


if __name__ == "__main__":
    main()
