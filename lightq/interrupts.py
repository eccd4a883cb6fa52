"""SIGTERM as an exception, so that a terminated run cleans up like an interrupted one.

Python's default for SIGTERM is to die on the spot: no ``finally`` runs, so temporaries stay behind and a job's
record still says ``running``. ``terminate_gracefully()`` (called once by each command-line entry point) makes
SIGTERM raise ``Terminated`` in the main thread instead; like ``KeyboardInterrupt`` it is a ``BaseException``,
so every ``except Exception`` lets it through, every ``finally`` and temporary-file cleanup runs, and the process
then exits with 128 + 15, the status a shell reports for a process ended by SIGTERM.
"""

from __future__ import annotations

import signal
import threading

EXIT_CODE = 128 + signal.SIGTERM


class Terminated(BaseException):
    """The process received SIGTERM (a scheduler's time limit, ``kill``, a container stop)."""

    exit_code = EXIT_CODE

    def __str__(self) -> str:
        return "terminated by SIGTERM"


def _raise(signum, frame) -> None:
    raise Terminated()


def terminate_gracefully() -> None:
    """Make SIGTERM raise ``Terminated`` (only possible from the main thread; elsewhere a no-op)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise)
