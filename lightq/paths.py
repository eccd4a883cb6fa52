"""Where lightq finds its configs and keeps its caches.

Configs live in the repository's top-level ``conf/``; the wheel ships the same files as the package data
``lightq/conf``. ``conf_dir()`` returns whichever exists, as an absolute path, so Hydra finds them from an
installed wheel, an editable install, or a source checkout, whatever the working directory.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def conf_dir() -> Path:
    for candidate in (PACKAGE_DIR / "conf", PACKAGE_DIR.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"lightq configs not found next to {PACKAGE_DIR}: reinstall lightq")


def cache_dir() -> Path:
    """``$LIGHTQ_CACHE`` or ``~/.cache/lightq``: tiny synthetic checkpoints and bf16 baselines for quality."""
    root = os.environ.get("LIGHTQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lightq")
    return Path(root)


JOB_NAME_BYTES = 120  # filesystems allow 255 bytes per name; leave room for lightq's temporaries beside it
_UNSAFE = re.compile(r"[/\\$\x00-\x1f\x7f]|^\.")  # "$": the name is interpolated into other paths


def job_folder_name(overrides: str) -> str:
    """The sweep sub-folder of a job, from Hydra's ``override_dirname`` (``key=value,key=value``).

    Kept as is when it is a plain, short name; otherwise path separators, ``$`` (Hydra interpolates the folder into
    the log file's path: ``${`` there would be resolved), control characters and a leading dot become ``_``, it is cut to ``JOB_NAME_BYTES`` and the sha256 of the original is appended, so every job gets
    its own folder, inside the sweep folder, whatever its prompt holds (``../``, 300 characters, newlines).
    """
    safe = _UNSAFE.sub("_", overrides)
    if safe == overrides and len(overrides.encode()) <= JOB_NAME_BYTES:
        return overrides
    digest = hashlib.sha256(overrides.encode()).hexdigest()[:12]
    head = safe.encode()[:JOB_NAME_BYTES - len(digest) - 1].decode(errors="ignore")
    return f"{head}-{digest}"
