"""Progress of a long loop: a tqdm bar on a terminal; elsewhere (a log file, CI, SLURM) a line now and then.

``Progress(total, desc, unit)`` is used as a context manager and advanced with ``update(n)``. When stderr is not a
terminal it writes, to stderr and to the ``lightq`` log, ``lightq: <desc>: <done>/<total> <unit>, <elapsed> s,
about <eta> s left`` once ``interval_s()`` seconds have passed since the loop started or since its last line, and a
closing ``... done in <elapsed> s`` line for a loop that wrote any: a loop shorter than the interval stays silent.
``LIGHTQ_PROGRESS_INTERVAL_S`` sets the interval (default 30 s; 0 writes a line per update).
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("lightq")
DEFAULT_INTERVAL_S = 30.0


def interval_s() -> float:
    try:
        return max(0.0, float(os.environ.get("LIGHTQ_PROGRESS_INTERVAL_S", DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


class Progress:
    """See the module doc. ``enabled=False`` shows nothing anywhere; ``leave=False`` clears a finished bar."""

    def __init__(self, total: int, desc: str, unit: str = "it", enabled: bool = True, leave: bool = True):
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self.enabled = enabled
        self._bar = None
        self._lines = enabled and not sys.stderr.isatty()
        if enabled and not self._lines:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=leave)
        self._t0 = self._last = time.perf_counter()
        self._wrote = self._closed = False
        self._interval = interval_s()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._lines:
            now = time.perf_counter()
            if now - self._last >= self._interval:
                self._last = now
                elapsed = now - self._t0
                left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
                self._write(f"{self.done}/{self.total} {self.unit}, {elapsed:.0f} s, about {left:.0f} s left")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._wrote and not self._closed:
            self._closed = True
            self._write(f"{self.done}/{self.total} {self.unit} done in {time.perf_counter() - self._t0:.0f} s")

    def _write(self, what: str) -> None:
        line = f"lightq: {self.desc}: {what}"
        print(line, file=sys.stderr, flush=True)
        log.info(line)
        self._wrote = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
