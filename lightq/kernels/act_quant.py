"""Per-token dynamic activation quantization in one pass (one read of ``x``, one write of ``q`` and the scales).

For each row ``x`` of an ``[M, K]`` bf16 / fp16 / fp32 tensor, exactly ``lightq.quant.schemes.quantize_activation``:

    amax = max_k |x_k|                    (fp32)
    s    = amax / qmax                    (IEEE fp32 division; 1 where that is 0)
    fp8:   q = fp8_e4m3(clamp(x / s, -448, 448))          round-to-nearest-even cast
    int8:  q = clamp(rint(x / s), -127, 127)              rint = round half to even

``x / s`` is correctly rounded (``divide``: the row's correctly rounded reciprocal and one FMA correction,
Markstein's division, branch-free; ``tl.div_rn`` per element costs whole-row kernels half their bandwidth), and
``rint`` is the ``(v + 1.5 * 2**23) - 1.5 * 2**23`` identity (exact round-half-even for |v| < 2**22), so the codes
and scales are bit-identical to the torch reference. With ``gelu=True`` the row is first passed through GELU
(tanh form, ``gelu_tanh``) in fp32 and rounded back to ``x``'s dtype, as ``nn.GELU(approximate="tanh")`` does on
a bf16 tensor, so the FFN's inner activation is quantized without being written out (the fp32 GELU may differ
from torch's by a few ulps, which changes the rounded value only next to bf16 rounding ties).

Each program quantizes ``ROWS`` rows in two passes over ``K`` in ``CHUNK``-wide pieces: pass 1 reduces the row
amax, pass 2 re-reads the row (from L1 / L2: the first read asks the cache to keep it) and writes the codes; on
an H100 this moves the bytes at the device's copy bandwidth. With GELU, pass 1 reduces max x and evaluates GELU
once per row (``_gelu_row_amax``), so GELU runs once per element, in pass 2 (a one-pass whole-row kernel
measured slower at K = 13824). Rows / chunk / warps are autotuned per (K, scheme, GELU).
Bytes moved: ``M K (elt + 1) + 4 M``: the HBM floor at M = 32760, K = 5120 (bf16) is 0.15 ms on an H100 SXM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import Tuned, interpreting, kernel_op, rows_grid
from .rounding import round_to, soft_rounding

MAX_K = 16384  # the whole-row kernels (norm + quant, RMSNorm + RoPE) hold a row in registers


@triton.jit
def row_scale(amax, qmax):
    """``amax / qmax`` correctly rounded, 1 where that is 0; ``qmax`` of ``amax``'s shape (div_rn does not
    broadcast)."""
    scale = tl.div_rn(amax, qmax)
    return tl.where(scale > 0.0, scale, 1.0)


@triton.jit
def divide(x, s, inv, INTERPRETED: tl.constexpr):
    """``x / s`` correctly rounded, given ``inv`` = ``1 / s`` correctly rounded (all of ``x``'s shape).

    Markstein: ``q0 = x * inv`` is within an ulp of ``x / s``, so ``e = x - q0 s`` is exact in one FMA and
    ``q0 + e inv`` rounds to ``x / s`` wherever ``e`` and the quotient are normal (|x| >= 2**-100,
    |x / s| >= 2**-125); elsewhere, in rows with amax >= 2**-80, both quotients are below 2**-11 and the code is 0
    either way. The GPU tests check this against IEEE division for every bf16 ``x``.
    ``e == 0`` keeps ``q0``, and so the sign of a zero. The interpreter's FMA is not fused: there this is
    ``div_rn``."""
    if INTERPRETED:
        q = tl.div_rn(x, s)
    else:
        q0 = x * inv
        e = tl.fma(-q0, s, x)
        q = tl.where(e == 0.0, q0, tl.fma(e, inv, q0))
    return q


@triton.jit
def quantize_values(xf, scale, inv, out_dtype: tl.constexpr, IS_FP8: tl.constexpr, INTERPRETED: tl.constexpr):
    """Codes of fp32 ``xf`` for ``scale`` and its reciprocal ``inv`` (both of ``xf``'s shape): ``fp8(clamp(x / s))``
    or ``clamp(rint(x / s))``."""
    QMAX: tl.constexpr = 448.0 if IS_FP8 else 127.0
    v = divide(xf, scale, inv, INTERPRETED)
    if IS_FP8:
        q = tl.clamp(v, -QMAX, QMAX).to(out_dtype)
    else:
        q = tl.clamp((v + 12582912.0) - 12582912.0, -QMAX, QMAX).to(tl.int8)  # +- 1.5 * 2**23: rint, ties even
    return q


@triton.jit
def quantize_store_row(xf, q_row_ptr, s_ptr, cols, mask, IS_FP8: tl.constexpr, INTERPRETED: tl.constexpr):
    """Quantize one fp32 row ``xf`` held whole in registers (masked lanes hold 0), store its codes at
    ``q_row_ptr + cols`` and its scale at ``s_ptr``. Used by the kernels that end a row-wise norm in a quantization."""
    QMAX: tl.constexpr = 448.0 if IS_FP8 else 127.0
    scale = row_scale(tl.max(tl.abs(xf), axis=0), QMAX)  # a scalar over a constant: no broadcast needed
    inv = tl.div_rn(1.0, scale)
    q = quantize_values(xf, tl.broadcast_to(scale, xf.shape), tl.broadcast_to(inv, xf.shape),
                        q_row_ptr.dtype.element_ty, IS_FP8, INTERPRETED)
    tl.store(q_row_ptr + cols, q, mask=mask)
    tl.store(s_ptr, scale)


@triton.jit
def gelu_tanh(x):
    """GELU, tanh form, in fp32 as ``x * sigmoid(2u) = x / (1 + exp(-2u))``, ``u = sqrt(2/pi) (x + 0.044715 x^3)``:
    the same function as torch's ``0.5 x (1 + tanh(u))``, without libdevice's tanh (which made the GELU
    quantizer compute-bound on an H100: about 1.4 ms at 32760 x 13824) and without the cancellation of
    ``1 + tanh`` for negative x. Values agree with torch's to a few fp32 ulps where torch's own rounding is that
    good."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def _load_rows(x_ptr, offs, mask, GELU: tl.constexpr, SOFT: tl.constexpr, EVICT: tl.constexpr):
    """fp32 values of a ``[ROWS, CHUNK]`` tile of ``x`` (after GELU rounded to ``x``'s dtype, if asked); 0 off-mask."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0, eviction_policy=EVICT)
    if GELU:
        xf = round_to(gelu_tanh(x.to(tl.float32)), x_ptr.dtype.element_ty, SOFT)
        xf = tl.where(mask, xf, 0.0)
    else:
        xf = x.to(tl.float32)
    return xf


@triton.jit
def _gelu_row_amax(x_ptr, x_rows, row_ok, cols, K: tl.constexpr, SOFT: tl.constexpr, ROWS: tl.constexpr,
                   CHUNK: tl.constexpr):
    """``max_k |round(GELU(x_k))|`` per row, evaluating GELU once per row where it can: GELU increases on
    x >= -0.76 and lies in (-0.171, 0) below that, so if ``g = round(GELU(max x)) >= 0.25`` the row's amax is
    ``g`` exactly (no negative value reaches it, no smaller x exceeds it: adjacent bf16 inputs move GELU by far
    more than its fp32 rounding error there). Tiles with a row below that take the exact pass over GELU values."""
    xmax = tl.full((ROWS, CHUNK), float("-inf"), tl.float32)
    for k0 in range(0, K, CHUNK):
        mask = row_ok[:, None] & ((k0 + cols) < K)[None, :]
        x = tl.load(x_ptr + x_rows + k0 + cols[None, :], mask=mask, other=float("-inf"),
                    eviction_policy="evict_last")
        xmax = tl.maximum(xmax, x.to(tl.float32))
    top = tl.where(row_ok, tl.max(xmax, axis=1), 1.0)
    row_amax = round_to(gelu_tanh(top), x_ptr.dtype.element_ty, SOFT)
    if tl.min(row_amax, axis=0) < 0.25:
        amax = tl.zeros((ROWS, CHUNK), dtype=tl.float32)
        for k0 in range(0, K, CHUNK):
            mask = row_ok[:, None] & ((k0 + cols) < K)[None, :]
            xf = _load_rows(x_ptr, x_rows + k0 + cols[None, :], mask, True, SOFT, "evict_last")
            amax = tl.maximum(amax, tl.abs(xf))
        row_amax = tl.max(amax, axis=1)
    return row_amax


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K: tl.constexpr, stride_xm, stride_qm,
                      IS_FP8: tl.constexpr, GELU: tl.constexpr, INTERPRETED: tl.constexpr, SOFT: tl.constexpr,
                      ROWS: tl.constexpr, CHUNK: tl.constexpr):
    QMAX: tl.constexpr = 448.0 if IS_FP8 else 127.0
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    cols = tl.arange(0, CHUNK)
    x_rows = (rows * stride_xm)[:, None]
    if GELU:
        row_amax = _gelu_row_amax(x_ptr, x_rows, row_ok, cols, K, SOFT, ROWS, CHUNK)
    else:
        amax = tl.zeros((ROWS, CHUNK), dtype=tl.float32)
        for k0 in range(0, K, CHUNK):  # pass 1: row maxima; the tiles stay in cache for pass 2
            mask = row_ok[:, None] & ((k0 + cols) < K)[None, :]
            xf = _load_rows(x_ptr, x_rows + k0 + cols[None, :], mask, False, SOFT, "evict_last")
            amax = tl.maximum(amax, tl.abs(xf))
        row_amax = tl.max(amax, axis=1)
    scale = row_scale(row_amax, tl.full((ROWS,), QMAX, tl.float32))
    tl.store(s_ptr + rows, scale, mask=row_ok)
    scale_tile = tl.broadcast_to(scale[:, None], (ROWS, CHUNK))  # div_rn / fma do not broadcast by themselves
    inv_tile = tl.broadcast_to(tl.div_rn(tl.full((ROWS,), 1.0, tl.float32), scale)[:, None], (ROWS, CHUNK))
    q_rows = (rows * stride_qm)[:, None]
    for k0 in range(0, K, CHUNK):  # pass 2: codes
        mask = row_ok[:, None] & ((k0 + cols) < K)[None, :]
        xf = _load_rows(x_ptr, x_rows + k0 + cols[None, :], mask, GELU, SOFT, "evict_first")
        q = quantize_values(xf, scale_tile, inv_tile, q_ptr.dtype.element_ty, IS_FP8, INTERPRETED)
        tl.store(q_ptr + q_rows + k0 + cols[None, :], q, mask=mask)


# The first config is the one the interpreter runs (small, so the CPU tests stay fast). The rest: the fastest
# found by scripts/diag/act_quant_variants.py on an H100 (one row per program, 512-2048 wide chunks reach the copy
# bandwidth at K = 5120 and 13824; many rows per program did not), and neighbours for other K.
_ACT_CONFIGS = [triton.Config({"ROWS": r, "CHUNK": c}, num_warps=w)
                for r, c, w in ((1, 256, 4), (1, 512, 4), (1, 1024, 8), (1, 1024, 16), (1, 2048, 8), (1, 2048, 16),
                                (2, 512, 4), (2, 1024, 8), (2, 2048, 16), (4, 512, 8), (4, 256, 4))]
_act_quant = Tuned(_act_quant_kernel, _ACT_CONFIGS, key=["K", "IS_FP8", "GELU"])


def _check_input(x: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"act_quant takes a row-major [M, K] tensor, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")


@kernel_op("act_quant")
def act_quant(x: torch.Tensor, fp8: bool, gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization of ``x`` ``[M, K]`` (last dim contiguous): (codes ``[M, K]``, fp32 scales ``[M, 1]``)."""
    _check_input(x)
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        _act_quant[rows_grid(m)](x, q, s, m, k, x.stride(0), q.stride(0), IS_FP8=fp8, GELU=gelu,
                             INTERPRETED=interpreting(), SOFT=soft_rounding(x.dtype))
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
    return act_quant(x2, scheme == "fp8", gelu)
