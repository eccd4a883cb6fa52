"""Q8-Kernels (KONAKONA666/q8_kernels) for the ``fp8`` and ``int8`` schemes, on Ada GPUs (sm89).

UNVERIFIED: Q8-Kernels is not on the package index and could not be built or run while this was written; the
calls below follow its published Python API (``q8_kernels/functional/linear.py`` and ``quantizer.py``):

    quantize(x)      -> (x_q int8 [M, K], s_x fp32 [M])      token-wise int8 quantization
    quantize_fp8(x)  -> (x_q fp8  [M, K], s_x fp32 [M])      token-wise fp8 quantization
    q8_linear(a, b, bias, scale_a, scale_b, fuse_gelu, out_dtype)     int8 a [M, K], b [N, K], scales fp32 [M] / [N]
    fp8_linear(a, b, bias, scale_a, scale_b, use_hadamard, out_dtype)  fp8 a, b; use_hadamard=False
    y = (s_x s_w^T) * (x_q @ W_q^T) + bias          bias fp32; out_dtype bf16 (its GEMMs write bf16 or fp8 only)

so ``apply`` asks for bf16 and casts to x.dtype (one extra rounding for fp16 activations). The Hadamard variants
are not used: they change the numerics of the scheme. Q8-Kernels' own quantizers are used for speed; their
agreement with lightq's per-token rule (s = max|x| / 448 or / 127) is what the GPU test checks first. The weight
is the checkpoint's ``[N, K]`` tensor with its per-channel scales flattened to ``[N]``.
"""

from __future__ import annotations

import torch
from q8_kernels.functional.linear import fp8_linear, q8_linear  # failure -> BackendUnavailable in spec.load()
from q8_kernels.functional.quantizer import quantize, quantize_fp8

from lightq.backends.base import Backend
from lightq.quant.schemes import QuantizedWeight



class Q8fBackend(Backend):
    """``fp8`` / ``int8``: Q8-Kernels' token-wise quantizers and 8-bit GEMMs (bias fused, bf16 output)."""

    split_gemm = True

    def version(self) -> str:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("q8_kernels")
        except PackageNotFoundError:
            return ""

    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        self.check_scheme(qw.scheme)
        return {"data": qw.data.contiguous(), "scale": qw.scale.float().reshape(-1).contiguous()}

    def quantize_activation(self, x2: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-wise quantization of a contiguous ``[M, K]`` tensor: (x_q ``[M, K]``, s_x ``[M]`` fp32)."""
        xq, sx = quantize_fp8(x2) if scheme == "fp8" else quantize(x2)
        return xq, sx.float().reshape(-1).contiguous()

    def gemm_only(self, xq: torch.Tensor, sx: torch.Tensor, packed: dict[str, torch.Tensor],
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        """The 8-bit GEMM alone (bias fused, bf16 output) on an already quantized activation, cast to ``out_dtype``."""
        b = None if bias is None else bias.float()
        sx = sx.reshape(-1).contiguous()
        if xq.dtype == torch.int8:
            y = q8_linear(xq, packed["data"], b, sx, packed["scale"], False, torch.bfloat16)
        else:
            y = fp8_linear(xq, packed["data"], b, sx, packed["scale"], False, torch.bfloat16)
        return y.reshape(xq.shape[0], -1).to(out_dtype)

    def apply(self, x, packed, scheme, bias):
        x2 = self.flat_input(x, packed["data"].shape[1], scheme)
        xq, sx = self.quantize_activation(x2, scheme)
        return self.gemm_only(xq, sx, packed, bias, x.dtype).reshape(*x.shape[:-1], -1)


