"""The DiT block's norm + modulation fused with the per-token quantization of the next linear's input, and the
q/k RMSNorm fused with RoPE. Each kernel reads its input once and writes only what the next op consumes.

``norm_quant`` / ``add_norm_quant`` (each program takes 1-8 consecutive token rows of ``x`` fp32 ``[M, K]``,
``M = B * L``, one whole row at a time)::

    x'   = x + res * mod[b, gate]           (add_norm_quant only; written out: the new residual stream)
    h    = (x' - mean) / sqrt(var + eps)     (LayerNorm in fp32, biased variance)
    h    = h * weight + bias                 (affine LayerNorm, if given)
    h    = h * (1 + mod[b, scale]) + mod[b, shift]      (modulation, if given; b = row // L)
    h    = round(h to round_dtype)           (the bf16 activation the unfused block would hand to the linear)
    q, s = per-token quantization of h       (exactly ``quantize_activation``, see ``act_quant``)

The unfused block's bf16 ``h`` is never written. The reduction order of mean / variance differs from
``F.layer_norm``'s, so ``h`` may differ from the unfused one by an fp32 ulp before its bf16 rounding: a code then
differs by one step on the rare element that sits on a rounding boundary.

``add_gated``: ``x + res * mod[b, gate]`` in fp32, one pass (the block's last residual update).

``rms_rope`` (one program per row of ``t`` ``[M, K]``, any row stride, e.g. a slice of the fused q/k/v output)::

    n = round(t * rsqrt(mean(t^2) + eps) * weight)        RMSNorm over the whole row, rounded to t's dtype
    pairs (n[2j], n[2j+1]) rotated by the angle of pair j % (head_dim / 2) at position row % L (RoPE tables fp32)
    out = round(rotated) in t's dtype, contiguous [M, K]   (without tables: the RMSNorm alone)

``qkv_rms_rope`` does that for the q and k thirds of the fused q/k/v projection in one pass and copies v, into one
contiguous ``[3, M, dim]``: attention then gets q, k and v with unit head-dim stride and ``dim`` row stride, as in
the unfused block (with v a strided view of the ``[M, 3 dim]`` GEMM output, the fused block's cuDNN attention
measured 40 ms vs the bf16 block's 34 ms on an H100 at 14B / 480p).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import ROW_CONFIGS, Tuned, interpreting, kernel_op, rows_grid
from .act_quant import MAX_K, quantize_store_row
from .rounding import round_to, soft_rounding

TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _norm_quant_row(row, x_ptr, res_ptr, xout_ptr, w_ptr, b_ptr, mod_ptr, q_ptr, s_ptr, L, K, stride_mod_b, eps,
                    SHIFT: tl.constexpr, SCALE: tl.constexpr, GATE: tl.constexpr, HAS_RES: tl.constexpr,
                    HAS_AFFINE: tl.constexpr, IS_FP8: tl.constexpr, ROUND_DTYPE: tl.constexpr, SOFT: tl.constexpr,
                    INTERPRETED: tl.constexpr, BLOCK: tl.constexpr):
    mod_row = mod_ptr + (row // L) * stride_mod_b
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row * K + cols, mask=mask, other=0.0, eviction_policy="evict_first")
    if HAS_RES:
        r = tl.load(res_ptr + row * K + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        if GATE >= 0:
            r = r * tl.load(mod_row + GATE * K + cols, mask=mask, other=0.0, eviction_policy="evict_last")
        x = x + r
        tl.store(xout_ptr + row * K + cols, x, mask=mask)
    mean = tl.sum(x, axis=0) / K
    d = tl.where(mask, x - mean, 0.0)
    var = tl.sum(d * d, axis=0) / K
    h = d * tl.rsqrt(var + eps)
    if HAS_AFFINE:
        h = h * tl.load(w_ptr + cols, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32) \
            + tl.load(b_ptr + cols, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
    if SCALE >= 0:
        h = h * (1.0 + tl.load(mod_row + SCALE * K + cols, mask=mask, other=0.0, eviction_policy="evict_last"))
    if SHIFT >= 0:
        h = h + tl.load(mod_row + SHIFT * K + cols, mask=mask, other=0.0, eviction_policy="evict_last")
    h = tl.where(mask, round_to(h, ROUND_DTYPE, SOFT), 0.0)
    quantize_store_row(h, q_ptr + row * K, s_ptr + row, cols, mask, IS_FP8, INTERPRETED)


@triton.jit
def _norm_quant_kernel(x_ptr, res_ptr, xout_ptr, w_ptr, b_ptr, mod_ptr, q_ptr, s_ptr,
                       M, L, K, stride_mod_b, eps, SHIFT: tl.constexpr, SCALE: tl.constexpr, GATE: tl.constexpr,
                       HAS_RES: tl.constexpr, HAS_AFFINE: tl.constexpr, IS_FP8: tl.constexpr,
                       ROUND_DTYPE: tl.constexpr, SOFT: tl.constexpr, INTERPRETED: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """``ROWS`` consecutive rows per program, one after the other: their modulation / affine vectors (shared by a
    sample's rows) are re-read from the SM's cache instead of L2."""
    for i in tl.static_range(ROWS):
        row = tl.program_id(0).to(tl.int64) * ROWS + i
        if row < M:
            _norm_quant_row(row, x_ptr, res_ptr, xout_ptr, w_ptr, b_ptr, mod_ptr, q_ptr, s_ptr, L, K, stride_mod_b,
                            eps, SHIFT, SCALE, GATE, HAS_RES, HAS_AFFINE, IS_FP8, ROUND_DTYPE, SOFT, INTERPRETED,
                            BLOCK)


# The first config is the interpreter's (4 rows: the CPU tests cover a partial last program).
_NORM_CONFIGS = [triton.Config({"ROWS": r}, num_warps=w) for r, w in ((4, 8), (1, 8), (1, 4), (1, 16), (2, 8),
                                                                        (2, 16), (4, 16), (8, 16))]
_norm_quant = Tuned(_norm_quant_kernel, _NORM_CONFIGS, key=["K", "HAS_RES", "HAS_AFFINE", "IS_FP8"])


def _launch_norm_quant(x, res, xout, weight, bias, mod, shift, scale, gate, seq_len, eps, fp8, round_dtype):
    m, k = x.shape
    if x.dtype != torch.float32 or not x.is_contiguous() or k > MAX_K:
        raise ValueError(f"norm_quant takes a contiguous fp32 [M, K <= {MAX_K}] residual stream, got "
                         f"{x.dtype} {tuple(x.shape)}")
    if mod is not None and (mod.dtype != torch.float32 or mod.stride(-1) != 1 or mod.stride(-2) != k):
        raise ValueError("norm_quant: the modulation must be fp32 [B, C, K] with contiguous [C, K] rows")
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        _norm_quant[rows_grid(m)](x, x if res is None else res, x if xout is None else xout,
                                  x if weight is None else weight, x if bias is None else bias,
                                  x if mod is None else mod, q, s, m, seq_len, k, 0 if mod is None else mod.stride(0),
                                  eps, SHIFT=shift, SCALE=scale, GATE=gate, HAS_RES=res is not None,
                                  HAS_AFFINE=weight is not None, IS_FP8=fp8, ROUND_DTYPE=TL_DTYPES[round_dtype],
                                  SOFT=soft_rounding(round_dtype), INTERPRETED=interpreting(),
                                  BLOCK=triton.next_power_of_2(k))
    return q, s


@kernel_op("norm_quant")
def norm_quant(x: torch.Tensor, seq_len: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               mod: Optional[torch.Tensor], shift: int, scale: int, eps: float, fp8: bool,
               round_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of ``round(LN(x)[*w+b] * (1 + mod[:, scale]) + mod[:, shift])``; index -1 = not applied."""
    return _launch_norm_quant(x, None, None, weight, bias, mod, shift, scale, -1, seq_len, eps, fp8, round_dtype)


@norm_quant.register_fake
def _(x, seq_len, weight, bias, mod, shift, scale, eps, fp8, round_dtype):
    return (x.new_empty(x.shape, dtype=torch.float8_e4m3fn if fp8 else torch.int8),
            x.new_empty((x.shape[0], 1), dtype=torch.float32))


@kernel_op("add_norm_quant")
def add_norm_quant(x: torch.Tensor, res: torch.Tensor, seq_len: int, weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], mod: Optional[torch.Tensor], shift: int, scale: int, gate: int,
                   eps: float, fp8: bool, round_dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x + res * mod[:, gate], codes, scales): ``norm_quant`` of the updated residual stream, which is returned."""
    if res.shape != x.shape or not res.is_contiguous():
        raise ValueError(f"add_norm_quant: residual {tuple(res.shape)} must be contiguous and match x {tuple(x.shape)}")
    xout = torch.empty_like(x)
    q, s = _launch_norm_quant(x, res, xout, weight, bias, mod, shift, scale, gate, seq_len, eps, fp8, round_dtype)
    return xout, q, s


@add_norm_quant.register_fake
def _(x, res, seq_len, weight, bias, mod, shift, scale, gate, eps, fp8, round_dtype):
    return (torch.empty_like(x), x.new_empty(x.shape, dtype=torch.float8_e4m3fn if fp8 else torch.int8),
            x.new_empty((x.shape[0], 1), dtype=torch.float32))


@triton.jit
def _add_gated_kernel(x_ptr, res_ptr, mod_ptr, out_ptr, M, L, K: tl.constexpr, stride_mod_b, GATE: tl.constexpr,
                      ROWS: tl.constexpr, CHUNK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    cols = tl.arange(0, CHUNK)
    gate_rows = mod_ptr + ((rows // L) * stride_mod_b + GATE * K)[:, None]
    base = (rows * K)[:, None]
    for k0 in range(0, K, CHUNK):
        mask = row_ok[:, None] & ((k0 + cols) < K)[None, :]
        offs = base + k0 + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gate_rows + k0 + cols[None, :], mask=mask, other=0.0)
        tl.store(out_ptr + offs, x + r * g, mask=mask)


_ADD_CONFIGS = [triton.Config({"ROWS": r, "CHUNK": c}, num_warps=w)
                for r, c, w in ((1, 256, 4), (1, 1024, 4), (1, 2048, 8), (2, 1024, 8), (4, 512, 4), (4, 1024, 8))]
_add_gated = Tuned(_add_gated_kernel, _ADD_CONFIGS, key=["K"])


@kernel_op("add_gated")
def add_gated(x: torch.Tensor, res: torch.Tensor, mod: torch.Tensor, gate: int, seq_len: int) -> torch.Tensor:
    """``x + res * mod[b, gate]`` in fp32, one pass: ``x`` fp32 ``[M, K]``, ``res`` ``[M, K]`` any float dtype,
    ``mod`` fp32 ``[B, C, K]``, ``b = row // seq_len`` (the block's last residual update)."""
    m, k = x.shape
    if x.dtype != torch.float32 or not x.is_contiguous() or res.shape != x.shape or not res.is_contiguous():
        raise ValueError(f"add_gated takes contiguous fp32 x and a contiguous residual of its shape, got {x.dtype} "
                         f"{tuple(x.shape)} and {res.dtype} {tuple(res.shape)}")
    if mod.dtype != torch.float32 or mod.stride(-1) != 1 or mod.stride(-2) != k:
        raise ValueError("add_gated: the modulation must be fp32 [B, C, K] with contiguous [C, K] rows")
    out = torch.empty_like(x)
    if m:
        _add_gated[rows_grid(m)](x, res, mod, out, m, seq_len, k, mod.stride(0), GATE=gate)
    return out


