"""Wall time of the first call of each GPU op the fp8 / int8 DiT paths use, in a fresh process (module loading,
PTX JIT, kernel selection), against the second call: ``python scripts/diag/first_calls.py``.

Run it twice in a row: what stays slow in the second process is paid by every job, not only the first on a machine.
Prints one line per op: first-call ms, second-call ms.
"""

from __future__ import annotations

import os
import time

import torch


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    dev = torch.device("cuda")
    torch.zeros(1, device=dev)
    print("CUDA_CACHE_MAXSIZE", os.environ.get("CUDA_CACHE_MAXSIZE"), "CUDA_MODULE_LOADING",
          os.environ.get("CUDA_MODULE_LOADING"), "arch list", torch.cuda.get_arch_list())
    m = 32760
    ops = {}
    for n, k in ((15360, 5120), (5120, 5120), (13824, 5120), (5120, 13824)):
        a = torch.randn(m, k, device=dev).to(torch.float8_e4m3fn)
        w = torch.randn(n, k, device=dev).to(torch.float8_e4m3fn)
        sa, sw = torch.rand(m, 1, device=dev), torch.rand(1, n, device=dev)
        bias = torch.randn(n, device=dev, dtype=torch.bfloat16)
        for fast in (True, False):
            ops[f"scaled_mm rowwise {n}x{k} fast_accum={fast} bias"] = (
                lambda a=a, w=w, sa=sa, sw=sw, b=bias, f=fast: torch._scaled_mm(
                    a, w.t(), scale_a=sa, scale_b=sw, bias=b, out_dtype=torch.bfloat16, use_fast_accum=f))
        one = torch.ones((), device=dev)
        ops[f"scaled_mm tensorwise {n}x{k}"] = (lambda a=a, w=w, o=one: torch._scaled_mm(
            a, w.t(), scale_a=o, scale_b=o, out_dtype=torch.bfloat16))
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        wb = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        ops[f"bf16 matmul {n}x{k}"] = lambda x=x, wb=wb: x @ wb.t()
    for name, fn in ops.items():
        print(f"{name}: first {timed(fn):.1f} ms, second {timed(fn):.1f} ms", flush=True)


if __name__ == "__main__":
    main()
