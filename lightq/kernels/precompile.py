"""A job's Triton kernels compiled in the background while it loads, from the table of what jobs of its kind
compiled before, so its first denoising step compiles nothing.

Triton compiles a kernel once per *specialization*: the dtypes of its tensor arguments, which integer arguments
are 1 or multiples of 16 and which pointers are 16-byte aligned, its constexpr values (an autotuned config's
included) and its launch options. Triton writes one as JSON (``specialization_data``, handed to its JIT compile
hooks) and compiles it with no launch (``JITFunction.preload``). ``tuned/<arch>-specializations.json`` holds, per
*job kind* (``lightq.pipeline.components.job_kind``: which components run on lightq's kernels, in which mode, at
which architecture), the specializations of lightq's kernels that such jobs compiled:

    {"arch": "sm90", "kinds": {"dit=fp8-triton@14b": {"compiler": "3.6.0",
                                                      "entries": [[module, kernel, specialization], ...]}}}

``Background`` enters ``triton.AsyncCompileMode`` on a thread pool and preloads its kind's entries into it: each
compile runs in a pool thread (Triton's passes and ``ptxas`` run without holding the GIL), from Triton's on-disk
cache when it holds the kernel, and the same thread loads the compiled kernel and builds its launcher. A kernel
the job launches meanwhile (the backend's self-test at load) waits for its own compile only; ``wait`` (the job's
``kernel_warmup`` stage, before the first step) waits for the rest and leaves every kernel in Triton's in-memory
cache. An entry that fails to compile (a table older than a kernel's signature) is only a kernel compiled at its
first launch, as without a table; ``Background.record`` counts both.
Machine-specific fields (``extern_libs``: the path of libdevice) are not stored; the compile target is the
running GPU's (the table is chosen by its architecture).

``LIGHTQ_SPECIALIZATIONS=<file>`` adds a table of one's own (recorded for other GPUs or sizes), read after the
shipped one. ``LIGHTQ_SPECIALIZATIONS_DUMP=<file>`` makes a process record every specialization of lightq's kernels
it compiles, under the kind of the job running, and merge them into ``<file>`` at exit: how the shipped tables are
made (docs/BENCHMARKS.md, "Kernel warm-up"). Record with the tuned table complete (``tuned_configs``), so no
autotuning compiles configurations the job never runs.
"""

from __future__ import annotations

import atexit
import importlib
import inspect
import json
import logging
import os
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from . import tuned_configs

DUMP_ENV = "LIGHTQ_SPECIALIZATIONS_DUMP"
TABLE_ENV = "LIGHTQ_SPECIALIZATIONS"  # a table of one's own (other GPUs, sizes), read after the shipped one
MACHINE_FIELDS = ("extern_libs",)  # options naming files of the machine that compiled
log = logging.getLogger(__name__)

# What LIGHTQ_SPECIALIZATIONS_DUMP records: {kind: {(module, kernel, key): specialization}}; the kind running; how
# many lightq kernels this process compiled outside a preload (the job's own launches).
_recorded: dict[str, dict[tuple[str, str, str], dict]] = {}
_recording_kind: str | None = None
_launch_compiles = 0


def table_path(gpu_arch: str) -> Path:
    return tuned_configs.TABLE_DIR / f"{gpu_arch}-specializations.json"