@add_gated.register_fake
def _(x, res, mod, gate, seq_len):
    return torch.empty_like(x)


@triton.jit
def _rms_rope_row(t_row, w_ptr, cos_ptr, sin_ptr, out_row, pos, K, HALF_HEAD, eps,
                  HAS_ROPE: tl.constexpr, SOFT: tl.constexpr, BLOCK: tl.constexpr):
    """RMSNorm (+ RoPE at sequence position ``pos``) of the ``K`` values at ``t_row``, stored at ``out_row``."""
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(t * t, axis=0) / K + eps)
    n = round_to(t * rstd * w, t_row.dtype.element_ty, SOFT)
    if HAS_ROPE:
        even, odd = tl.split(tl.reshape(n, [BLOCK // 2, 2]))
        pair = tl.arange(0, BLOCK // 2)
        table = pos * HALF_HEAD + pair % HALF_HEAD
        pmask = pair < K // 2
        c = tl.load(cos_ptr + table, mask=pmask, other=0.0)
        s = tl.load(sin_ptr + table, mask=pmask, other=0.0)
        n = tl.interleave(even * c - odd * s, even * s + odd * c)
        n = round_to(n, t_row.dtype.element_ty, SOFT)
    tl.store(out_row + cols, n.to(out_row.dtype.element_ty), mask=mask)


@triton.jit
def _rms_rope_kernel(t_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, L, K, stride_t, HALF_HEAD, eps,
                     HAS_ROPE: tl.constexpr, SOFT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    _rms_rope_row(t_ptr + row * stride_t, w_ptr, cos_ptr, sin_ptr, out_ptr + row * K, row % L, K, HALF_HEAD, eps,
                  HAS_ROPE, SOFT, BLOCK)


@triton.jit
def _qkv_rms_rope_kernel(qkv_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, out_ptr, M, L, K, stride_qkv, HALF_HEAD, eps,
                         SOFT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    src = qkv_ptr + row * stride_qkv
    pos = row % L
    _rms_rope_row(src, wq_ptr, cos_ptr, sin_ptr, out_ptr + row * K, pos, K, HALF_HEAD, eps, True, SOFT, BLOCK)
    _rms_rope_row(src + K, wk_ptr, cos_ptr, sin_ptr, out_ptr + (M + row) * K, pos, K, HALF_HEAD, eps, True, SOFT,
                  BLOCK)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    tl.store(out_ptr + (2 * M + row) * K + cols, tl.load(src + 2 * K + cols, mask=mask), mask=mask)


_rms_rope = Tuned(_rms_rope_kernel, ROW_CONFIGS, key=["K", "HAS_ROPE"])
_qkv_rms_rope = Tuned(_qkv_rms_rope_kernel, ROW_CONFIGS, key=["K"])


def _check_rows(t: torch.Tensor, k: int, what: str) -> None:
    if t.dim() != 2 or t.stride(1) != 1 or k > MAX_K or k % 2:
        raise ValueError(f"{what} takes [M, K] rows with unit column stride and even K <= {MAX_K}, got "
                         f"{tuple(t.shape)} strides {t.stride()}")


@kernel_op("rms_rope")
def rms_rope(t: torch.Tensor, weight: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
             seq_len: int, head_dim: int, eps: float) -> torch.Tensor:
    """RMSNorm of each row of ``t`` ``[M, K]`` (then RoPE when tables ``[L, 1, head_dim/2]`` are given)."""
    m, k = t.shape
    _check_rows(t, k, "rms_rope")
    out = torch.empty((m, k), dtype=t.dtype, device=t.device)
    if m:
        _rms_rope[(m,)](t, weight, t if cos is None else cos, t if sin is None else sin, out, seq_len, k,
                        t.stride(0), head_dim // 2, eps, HAS_ROPE=cos is not None, SOFT=soft_rounding(t.dtype),
                        BLOCK=triton.next_power_of_2(k))
    return out


@rms_rope.register_fake
def _(t, weight, cos, sin, seq_len, head_dim, eps):
    return t.new_empty(t.shape)


@kernel_op("qkv_rms_rope")
def qkv_rms_rope(qkv: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, seq_len: int, head_dim: int, eps: float) -> torch.Tensor:
    """``[3, M, dim]`` contiguous (q, k, v) from the fused projection ``qkv`` ``[M, 3 dim]``: ``rms_rope`` of the
    q and k thirds (own norm weights, one RoPE), v copied. Each of q / k / v is then a contiguous ``[B, L, heads,
    head_dim]`` view, the layout the unfused block hands to attention."""
    m, k3 = qkv.shape
    if k3 % 3:
        raise ValueError(f"qkv_rms_rope takes [M, 3 dim] rows, got {tuple(qkv.shape)}")
    k = k3 // 3
    _check_rows(qkv, k, "qkv_rms_rope")
    out = torch.empty((3, m, k), dtype=qkv.dtype, device=qkv.device)
    if m:
        _qkv_rms_rope[(m,)](qkv, weight_q, weight_k, cos, sin, out, m, seq_len, k, qkv.stride(0), head_dim // 2, eps,
                            SOFT=soft_rounding(qkv.dtype), BLOCK=triton.next_power_of_2(k))
    return out


@qkv_rms_rope.register_fake
def _(qkv, weight_q, weight_k, cos, sin, seq_len, head_dim, eps):
    return qkv.new_empty((3, qkv.shape[0], qkv.shape[1] // 3))


__all__ = ["norm_quant", "add_norm_quant", "add_gated", "rms_rope", "qkv_rms_rope", "interpreting"]
