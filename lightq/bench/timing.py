"""Timing and device facts for the benchmarks: CUDA events around each call, warm-up, median, host latency hidden.

``time_ms(fn)`` runs ``fn`` ``warmup`` times, then ``iters`` times each between two CUDA events, and returns the
median in milliseconds. ``copy_bandwidth()`` measures the device's achievable memory bandwidth in the same run
(a 1 GiB device-to-device copy, bytes read + written), the ceiling memory-bound kernels are judged against.
"""

from __future__ import annotations

import statistics

import torch

H100_SXM_HBM_TBPS = 3.35


HOST_HEADSTART_CYCLES = 2_000_000  # about 1 ms of GPU spin at H100 clocks


def time_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` CUDA-event-timed calls, after ``warmup`` calls.

    Before each timed call the GPU is given a spin kernel of about 1 ms, so the host enqueues ``fn``'s kernels
    while the GPU is busy, as it does in a running pipeline: the time is the GPU's, not the host's launch latency
    (Python-launched Triton kernels cost tens of microseconds of host time per call; cuBLAS calls less), for every
    mode and its bf16 baseline alike."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(HOST_HEADSTART_CYCLES)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Achieved device-to-device copy bandwidth in GB/s (read + write bytes)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters=10, warmup=2)
    del src, dst
    return 2 * nbytes / ms / 1e6


def device_info() -> dict:
    """The device the numbers were measured on."""
    import platform

    info = {"torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        info.update(device=torch.cuda.get_device_name(), capability=f"{major}.{minor}",
                    cuda=torch.version.cuda, memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
        try:
            import triton

            info["triton"] = triton.__version__
        except Exception:  # triton is optional
            info["triton"] = "absent"
    return info


def describe(info: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in info.items())


def ratio(base_ms: float | None, ms: float | None) -> str:
    """``base / ms`` as 'N.NNx' (speed-up over the baseline), or '-'."""
    return f"{base_ms / ms:.2f}x" if base_ms and ms else "-"


def fmt_ms(ms: float | None) -> str:
    return f"{ms:.3f}" if ms is not None else "-"
