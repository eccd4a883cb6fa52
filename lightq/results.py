"""A job's record: ``result.json`` in its output folder, written atomically (temp file + rename).

Fields: ``status`` (ok | skipped | failed | running), ``reason`` (one line), ``error`` (traceback of a failure),
``choices`` (the config-group choices and overrides), ``hardware``, ``components`` (per component: mode, scheme,
backend and why, quantized layer count, weight bytes), ``timings_s`` (load, encode_text, encode_image, denoise,
denoise_per_step, decode, write, total), ``memory`` (peak host RSS and peak GPU allocation, bytes),
``quality`` (against the bf16 baseline: psnr, ssim, latent_cosine, speedup), ``outputs`` (files written),
``versions``.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

from . import staging

RESULT_FILE = "result.json"


def write_json_atomic(path: Path, data: Any) -> None:
    """``data`` as indented JSON (non-JSON values through ``str``), written with ``staging.write_atomic``."""
    text = json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"
    staging.write_atomic(path, lambda tmp: tmp.write_text(text))


def read_result(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None


def peak_host_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024
