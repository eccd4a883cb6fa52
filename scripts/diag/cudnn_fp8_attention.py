"""Feasibility probe: cuDNN's fp8 flash attention (cudnn-frontend ``sdpa_fp8``) at Wan2.1's self-attention shapes,
against cuDNN's bf16 attention (torch SDPA restricted to cuDNN), in one run.

    python scripts/diag/cudnn_fp8_attention.py OUT.json [tokens ...]     (default 32760 75600; 40 heads, d = 128)

Numerics probed (per-tensor scales, the only kind cuDNN's fp8 graph takes):
    k' = k - mean_tokens(k)                 (exact for softmax; optional, ``smooth``)
    Q = e4m3(q 448 / amax q), K = e4m3(k' 448 / amax k'), V = e4m3(v 448 / amax v)
    P quantized by cuDNN with scale_s = 448 (p <= 1), O written in e4m3 with scale_o = 448 / amax v (|O| <= amax v)
    out = O amax(v) / 448 in bf16
Times include the quantization passes and the output's dequantization; the graph build is timed apart (a job pays
it once per shape). Error against float64 attention on sampled rows, as ``lightq.bench attention`` reports it.
"""

from __future__ import annotations

import json
import math
import sys
import time

import cudnn
import torch

from lightq.attention.inputs import wan_like_qkv
from lightq.attention.numerics import errors
from lightq.bench import timing
from lightq.bench.attention import exact_rows, sdpa_with

E4M3 = torch.float8_e4m3fn


def build(b, s, h, d, out_type):
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    g = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3, intermediate_data_type=cudnn.data_type.FLOAT,
                      compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    dim, stride = (b, h, s, d), (s * h * d, d, h * d, 1)  # BSHD memory, BHSD logical
    tq, tk, tv = (g.tensor(name=n, dim=dim, stride=stride, data_type=cudnn.data_type.FP8_E4M3) for n in "qkv")
    scal = [g.tensor(name=n, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=cudnn.data_type.FLOAT)
            for n in ("dq", "dk", "dv", "ds", "ss", "so")]
    o, _, amax_s, amax_o = g.sdpa_fp8(q=tq, k=tk, v=tv, descale_q=scal[0], descale_k=scal[1], descale_v=scal[2],
                                      descale_s=scal[3], scale_s=scal[4], scale_o=scal[5], generate_stats=False,
                                      attn_scale=1.0 / math.sqrt(d), use_causal_mask=False, name="sdpa_fp8")
    o.set_output(True).set_dim(dim).set_stride(stride).set_data_type(out_type)
    for a in (amax_s, amax_o):
        a.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(cudnn.data_type.FLOAT)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    ws = torch.empty(g.get_workspace_size(), dtype=torch.uint8, device="cuda")
    return g, handle, (tq, tk, tv, *scal, o, amax_s, amax_o), ws


def make_fn(q, k, v, smooth: bool, out_type):
    b, s, h, d = q.shape
    g, handle, (tq, tk, tv, dq, dk, dv, ds, ss, so, to, tas, tao), ws = build(b, s, h, d, out_type)
    fp8_out = out_type == cudnn.data_type.FP8_E4M3
    out = torch.empty(q.shape, dtype=E4M3 if fp8_out else torch.bfloat16, device="cuda")
    amax_s, amax_o = (torch.empty(1, 1, 1, 1, device="cuda") for _ in range(2))
    one = torch.ones(1, 1, 1, 1, device="cuda")
    s_s = torch.full((1, 1, 1, 1), 448.0, device="cuda")
    d_s = torch.full((1, 1, 1, 1), 1 / 448.0, device="cuda")

    def quant(x):
        amax = x.abs().amax().float().clamp_min(1e-12).reshape(1, 1, 1, 1)
        return (x.float() * (448.0 / amax)).to(E4M3), amax / 448.0

    def fn():
        kk = k - k.float().mean(dim=1, keepdim=True).to(k.dtype) if smooth else k
        q8, sq = quant(q)
        k8, sk = quant(kk)
        v8, sv = quant(v)
        scale_o = (1.0 / sv) if fp8_out else one
        g.execute({tq: q8, tk: k8, tv: v8, dq: sq, dk: sk, dv: sv, ds: d_s, ss: s_s, so: scale_o, to: out,
                   tas: amax_s, tao: amax_o}, ws, handle=handle)
        if fp8_out:
            return (out.float() * sv).to(torch.bfloat16).flatten(2)
        return out.flatten(2)
    return fn


def main():
    from torch.nn.attention import SDPBackend

    path = sys.argv[1]
    counts = [int(t) for t in sys.argv[2:]] or [32760, 75600]
    result = {"device": timing.device_info(), "cudnn_backend": cudnn.backend_version(), "rows": []}
    print(result["device"], "cudnn", result["cudnn_backend"], flush=True)
    for n in counts:
        q, k, v = wan_like_qkv(1, n, 40, 128, torch.bfloat16, device="cuda", seed=0)
        idx = torch.linspace(0, n - 1, 256, device="cuda").round().long()
        exact = exact_rows(q, k, v, idx)
        base = sdpa_with(SDPBackend.CUDNN_ATTENTION)
        base_ms = timing.time_ms(lambda: base(q, k, v), 10)
        flops = 4.0 * n * n * 128 * 40
        rows = [dict(tokens=n, mode="cudnn bf16", ms=base_ms, tflops=flops / base_ms / 1e9, ratio=1.0,
                     **errors(base(q, k, v)[:, idx], exact))]
        for out_name, out_type in (("bf16 O", cudnn.data_type.BFLOAT16), ("fp8 O", cudnn.data_type.FP8_E4M3)):
            for smooth in (True, False):
                name = f"cudnn fp8, {out_name}, {'smoothed K' if smooth else 'raw K'}"
                try:
                    t0 = time.perf_counter()
                    fn = make_fn(q, k, v, smooth, out_type)
                    build_s = time.perf_counter() - t0
                    o = fn()
                    ms = timing.time_ms(fn, 10)
                    rows.append(dict(tokens=n, mode=name, ms=ms, tflops=flops / ms / 1e9, ratio=base_ms / ms,
                                     build_s=build_s, **errors(o[:, idx], exact)))
                except Exception as exc:  # a probe: record why and go on
                    rows.append(dict(tokens=n, mode=name, note=f"{type(exc).__name__}: {str(exc)[:300]}"))
                print(rows[-1], flush=True)
        result["rows"] += rows
        del q, k, v
        torch.cuda.empty_cache()
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
