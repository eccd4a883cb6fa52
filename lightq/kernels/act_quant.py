"""Per-token dynamic activation quantization in one pass (one read of ``x``, one write of ``q`` and the scales).

For each row ``x`` of an ``[M, K]`` bf16 / fp16 / fp32 tensor, exactly ``lightq.quant.schemes.quantize_activation``:

    amax = max_k |x_k|                    (fp32)
    s    = amax / qmax                    (IEEE fp32 division; 1 where that is 0)
    fp8:   q = fp8_e4m3(clamp(x / s, -448, 448))          round-to-nearest-even cast
    int8:  q = clamp(rint(x / s), -127, 127)              rint = round half to even

``x / s`` is ``tl.div_rn`` (correctly rounded), not Triton's default approximate division, and ``rint`` is the
``(v + 1.5 * 2**23) - 1.5 * 2**23`` identity (exact round-half-even for |v| < 2**22), so the codes and scales are
bit-identical to the torch reference. With ``gelu=True`` the row is first passed through GELU (tanh form) in fp32
and rounded back to ``x``'s dtype, as ``nn.GELU(approximate="tanh")`` does on a bf16 tensor, so the FFN's inner
activation is quantized without being written out (GELU's tanh may differ from torch's by an fp32 ulp, which
changes the rounded value only at bf16 rounding ties).

One program per row holds the whole row in registers (``BLOCK`` = next power of two >= K; K <= 16384 here).
Bytes moved: ``M K (elt + 1) + 4 M``: the HBM floor at M = 32760, K = 5120 (bf16) is 0.15 ms on an H100 SXM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import ROW_CONFIGS, Tuned, interpreting
from .rounding import round_to, soft_rounding

FP8_MAX = 448.0
INT8_MAX = 127.0
_RNE_MAGIC = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds |v| < 2**22 to the nearest even integer
MAX_K = 16384


@triton.jit
def quantize_store_row(xf, q_row_ptr, s_ptr, cols, mask, IS_FP8: tl.constexpr):
    """Quantize one fp32 row ``xf`` (masked lanes hold 0), store its codes at ``q_row_ptr + cols`` and its scale
    at ``s_ptr``. Shared by every kernel that ends in a per-token quantization."""
    QMAX: tl.constexpr = 448.0 if IS_FP8 else 127.0
    amax = tl.max(tl.abs(xf), axis=0)
    scale = tl.div_rn(amax, QMAX)
    scale = tl.where(scale > 0.0, scale, 1.0)
    v = tl.div_rn(xf, tl.broadcast_to(scale, xf.shape))  # div_rn does not broadcast a scalar by itself
    if IS_FP8:
        q = tl.clamp(v, -QMAX, QMAX).to(q_row_ptr.dtype.element_ty)
    else:
        q = tl.clamp((v + 12582912.0) - 12582912.0, -QMAX, QMAX).to(tl.int8)
    tl.store(q_row_ptr + cols, q, mask=mask)
    tl.store(s_ptr, scale)


@triton.jit
def gelu_tanh(x, INTERPRETED: tl.constexpr):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in fp32, as torch computes it. ``tanh`` is libdevice's on
    the GPU; the interpreter has no libdevice, so there it is 1 - 2 / (exp(2u) + 1)."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    if INTERPRETED:
        t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
    else:
        t = libdevice.tanh(u)
    return 0.5 * x * (1.0 + t)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                      IS_FP8: tl.constexpr, GELU: tl.constexpr, INTERPRETED: tl.constexpr, SOFT: tl.constexpr,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0)
    if GELU:
        xf = round_to(gelu_tanh(x.to(tl.float32), INTERPRETED), x_ptr.dtype.element_ty, SOFT)
    else:
        xf = x.to(tl.float32)
    quantize_store_row(xf, q_ptr + row * stride_qm, s_ptr + row, cols, mask, IS_FP8)


_act_quant = Tuned(_act_quant_kernel, ROW_CONFIGS, key=["K", "IS_FP8", "GELU"])


def _check_input(x: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"act_quant takes a row-major [M, K] tensor, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")
    if x.shape[1] > MAX_K:
        raise ValueError(f"act_quant holds a row in registers: K <= {MAX_K}, got {x.shape[1]}")


@torch.library.custom_op("lightq::act_quant", mutates_args=())
def act_quant(x: torch.Tensor, fp8: bool, gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization of ``x`` ``[M, K]`` (last dim contiguous): (codes ``[M, K]``, fp32 scales ``[M, 1]``)."""
    _check_input(x)
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        _act_quant[(m,)](x, q, s, k, x.stride(0), q.stride(0), IS_FP8=fp8, GELU=gelu,
                         INTERPRETED=interpreting(), SOFT=soft_rounding(x.dtype), BLOCK=triton.next_power_of_2(k))
    return q, s


@act_quant.register_fake
def _(x, fp8, gelu):
    m, k = x.shape
    return (x.new_empty((m, k), dtype=torch.float8_e4m3fn if fp8 else torch.int8),
            x.new_empty((m, 1), dtype=torch.float32))


def quantize_per_token(x2: torch.Tensor, scheme: str, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_activation(x2, scheme)`` for ``scheme`` in fp8 / int8, on the fused kernel."""
    if scheme not in ("fp8", "int8"):
        raise ValueError(f"per-token quantization is for fp8 / int8, not '{scheme}'")
    return torch.ops.lightq.act_quant(x2, scheme == "fp8", gelu)
