"""Leaner variants of lightq's quantized attention kernel (issue 14), timed against cuDNN bf16 attention.

What each switch removes from the per-score work of ``lightq.kernels.attention._attn_kernel``:

- ``MAGIC``: the int32 -> fp32 conversion of the int8 Q.K product (``I2F``, a 16-per-clock-per-SM instruction on
  sm90, as slow as the ``exp2`` itself) becomes an integer add and an fp32 subtraction: for ``|x| < 2^22`` the
  float with bits ``x + 0x4B400000`` is exactly ``1.5 * 2^23 + x``.
- ``ACC_DOT``: ``acc = dot(P, V, acc * alpha)`` accumulates in the tensor-core product instead of a separate
  ``P.V`` tile added afterwards (one fp32 tile of registers less).
- ``BLOCK_N = 128``: 128-key tiles (two K scales per tile), so the row max / sum and the rescale of ``acc``
  are paid once per 128 keys. This changes where P is rounded (the running maximum moves per tile), so it is a
  numerics change of the reference, not only of the kernel.

Issuing the next block's ``Q.K`` before this block's softmax (FlashAttention-3's order) cannot be written in
Triton 3.6: a variant of this kernel that carried the next block's raw scores through the loop, compiled for sm90,
waited for that product right after issuing it (seen in its SASS; the variant is not kept). That is why
``attention_wgmma.py`` (Gluon, explicit waits) exists.

Run on the GPU machine: ``python scripts/diag/attention_lean.py OUT.json [--sass]``; with ``--sass`` (any machine
with Triton, no GPU needed) it compiles each variant for sm90 and prints registers, spills and the count of
conversion / exp2 instructions instead."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import triton
import triton.language as tl

from lightq.kernels import attention as A


@triton.jit
def _raw_scores(q, k, QK_FP8: tl.constexpr):
    if QK_FP8:
        return tl.dot(q, k)
    return tl.dot(q, k, out_dtype=tl.int32)


@triton.jit
def _as_float(raw, QK_FP8: tl.constexpr, MAGIC: tl.constexpr):
    if QK_FP8:
        return raw
    if MAGIC:
        return (raw + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    return raw.to(tl.float32)


@triton.jit
def _lean(q_ptr, sq_ptr, k_ptr, sk_ptr, v_ptr, sv_ptr, o_ptr, Lq, Lk: tl.constexpr, H,
          stride_vb, stride_vh, stride_vl, stride_vd, QK_FP8: tl.constexpr, PV_FP8: tl.constexpr,
          V_CHANNEL: tl.constexpr, MAGIC: tl.constexpr, ACC_DOT: tl.constexpr, D: tl.constexpr,
          QBLK: tl.constexpr, KBLK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh = (b * H + h).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < Lq
    q = tl.load(q_ptr + (bh * Lq + offs_m.to(tl.int64))[:, None] * D + offs_d[None, :], mask=row_ok[:, None],
                other=0.0)
    q_scale = tl.load(sq_ptr + bh * tl.cdiv(Lq, QBLK) + offs_m // QBLK, mask=row_ok, other=1.0)
    nkb: tl.constexpr = (Lk + KBLK - 1) // KBLK
    k_ptrs = k_ptr + bh * Lk * D + offs_n[None, :] * D + offs_d[:, None]
    v_ptrs = v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh + offs_n.to(tl.int64)[:, None] * stride_vl \
        + offs_d[None, :] * stride_vd
    sk_row = sk_ptr + bh * nkb
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    n_blocks: tl.constexpr = (Lk + BLOCK_N - 1) // BLOCK_N
    for j in range(0, n_blocks):
        key = j * BLOCK_N + offs_n
        key_ok = key < Lk
        k = tl.load(k_ptrs, mask=key_ok[None, :], other=0.0)
        f = _as_float(_raw_scores(q, k, QK_FP8), QK_FP8, MAGIC)
        if BLOCK_N == KBLK:
            s = f * (q_scale * tl.load(sk_row + j))[:, None]
        else:
            s = f * q_scale[:, None] * tl.load(sk_row + key // KBLK, mask=key_ok, other=1.0)[None, :]
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
        if PV_FP8:
            pq = (p * 448.0).to(tl.float8e4nv)
        else:
            pq = p.to(v_ptr.dtype.element_ty)
        if ACC_DOT:
            acc = tl.dot(pq, v, acc * alpha[:, None])
        else:
            pv = tl.dot(pq, v)
            if PV_FP8 and not V_CHANNEL:
                pv = pv * tl.load(sv_ptr + bh * nkb + j)
            acc = acc * alpha[:, None] + pv
        m_i = m_new
        k_ptrs += BLOCK_N * D
        v_ptrs += BLOCK_N * stride_vl
    if PV_FP8:
        out = acc / (l_i * 448.0)[:, None]
        if V_CHANNEL:
            out = out * tl.load(sv_ptr + bh * D + offs_d)[None, :]
    else:
        out = acc / l_i[:, None]
    o_ptrs = o_ptr + ((b.to(tl.int64) * Lq + offs_m.to(tl.int64)) * H + h)[:, None] * D + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


SCHEMES = ("int8-sage", "int8fp8-sage2")
VARIANTS = [dict(MAGIC=mg, ACC_DOT=ad, BLOCK_N=bn)
            for mg, ad, bn in ((False, False, 64), (True, False, 64), (True, True, 64), (True, True, 128))]
CONFIGS = ((128, 8, 2), (128, 8, 3), (64, 4, 3))


def _strides(vv, pv_fp8):
    if pv_fp8:
        return (vv.stride(0), vv.stride(1), vv.stride(2), vv.stride(3))
    return (vv.stride(0), vv.stride(2), vv.stride(1), vv.stride(3))


def launch(ops, scheme, var, bm, warps, stages):
    qc, sq, kc, sk, vv, sv = ops
    qk_fp8, pv_fp8, vch = A.SCHEMES[scheme]
    b, h, lq, d = qc.shape
    lk = kc.shape[2]
    out = torch.empty((b, lq, h * d), dtype=torch.bfloat16, device=qc.device)
    grid = (triton.cdiv(lq, bm), h, b)

    def f():
        _lean[grid](qc, sq, kc, sk, vv, vv if sv is None else sv, out, lq, lk, h, *_strides(vv, pv_fp8),
                    QK_FP8=qk_fp8, PV_FP8=pv_fp8, V_CHANNEL=vch, D=d, QBLK=A.BLOCK_Q, KBLK=A.BLOCK_K,
                    BLOCK_M=bm, num_warps=warps, num_stages=stages, **var)
    f()
    return out, f


def sass_report(configs=CONFIGS):
    """Compile every variant for sm90 (no GPU needed) and count what each score costs."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.tools.disasm import get_sass
    import os
    import re
    import subprocess
    import tempfile
    target = GPUTarget("cuda", 90, 32)
    for scheme in SCHEMES:
        qk_fp8, pv_fp8, vch = A.SCHEMES[scheme]
        lq = lk = 32760
        h, d = 40, 128
        lp = triton.cdiv(lk, A.ROW_ALIGN) * A.ROW_ALIGN
        strides = (h * d * lp, d * lp, 1, lp) if pv_fp8 else (lk * h * d, d, h * d, 1)
        ints = dict(Lq=lq, H=h, **dict(zip(("stride_vb", "stride_vh", "stride_vl", "stride_vd"), strides)))
        for var in VARIANTS:
            for bm, warps, stages in configs:
                # what Triton's launcher specializes on: 16-byte aligned pointers, ints equal to 1 or divisible by 16
                sig = {"q_ptr": "*fp8e4nv" if qk_fp8 else "*i8", "sq_ptr": "*fp32", "k_ptr": "*fp8e4nv" if qk_fp8
                       else "*i8", "sk_ptr": "*fp32", "v_ptr": "*fp8e4nv" if pv_fp8 else "*bf16", "sv_ptr": "*fp32",
                       "o_ptr": "*bf16"}
                const = dict(Lk=lk, QK_FP8=qk_fp8, PV_FP8=pv_fp8, V_CHANNEL=vch, D=d, QBLK=128, KBLK=64,
                             BLOCK_M=bm, **var)
                for name, value in ints.items():
                    if value == 1:
                        const[name] = 1
                    sig[name] = "i32"
                order = _lean.arg_names
                attrs = {(order.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
                         if t.startswith("*") or (n in ints and ints[n] % 16 == 0 and ints[n] != 1)}
                sig = {n: sig.get(n, "constexpr") if n not in const else "constexpr" for n in order}
                try:
                    k = triton.compile(ASTSource(_lean, sig, const, attrs), target=target,
                                       options=dict(num_warps=warps, num_stages=stages))
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(scheme, var, bm, warps, stages, "FAIL", repr(e)[:300], flush=True)
                    continue
                sass = get_sass(k.asm["cubin"])
                with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
                    fh.write(k.asm["cubin"])
                    fh.flush()
                    usage = subprocess.run([os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                                         "cuobjdump"), "-res-usage", fh.name],
                                           capture_output=True, text=True).stdout
                regs = re.search(r"REG:(\d+)", usage)
                ops = {name: len(re.findall(pat, sass)) for name, pat in
                       (("I2F", r"\bI2F"), ("MUFU.EX2", r"MUFU\.EX2"), ("F2FP", r"\bF2FP"), ("F2F", r"\bF2F\b"),
                        ("HGMMA", r"\bHGMMA"), ("IGMMA", r"\bIGMMA"), ("QGMMA", r"\bQGMMA"), ("STS", r"\bSTS"),
                        ("LDS", r"\bLDS"), ("LDG.U8", r"LDG\.E\.U8"), ("LDGSTS", r"\bLDGSTS"), ("UTMALDG", r"UTMALDG"), ("STL", r"\bSTL"), ("LDL", r"\bLDL"), ("BAR", r"\bBAR"), ("FFMA", r"\bFFMA"), ("FMUL", r"\bFMUL"),
                        ("FADD", r"\bFADD"))}
                print(f"{scheme:14s} {var} bm={bm} w={warps} st={stages}: regs {regs.group(1) if regs else '?'} "
                      f"smem {k.metadata.shared} {ops}", flush=True)