def read_table(path: Path) -> dict:
    """The table at ``path`` (``{"kinds": {}}`` when there is none, or it is unreadable: logged)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        log.warning("kernel specializations table %s unreadable (%s): compiling kernels at their first launch",
                    path, exc)
    return {"kinds": {}}


def tables() -> list[Path]:
    """The tables this GPU's jobs read: the shipped one of its architecture, then ``TABLE_ENV``'s file if set."""
    extra = os.environ.get(TABLE_ENV)
    return [table_path(tuned_configs.arch()), *([Path(extra)] if extra else [])]


def recorded(kind: str) -> list:
    """``[module, kernel, specialization]`` entries of job kind ``kind`` in every table of ``tables()``, once each."""
    found = {}
    for path in tables():
        for module, name, spec in read_table(path).get("kinds", {}).get(kind, {}).get("entries", []):
            found.setdefault((module, name, spec.get("key")), [module, name, spec])
    return list(found.values())


def _kernel(module: str, name: str):
    """The Triton kernel ``module.name`` (a ``JITFunction``; under ``TRITON_INTERPRET`` Triton's interpreted
    function), or None if lightq has no such kernel (any more)."""
    try:
        fn = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    return fn if isinstance(fn, (triton.runtime.JITFunction, InterpretedFunction)) else None


def _fits(fn, spec: dict) -> bool:
    """Does ``spec`` name exactly kernel ``fn``'s Python function and parameters, in their order (a table written
    before a signature changed does not)?"""
    py = fn.fn
    return spec.get("name") == f"{py.__module__}.{py.__qualname__}" and \
        list(spec.get("signature", {})) == list(inspect.signature(py).parameters)


def _portable(spec: dict) -> dict:
    return {**spec, "options": {k: v for k, v in spec.get("options", {}).items() if k not in MACHINE_FIELDS}}


class _CompileAndLoad(Executor):
    """What ``AsyncCompileMode`` submits to: each compile, then in the same worker the compiled kernel's module load
    and launcher build (``CompiledKernel._init_handles``, which Triton otherwise runs at the first launch, on the
    job's thread; the launcher is C code compiled once per signature), on the job's GPU. A kernel that cannot load
    keeps the error for its launch, where Triton raises it."""

    def __init__(self, workers: int):
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="lightq-compile")
        self.device = torch.cuda.current_device()

    def submit(self, fn, /, *args, **kwargs):
        return self.pool.submit(self._compile_and_load, fn, *args, **kwargs)

    def _compile_and_load(self, fn, *args, **kwargs):
        kernel = fn(*args, **kwargs)
        try:
            torch.cuda.set_device(self.device)  # a new thread starts on GPU 0
            kernel._init_handles()
        except Exception as exc:  # noqa: BLE001 (the launch raises it, with its context)
            log.debug("loading %s in the background failed: %s", kernel, exc)
        return kernel

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.pool.shutdown(wait=wait, cancel_futures=cancel_futures)


class Background:
    """Compile the specializations of job kind ``kind`` (``entries``, by default ``recorded(kind)``) in
    ``workers`` threads, from construction until ``wait``; a context manager whose exit waits (``wait`` is
    idempotent; an exit on an error cancels what has not started)."""

    def __init__(self, kind: str, entries: list | None = None, workers: int | None = None):
        global _recording_kind
        _recording_kind = kind
        self._counting = _install_hook()
        self.kind, self.preloaded, self.skipped, self.failed, self.waited_s = kind, 0, 0, 0, 0.0
        self._compiles_before = _launch_compiles
        self._pending: list = []
        self._mode = self._pool = None
        entries = recorded(kind) if entries is None else entries
        if not entries:
            log.info("no recorded kernel specializations for %s on %s: kernels compile at their first launch",
                     kind, tuned_configs.arch())
            return
        kernels = [(fn, spec) for module, name, spec in entries
                   if (fn := _kernel(module, name)) is not None and _fits(fn, spec)]
        self.skipped = len(entries) - len(kernels)
        if not kernels:
            return
        workers = workers or max(1, min(len(kernels), 16, (len(os.sched_getaffinity(0)) + 1) // 2))
        self._pool = _CompileAndLoad(workers)
        self._mode = triton.AsyncCompileMode(self._pool, ignore_errors=True)
        self._mode.__enter__()
        target = triton.runtime.driver.active.get_current_target()
        for fn, spec in kernels:
            try:  # submits the compile to the pool (Triton >= 3.7 checks the target the data names)
                self._pending.append(fn.preload(json.dumps({**_portable(spec), "target": target.__dict__})))
            except Exception as exc:  # unreadable by this Triton: the kernel compiles at its first launch
                self.failed += 1
                log.debug("preloading %s failed: %s", fn, exc)

    def wait(self) -> float:
        """Wait for every compile still running; the seconds waited."""
        if self._mode is None:
            return 0.0
        t0 = time.perf_counter()
        try:
            self._mode.__exit__(None, None, None)
        finally:
            self._mode = None
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.waited_s = time.perf_counter() - t0
        done = sum(getattr(k, "kernel", None) is not None for k in self._pending)
        self.preloaded, self.failed = done, self.failed + len(self._pending) - done
        if self.failed or self.skipped:
            log.info("kernel specializations of %s: %d compiled in the background, %d failed, %d no longer fit "
                     "lightq's kernels (those compile at their first launch)", self.kind, done, self.failed,
                     self.skipped)
        return self.waited_s

    def __enter__(self) -> "Background":
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)  # a failing job does not wait for queued compiles
            self.wait()

    def record(self) -> dict:
        """result.json's ``kernels``: the job kind, what its table compiled in the background, and how many of
        lightq's kernels the job compiled (or read from Triton's disk cache) at a launch since: those the table
        lacks (None where another tool holds Triton's compile hook)."""
        return {"kind": self.kind, "precompiled": self.preloaded, "precompile_failed": self.failed,
                "precompile_stale": self.skipped, "precompile_wait_s": round(self.waited_s, 4),
                "compiled_at_launch": _launch_compiles - self._compiles_before if self._counting else None}


def _on_compile(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
    """Triton's ``jit_post_compile_hook``: count a lightq kernel compiled for a launch, and keep its
    specialization when recording (``DUMP_ENV``)."""
    global _launch_compiles
    if not fn.module.startswith("lightq."):
        return None
    _launch_compiles += not is_manual_warmup
    if _recording_kind is not None and os.environ.get(DUMP_ENV):
        spec = _portable(json.loads(compile["specialization_data"]))
        spec.pop("target", None)
        _recorded.setdefault(_recording_kind, {})[(fn.module, fn.name, spec["key"])] = spec
    return None


def _install_hook() -> bool:
    """Make ``_on_compile`` Triton's post-compile hook unless another tool holds it; whether it is lightq's."""
    if triton.knobs.runtime.jit_post_compile_hook not in (None, _on_compile):
        return False
    triton.knobs.runtime.jit_post_compile_hook = _on_compile
    return True


def dump(path: Path) -> None:
    """Merge what this process recorded into the table file ``path`` (entries of a kind recorded under another
    Triton version are replaced)."""
    if not _recorded:
        return
    path = Path(path)
    table = read_table(path)
    table.setdefault("arch", tuned_configs.arch())
    for kind, specs in _recorded.items():
        old = table["kinds"].get(kind, {})
        merged = {} if old.get("compiler") != triton.__version__ else \
            {(m, n, s["key"]): s for m, n, s in old.get("entries", [])}
        merged.update(specs)
        table["kinds"][kind] = {"compiler": triton.__version__,
                                "entries": [[m, n, merged[(m, n, k)]] for m, n, k in sorted(merged)]}
    text = json.dumps(table, indent=1) + "\n"  # not sort_keys: a signature's order is its parameters' order
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # a reader never sees half a table
    tmp.write_text(text)
    os.replace(tmp, path)


if os.environ.get(DUMP_ENV):
    _install_hook()
    atexit.register(lambda: dump(Path(os.environ[DUMP_ENV])))
