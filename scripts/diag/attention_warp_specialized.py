"""Experiment (issue 14): lightq's int8-sage attention kernel with on-device TMA descriptors and Triton's
warp-specialized key loop (tl.range(warp_specialize=True)), timed against cuDNN bf16 and the shipped kernel.
L a multiple of 64 (no masked tail) for the experiment."""
import math, sys, json, time
import torch, triton, triton.language as tl

@triton.jit
def _ws_kernel(q_ptr, sq_ptr, k_ptr, sk_ptr, v_ptr, o_ptr, L, H, D: tl.constexpr, QBLK: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr):
    pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh = b * H + h
    q_desc = tl.make_tensor_descriptor(q_ptr, shape=[H * L * 1, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    k_desc = tl.make_tensor_descriptor(k_ptr, shape=[H * L, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    v_desc = tl.make_tensor_descriptor(v_ptr, shape=[H * L, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    row0 = bh * L + pid_m * BLOCK_M
    q = q_desc.load([row0, 0])
    q_scale = tl.load(sq_ptr + bh * tl.cdiv(L, QBLK) + pid_m)  # BLOCK_M == QBLK: one Q scale per program
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    n_blocks = L // BLOCK_N
    for j in tl.range(0, n_blocks, warp_specialize=WS):
        k = k_desc.load([bh * L + j * BLOCK_N, 0])
        qk = tl.dot(q, k.T, out_dtype=tl.int32).to(tl.float32)
        s = qk * (q_scale * tl.load(sk_ptr + bh * n_blocks + j))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = v_desc.load([bh * L + j * BLOCK_N, 0])
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), v)
        m_i = m_new
    out = acc / l_i[:, None]
    o_desc = tl.make_tensor_descriptor(o_ptr, shape=[L, H * D], strides=[H * D, 1], block_shape=[BLOCK_M, D])
    o_desc.store([pid_m * BLOCK_M, h * D], out.to(tl.bfloat16))


def compile_only():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    for ws in (False, True):
        src = ASTSource(_ws_kernel, {"q_ptr": "*i8", "sq_ptr": "*fp32", "k_ptr": "*i8", "sk_ptr": "*fp32",
                                     "v_ptr": "*bf16", "o_ptr": "*bf16", "L": "i32", "H": "i32", "D": "constexpr",
                                     "QBLK": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                                     "WS": "constexpr"},
                        {"D": 128, "QBLK": 128, "BLOCK_M": 128, "BLOCK_N": 64, "WS": ws})
        t = time.time()
        k = triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": 4, "num_stages": 2})
        print("ws", ws, "compiled", round(time.time() - t, 2), "s; shared", k.metadata.shared)


def main(out):
    from lightq.kernels import attention as A
    from lightq.attention.inputs import wan_like_qkv
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    rows = []
    for L in (32768, 75600 // 64 * 64):
        H, D = 40, 128
        q, k, v = wan_like_qkv(1, L, H, D, torch.bfloat16, device="cuda", seed=0)
        qc, sq, kc, sk, vv, _ = A.quantize_operands(q, k, v, "int8-sage")
        vt = vv.transpose(1, 2).contiguous()  # [B, H, L, D]
        ref = A.attend_quantized(qc, sq, kc, sk, vv, None, "int8-sage", torch.bfloat16)
        def t(fn, n=10):
            fn(); torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ts = []
            for _ in range(n):
                e0.record(); fn(); e1.record(); torch.cuda.synchronize(); ts.append(e0.elapsed_time(e1))
            return sorted(ts)[n // 2]
        qt, kt, vtt = (x.transpose(1, 2) for x in (q, k, v))
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn = t(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vtt))
        shipped = t(lambda: A.attend_quantized(qc, sq, kc, sk, vv, None, "int8-sage", torch.bfloat16))
        row = {"L": L, "cudnn_ms": cudnn, "shipped_ms": shipped}
        for ws in (False, True):
            for bm, nw, st in ((128, 4, 2), (128, 8, 2), (128, 4, 3), (128, 8, 3)):
                o = torch.empty_like(ref)
                grid = (L // bm, H, 1)
                try:
                    fn = lambda: _ws_kernel[grid](qc, sq, kc, sk, vt, o, L, H, D=D, QBLK=128, BLOCK_M=bm, BLOCK_N=64,
                                                  WS=ws, num_warps=nw, num_stages=st)
                    ms = t(fn)
                    err = float((o.float() - ref.float()).abs().max())
                    row[f"ws{int(ws)}_w{nw}_s{st}"] = (round(ms, 3), err)
                except Exception as exc:
                    row[f"ws{int(ws)}_w{nw}_s{st}"] = repr(exc)[:200]
        print(row, flush=True)
        rows.append(row)
    json.dump(rows, open(out, "w"), indent=1)


if __name__ == "__main__":
    compile_only() if sys.argv[1] == "compile" else main(sys.argv[1])
