"""Quantized self-attention numerics: the portable torch reference, the oracle every attention kernel is checked
against, and the error bound each scheme guarantees against exact (float64) attention.

Inputs ``q`` ``[B, Lq, H, D]``, ``k`` / ``v`` ``[B, Lk, H, D]`` (bf16 / fp16 / fp32, any token count, no mask);
output ``softmax(q k^T / sqrt(D)) v`` as ``[B, Lq, H * D]`` in ``q``'s dtype (the seam's contract,
``lightq.models.attention``). Every scheme computes, per batch and head, in fp32:

    c  = log2(e) / sqrt(D)                  scores in base 2: softmax(q k^T / sqrt(D)) = 2^(S - max) / sum
    k' = k - mean_tokens(k)                 K smoothing, per channel. Exact: it shifts every score of a query row
                                            by q . mean(k), and softmax is invariant to a per-row shift
    Q  = quant(c q)   per block of BLOCK_Q = 128 consecutive queries     scale s = amax(block) / qmax
    K  = quant(k')    per block of BLOCK_K = 64 consecutive keys         (1 where amax is 0)
    S  = (Q K^T) (s_q s_k)                  int8: the integer dot product is exact in fp32 (|sum| < 2^24)
    online softmax over the key blocks of BLOCK_K keys, as a flash-attention kernel runs it:
        m_j = max(m_{j-1}, rowmax S_j),  p = 2^(S_j - m_j),  a = 2^(m_{j-1} - m_j)
        l   = a l + rowsum p             (p unrounded)
        acc = a acc + round(p) V_j
    out = acc / l

``quant`` is int8 ``clamp(rint(x / s), -127, 127)`` (round half to even) or fp8 e4m3 ``RNE(x / s)``, the rounding
of ``lightq.quant.schemes``. The schemes differ in the formats of Q/K and of the P.V product:

``int8-sage``      SageAttention (1): int8 Q, K; P rounded to the 16-bit input type (fp16 for fp16 inputs, else
                   bf16) and multiplied with V in that type, fp32 accumulation.
``int8fp8-sage2``  SageAttention2's int8 Q.K + fp8 P.V: V in fp8 e4m3 with one scale per (batch, head, channel),
                   amax over all tokens / 448; P~ = 448 p rounded to e4m3 (p <= 1, so 448 maps the running row
                   maximum to e4m3's largest value); out = acc s_v / (448 l).
``fp8-fa3``        FlashAttention-3 FP8 style: fp8 e4m3 Q, K (the blocks above) and V, one V scale per block of
                   BLOCK_K keys per head; P~ as in sage2; out = (sum_j s_vj P~_j V_j) / (448 l).

Error bound against float64 attention (``error_bound``), elementwise, derived from the formats. With ``eps`` the
largest score error of a query row (log2 units) from quantizing Q and K,
``|dS_ij| <= (s_qi/2)|k'_j|_1 + (s_kj/2)|c q_i|_1 + D s_qi s_kj / 4`` for int8 (half a step each, and the cross
term), ``2^-4 (|Q||K|_1 terms)`` relative plus the subnormal half-step for fp8, the softmax weights move by a factor
within ``2^(+-2 eps)``, so with ``A = softmax(S) |V|`` (the attention of |V|):

    |out - exact| <= (2^(2 eps) - 1) A + 2^(2 eps) (u_p (A + A_dv) + A_dv) + a_p sum_j |V~_j| + u_out |out| + 1e-5 A

where ``u_p`` is P's unit roundoff (bf16 2^-8, fp16 2^-11, e4m3 2^-4), ``a_p`` P's subnormal half-step in p units
(e4m3: 2^-10 / 448; l >= 1 because the row's maximum contributes 1), ``A_dv = softmax(S) |V~ - V|`` with
``|V~ - V| <= 2^-4 |V| + 2^-10 s_v`` (e4m3), ``u_out`` the output type's roundoff, and 1e-5 A covers fp32
arithmetic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import LightqError
from ..quant.schemes import FP8_DTYPE, FP8_MAX, INT8_MAX, safe_scale

BLOCK_Q = 128
BLOCK_K = 64
LOG2E = 1.4426950408889634

# scheme -> (Q/K format, P.V format, V scale granularity)
SCHEMES: dict[str, tuple[str, str, str | None]] = {
    "int8-sage": ("int8", "half", None),
    "int8fp8-sage2": ("int8", "fp8", "channel"),
    "fp8-fa3": ("fp8", "fp8", "block"),
}
HEAD_DIMS = (64, 128)  # what the kernels tile (powers of two that tensor cores take); Wan uses 128 (64 in tiny)

UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, FP8_DTYPE: 2.0 ** -4, torch.float32: 2.0 ** -24}


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scheme: str) -> None:
    """One clear error for inputs no scheme takes (unknown scheme, bad shapes or dtypes, empty keys)."""
    if scheme not in SCHEMES:
        raise LightqError(f"unknown attention scheme '{scheme}': choose one of {', '.join(SCHEMES)}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] \
            or q.shape[2:] != k.shape[2:]:
        raise LightqError(f"attention inputs must be q [B, Lq, H, D] and k, v [B, Lk, H, D]; got q {tuple(q.shape)}, "
                          f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise LightqError(f"attention inputs must share one dtype of bf16 / fp16 / fp32, got {q.dtype}, {k.dtype}, "
                          f"{v.dtype}")
    if k.shape[1] == 0 or q.shape[1] == 0:
        raise LightqError(f"attention needs at least one query and one key, got Lq={q.shape[1]}, Lk={k.shape[1]}")
    if q.shape[-1] not in HEAD_DIMS:
        raise LightqError(f"quantized attention '{scheme}' takes head_dim {' or '.join(map(str, HEAD_DIMS))}, "
                          f"got {q.shape[-1]}: use attn_quant=none")


def half_dtype(dtype: torch.dtype) -> torch.dtype:
    """The 16-bit type of int8-sage's P.V product: fp16 for fp16 inputs, bf16 otherwise."""
    return torch.float16 if dtype == torch.float16 else torch.bfloat16


