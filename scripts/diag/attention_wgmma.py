"""Hopper (sm90) quantized self-attention in Gluon: the numerics of ``lightq.kernels.attention`` (and so of
``lightq.attention.numerics``) for ``int8-sage`` and ``int8fp8-sage2``, scheduled by hand.

Why a second kernel: Triton's compiler waits for every ``wgmma`` right after issuing it, so the softmax of a key
block never overlaps a tensor-core product (docs/BENCHMARKS.md "Quantized attention"). Here the products are
issued asynchronously and waited for explicitly, FlashAttention-3's intra-warpgroup pipelining:

    before the loop: S_0, its softmax P_0
    per key block j >= 1:
      issue S_j = Q K_j^T, then acc += P_{j-1} V_{j-1}     (tensor cores, back to back)
      wait for S_j; softmax of S_j: m, p = 2^(S_j s_q s_k - m), l   (under the P.V product)
      wait for the P.V product; acc *= 2^(m_old - m)
    after the loop: acc += P_last V_last

P goes through a double-buffered shared-memory tile (``P_SMEM``, the default): with P in registers ptxas moves
the second wait above the softmax's ``exp2`` (both variants are timed). K and V tiles stream through a ring of
``STAGES`` shared-memory buffers by ``cp.async``; at iteration j the buffer of block j - 2 is refilled (its product
was waited for in the previous iteration, and the CTA barrier orders every warpgroup's wait before the copy), so a
tile is requested ``STAGES - 2`` iterations before it is used. The int32 scores are converted to fp32 without
``I2F`` (a 16-per-clock instruction on sm90): for ``|x| < 2^22`` (``127 * 127 * 128 < 2^21``) the float with the
bits ``x + 0x4B400000`` is exactly ``1.5 * 2^23 + x``. Same math as ``_attn_kernel``: 64-key blocks with one K
scale each, Q scale per 128 queries, P rounded to V's type (bf16 / fp16) or to e4m3 as ``448 p``, fp32
accumulation; only the order of the fp32 additions of ``acc`` differs (the product accumulates into it).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

BLOCK_M = 128
BLOCK_N = 64
NUM_WARPS = 8
MAGIC = gl.constexpr(0x4B400000)  # the bits of 1.5 * 2^23
MAGIC_F = gl.constexpr(12582912.0)


@gluon.constexpr_function
def _copy_layout(rows, cols, elem_bytes, num_warps):
    """A blocked layout in which each thread copies 16 contiguous bytes of a ``[rows, cols]`` row-major tile."""
    vec = 16 // elem_bytes
    tcols = min(32, cols // vec)
    return gl.BlockedLayout([1, vec], [32 // tcols, tcols], [num_warps, 1], [1, 0])


@gluon.jit
def _load_tile(bufs, stage, base, row0, n_rows, row_stride, ROWS: gl.constexpr, COLS: gl.constexpr,
               layout: gl.constexpr, KEYS_IN_ROWS: gl.constexpr):
    """``cp.async`` of a ``[ROWS, COLS]`` tile at ``base + r * row_stride + c`` into ``bufs[stage]``; the key
    index is ``row0 + r`` (``KEYS_IN_ROWS``) or ``row0 + c``, and keys ``>= n_rows`` are zero-filled."""
    r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    c = gl.arange(0, COLS, layout=gl.SliceLayout(0, layout))
    if KEYS_IN_ROWS:
        offs = (row0 + r)[:, None].to(gl.int64) * row_stride + c[None, :]
        keys = (row0 + r)[:, None] + 0 * c[None, :]
    else:
        offs = r[:, None].to(gl.int64) * row_stride + (row0 + c)[None, :]
        keys = 0 * r[:, None] + (row0 + c)[None, :]
    cp.async_copy_global_to_shared(bufs.index(stage), base + offs, mask=keys < n_rows)


@gluon.jit
def _load_kv(k_bufs, v_bufs, stage, k_base, v_base, blk, Lk: gl.constexpr, stride_vrow, PV_FP8: gl.constexpr,
             D: gl.constexpr, BLOCK_N: gl.constexpr, k_cl: gl.constexpr, v_cl: gl.constexpr):
    """One commit group: key block ``blk``'s K tile and V tile into buffer ``stage``."""
    _load_tile(k_bufs, stage, k_base, blk * BLOCK_N, Lk, D, BLOCK_N, D, k_cl, True)
    if PV_FP8:
        _load_tile(v_bufs, stage, v_base, blk * BLOCK_N, Lk, stride_vrow, D, BLOCK_N, v_cl, False)
    else:
        _load_tile(v_bufs, stage, v_base, blk * BLOCK_N, Lk, stride_vrow, BLOCK_N, D, v_cl, True)
    cp.commit_group()


