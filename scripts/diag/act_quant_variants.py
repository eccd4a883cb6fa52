"""Where the per-token activation quantizer loses bandwidth: variants of the kernel timed side by side (GPU only).

    python scripts/diag/act_quant_variants.py [--m 32760] [--k 5120]

Variants, each over a grid of (rows per program, chunk width, warps), best config printed:
  two-pass div   the shipped structure (amax pass, then a re-read that writes codes), x / s correctly rounded
  two-pass mul   the same with x * (qmax / amax): one division per row instead of one per element
  whole-row      the row held in registers ([ROWS, next_pow2(K)] tile): one read, div or mul
and, for the ceiling, a copy of the same bytes and vLLM's per-token quantizers if vLLM is importable; then the
host time per call of each launch path (what a CUDA-event timing of one call also counts while the GPU waits).
Bandwidth = (M K (2 + 1) + 4 M) bytes / time, also as a share of the torch copy bandwidth of this run.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.language as tl

from lightq.bench.timing import copy_bandwidth, describe, device_info, time_ms
from lightq.kernels.act_quant import row_scale


@triton.jit
def _codes(xf, scale, inv, out_dtype: tl.constexpr, IS_FP8: tl.constexpr, MUL: tl.constexpr):
    QMAX: tl.constexpr = 448.0 if IS_FP8 else 127.0
    v = xf * inv if MUL else tl.div_rn(xf, scale)
    if IS_FP8:
        q = tl.clamp(v, -QMAX, QMAX).to(out_dtype)
    else:
        q = tl.clamp((v + 12582912.0) - 12582912.0, -QMAX, QMAX).to(tl.int8)
    return q


@triton.jit
def _two_pass(x_ptr, q_ptr, s_ptr, M, K: tl.constexpr, IS_FP8: tl.constexpr, MUL: tl.constexpr,
              ROWS: tl.constexpr, CHUNK: tl.constexpr):
    QMAX: tl.constexpr = 448.0 if IS_FP8 else 127.0
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    cols = tl.arange(0, CHUNK)
    base = (rows * K)[:, None]
    amax = tl.zeros((ROWS, CHUNK), dtype=tl.float32)
    for k0 in range(0, K, CHUNK):
        mask = row_ok[:, None] & ((k0 + cols) < K)[None, :]
        x = tl.load(x_ptr + base + k0 + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_last")
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    rmax = tl.max(amax, axis=1)
    scale = row_scale(rmax, tl.full((ROWS,), QMAX, tl.float32))
    tl.store(s_ptr + rows, scale, mask=row_ok)
    inv = tl.broadcast_to((QMAX / tl.where(rmax > 0.0, rmax, QMAX))[:, None], (ROWS, CHUNK))
    scale_tile = tl.broadcast_to(scale[:, None], (ROWS, CHUNK))
    for k0 in range(0, K, CHUNK):
        mask = row_ok[:, None] & ((k0 + cols) < K)[None, :]
        x = tl.load(x_ptr + base + k0 + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
        q = _codes(x.to(tl.float32), scale_tile, inv, q_ptr.dtype.element_ty, IS_FP8, MUL)
        tl.store(q_ptr + base + k0 + cols[None, :], q, mask=mask)


@triton.jit
def _whole_row(x_ptr, q_ptr, s_ptr, M, K: tl.constexpr, IS_FP8: tl.constexpr, MUL: tl.constexpr,
               ROWS: tl.constexpr, BLOCK: tl.constexpr):
    QMAX: tl.constexpr = 448.0 if IS_FP8 else 127.0
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK)
    mask = row_ok[:, None] & (cols < K)[None, :]
    offs = (rows * K)[:, None] + cols[None, :]
    xf = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rmax = tl.max(tl.abs(xf), axis=1)
    scale = row_scale(rmax, tl.full((ROWS,), QMAX, tl.float32))
    tl.store(s_ptr + rows, scale, mask=row_ok)
    inv = tl.broadcast_to((QMAX / tl.where(rmax > 0.0, rmax, QMAX))[:, None], (ROWS, BLOCK))
    q = _codes(xf, tl.broadcast_to(scale[:, None], (ROWS, BLOCK)), inv, q_ptr.dtype.element_ty, IS_FP8, MUL)
    tl.store(q_ptr + offs, q, mask=mask)


def _run(kernel, x, fp8, mul, rows, width, warps):
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, rows),)
    if kernel is _two_pass:
        fn = lambda: _two_pass[grid](x, q, s, m, k, IS_FP8=fp8, MUL=mul, ROWS=rows, CHUNK=width, num_warps=warps)
    else:
        fn = lambda: _whole_row[grid](x, q, s, m, k, IS_FP8=fp8, MUL=mul, ROWS=rows, BLOCK=width, num_warps=warps)
    fn()
    return fn, q, s


def host_overhead(x1: torch.Tensor, calls: int = 2000) -> None:
    """Host time per call on a one-token input (the GPU work is negligible, so this is the launch path's cost):
    a bare Triton launch, lightq's custom op (op dispatch + autotuner lookup + launch), and vLLM's quantizer."""
    import time

    from lightq.kernels.act_quant import quantize_per_token

    q = torch.empty(x1.shape, dtype=torch.float8_e4m3fn, device=x1.device)
    s = torch.empty((1, 1), dtype=torch.float32, device=x1.device)
    fns = {"bare Triton launch (two-pass kernel)": lambda: _two_pass[(1,)](
               x1, q, s, 1, x1.shape[1], IS_FP8=True, MUL=False, ROWS=1, CHUNK=1024, num_warps=8),
           "lightq act_quant (eager: no dispatcher)": lambda: quantize_per_token(x1, "fp8"),
           "torch.ops.lightq.act_quant (dispatcher)": lambda: torch.ops.lightq.act_quant(x1, True, False)}
    try:
        from vllm import _custom_ops as ops
        fns["vLLM scaled_fp8_quant"] = lambda: ops.scaled_fp8_quant(x1, use_per_token_if_dynamic=True)
    except Exception:  # noqa: BLE001 - vLLM absent: the others still print
        pass
    for name, fn in fns.items():
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host_us = (time.perf_counter() - t0) / calls * 1e6
        torch.cuda.synchronize()
        print(f"host time per call, {name:<40} {host_us:6.1f} us", flush=True)
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(lambda: [quantize_per_token(x1, "fp8") for _ in range(500)])
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=32760)
    ap.add_argument("--k", type=int, default=5120)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--no-grid", action="store_true", help="only the shipped kernel, the ceilings and host times")
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.m, args.k, device="cuda", dtype=torch.bfloat16)
    nbytes = args.m * args.k * 3 + 4 * args.m
    copy_gbps = copy_bandwidth()
    print(describe(device_info()))
    print(f"M x K = {args.m} x {args.k} bf16; bytes moved {nbytes / 1e6:.1f} MB; torch copy bandwidth "
          f"{copy_gbps / 1e3:.2f} TB/s; floor at that bandwidth {nbytes / copy_gbps / 1e6:.3f} ms")

    def report(name, ms):
        gbps = nbytes / ms / 1e6
        print(f"{name:<44} {ms:8.4f} ms  {gbps / 1e3:5.2f} TB/s  {100 * gbps / copy_gbps:5.1f}% of copy", flush=True)

    from lightq.kernels.act_quant import quantize_per_token
    for fp8 in (True, False):
        scheme = "fp8" if fp8 else "int8"
        ref_q, ref_s = quantize_per_token(x, scheme)
        report(f"{scheme} shipped kernel (autotuned)", time_ms(lambda: quantize_per_token(x, scheme), args.iters))
        pow2 = triton.next_power_of_2(args.k)
        grids = {
            _two_pass: [c for c in itertools.product((1, 2, 4, 8), (512, 1024, 2048), (4, 8, 16))
                        if c[0] * c[1] <= 16384],
            _whole_row: [c for c in itertools.product((1, 2), (pow2,), (4, 8, 16, 32)) if c[0] * pow2 <= 32768],
        }
        for kernel, configs in ({} if args.no_grid else grids).items():
            for mul in (False, True):
                best = None
                for rows, width, warps in configs:
                    fn, q, s = _run(kernel, x, fp8, mul, rows, width, warps)
                    ms = time_ms(fn, args.iters)
                    if best is None or ms < best[0]:
                        best = (ms, rows, width, warps, q, s)
                ms, rows, width, warps, q, s = best
                same_s = torch.equal(s, ref_s)
                differ = (q.view(torch.int8) != ref_q.view(torch.int8)).sum().item()
                report(f"{scheme} {kernel.__name__.strip('_')} {'mul' if mul else 'div'} "
                       f"rows={rows} w={width} warps={warps}", ms)
                print(f"    scales identical: {same_s}; codes differing from the shipped kernel: {differ}")
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    report("copy of the same bytes (half read, half written)",
           time_ms(lambda: dst[: nbytes // 2].copy_(src[: nbytes // 2]), args.iters))
    host_overhead(x[:1])
    try:
        from vllm import _custom_ops as ops
        report("vLLM scaled_fp8_quant per-token", time_ms(
            lambda: ops.scaled_fp8_quant(x, use_per_token_if_dynamic=True), args.iters))
        report("vLLM scaled_int8_quant per-token", time_ms(lambda: ops.scaled_int8_quant(x), args.iters))
    except Exception as err:  # noqa: BLE001 - a diagnostic: say why and go on
        print(f"vLLM quantizers not timed: {err}")


if __name__ == "__main__":
    main()
