"""The end of a lightq process: every exit handler, flush and exit code as usual, without the interpreter's repeated
garbage-collector passes over the objects that imports left behind.

At exit CPython clears its modules and runs its cyclic garbage collector several times over every object still
tracked; once torch is imported those are hundreds of thousands (more with a GPU stack), and the passes cost a
large share of the time between a job's record being final and the process's exit (docs/BENCHMARKS.md, "A job's
process outside its job"). ``skip_exit_collections`` registers an exit handler that collects once, so whatever is
garbage by then is finalized as it would be at any time (files closed, finalizers run), then freezes the survivors
(``gc.freeze``), which the later passes skip. Nothing else changes: every other exit handler runs, the standard
streams are flushed, the exit code is the same. What goes uncollected is only the cycles among those survivors
that the modules' own teardown leaves, memory the operating system takes back when the process ends.
"""

from __future__ import annotations

import atexit
import gc


def _collect_then_freeze() -> None:
    gc.collect()
    gc.freeze()


def skip_exit_collections() -> None:
    """Register the exit handler (see the module doc). Call it early in a process's entry point: handlers run in
    reverse order, so this one then runs after those of the modules imported later (torch's). Idempotent."""
    atexit.unregister(_collect_then_freeze)
    atexit.register(_collect_then_freeze)


def drop_exit_collections() -> None:
    """Unregister the handler, for a process about to end by ``os._exit`` after running its exit handlers
    (``parallel.runtime.leave``): no interpreter teardown follows, so its collection would only cost time."""
    atexit.unregister(_collect_then_freeze)