@gluon.jit
def _v_operand(v_bufs, stage, PV_FP8: gl.constexpr):
    """V as the ``[BLOCK_N, D]`` right operand of P.V: fp8 tiles are stored ``[D, BLOCK_N]`` (K-major)."""
    if PV_FP8:
        op = v_bufs.index(stage).permute((1, 0))
    else:
        op = v_bufs.index(stage)
    return op


@gluon.jit
def _softmax(s_raw, scale, j, m_i, l_i, cols, Lk: gl.constexpr, BLOCK_N: gl.constexpr, PV_FP8: gl.constexpr,
             p_layout: gl.constexpr, p_dtype: gl.constexpr, P_SMEM: gl.constexpr = False):
    """Online softmax of key block ``j``'s int32 scores: (rounded P as the product's left operand, the rescale
    factor of the accumulator, the new row maximum and row sum)."""
    f = (s_raw + MAGIC).to(gl.float32, bitcast=True) - MAGIC_F
    s = gl.where((j * BLOCK_N + cols)[None, :] < Lk, f * scale, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s - m_new[:, None])
    l_new = l_i * alpha + gl.sum(p, axis=1)
    if PV_FP8:
        pq = (p * 448.0).to(gl.float8e4nv)
    else:
        pq = p.to(p_dtype)
    if not P_SMEM:
        pq = gl.convert_layout(pq, p_layout)
    return pq, alpha, m_new, l_new


