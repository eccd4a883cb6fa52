"""How fast host memory becomes a filled, page-locked pack, by strategy (what offload's loading spends per byte).

    python scripts/diag/pinned_fill.py [--gib 8] [--chunk-mib 340] [--threads 8] [--work-ms 60]

Moves ``--gib`` GiB from the GPU into host memory in chunks of ``--chunk-mib`` MiB (about one fp8 Wan2.1-14B
block), each chunk after ``--work-ms`` of device work (not counted: the loader making the next block), each
strategy into fresh memory, and prints the seconds it spends and the GB/s that makes:

    register+dma    page-lock untouched memory (``binding.host_buffer``), then device -> pinned copies into it
    pageable+pack   the loader's path before: device -> fresh pageable tensor (``Tensor.to('cpu')``), copied into
                    the pack, the filled pack page-locked
    thp+register    as register+dma, the buffer advised for transparent huge pages first (MADV_HUGEPAGE)
    prefault+reg    as register+dma, the buffer's pages written by ``--threads`` threads first
    ahead+dma       lightq's path for blocks (``binding.HostBuffers``): the next buffer's pages written on a
                    background thread during the device work, page-locked and filled by DMA when it is taken

Host memory is grown once beforehand (this VM's memory grows on first touch: KINDS.md), so every strategy meets
memory the guest already has. What it decides: whether page-locking untouched memory (its page faults inside
``cudaHostRegister``) costs more than the copies, and whether making buffers ahead, huge pages or parallel
pre-faulting pays in ``lightq.offload.binding``.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import threading
import time

import numpy as np
import torch

from lightq.offload.binding import HOST_REGISTER_PORTABLE, HostBuffers, host_buffer

MADV_HUGEPAGE = 14
HUGE = 2 << 20


def _register(buf: torch.Tensor) -> None:
    rc = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), HOST_REGISTER_PORTABLE))
    assert rc == 0, f"cudaHostRegister error {rc}"


def _unregister(buf: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())


def _aligned_buffer(nbytes: int) -> tuple[np.ndarray, torch.Tensor]:
    base = np.empty(nbytes + HUGE, dtype=np.uint8)
    start = -base.ctypes.data % HUGE
    return base, torch.from_numpy(base[start:start + nbytes])


def _copy_in(buf: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    buf.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return buf


def register_dma(src: torch.Tensor, state: dict) -> torch.Tensor:
    buf, seal = host_buffer(src.numel())
    seal()
    return _copy_in(buf, src)


def pageable_pack(src: torch.Tensor, state: dict) -> torch.Tensor:
    host = src.to("cpu")
    buf, seal = host_buffer(src.numel())
    buf.copy_(host)
    del host
    seal()
    return buf


def thp_register(src: torch.Tensor, state: dict) -> torch.Tensor:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    base, buf = _aligned_buffer(src.numel())
    libc.madvise(buf.data_ptr(), buf.numel() // HUGE * HUGE, MADV_HUGEPAGE)
    _register(buf)
    state.setdefault("registered", []).append((base, buf))
    return _copy_in(buf, src)


def prefault_register(src: torch.Tensor, state: dict) -> torch.Tensor:
    base, buf = _aligned_buffer(src.numel())
    arr, threads = buf.numpy(), state["threads"]
    step = -(-arr.size // threads)
    workers = [threading.Thread(target=lambda p=arr[i:i + step]: p.__setitem__(slice(None, None, mmap.PAGESIZE), 0))
               for i in range(0, arr.size, step)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    _register(buf)
    state.setdefault("registered", []).append((base, buf))
    return _copy_in(buf, src)


def host_buffers_ahead(src: torch.Tensor, state: dict) -> torch.Tensor:
    buffers = state.setdefault("buffers", HostBuffers(pin=True))
    return _copy_in(buffers.take([src.numel()])[0], src)


STRATEGIES = {"register+dma": register_dma, "pageable+pack": pageable_pack, "thp+register": thp_register,
              "prefault+reg": prefault_register, "ahead+dma": host_buffers_ahead}


def run(step, src: torch.Tensor, n: int, threads: int, work_ms: float) -> float:
    """Seconds ``step`` takes for ``n`` chunks, each after ``work_ms`` of device work (not counted) that a
    background thread may overlap, as the loader's next block is."""
    state, kept, spent = {"threads": threads}, [], 0.0
    cycles = int(work_ms * 1.98e6)  # about 1.98 GHz: the H200's boost clock (KINDS.md)
    try:
        for _ in range(n):
            torch.cuda._sleep(cycles)
            torch.cuda.synchronize()
            t = time.perf_counter()
            kept.append(step(src, state))
            spent += time.perf_counter() - t
    finally:
        if "buffers" in state:
            state["buffers"].close()
        for _, buf in state.get("registered", []):
            _unregister(buf)
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=8.0)
    ap.add_argument("--chunk-mib", type=int, default=340)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--work-ms", type=float, default=60.0)
    args = ap.parse_args()
    chunk = args.chunk_mib << 20
    n = max(1, int(args.gib * 2**30) // chunk)
    src = torch.randint(0, 255, (chunk,), dtype=torch.uint8, device="cuda")
    grow = [np.ones(int(args.gib * 2**30), dtype=np.uint8) for _ in range(2)]  # the VM's memory, grown once
    del grow
    try:
        thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip()
    except OSError:
        thp = "unknown"
    print(f"{torch.cuda.get_device_name()}, {n} chunks of {args.chunk_mib} MiB, transparent huge pages: {thp}")
    for name, step in STRATEGIES.items():
        torch.cuda.synchronize()
        spent = run(step, src, n, args.threads, args.work_ms)
        print(f"{name:14s} {spent:6.2f} s  {n * chunk / spent / 1e9:6.2f} GB/s", flush=True)


if __name__ == "__main__":
    main()
