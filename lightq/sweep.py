"""Sweeps (``python -m lightq -m ...``): per-job bookkeeping and the end-of-sweep status.

- After every job, ``record`` rebuilds the sweep's tables (lightq.report), so they are whole even when a job
  failed (Hydra skips its end-of-multirun callbacks in that case; lightq does not rely on them for the tables).
- ``SweepStatus`` is a Hydra callback: at the end of a multirun it rebuilds the tables once more and exits 1 if
  any job failed (skipped jobs — combinations that cannot run here — do not fail the sweep).
- ``resume=true`` skips jobs whose folder already holds a successful result (see ``lightq.app``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from . import report


def record(sweep_dir: Path, job_dir: Path, result: dict) -> None:
    report.build(sweep_dir)


class SweepStatus(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig

        sweep_dir = Path(HydraConfig.get().sweep.dir if HydraConfig.initialized() else config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = report.build(sweep_dir)
        failed = [r["job"] for r in rows if r["status"] == "failed"]
        counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
        print(f"lightq sweep: {counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed -> "
              f"{sweep_dir / 'results.md'}")
        if failed:
            print(f"lightq sweep: failed jobs: {', '.join(failed)}", file=sys.stderr)
            sys.exit(1)