@gluon.jit
def _wgmma_attn_kernel(q_ptr, sq_ptr, k_ptr, sk_ptr, v_ptr, sv_ptr, o_ptr, Lq, Lk: gl.constexpr, H,
                       stride_vb, stride_vh, stride_vrow, PV_FP8: gl.constexpr, D: gl.constexpr,
                       QBLK: gl.constexpr, STAGES: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                       q_sl: gl.constexpr, k_sl: gl.constexpr, v_sl: gl.constexpr, P_SMEM: gl.constexpr,
                       p_sl: gl.constexpr, num_warps: gl.constexpr):
    pid_m, h, b = gl.program_id(0), gl.program_id(1), gl.program_id(2)
    bh = (b * H + h).to(gl.int64)
    n_blocks: gl.constexpr = (Lk + BLOCK_N - 1) // BLOCK_N
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, D, 32 if PV_FP8 else 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4 if PV_FP8 else 2)
    row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow_l: gl.constexpr = gl.SliceLayout(1, o_layout)
    ocol_l: gl.constexpr = gl.SliceLayout(0, o_layout)
    k_cl: gl.constexpr = _copy_layout(BLOCK_N, D, 1, num_warps)
    if PV_FP8:  # V^T codes [B, H, D, LP]: tiles [D, BLOCK_N], keys along the columns
        v_cl: gl.constexpr = _copy_layout(D, BLOCK_N, 1, num_warps)
    else:  # 16-bit V [B, Lk, H, D]: tiles [BLOCK_N, D]
        v_cl: gl.constexpr = _copy_layout(BLOCK_N, D, 2, num_warps)

    # Q codes [B, H, Lq, D] -> shared memory (rows past Lq are the next head's: computed, never stored)
    q_cl: gl.constexpr = _copy_layout(BLOCK_M, D, 1, num_warps)
    qr = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_cl))
    qc = gl.arange(0, D, layout=gl.SliceLayout(0, q_cl))
    q_rows = pid_m * BLOCK_M + qr
    q_offs = (bh * Lq + q_rows.to(gl.int64))[:, None] * D + qc[None, :]
    q = gl.load(q_ptr + q_offs, mask=(q_rows[:, None] + 0 * qc[None, :]) < Lq, other=0)
    q_smem = gl.allocate_shared_memory(q_ptr.dtype.element_ty, [BLOCK_M, D], q_sl, q)
    q_scale = gl.load(sq_ptr + bh * gl.cdiv(Lq, QBLK) + (pid_m * BLOCK_M) // QBLK)

    k_bufs = gl.allocate_shared_memory(k_ptr.dtype.element_ty, [STAGES, BLOCK_N, D], k_sl)
    if PV_FP8:
        v_bufs = gl.allocate_shared_memory(v_ptr.dtype.element_ty, [STAGES, D, BLOCK_N], v_sl)
    else:
        v_bufs = gl.allocate_shared_memory(v_ptr.dtype.element_ty, [STAGES, BLOCK_N, D], v_sl)
    k_base = k_ptr + bh * Lk * D
    v_base = v_ptr + b.to(gl.int64) * stride_vb + h.to(gl.int64) * stride_vh
    sk_row = sk_ptr + bh * n_blocks

    for i in gl.static_range(STAGES - 1):  # blocks 0 .. STAGES - 2 in flight
        _load_kv(k_bufs, v_bufs, i, k_base, v_base, i, Lk, stride_vrow, PV_FP8, D, BLOCK_N, k_cl, v_cl)
    cp.wait_group(STAGES - 2)
    fence_async_shared()
    gl.thread_barrier()

    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=s_layout)
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    s_tok = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s_raw = warpgroup_mma_wait(0, deps=(s_tok,))
    pq, alpha, m_i, l_i = _softmax(s_raw, q_scale * gl.load(sk_row), 0, gl.full([BLOCK_M], float("-inf"),
                                   gl.float32, layout=row_l), gl.zeros([BLOCK_M], gl.float32, layout=row_l),
                                   cols, Lk, BLOCK_N, PV_FP8, p_layout, v_ptr.dtype.element_ty, P_SMEM)
    if P_SMEM:
        p_bufs = gl.allocate_shared_memory(pq.dtype, [2, BLOCK_M, BLOCK_N], p_sl)
        p_bufs.index(0).store(pq)
        fence_async_shared()
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout)
    for j in range(1, n_blocks):
        # block j has landed (every thread's copies); block j - 2's buffers are free (retired last iteration)
        cp.wait_group(STAGES - 3)
        fence_async_shared()
        gl.thread_barrier()
        _load_kv(k_bufs, v_bufs, (j + STAGES - 2) % STAGES, k_base, v_base, j + STAGES - 2, Lk, stride_vrow,
                 PV_FP8, D, BLOCK_N, k_cl, v_cl)
        sk_j = gl.load(sk_row + j)
        s_tok = warpgroup_mma(q_smem, k_bufs.index(j % STAGES).permute((1, 0)), s_zero, use_acc=False,
                              is_async=True)
        if P_SMEM:
            acc_tok = warpgroup_mma(p_bufs.index((j - 1) % 2), _v_operand(v_bufs, (j - 1) % STAGES, PV_FP8), acc,
                                    is_async=True)
        else:
            acc_tok = warpgroup_mma(pq, _v_operand(v_bufs, (j - 1) % STAGES, PV_FP8), acc, is_async=True)
        s_raw = warpgroup_mma_wait(1, deps=(s_tok,))  # S_j done; P_{j-1} V_{j-1} still runs under the softmax
        pq, alpha, m_i, l_i = _softmax(s_raw, q_scale * sk_j, j, m_i, l_i, cols, Lk, BLOCK_N, PV_FP8, p_layout,
                                       v_ptr.dtype.element_ty, P_SMEM)
        if P_SMEM:
            p_bufs.index(j % 2).store(pq)
            fence_async_shared()
        # l (the sum of every p) passes through the wait, so the softmax is scheduled before it, under the product
        acc, l_i = warpgroup_mma_wait(0, deps=(acc_tok, l_i))
        acc = acc * gl.convert_layout(alpha, orow_l)[:, None]
    if P_SMEM:
        gl.thread_barrier()
        acc = warpgroup_mma(p_bufs.index((n_blocks - 1) % 2), _v_operand(v_bufs, (n_blocks - 1) % STAGES, PV_FP8),
                            acc)
    else:
        acc = warpgroup_mma(pq, _v_operand(v_bufs, (n_blocks - 1) % STAGES, PV_FP8), acc)
    cp.wait_group(0)

    l_o = gl.convert_layout(l_i, orow_l)
    d_idx = gl.arange(0, D, layout=ocol_l)
    if PV_FP8:
        out = acc / (l_o * 448.0)[:, None] * gl.load(sv_ptr + bh * D + d_idx)[None, :]
    else:
        out = acc / l_o[:, None]
    rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=orow_l)
    o_offs = ((b.to(gl.int64) * Lq + rows.to(gl.int64)) * H + h)[:, None] * D + d_idx[None, :]
    gl.store(o_ptr + o_offs, out.to(o_ptr.dtype.element_ty), mask=(rows[:, None] + 0 * d_idx[None, :]) < Lq)


