"""lightq.progress off a terminal: lines at most every interval, a closing line only for a loop that wrote any."""

import io
import logging

from lightq import progress


class _Pipe(io.StringIO):
    def isatty(self):
        return False


def _run(monkeypatch, interval, steps=3):
    err = _Pipe()
    monkeypatch.setattr(progress.sys, "stderr", err)
    monkeypatch.setenv("LIGHTQ_PROGRESS_INTERVAL_S", interval)
    with progress.Progress(steps, "denoise", "steps") as bar:
        for _ in range(steps):
            bar.update()
    return err.getvalue().splitlines()


def test_every_update_at_interval_zero_then_one_closing_line(monkeypatch, caplog):
    # a handler an earlier in-process test left on a closed stream would print '--- Logging error ---' onto the
    # stderr this test reads; what the lightq logger itself receives is checked through caplog below
    monkeypatch.setattr(logging, "raiseExceptions", False)
    with caplog.at_level(logging.INFO, logger="lightq"):
        lines = _run(monkeypatch, "0")
    assert [line.split(", ")[0] for line in lines[:3]] == [f"lightq: denoise: {i}/3 steps" for i in (1, 2, 3)]
    assert lines[3].startswith("lightq: denoise: 3/3 steps done in ") and len(lines) == 4
    assert [r.getMessage() for r in caplog.records] == lines, "the same lines go to the job's log"


def test_a_loop_shorter_than_the_interval_is_silent(monkeypatch):
    assert _run(monkeypatch, "30") == []


def test_disabled_writes_nothing_and_a_bad_interval_falls_back(monkeypatch):
    err = _Pipe()
    monkeypatch.setattr(progress.sys, "stderr", err)
    monkeypatch.setenv("LIGHTQ_PROGRESS_INTERVAL_S", "0")
    with progress.Progress(2, "x", enabled=False) as bar:
        bar.update(2)
    assert err.getvalue() == ""
    monkeypatch.setenv("LIGHTQ_PROGRESS_INTERVAL_S", "soon")
    assert progress.interval_s() == progress.DEFAULT_INTERVAL_S
