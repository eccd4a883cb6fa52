"""Where lightq finds its configs and keeps its caches.

Configs live in the repository's top-level ``conf/``; the wheel ships the same files as the package data
``lightq/conf``. ``conf_dir()`` returns whichever exists, as an absolute path, so Hydra finds them from an
installed wheel, an editable install, or a source checkout, whatever the working directory.
"""

from __future__ import annotations

import os
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