def shared_layouts(q_dtype, v_dtype, pv_fp8: bool, d: int):
    """The NVMMA shared layouts of the Q, K and V tiles (host side, passed as constexprs)."""
    q_sl = gl.NVMMASharedLayout.get_default_for([BLOCK_M, d], q_dtype)
    k_sl = gl.NVMMASharedLayout.get_default_for([BLOCK_N, d], q_dtype)
    v_shape = [d, BLOCK_N] if pv_fp8 else [BLOCK_N, d]
    v_sl = gl.NVMMASharedLayout.get_default_for(v_shape, v_dtype)
    return q_sl, k_sl, v_sl


def launch(qc, sq, kc, sk, vv, sv, out, pv_fp8: bool, stages: int = 4, p_smem: bool = True):
    """Run the kernel on ``lightq.kernels.attention.quantize_operands``' outputs (int8 Q/K; V 16-bit
    ``[B, Lk, H, D]`` or e4m3 codes viewed ``[B, H, Lk, D]`` over ``[B, H, D, LP]`` storage) into ``out``
    ``[B, Lq, H * D]``."""
    b, h, lq, d = qc.shape
    lk = kc.shape[2]
    if pv_fp8:
        assert vv.stride(2) == 1, "fp8 V must be stored [B, H, D, LP]"
        strides = (vv.stride(0), vv.stride(1), vv.stride(3))
        vdt = gl.float8e4nv
    else:
        assert vv.stride(3) == 1
        strides = (vv.stride(0), vv.stride(2), vv.stride(1))
        vdt = gl.bfloat16 if vv.dtype == torch.bfloat16 else gl.float16
    q_sl, k_sl, v_sl = shared_layouts(gl.int8, vdt, pv_fp8, d)
    grid = (triton.cdiv(lq, BLOCK_M), h, b)
    _wgmma_attn_kernel[grid](qc, sq, kc, sk, vv, vv if sv is None else sv, out, lq, lk, h, *strides,
                             PV_FP8=pv_fp8, D=d, QBLK=128, STAGES=stages, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                             q_sl=q_sl, k_sl=k_sl, v_sl=v_sl, P_SMEM=p_smem,
                             p_sl=gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], gl.float8e4nv if pv_fp8
                                                                       else vdt), num_warps=NUM_WARPS)
    return out