def _encode(x: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "int8":
        return torch.round(x).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _qmax(fmt: str) -> float:
    return INT8_MAX if fmt == "int8" else FP8_MAX


def quantize_blocks(x: torch.Tensor, block: int, fmt: str, mean: torch.Tensor | None = None,
                    mul: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[B, L, H, D]`` -> codes ``[B, H, L, D]`` (int8 / e4m3) and scales ``[B, H, ceil(L / block)]`` fp32, of
    ``(x - mean) * mul`` in fp32 (``mean`` ``[B, 1, H, D]``), one scale per block of ``block`` consecutive tokens."""
    xf = x.float()
    if mean is not None:
        xf = xf - mean
    if mul is not None:
        xf = xf * mul
    xf = xf.transpose(1, 2)
    b, h, n, d = xf.shape
    nb = -(-n // block)
    blocks = F.pad(xf, (0, 0, 0, nb * block - n)).view(b, h, nb, block, d)  # zero padding leaves amax alone
    scale = safe_scale(blocks.abs().amax(dim=(-1, -2)), _qmax(fmt))
    codes = _encode(blocks / scale[..., None, None], fmt)
    return codes.view(b, h, nb * block, d)[:, :, :n], scale


def key_mean(k: torch.Tensor) -> torch.Tensor:
    """``mean_tokens(k)`` in fp32, ``[B, 1, H, D]`` (the kernels' wrappers use this same op)."""
    return k.float().mean(dim=1, keepdim=True)


def value_channel_scale(v: torch.Tensor) -> torch.Tensor:
    """sage2's V scales: ``amax over tokens of |v| / 448`` per (batch, head, channel), ``[B, H, D]`` fp32."""
    return safe_scale(v.float().abs().amax(dim=1), FP8_MAX)


def quantize_values_per_channel(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 codes ``[B, H, L, D]`` of ``v / scale`` (``scale`` ``[B, H, D]``)."""
    return _encode(v.float().transpose(1, 2) / scale[:, :, None, :], "fp8")


def quantize_inputs(q, k, v, scheme: str):
    """The quantized operands of ``scheme``: (Q codes, Q scales, K codes, K scales, V operand, V scales or None).

    V is ``[B, H, Lk, D]``: the 16-bit input (int8-sage) or e4m3 codes; V scales ``[B, H, D]`` (channel) or
    ``[B, H, ceil(Lk / BLOCK_K)]`` (block)."""
    qk_fmt, pv, v_gran = SCHEMES[scheme]
    c = LOG2E / math.sqrt(q.shape[-1])
    qc, sq = quantize_blocks(q, BLOCK_Q, qk_fmt, mul=c)
    kc, sk = quantize_blocks(k, BLOCK_K, qk_fmt, mean=key_mean(k))
    if v_gran is None:
        return qc, sq, kc, sk, v.to(half_dtype(q.dtype)).transpose(1, 2), None
    if v_gran == "channel":
        sv = value_channel_scale(v)
        return qc, sq, kc, sk, quantize_values_per_channel(v, sv), sv
    vc, sv = quantize_blocks(v, BLOCK_K, "fp8")
    return qc, sq, kc, sk, vc, sv


def attend(qc, sq, kc, sk, vv, sv, scheme: str, out_dtype: torch.dtype) -> torch.Tensor:
    """The online softmax over key blocks of BLOCK_K keys (module docstring) on quantized operands (as
    ``quantize_inputs`` returns them); ``[B, Lq, H * D]`` in ``out_dtype``."""
    _, pv, v_gran = SCHEMES[scheme]
    b, h, lq, d = qc.shape
    lk = kc.shape[2]
    qf = qc.float()
    row_sq = sq.repeat_interleave(BLOCK_Q, dim=2)[:, :, :lq, None]
    m = torch.full((b, h, lq, 1), -math.inf, device=qc.device)
    l = torch.zeros((b, h, lq, 1), device=qc.device)
    acc = torch.zeros((b, h, lq, d), device=qc.device)
    for start in range(0, lk, BLOCK_K):
        stop = min(start + BLOCK_K, lk)
        key_scale = sk[:, :, start // BLOCK_K, None, None]  # one scale per key block
        s = (qf @ kc[:, :, start:stop].float().transpose(-1, -2)) * (row_sq * key_scale)
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        p = torch.exp2(s - m_new)
        alpha = torch.exp2(m - m_new)
        l = l * alpha + p.sum(dim=-1, keepdim=True)
        if pv == "half":
            pv_block = p.to(vv.dtype).float() @ vv[:, :, start:stop].float()
        else:
            pv_block = (p * FP8_MAX).to(FP8_DTYPE).float() @ vv[:, :, start:stop].float()
            if v_gran == "block":
                pv_block = pv_block * sv[:, :, start // BLOCK_K, None, None]
        acc = acc * alpha + pv_block
        m = m_new
    if pv == "half":
        out = acc / l
    elif v_gran == "channel":
        out = acc / (l * FP8_MAX) * sv[:, :, None, :]
    else:
        out = acc / (l * FP8_MAX)
    return out.transpose(1, 2).flatten(2).to(out_dtype)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scheme: str) -> torch.Tensor:
    """``scheme``'s quantized attention in torch (any device); ``[B, Lq, H * D]`` in ``q``'s dtype."""
    check_inputs(q, k, v, scheme)
    return attend(*quantize_inputs(q, k, v, scheme), scheme, q.dtype)


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v in float64, ``[B, Lq, H * D]`` (the oracle's oracle)."""
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(qd @ kd.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (w @ vd).transpose(1, 2).flatten(2)


def errors(out: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    """Cosine similarity and relative L2 error of ``out`` against ``exact`` (flattened, in float64)."""
    o, e = out.double().flatten(), exact.double().flatten()
    return {"cosine": float(F.cosine_similarity(o, e, dim=0)), "rel_l2": float((o - e).norm() / e.norm())}


def _score_error(q, k, scheme: str) -> torch.Tensor:
    """Largest |dS| per query row (log2 units) from quantizing Q and K, ``[B, H, Lq, 1]`` (module docstring)."""
    qk_fmt = SCHEMES[scheme][0]
    c = LOG2E / math.sqrt(q.shape[-1])
    _, sq = quantize_blocks(q, BLOCK_Q, qk_fmt, mul=c)
    _, sk = quantize_blocks(k, BLOCK_K, qk_fmt, mean=key_mean(k))
    qs = (q.double() * c).transpose(1, 2)
    ks = (k.double() - key_mean(k).double()).transpose(1, 2)
    lq, lk = qs.shape[2], ks.shape[2]
    sqr = sq.double().repeat_interleave(BLOCK_Q, dim=2)[:, :, :lq, None]
    skr = sk.double().repeat_interleave(BLOCK_K, dim=2)[:, :, None, :lk]
    q1, k1 = qs.abs().sum(-1, keepdim=True), ks.abs().sum(-1)[:, :, None, :]
    if qk_fmt == "int8":
        err = sqr / 2 * k1 + skr / 2 * q1 + q.shape[-1] * sqr * skr / 4
    else:  # e4m3: |dx| <= 2^-4 |x| + 2^-10 s per element, for both factors
        u, a = 2.0 ** -4, 2.0 ** -10
        qa, ka = qs.abs(), ks.abs()
        dq_k = u * (qa @ ka.transpose(-1, -2)) + a * sqr * k1
        dk_q = u * (qa @ ka.transpose(-1, -2)) + a * skr * q1
        err = dq_k + dk_q + (u * qa + a * sqr) @ (u * ka + a * skr.transpose(-1, -2).expand_as(ka)).transpose(-1, -2)
    return err.amax(dim=-1, keepdim=True)


def error_bound(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scheme: str, out_dtype: torch.dtype) -> torch.Tensor:
    """The elementwise bound on ``|reference_attention - exact_attention|`` (module docstring), ``[B, Lq, H * D]``
    float64. Small shapes only: it forms every score."""
    _, pv, v_gran = SCHEMES[scheme]
    eps = _score_error(q, k, scheme)
    qd, kd = (t.double().transpose(1, 2) for t in (q, k))
    w = torch.softmax(qd @ kd.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    vd = v.double().transpose(1, 2)
    if pv == "half":
        dv = (vd - v.to(half_dtype(q.dtype)).double().transpose(1, 2)).abs()
        u_p, a_p = UNIT_ROUNDOFF[half_dtype(q.dtype)], 0.0
    else:
        if v_gran == "channel":
            sv = value_channel_scale(v).double()[:, :, None, :]
        else:
            _, svb = quantize_blocks(v, BLOCK_K, "fp8")
            sv = svb.double().repeat_interleave(BLOCK_K, dim=2)[:, :, :vd.shape[2], None]
        dv = 2.0 ** -4 * vd.abs() + 2.0 ** -10 * sv
        u_p, a_p = 2.0 ** -4, 2.0 ** -10 / FP8_MAX
    a_v, a_dv = w @ vd.abs(), w @ dv
    grow = torch.exp2(2 * eps)
    exact = (w @ vd)
    sum_v = (vd.abs() + dv).sum(dim=-2, keepdim=True)
    bound = (grow - 1) * a_v + grow * (u_p * (a_v + a_dv) + a_dv) + a_p * sum_v \
        + UNIT_ROUNDOFF[out_dtype] * (exact.abs() + (grow - 1) * a_v + a_dv) + 1e-5 * a_v
    return bound.transpose(1, 2).flatten(2)
