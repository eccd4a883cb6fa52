"""Autotuning results shipped with lightq, per GPU architecture, so a job on a known GPU never autotunes.

``tuned/<arch>.json`` (``arch`` as ``sm90``: the compute capability) maps each tuned kernel's name to its
``[tuning key, config]`` pairs, the key exactly as Triton's autotuner forms it (the values of the kernel's ``key``
arguments, then the dtypes of its tensor arguments) and the config as ``triton.Config``'s fields. ``seed``
pre-fills an autotuner's in-memory cache from the table before its first launch, keeping only configs that are
still in the kernel's own list (a table written by older code can never launch a config the kernel dropped);
a key the table lacks (another model's widths) is answered by Triton's on-disk result cache if this machine
autotuned it before (``cache_results=True``: ``TRITON_CACHE_DIR``, keyed by Triton version, GPU target, kernel
source and key), else by the table's nearest key (``nearest``: same flags and dtypes, closest sizes), so a job on a
GPU with a table never times configurations inside its denoising loop. Only a kernel the table of this GPU lacks
altogether (a GPU lightq has no table for) is autotuned, once per shape and machine. ``LIGHTQ_AUTOTUNE=1`` times
every missing key instead of taking the nearest; ``LIGHTQ_AUTOTUNE=0`` never times: a key nothing answers takes the
kernel's first config (correctness tests that launch many shapes).

``LIGHTQ_TUNED_DUMP=<file>`` makes a process autotune every missing key and write every kernel's choices into
``<file>`` (merged with what it holds) when it exits: how the shipped tables are made (docs/BENCHMARKS.md, "Kernel
warm-up").
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
from pathlib import Path

import triton

TABLE_DIR = Path(__file__).resolve().parent / "tuned"
DUMP_ENV = "LIGHTQ_TUNED_DUMP"
AUTOTUNE_ENV = "LIGHTQ_AUTOTUNE"
log = logging.getLogger(__name__)

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


def _distance(a: list, b: tuple) -> float | None:
    """Sum of ``|log2(x / y)|`` over the sizes of two tuning keys; None unless every flag and dtype is equal."""
    if len(a) != len(b):
        return None
    total = 0.0
    for x, y in zip(a, b):
        sizes = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y))
        if not sizes:
            if type(x) is not type(y) or x != y:
                return None
            continue
        total += abs(math.log2(max(x, 1)) - math.log2(max(y, 1)))
    return total


def nearest(name: str, key: tuple, configs: list) -> tuple[str, "triton.Config"] | None:
    """(which shipped key, its config) of kernel ``name`` on this GPU nearest to ``key`` (``_distance``), among
    the kernel's own ``configs``; None when the table has no key with ``key``'s flags and dtypes."""
    allowed = [_fields(c) for c in configs]
    best = None
    for shipped, fields in _table(arch()).get(name, []):
        d = _distance(shipped, key)
        if d is not None and fields in allowed and (best is None or d < best[0]):
            best = (d, shipped, fields)
    return None if best is None else (f"that of {best[1]}", triton.Config(**best[2]))


class _TakeNearest(Exception):
    """Raised in place of timing the configs: the autotuner's disk-cache check found nothing."""


def fall_back_to_nearest(name: str, autotuner) -> None:
    """On a key neither the table nor the disk cache holds, make ``autotuner`` take ``nearest``'s config instead of
    timing every config (unless ``LIGHTQ_AUTOTUNE`` or ``LIGHTQ_TUNED_DUMP`` is set, or no shipped key fits).

    Hooks ``check_disk_cache``, which Triton's autotuner calls only on a key missing from its in-memory cache:
    the disk cache is read as before, and the timing it would start (``bench_fn``) becomes the nearest lookup."""
    check = getattr(autotuner, "check_disk_cache", None)
    if check is None:  # a Triton without the on-disk result cache: misses are timed as before
        return

    def check_or_nearest(key, configs, bench_fn):
        setting = os.environ.get(AUTOTUNE_ENV, "")
        if setting not in ("", "0") or os.environ.get(DUMP_ENV):
            return check(key, configs, bench_fn)
        found = nearest(name, key, configs)
        if found is None and setting == "0":
            found = ("the kernel's first config", configs[0])
        if found is None:
            return check(key, configs, bench_fn)

        def take_nearest():
            autotuner.cache[key] = found[1]
            raise _TakeNearest

        try:
            return check(key, configs, take_nearest)
        except _TakeNearest:
            log.info("%s: no tuned config for %s on %s; using %s (%s=1 times the configs instead)", name,
                     list(key), arch(), found[0], AUTOTUNE_ENV)
            return True
    autotuner.check_disk_cache = check_or_nearest


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
