"""Float64 reference for ``TorchBackend.apply`` and the error bound a correct implementation must meet.

The reference starts from the *same* quantized activation and weight the backend uses (``quantize_activation`` of
the input, the stored ``QuantizedWeight``), so the only differences left are floating-point roundings in the
GEMM, the scaling and the output cast. With ``A = sum_k |x_k w_k|`` (scales included) the bound per element is

    |y - ref| <= u_out * (|ref_no_bias| + |bias| + |ref|) + (K + 3) * 2**-24 * A + u_w * A

- ``u_out``: unit roundoff of the output (2**-8 bf16, 2**-11 fp16, 2**-24 fp32); ``gemm_dtype`` a coarser dtype the
  GEMM rounds to first. The output is rounded once before the bias is added (16-bit paths) and once after.
- ``(K + 3) * 2**-24 * A``: fp32 accumulation of K products (worst case K * 2**-24 * A) and up to three fp32
  roundings of the scaling. fp8 x fp8 and int8 x int8 products are exact, so no term for the inputs.
- outputs in the subnormal range of ``x.dtype`` round with an absolute error of half its subnormal spacing.
- ``u_w * A``: int4-g128 only: the weight is dequantized to the activation dtype before the matmul.
- ``extra_acc`` adds a per-device accumulation term (the GPU tests use it for fp8 tensor cores).
"""

from __future__ import annotations

import torch

from lightq.quant import schemes as S

UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}
SUBNORMAL_HALF_SPACING = {torch.bfloat16: 2.0 ** -134, torch.float16: 2.0 ** -25, torch.float32: 2.0 ** -150}


def reference(x2: torch.Tensor, qw: S.QuantizedWeight, bias: torch.Tensor | None):
    """(ref, abs_sum) in float64 for ``x2`` ``[M, K]``: the exact result of the quantized inputs, and ``A``."""
    if qw.scheme == "int4-g128":
        xd, wd = x2.double(), S.dequantize_weight(qw).double()
        ref, abs_sum = xd @ wd.t(), xd.abs() @ wd.abs().t()
    elif qw.scheme in ("fp8", "int8", S.PER_TENSOR):
        xq, sx = S.quantize_activation(x2, qw.scheme, qw.input_scale)
        xd, wd = xq.double() * sx.double(), qw.data.double() * qw.scale.double()
        ref, abs_sum = xd @ wd.t(), xd.abs() @ wd.abs().t()
    else:  # fp8-b128: dequantization is exact in float64 (fp8 has 4 significant bits, the scales 24)
        xq, sx = S.quantize_activation(x2, "fp8-b128")
        xd = xq.double() * sx.double().repeat_interleave(S.GROUP, 1)[:, :x2.shape[1]]
        n, k = qw.out_features, qw.in_features
        ws = qw.scale.double().repeat_interleave(S.BLOCK, 0)[:n].repeat_interleave(S.BLOCK, 1)[:, :k]
        wd = qw.data.double() * ws
        ref, abs_sum = xd @ wd.t(), xd.abs() @ wd.abs().t()
    no_bias = ref
    if bias is not None:
        ref = ref + bias.double()
    return no_bias, ref, abs_sum


def bound(no_bias, ref, abs_sum, bias, k: int, u_out: float, scheme: str, x_dtype: torch.dtype,
          extra_acc: float = 0.0) -> torch.Tensor:
    """The per-element error bound described in the module docstring."""
    b = 0.0 if bias is None else bias.double().abs()
    u_w = UNIT_ROUNDOFF[x_dtype] if scheme == "int4-g128" else 0.0
    return (u_out * (no_bias.abs() + b + ref.abs())
            + ((k + 3) * 2.0 ** -24 + u_w + extra_acc) * abs_sum
            + SUBNORMAL_HALF_SPACING[x_dtype])


def assert_close_to_reference(y, x, qw, bias, *, gemm_dtype=None, extra_acc: float = 0.0) -> None:
    """Check ``y = backend.apply(x, ...)`` against the float64 reference, element by element.

    ``gemm_dtype``: the dtype the GEMM itself rounds to when coarser than ``x.dtype``.
    """
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    no_bias, ref, abs_sum = reference(x2, qw, bias)
    u_out = max(UNIT_ROUNDOFF[x.dtype], UNIT_ROUNDOFF[gemm_dtype or x.dtype])
    tol = bound(no_bias, ref, abs_sum, bias, k, u_out, qw.scheme, x.dtype, extra_acc)
    err = (y.reshape(-1, y.shape[-1]).double() - ref).abs()
    bad = err > tol
    assert not bad.any(), (f"{qw.scheme}: {int(bad.sum())}/{bad.numel()} outputs outside the bound; worst excess "
                           f"{float((err - tol).max()):.3e}, worst err {float(err.max()):.3e}")
