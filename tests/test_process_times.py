"""The wall time a job's process spends outside the job: ``results.process_age_s`` (the start-up part, recorded in
result.json ``process.before_job_s``) and ``lightq.bench pipeline``'s split of a job's wall time into start-up,
the job's stages and exit."""

import subprocess
import sys
import time

import pytest

from lightq.bench.pipeline import Job, _row
from lightq.results import process_age_s

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process_age_s reads Linux's /proc")


def test_process_age_counts_from_the_process_start():
    code = "import time; time.sleep(0.6); from lightq.results import process_age_s; print(process_age_s())"
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - start
    age = float(out)
    assert 0.6 <= age <= wall + 0.02, (age, wall)  # 10 ms ticks: the start can round down by one tick
    assert process_age_s() > age - 10  # this long-running test process is older than a child started just now


def test_bench_row_splits_the_wall_time_into_start_up_stages_and_exit():
    job = Job("fp8-triton", ["dit_quant=fp8-triton"], "warm")
    job.wall_s = 40.0
    job.result = {"status": "ok", "process": {"before_job_s": 6.5},
                  "timings_s": {"setup": 0.5, "load": 3.0, "denoise": 20.0, "unaccounted": 0.2, "total": 23.7}}
    row = _row(job, None)
    assert row["startup_s"] == 6.5 and row["exit_s"] == round(40.0 - 23.7 - 6.5, 2)
    assert row["process_overhead_s"] == round(40.0 - 23.7, 2)
    job.result = {**job.result, "process": {"before_job_s": None}}  # a platform without /proc: unknown, not 0
    assert _row(job, None)["exit_s"] is None and _row(job, None)["startup_s"] is None



def _ending(tmp_path, register: str) -> tuple[int, str, str]:
    """(exit code, the two files) of a child that leaves an object with a finalizer in a reference cycle, garbage
    when the process ends, after the ``lightq.teardown`` calls ``register``."""
    code = f"""
import gc, sys
from lightq.teardown import drop_exit_collections, skip_exit_collections

{register}
freeze = gc.freeze
def counted():
    open({str(tmp_path / "freezes.txt")!r}, "a").write("x")
    freeze()
gc.freeze = counted


class Holder:
    def __init__(self):
        self.me = self  # a cycle: only the collector frees it
        self.file = open({str(tmp_path / "buffered.txt")!r}, "w")
        self.file.write("written, flushed by the finalizer")

    def __del__(self):
        self.file.close()


Holder()
sys.exit(3)
"""
    rc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode
    files = [(tmp_path / name).read_text() if (tmp_path / name).exists() else "" for name in ("buffered.txt",
                                                                                              "freezes.txt")]
    for name in ("buffered.txt", "freezes.txt"):
        (tmp_path / name).unlink(missing_ok=True)
    return rc, *files


def test_exit_handler_finalizes_the_garbage_of_the_run_and_keeps_the_exit_code(tmp_path):
    """``teardown.skip_exit_collections``: an object garbage by the time the process ends is finalized as without
    the handler (its file flushed and closed), the exit code stays the process's own, the handler runs once, and not
    at all once dropped."""
    assert _ending(tmp_path, "") == (3, "written, flushed by the finalizer", "")
    twice = "skip_exit_collections(); skip_exit_collections()"
    assert _ending(tmp_path, twice) == (3, "written, flushed by the finalizer", "x")
    assert _ending(tmp_path, twice + "; drop_exit_collections()") == (3, "written, flushed by the finalizer", "")
