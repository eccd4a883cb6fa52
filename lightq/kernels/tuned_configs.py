"""Autotuning results shipped with lightq, per GPU architecture, so a job on a known GPU never autotunes.

``tuned/<arch>.json`` (``arch`` as ``sm90``: the compute capability) maps each tuned kernel's name to its
``[tuning key, config]`` pairs, the key exactly as Triton's autotuner forms it (the values of the kernel's ``key``
arguments, then the dtypes of its tensor arguments) and the config as ``triton.Config``'s fields. ``seed``
pre-fills an autotuner's in-memory cache from the table before its first launch, keeping only configs that are
still in the kernel's own list (a table written by older code can never launch a config the kernel dropped);
keys the table lacks are autotuned as before, with Triton's on-disk result cache
(``cache_results=True``: ``TRITON_CACHE_DIR``, keyed by Triton version, GPU target, kernel source and key), so
a GPU lightq has no table for autotunes each shape once per machine.

``LIGHTQ_TUNED_DUMP=<file>`` makes a process write every kernel's autotuned choices into ``<file>`` (merged with
what it holds) when it exits: how the shipped tables are made (docs/BENCHMARKS.md, "Kernel warm-up").
"""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path

import triton

TABLE_DIR = Path(__file__).resolve().parent / "tuned"
DUMP_ENV = "LIGHTQ_TUNED_DUMP"

_AUTOTUNERS: dict[str, "triton.runtime.Autotuner"] = {}


def arch() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}"


def _fields(config: "triton.Config") -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages,
            "num_ctas": config.num_ctas, "maxnreg": config.maxnreg}


def _table(name: str) -> dict:
    path = TABLE_DIR / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def register(name: str, autotuner) -> None:
    """Record ``autotuner`` under the kernel ``name`` (for ``dump``)."""
    _AUTOTUNERS[name] = autotuner


def seed(name: str, autotuner) -> int:
    """Fill ``autotuner.cache`` with the shipped choices of kernel ``name`` on this GPU; returns how many."""
    allowed = [_fields(c) for c in autotuner.configs]
    seeded = 0
    for key, fields in _table(arch()).get(name, []):
        if fields in allowed:
            autotuner.cache[tuple(key)] = triton.Config(**fields)
            seeded += 1
    return seeded


def dump(path: Path) -> None:
    """Merge every registered kernel's autotuned choices on this GPU into the table file ``path``."""
    if not _AUTOTUNERS:
        return
    path = Path(path)
    table = json.loads(path.read_text()) if path.is_file() else {}
    for name, tuner in _AUTOTUNERS.items():
        entries = {json.dumps(k): f for k, f in table.get(name, [])}
        entries.update({json.dumps(list(key)): _fields(cfg) for key, cfg in tuner.cache.items()})
        table[name] = sorted(([json.loads(k), f] for k, f in entries.items()), key=lambda e: json.dumps(e[0]))
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


if os.environ.get(DUMP_ENV):
    atexit.register(lambda: dump(Path(os.environ[DUMP_ENV])))
