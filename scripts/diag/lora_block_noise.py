"""How much rounding alone moves a block's LoRA contribution: the rounding floor of tests/gpu/test_lora_gpu.py.

    python scripts/diag/lora_block_noise.py [--device cpu] [--seeds 0 1 2] [--schemes int8 fp8]

The block of that test (1.3B widths, one layer, 3x16x20 tokens, 512 text tokens, a rank-32 LoRA on every block
linear, ``lightq.bench.lora``), unfused, on the torch backend (the activation codes of the triton backend, with no
kernel of its own). ``c`` is the block output with the LoRA minus without. Printed per scheme and seed:

    floor     how far ``c`` moves when every input element moves by one fp32 ulp (the test's floor)
    kernels   how far ``c`` moves when the unfused block computes as the fused GPU kernels do, to rounding:
              LayerNorm and RMSNorm summed in another order, each residual update by one rounding (an FMA), GELU
              in its sigmoid form (``lightq.kernels``); none of these changes a value by more than its rounding

Both are rounding noise; the fused and the unfused triton blocks on the GPU differ by such noise (the site check of
the test holds their side paths to the same codes).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import tempfile
from pathlib import Path

import torch
from torch import nn

from lightq.bench import lora as bench
from lightq.models.rope import rope_tables
from lightq.models.wan_dit import DIT_ARCHS, Block, LayerNorm32, RMSNorm, modulation_terms
from lightq.quant.method import QuantMethod

CHUNKS = 8  # the emulated reductions sum each row in this many partial sums


def _chunked_sum(t: torch.Tensor) -> torch.Tensor:
    return t.unflatten(-1, (CHUNKS, -1)).sum(-1).sum(-1, keepdim=True)


def _layer_norm(self, x):
    x = x.float()
    d = x - _chunked_sum(x) / x.shape[-1]
    h = d * torch.rsqrt(_chunked_sum(d * d) / x.shape[-1] + self.eps)
    return h if self.weight is None else h * self.weight.float() + self.bias.float()


def _rms_norm(self, x):
    xf = x.float()
    return (xf * torch.rsqrt(_chunked_sum(xf * xf) / xf.shape[-1] + self.eps) * self.weight.float()).to(x.dtype)


def _fma(x, y, gate):
    """``x + y * gate`` rounded once to fp32 (the product of two fp32 values is exact in float64)."""
    return (x.double() + y.double() * gate.double()).float()


def _block(self, x, e0, rope, text, image, dtype):
    shift1, scale1, gate1, shift2, scale2, gate2 = modulation_terms(self.modulation, e0, 6)
    x = _fma(x, self.self_attn((self.norm1(x) * (1 + scale1) + shift1).to(dtype), rope).float(), gate1)
    x = x + self.cross_attn(self.norm3(x).to(dtype), text, image).float()
    return _fma(x, self.ffn((self.norm2(x) * (1 + scale2) + shift2).to(dtype)).float(), gate2)


def _gelu(self, x):
    xf = x.float()
    return (xf / (1.0 + torch.exp(-2.0 * 0.7978845608028654 * (xf + 0.044715 * xf * xf * xf)))).to(x.dtype)


@contextlib.contextmanager
def kernel_rounding():
    """The unfused block computing as the fused kernels do (module docstring), restored on exit."""
    patches = [(LayerNorm32, "forward", _layer_norm), (RMSNorm, "forward", _rms_norm), (Block, "forward", _block),
               (nn.GELU, "forward", _gelu)]
    saved = [(cls, name, getattr(cls, name)) for cls, name, _ in patches]
    try:
        for cls, name, fn in patches:
            setattr(cls, name, fn)
        yield
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)


def measure(scheme: str, seed: int, device: str) -> tuple[float, float, float]:
    """(floor, kernels, |c| / |block update|) of the module docstring for one scheme and seed."""
    arch = dataclasses.replace(DIT_ARCHS["1.3b"], num_layers=1)
    method = QuantMethod.portable(scheme, "dit")
    with tempfile.TemporaryDirectory() as tmp:
        weights, lora_path = bench.write_model_and_lora(arch, 32, Path(tmp), seed=seed, device=device)
        plain = bench.load(arch, weights, method, None, device=device)[0].blocks[0]
        lora = bench.load(arch, weights, method, lora_path, "unmerged", device=device)[0].blocks[0]
    g = torch.Generator(device=device).manual_seed(seed)
    grid = (3, 16, 20)
    x = torch.randn(1, grid[0] * grid[1] * grid[2], arch.dim, device=device, generator=g)
    rest = (torch.randn(1, 6, arch.dim, device=device, generator=g) * 0.1,
            rope_tables(grid, arch.head_dim, torch.device(device)),
            torch.randn(1, 512, arch.dim, device=device, generator=g).bfloat16(), None, torch.bfloat16)

    def contribution(inp):
        base = plain(inp, *rest)
        return lora(inp, *rest) - base, base

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    with torch.no_grad():
        c, base = contribution(x)
        nudged, _ = contribution(torch.nextafter(x, torch.full_like(x, float("inf"))))
        with kernel_rounding():
            kernels, _ = contribution(x)
    return rel(nudged, c), rel(kernels, c), (c.norm() / (base - x).norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--schemes", nargs="+", default=["int8", "fp8"])
    args = ap.parse_args()
    print("| scheme | seed | floor | kernels | c / update |\n|---|---|---|---|---|")
    for scheme in args.schemes:
        for seed in args.seeds:
            floor, kernels, share = measure(scheme, seed, args.device)
            print(f"| {scheme} | {seed} | {floor:.4f} | {kernels:.4f} | {share:.3f} |")


if __name__ == "__main__":
    main()
