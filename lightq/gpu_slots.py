"""A sweep's GPUs shared among its concurrent jobs (``sweep.gpus``): each job takes one free GPU of the list.

With a parallel launcher (``hydra/launcher=joblib_local hydra.launcher.n_jobs=N``) several isolated jobs start at
once; ``gpu_slot(gpus, n)`` gives each job ``n`` GPUs no other job holds (``sweep.procs_per_job``: one, or a parallel
job's process count), under a machine-wide lock file per GPU in lightq's cache folder
(``<cache>/gpu-locks/gpu-<i>.lock``, so two sweeps on one machine share the pool too), waiting while too few are
free. The job's worker then runs with ``CUDA_VISIBLE_DEVICES`` set to them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import LightqError
from .paths import cache_dir

POLL_S = 0.2


def parse_gpus(spec, visible: int) -> list[int]:
    """The GPU indices ``sweep.gpus`` names (``all``, ``"0,2"``, a list ``[0,2]``, one index) among ``visible``."""
    if visible == 0:
        raise LightqError("sweep.gpus shares GPUs among a sweep's jobs, but this machine shows no CUDA GPU: drop "
                          "sweep.gpus")
    if isinstance(spec, str) and spec.strip() == "all":
        picked = list(range(visible))
    else:
        items = spec.split(",") if isinstance(spec, str) else list(spec) if hasattr(spec, "__iter__") else [spec]
        try:
            picked = [int(str(i).strip()) for i in items]
        except ValueError:
            raise LightqError(f"sweep.gpus={spec}: give all or GPU indices, e.g. sweep.gpus=[0,1,2,3]") from None
    if not picked:
        raise LightqError("sweep.gpus=[] names no GPU: give all or GPU indices, e.g. sweep.gpus=[0,1]")
    bad = [i for i in picked if not 0 <= i < visible]
    if bad or len(set(picked)) != len(picked):
        raise LightqError(f"sweep.gpus={spec}: this machine has GPUs 0..{visible - 1} (each once); got {picked}")
    return picked


@contextmanager
def gpu_slot(gpus: list[int], count: int = 1) -> Iterator[list[int]]:
    """Hold ``count`` of ``gpus`` (the first free ones, all or none, waiting while fewer are free) for the ``with``
    block."""
    from filelock import FileLock, Timeout

    if count > len(gpus):
        raise LightqError(f"a job of {count} processes needs {count} GPUs, but sweep.gpus lists {len(gpus)}")
    folder = cache_dir() / "gpu-locks"
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        held = []
        for gpu in gpus:
            lock = FileLock(str(folder / f"gpu-{gpu}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            held.append((gpu, lock))
            if len(held) == count:
                break
        if len(held) == count:
            try:
                yield [gpu for gpu, _ in held]
            finally:
                for _, lock in held:
                    lock.release()
            return
        for _, lock in held:  # too few free: let the others have them, try again
            lock.release()
        time.sleep(POLL_S)