def main(path):
    from triton.testing import do_bench
    from torch.nn.attention import SDPBackend
    from lightq.attention.inputs import wan_like_qkv
    from lightq.attention.numerics import errors
    from lightq.bench.attention import exact_rows, sdpa_with
    res = []
    for tokens in (32760, 75600):
        q, k, v = wan_like_qkv(1, tokens, 40, 128, device="cuda")
        rows = torch.randperm(tokens, device="cuda")[:256]
        ref = exact_rows(q, k, v, rows)
        cud = sdpa_with(SDPBackend.CUDNN_ATTENTION)
        t_cud = do_bench(lambda: cud(q, k, v), warmup=5, rep=200)
        for scheme in SCHEMES:
            t_cur = do_bench(lambda: A.quant_attention(q, k, v, scheme), warmup=5, rep=200)
            ops = A.quantize_operands(q, k, v, scheme)
            t_q = do_bench(lambda: A.quantize_operands(q, k, v, scheme), warmup=5, rep=200)
            print(f"{tokens} {scheme}: cuDNN {t_cud:.2f} ms, shipped {t_cur:.2f} ms ({t_cud / t_cur:.2f}x), "
                  f"quantize {t_q:.2f} ms", flush=True)
            if scheme in ("int8-sage", "int8fp8-sage2"):
                import attention_wgmma as W  # scripts/diag/, beside this file
                pv_fp8 = scheme != "int8-sage"
                ref_out = A.attend_quantized(*ops, scheme, torch.bfloat16)
                for stages, p_smem in ((4, True), (5, True), (4, False), (3, True)):
                    try:
                        out = torch.empty_like(ref_out)
                        g = lambda: W.launch(*ops, out, pv_fp8, stages, p_smem)  # noqa: E731
                        g()
                        torch.cuda.synchronize()
                        t = do_bench(g, warmup=3, rep=100)
                    except Exception as e:  # noqa: BLE001
                        print("gluon fail", scheme, stages, p_smem, repr(e)[:2000], flush=True)
                        continue
                    err = errors(out[:, rows], ref)
                    r = dict(tokens=tokens, scheme=scheme, kernel="gluon-wgmma", stages=stages, p_smem=p_smem, attn_ms=t,
                             quant_ms=t_q, total_ms=t + t_q, cudnn_ms=t_cud, shipped_ms=t_cur,
                             vs_cudnn=t_cud / (t + t_q),
                             cos=err["cosine"], rel=err["rel_l2"],
                             max_vs_shipped=(out.float() - ref_out.float()).abs().max().item(),
                             rel_vs_shipped=((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item())
                    res.append(r)
                    print(r, flush=True)
            if "--gluon-only" in sys.argv:
                continue
            for var in VARIANTS:
                best = None
                for bm, w, st in CONFIGS:
                    try:
                        out, f = launch(ops, scheme, var, bm, w, st)
                        t = do_bench(f, warmup=3, rep=100)
                    except Exception as e:  # noqa: BLE001 - a config that does not compile or fit is skipped
                        print("fail", scheme, var, bm, w, st, repr(e)[:160], flush=True)
                        continue
                    if best is None or t < best[0]:
                        err = errors(out[:, rows], ref)
                        best = (t, (bm, w, st), err["cosine"], err["rel_l2"])
                if best:
                    r = dict(tokens=tokens, scheme=scheme, **var, attn_ms=best[0], quant_ms=t_q,
                             total_ms=best[0] + t_q, cudnn_ms=t_cud, shipped_ms=t_cur,
                             vs_cudnn=t_cud / (best[0] + t_q), cfg=best[1], cos=best[2], rel=best[3])
                    res.append(r)
                    print(r, flush=True)
                    with open(path, "w") as fh:
                        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    if "--sass" in sys.argv:
        picked = [tuple(int(x) for x in a.split(",")) for a in sys.argv[2:]]
        sass_report(picked or CONFIGS)
    else:
        main(sys.argv[1])  # [--gluon-only]
