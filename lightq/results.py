"""A job's record: ``result.json`` in its output folder, written atomically (temp file + rename).

Fields: ``status`` (ok | skipped | failed | running), ``reason`` (one line), ``error`` (traceback of a failure),
``choices`` (the config-group choices and overrides), ``hardware``, ``components`` (per component: mode, scheme,
backend and why, quantized layer count, weight bytes), ``timings_s`` (the stages of ``STAGES`` that ran, which with
``unaccounted`` sum to ``total``; ``denoise_steps`` per step and ``denoise_warmup``, the first step's excess over
the median of the others; ``write_background``, see below), ``memory`` (peak host RSS and peak GPU allocation,
bytes; ``peak_host_bytes_by_stage`` the peak reached by the end of each stage),
``kernels`` (jobs on lightq's Triton kernels on a GPU: ``kernels.precompile.Background.record``),
``process`` (``before_job_s``: the process's age when the job began: interpreter, imports, Hydra),
``quality`` (against the bf16 baseline: psnr, ssim, latent_cosine; ``speedup_denoise`` only when the baseline
was timed in the same job, else ``speed`` says why not), ``outputs`` (files written),
``versions``.

Stages are disjoint intervals of the job's wall time, measured in its main thread. ``kernel_warmup``: starting
the background compile of the job's Triton kernels (jobs on lightq's kernels on a GPU) and, before the first
denoising step, waiting for what is still compiling (``kernels.precompile``; result.json's ``kernels`` says what
was compiled in the background and what at a launch). ``decode``: the VAE decode,
including handing each latent frame's frames to the mp4 encoder (converted to uint8 on the decode device and
queued: ``pipeline.video.Mp4Writer.feed``), which encodes them in a background thread from the first frame on.
``write``: saving the latents, the end of the video's input (one check that every frame was finite), the PNG
frames if asked, and, after ``quality``, the wait for the encode. ``quality``: the bf16 baseline's cache key,
reading it (or, in the bf16 job, saving it) and the comparison (``pipeline.quality``). The encode's own wall
time, from the first frame fed to ffmpeg's exit, is ``write_background``: not a stage and not in the sum, since
the part of it that overlapped the stages in between (``decode``, ``write``'s first part, ``quality``,
``baseline_run``) is in their time already.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from . import staging

RESULT_FILE = "result.json"
# every stage a job can spend time in, in the order they run; a job's stages plus "unaccounted" sum to its total
STAGES = ("setup", "load", "encode_text", "encode_image", "kernel_warmup", "denoise", "decode", "write", "quality",
          "baseline_run")


def write_json_atomic(path: Path, data: Any) -> None:
    """``data`` as indented JSON (non-JSON values through ``str``), written with ``staging.write_atomic``."""
    text = json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"
    staging.write_atomic(path, lambda tmp: tmp.write_text(text))


# what a sweep may optimize (``sweep.objective``): the numbers of result.json a job measures
OBJECTIVES = {"quality": ("psnr_db", "ssim", "latent_cosine", "speedup_denoise"),
              "timings_s": (*STAGES, "denoise_warmup", "unaccounted", "total"),
              "memory": ("peak_host_bytes", "peak_gpu_bytes")}


def check_objective(path: str | None) -> None:
    """Raise LightqError unless ``path`` is None or ``<group>.<key>`` of ``OBJECTIVES``."""
    from .errors import LightqError

    if path is None:
        return
    group, _, key = str(path).partition(".")
    if key not in OBJECTIVES.get(group, ()):
        known = ", ".join(f"{g}.{k}" for g, keys in OBJECTIVES.items() for k in keys)
        raise LightqError(f"sweep.objective='{path}' is not a number a job records: choose one of {known}")


def objective_value(result: dict, path: str) -> float:
    """The number at ``path`` (``group.key``) of a job's record, returned to Hydra's sweeper; NaN when the job did
    not measure it (skipped or failed, or the bf16 baseline itself has no quality against itself), which
    Optuna-style sweepers record as a failed trial instead of a made-up score."""
    group, _, key = path.partition(".")
    value = (result.get(group) or {}).get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


def read_result(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``: its start time in clock ticks after boot against the
    uptime; 10 ms resolution); None elsewhere (unknown, never a made-up 0)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return round(max(uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"), 0.0), 3)
    except (OSError, ValueError, IndexError):
        return None


def peak_host_bytes() -> int | None:
    """Peak resident set size of this process so far: ``getrusage`` on POSIX (ru_maxrss is KiB on Linux, bytes on
    macOS), psutil's peak working set on Windows; None where neither exists (unknown, never a made-up 0)."""
    try:
        import resource
    except ImportError:
        try:
            import psutil
        except ImportError:
            return None
        return int(getattr(psutil.Process().memory_info(), "peak_wset", 0)) or None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class StageTimer:
    """Wall time per named stage (``STAGES``) of one job, and the host-memory peak reached by the end of each.

    ``sync`` runs at each stage boundary (the pipeline sets it to ``torch.cuda.synchronize`` on a GPU, so device
    work is counted in the stage that launched it). A stage entered twice accumulates."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.times: dict[str, float] = {}
        self.peak_host: dict[str, int] = {}
        self.sync: Callable[[], None] = lambda: None

    @contextmanager
    def __call__(self, name: str):
        if name not in STAGES:
            raise ValueError(f"unknown stage '{name}' (stages: {', '.join(STAGES)})")
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.times[name] = round(self.times.get(name, 0.0) + time.perf_counter() - start, 4)
            self.peak_host[name] = peak_host_bytes()

    def total(self) -> float:
        return time.perf_counter() - self.t0

    def summary(self) -> dict[str, float]:
        """The stages in ``STAGES`` order, ``unaccounted`` (total minus their sum) and ``total``."""
        total = self.total()
        out = {name: self.times[name] for name in STAGES if name in self.times}
        out["unaccounted"] = round(max(total - sum(out.values()), 0.0), 4)
        out["total"] = round(total, 4)
        return out


def missing_outputs(folder: Path, result: dict) -> list[str]:
    """The outputs ``result`` lists (``outputs``: name -> file or ``folder/``) that are no longer in ``folder``."""
    gone = []
    for rel in (result.get("outputs") or {}).values():
        path = Path(folder) / str(rel)
        present = path.is_dir() and any(path.iterdir()) if str(rel).endswith("/") else path.is_file()
        if not present:
            gone.append(str(rel))
    return gone
