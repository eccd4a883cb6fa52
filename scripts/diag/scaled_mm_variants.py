"""Why is ``torch._scaled_mm`` (fp8, row-wise scales) slower in the triton backend than measured in DESIGN.md?

Times the variants of one call side by side at a Wan2.1-14B projection (default 32760 x 5120 x 5120; CUDA events,
median of 20 after warm-up) and gives each one's error against a float64 product of the *same* quantized inputs:

    bias        none, or a bf16 bias fused into the epilogue
    fast_accum  False (partial sums promoted to fp32 every few k-blocks) / True (tensor-core accumulator only)
    scale_b     "view": ``sw.t()`` of the per-channel [N, 1] scales (what the backend passed), or a [1, N] tensor
    out         bf16 (the backend's), fp32 where this torch build allows it

and the CUDA kernel each variant launched (torch.profiler), so a different kernel choice is visible.

    python scripts/diag/scaled_mm_variants.py [--m 32760 --n 5120 --k 5120]        (about 30 s on an H100)
"""

from __future__ import annotations

import argparse
import itertools
import torch

from lightq.bench.timing import time_ms as median_ms
from lightq.quant import schemes as S



def kernel_name(fn) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not events:
        return "?"
    key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    return max(events, key=lambda e: getattr(e, key)).key[:60]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=32760)
    parser.add_argument("--n", type=int, default=5120)
    parser.add_argument("--k", type=int, default=5120)
    args = parser.parse_args()
    m, n, k = args.m, args.n, args.k
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
    w = torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5
    bias = (torch.randn(n, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    xq, sx = S.quantize_activation(x, "fp8")
    qw = S.quantize_weight(w, "fp8")
    wt, sw = qw.data.t(), qw.scale.float().contiguous()  # [K, N] column-major view, [N, 1]
    exact = (xq.double() @ qw.data.double().t()) * sx.double() * sw.double().t()
    scales = {"view": sw.t(), "[1,N]": sw.reshape(1, -1).contiguous()}
    bf16_ms = median_ms(lambda: torch.nn.functional.linear(x, w.to(torch.bfloat16), bias))
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, cuda {torch.version.cuda}; "
          f"M x N x K = {m} x {n} x {k}; bf16 F.linear with bias: {bf16_ms:.3f} ms")
    print(f"scale_b strides: view {scales['view'].stride()}, [1,N] {scales['[1,N]'].stride()}")
    print()
    header = f"{'bias':5} {'fast_accum':10} {'scale_b':7} {'out':5} {'ms':>7} {'vs bf16':>8} {'rel L2 err':>11} " \
             f"{'max err / max|ref|':>18}  kernel"
    print(header)
    print("-" * len(header))
    for with_bias, fast, scale_name, out in itertools.product((False, True), (False, True), scales,
                                                              (torch.bfloat16, torch.float32)):
        def call():
            return torch._scaled_mm(xq, wt, scale_a=sx, scale_b=scales[scale_name], out_dtype=out,
                                    bias=bias if with_bias else None, use_fast_accum=fast)
        label = f"{'yes' if with_bias else 'no':5} {str(fast):10} {scale_name:7} {str(out)[6:]:5}"
        try:
            y = call()
        except RuntimeError as exc:
            print(f"{label} not supported: {str(exc).splitlines()[0][:80]}")
            continue
        ms = median_ms(call)
        ref = exact + bias.double() if with_bias else exact
        diff = y.double() - ref
        rel = (diff.norm() / ref.norm()).item()
        worst = (diff.abs().max() / ref.abs().max()).item()
        print(f"{label} {ms:7.3f} {bf16_ms / ms:7.2f}x {rel:11.3e} {worst:18.3e}  {kernel_name(call)}")
        del y, diff
    bf16_err = ((exact.to(torch.bfloat16).double() - exact).norm() / exact.norm()).item()
    print(f"\nfor scale: rounding the exact product to bf16 alone gives a relative L2 error of {bf16_err:.3e}")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("scaled_mm_variants needs a CUDA GPU with fp8 tensor cores (sm89+)")
    main()
