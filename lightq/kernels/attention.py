"""Quantized self-attention: lightq's Triton kernels for the schemes of ``lightq.attention.numerics``.

Two steps, exactly the reference's numerics (read that module's docstring for the math):

1. ``_quant_kernel`` (one program per block of tokens and head): fp32 ``(x - mean) * mul`` of a ``[BLOCK, D]``
   tile, its amax, scale ``amax / qmax`` (1 where 0), codes ``rint(x / s)`` (int8) or ``e4m3(x / s)``, written as
   ``[B, H, L, D]`` so the attention kernel reads contiguous tiles; with ``CHANNEL`` it applies given per-channel
   scales instead (sage2's V). Q takes ``mul = log2(e) / sqrt(D)``, K its token mean. ``x / s`` is an IEEE
   division (``div_rn``; the reciprocal-and-correction shortcut of ``act_quant.divide`` is exact only for 16-bit
   inputs, and ``c q`` or ``k - mean`` are full fp32 values), so codes and scales are the reference's bit for bit.
2. ``_attn_kernel`` (one program per ``BLOCK_M`` queries and head): flash attention's online softmax over key
   blocks of ``BLOCK_N`` = 64 keys (the K / V quantization block, so one scale per tile; fixed, since P's rounding
   depends on the running maximum and so on the key tiling): ``S = dot(Q, K^T) (s_q s_k)`` (int8 -> int32 exact, or
   e4m3 -> fp32); the full key blocks run without masks, then the partial last one (if any) with keys past the end
   masked to -inf (any token count); ``p = exp2(S - m)``, P rounded to the
   16-bit type of V (int8-sage) or ``e4m3(448 p)`` against e4m3 V (sage2, fa3), fp32 accumulator. The output is
   stored straight in ``[B, Lq, H * D]``, the layout the output projection reads.

int8 Q.K runs on sm80+ (Ampere's int8 tensor cores); fp8 needs sm89+. Under ``TRITON_INTERPRET=1`` the e4m3 and
bf16 roundings are done in fp32 arithmetic (``fp8_rne`` / ``round_to`` with ``SOFT``), so the CPU tests compare
codes bit for bit and outputs to fp32 accumulation order. Head dim 64 or 128.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import Tuned, interpreting, kernel_op
from .act_quant import row_scale
from .rounding import fp8_rne, round_to, soft_rounding

BLOCK_Q = 128
BLOCK_K = 64
ROW_ALIGN = 16  # fp8 elements per 16 bytes
LOG2E = 1.4426950408889634
# scheme -> (Q/K in fp8, P.V in fp8, V scale per channel (else per key block))
SCHEMES = {"int8-sage": (False, False, False), "int8fp8-sage2": (False, True, True), "fp8-fa3": (True, True, False)}


@triton.jit
def _encode(xf, scale, IS_FP8: tl.constexpr, INTERPRETED: tl.constexpr):
    """Codes of fp32 ``xf`` for ``scale`` (``xf``'s shape): e4m3 RNE or int8 rint of the IEEE quotient."""
    v = tl.div_rn(xf, scale)
    if IS_FP8:
        q = fp8_rne(tl.clamp(v, -448.0, 448.0), INTERPRETED)
    else:
        q = tl.clamp((v + 12582912.0) - 12582912.0, -127.0, 127.0).to(tl.int8)  # +- 1.5 * 2**23: rint, ties even
    return q


@triton.jit
def _quant_kernel(x_ptr, mean_ptr, scale_ptr, out_ptr, L, LP, H, stride_b, stride_l, stride_h, mul,
                  HAS_MEAN: tl.constexpr, CHANNEL: tl.constexpr, TRANSPOSED: tl.constexpr, IS_FP8: tl.constexpr,
                  INTERPRETED: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr):
    blk, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh = (b * H + h).to(tl.int64)
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    mask = (rows < L)[:, None]
    x = tl.load(x_ptr + b.to(tl.int64) * stride_b + rows.to(tl.int64)[:, None] * stride_l + h * stride_h
                + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_MEAN:
        x = tl.where(mask, x - tl.load(mean_ptr + bh * D + cols)[None, :], 0.0)
    x = x * mul
    if CHANNEL:
        s = tl.load(scale_ptr + bh * D + cols)
        scale = tl.broadcast_to(s[None, :], (BLOCK, D))
    else:
        s = row_scale(tl.max(tl.max(tl.abs(x), axis=1), axis=0), 448.0 if IS_FP8 else 127.0)
        tl.store(scale_ptr + bh * tl.cdiv(L, BLOCK) + blk, s)
        scale = tl.broadcast_to(s, (BLOCK, D))
    q = _encode(x, scale, IS_FP8, INTERPRETED)
    if TRANSPOSED:  # [B, H, D, LP]: the K-major layout an fp8 P.V product wants for V on Hopper
        offs = (bh * D + cols)[None, :] * LP + rows.to(tl.int64)[:, None]
    else:
        offs = (bh * L + rows.to(tl.int64))[:, None] * D + cols[None, :]
    tl.store(out_ptr + offs, q, mask=mask)


def _quantize(x: torch.Tensor, block: int, fp8: bool, mean: torch.Tensor | None = None, mul: float = 1.0,
              channel_scale: torch.Tensor | None = None, transposed: bool = False):
    """``x`` ``[B, L, H, D]`` -> (codes as a ``[B, H, L, D]`` tensor, stored ``[B, H, D, LP]`` if ``transposed``,
    ``LP`` = ``L`` rounded up to ``ROW_ALIGN`` so every row starts 16-byte aligned (the fp8 V tiles load unaligned
    otherwise, docs/BENCHMARKS.md "Quantized attention"); scales ``[B, H, ceil(L / block)]``, or ``channel_scale``
    ``[B, H, D]`` as given)."""
    b, n, h, d = x.shape
    dtype = torch.float8_e4m3fn if fp8 else torch.int8
    lp = triton.cdiv(n, ROW_ALIGN) * ROW_ALIGN
    codes = torch.empty((b, h, d, lp) if transposed else (b, h, n, d), dtype=dtype, device=x.device)
    if channel_scale is None:
        scale = torch.empty((b, h, triton.cdiv(n, block)), dtype=torch.float32, device=x.device)
    else:
        scale = channel_scale
    _quant_kernel[(triton.cdiv(n, block), h, b)](
        x, x if mean is None else mean, scale, codes, n, lp, h, x.stride(0), x.stride(1), x.stride(2), mul,
        HAS_MEAN=mean is not None, CHANNEL=channel_scale is not None, TRANSPOSED=transposed, IS_FP8=fp8,
        INTERPRETED=interpreting(), BLOCK=block, D=d)
    return (codes[..., :n].transpose(-1, -2) if transposed else codes), scale


@triton.jit
def _attn_step(acc, l_i, m_i, q, q_scale, k_ptrs, v_ptrs, sk_ptr, sv_ptr, j, key_ok, QK_FP8: tl.constexpr,
               PV_FP8: tl.constexpr, V_CHANNEL: tl.constexpr, SOFT_P: tl.constexpr, SOFT_FP8: tl.constexpr,
               MASKED: tl.constexpr):
    """One key block ``j`` of the online softmax; ``MASKED`` only for the partial last block (``key_ok``)."""
    if MASKED:
        k = tl.load(k_ptrs, mask=key_ok[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
    if QK_FP8:
        qk = tl.dot(q, k)
    else:
        qk = tl.dot(q, k, out_dtype=tl.int32).to(tl.float32)
    s = qk * (q_scale * tl.load(sk_ptr + j))[:, None]
    if MASKED:
        s = tl.where(key_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if MASKED:
        v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    if PV_FP8:
        pv = tl.dot(fp8_rne(p * 448.0, SOFT_FP8), v)
        if not V_CHANNEL:
            pv = pv * tl.load(sv_ptr + j)
    else:
        pr = round_to(p, v_ptrs.dtype.element_ty, SOFT_P)
        if SOFT_P:  # the interpreter's bf16 dot is wrong; bf16 products are exact in fp32
            pv = tl.dot(pr, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(pr.to(v_ptrs.dtype.element_ty), v)
    return acc * alpha[:, None] + pv, l_i, m_new


@triton.jit
def _attn_kernel(q_ptr, sq_ptr, k_ptr, sk_ptr, v_ptr, sv_ptr, o_ptr, Lq, Lk: tl.constexpr, H,
                 stride_vb, stride_vh, stride_vl, stride_vd, QK_FP8: tl.constexpr, PV_FP8: tl.constexpr,
                 V_CHANNEL: tl.constexpr, SOFT_P: tl.constexpr, SOFT_FP8: tl.constexpr, SOFT_OUT: tl.constexpr,
                 D: tl.constexpr, QBLK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh = (b * H + h).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < Lq
    q = tl.load(q_ptr + (bh * Lq + offs_m.to(tl.int64))[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q_scale = tl.load(sq_ptr + bh * tl.cdiv(Lq, QBLK) + offs_m // QBLK, mask=row_ok, other=1.0)
    n_blocks: tl.constexpr = (Lk + BLOCK_N - 1) // BLOCK_N
    FULL: tl.constexpr = Lk // BLOCK_N  # blocks without a key past the end: no masks
    k_ptrs = k_ptr + bh * Lk * D + offs_n[None, :] * D + offs_d[:, None]  # K^T tiles [D, BLOCK_N]
    v_ptrs = v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh + offs_n.to(tl.int64)[:, None] * stride_vl \
        + offs_d[None, :] * stride_vd
    sk_row, sv_row = sk_ptr + bh * n_blocks, sv_ptr + bh * n_blocks
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for j in range(0, FULL):
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, q_scale, k_ptrs, v_ptrs, sk_row, sv_row, j, offs_n < BLOCK_N,
                                   QK_FP8, PV_FP8, V_CHANNEL, SOFT_P, SOFT_FP8, False)
        k_ptrs += BLOCK_N * D
        v_ptrs += BLOCK_N * stride_vl
    if FULL < n_blocks:
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, q_scale, k_ptrs, v_ptrs, sk_row, sv_row, FULL,
                                   (FULL * BLOCK_N + offs_n) < Lk, QK_FP8, PV_FP8, V_CHANNEL, SOFT_P, SOFT_FP8, True)
    if PV_FP8:
        out = acc / (l_i * 448.0)[:, None]
        if V_CHANNEL:
            out = out * tl.load(sv_ptr + bh * D + offs_d)[None, :]
    else:
        out = acc / l_i[:, None]
    o_ptrs = o_ptr + ((b.to(tl.int64) * Lq + offs_m.to(tl.int64)) * H + h)[:, None] * D + offs_d[None, :]
    out = round_to(out, o_ptr.dtype.element_ty, SOFT_OUT)
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


# The first config is the one the interpreter runs. BLOCK_N is not tuned: it is the numerics' key block. The key
# count is a compile-time constant (Triton 3.6's interpreter cannot loop to a runtime bound under NumPy 2.4; a run's
# token count is fixed, and the autotuning key holds it anyway).
_ATTN_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": BLOCK_K}, num_warps=w, num_stages=st)
                 for bm, w, st in ((64, 4, 2), (128, 8, 3), (128, 8, 4), (128, 4, 3), (64, 4, 3), (64, 4, 4),
                                   (128, 8, 2))]
_attn = Tuned(_attn_kernel, _ATTN_CONFIGS, key=["Lq", "Lk", "D", "PV_FP8", "V_CHANNEL"])


def quantize_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scheme: str):
    """The quantized operands of ``scheme`` (``lightq.attention.numerics.quantize_inputs``' layout): Q codes and
    scales, K codes and scales, V (the 16-bit input itself for int8-sage, else e4m3 codes ``[B, H, Lk, D]``), V
    scales (``[B, H, D]``, ``[B, H, ceil(Lk / 64)]``) or None."""
    qk_fp8, pv_fp8, v_channel = SCHEMES[scheme]
    qc, sq = _quantize(q, BLOCK_Q, qk_fp8, mul=LOG2E / math.sqrt(q.shape[-1]))
    kc, sk = _quantize(k, BLOCK_K, qk_fp8, mean=k.float().mean(dim=1, keepdim=True).contiguous())
    if not pv_fp8:
        half = torch.float16 if q.dtype == torch.float16 else torch.bfloat16
        return qc, sq, kc, sk, v.to(half), None
    if v_channel:
        amax = v.float().abs().amax(dim=1)
        sv = amax / torch.full_like(amax, 448.0)  # a tensor divisor: CUDA divides by a Python scalar inexactly
        sv = torch.where(sv > 0, sv, torch.ones_like(sv)).contiguous()  # the reference's value_channel_scale
        vc, _ = _quantize(v, BLOCK_K, True, channel_scale=sv, transposed=True)
        return qc, sq, kc, sk, vc, sv
    vc, sv = _quantize(v, BLOCK_K, True, transposed=True)
    return qc, sq, kc, sk, vc, sv


def attend_quantized(qc, sq, kc, sk, vv, sv, scheme: str, out_dtype: torch.dtype) -> torch.Tensor:
    """The attention kernel on quantized operands (``quantize_operands``; Q and K codes contiguous ``[B, H, L, D]``);
    ``[B, Lq, H * D]`` in ``out_dtype``. ``vv``: the 16-bit ``[B, Lk, H, D]`` (int8-sage) or e4m3 codes as a
    ``[B, H, Lk, D]`` tensor of any strides (``[B, H, D, Lk]`` storage is the fast one on Hopper)."""
    qk_fp8, pv_fp8, v_channel = SCHEMES[scheme]
    b, h, lq, d = qc.shape
    lk = kc.shape[2]
    out = torch.empty((b, lq, h * d), dtype=out_dtype, device=qc.device)
    if pv_fp8:
        strides = (vv.stride(0), vv.stride(1), vv.stride(2), vv.stride(3))
    else:
        strides = (vv.stride(0), vv.stride(2), vv.stride(1), vv.stride(3))
    grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), h, b)  # noqa: E731
    _attn[grid](qc, sq, kc, sk, vv, vv if sv is None else sv, out, lq, lk, h, *strides, QK_FP8=qk_fp8,
                PV_FP8=pv_fp8, V_CHANNEL=v_channel, SOFT_P=not pv_fp8 and soft_rounding(vv.dtype),
                SOFT_FP8=interpreting(), SOFT_OUT=soft_rounding(out_dtype), D=d, QBLK=BLOCK_Q)
    return out


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown attention scheme '{scheme}' (kernels: {', '.join(SCHEMES)})")
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:] \
            or q.shape[-1] not in (64, 128) or k.shape[1] == 0:
        raise ValueError(f"quantized attention takes q [B, Lq, H, D], k and v [B, Lk >= 1, H, D] with D 64 or 128; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("quantized attention needs q, k, v with a contiguous last dimension")


@kernel_op("quant_attention")
def quant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scheme: str) -> torch.Tensor:
    """``scheme``'s quantized ``softmax(q k^T / sqrt(D)) v`` for ``q`` ``[B, Lq, H, D]``, ``k``, ``v``
    ``[B, Lk, H, D]`` (bf16 / fp16 / fp32, last dim contiguous); ``[B, Lq, H * D]`` in ``q``'s dtype."""
    _check(q, k, v, scheme)
    if q.shape[1] == 0:
        return q.new_empty((q.shape[0], 0, q.shape[2] * q.shape[3]))
    return attend_quantized(*quantize_operands(q, k, v, scheme), scheme, q.dtype)


@quant_attention.register_fake
def _(q, k, v, scheme):
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2] * q.shape[3]))
