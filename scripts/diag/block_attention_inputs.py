"""Why self-attention costs more inside the fused fp8 block than inside the bf16 block (GPU only).

    python scripts/diag/block_attention_inputs.py [--mode fp8-triton+fast_accum]

Builds one Wan2.1-14B block in bf16 and in ``--mode`` from the same seeded random weights (as ``lightq.bench step``
does), computes the self-attention q/k/v each block hands to attention, and times the same attention call on:
the bf16 block's q/k/v; the fused block's (views of one [3, M, dim] buffer); the fused block's copied into three
fresh tensors; the bf16 block's copied into one [3, M, dim] buffer; random normal q/k/v. Same layout and different
time = the values matter (softmax peakiness, power); same values and different time = the layout matters.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from lightq.bench.linear import Backends, discover_modes
from lightq.bench.step import DIT_ARCHS, build, inputs
from lightq.bench.timing import describe, device_info, time_ms
from lightq.models.attention import attention
from lightq.models.rope import apply_rope


def bf16_qkv(block, tokens, e0, rope, dtype):
    shift, scale = (block.modulation.float() + e0).chunk(6, dim=1)[:2]
    attn = block.self_attn
    h = (block.norm1(tokens) * (1 + scale) + shift).to(dtype)
    heads = (attn.num_heads, attn.head_dim)
    q = apply_rope(attn.norm_q(attn.q(h)).unflatten(-1, heads), *rope).to(dtype)
    k = apply_rope(attn.norm_k(attn.k(h)).unflatten(-1, heads), *rope).to(dtype)
    return q, k, attn.v(h).unflatten(-1, heads)


def fused_qkv(block, tokens, e0, rope, dtype):
    b, seq_len, dim = tokens.shape
    attn = block.self_attn
    mod = (block.modulation.float() + e0).contiguous()
    qkv = block.norm_qkv(tokens.reshape(b * seq_len, dim).contiguous(), mod, seq_len, dtype)
    cos, sin = rope
    out = torch.ops.lightq.qkv_rms_rope(qkv, attn.norm_q.weight, attn.norm_k.weight, cos, sin, seq_len,
                                        attn.head_dim, attn.norm_q.eps)
    return tuple(out.view(3, b, seq_len, attn.num_heads, attn.head_dim))


def stats(q, k) -> str:
    """Scale of q, k and of the softmax logits on a sample of query rows (head 0)."""
    qs, ks = q[0, ::512, 0].float(), k[0, :, 0].float()
    logits = qs @ ks.T / q.shape[-1] ** 0.5
    top = torch.softmax(logits, dim=-1).max(dim=-1).values.mean().item()
    return (f"|q| rms {q.float().pow(2).mean().sqrt():.3f}, |k| rms {k.float().pow(2).mean().sqrt():.3f}, "
            f"logit std {logits.std():.2f}, mean top softmax weight {top:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="fp8-triton+fast_accum")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    print(describe(device_info()))
    arch = dataclasses.replace(DIT_ARCHS["14b"], num_layers=1)
    _, _, _, (tokens, e0, rope, _) = inputs(arch)
    dtype = torch.bfloat16
    (mode, scheme, spec), = discover_modes([args.mode])
    backend, why = Backends().get(spec, mode)
    if backend is None:
        raise SystemExit(f"{mode} unavailable: {why}")
    cases = {}
    with torch.no_grad():
        model, _ = build(arch, "none", None, None)
        ref = bf16_qkv(model.blocks[0], tokens, e0, rope, dtype)
        cases["bf16 block q/k/v (three tensors)"] = ref
        buf = torch.stack([t.reshape(-1) for t in ref]).view(3, *ref[0].shape)
        cases["bf16 block q/k/v copied into one [3, M, dim] buffer"] = tuple(buf)
        del model
        model, fused = build(arch, mode, scheme, backend)
        got = fused_qkv(model.blocks[0], tokens, e0, rope, dtype)
        cases[f"{mode} fused q/k/v (views of one buffer)"] = got
        cases[f"{mode} fused q/k/v copied into three tensors"] = tuple(t.clone() for t in got)
        cases["random normal q/k/v"] = tuple(torch.randn_like(t) for t in ref)
        print(f"fused blocks: {fused}; relative L2 of fused q/k/v vs bf16: "
              + ", ".join(f"{((a.float() - b.float()).norm() / b.float().norm()).item():.2e}"
                          for a, b in zip(got, ref)))
        for name, (q, k, v) in cases.items():
            ms = time_ms(lambda: attention(q, k, v), args.iters)
            print(f"{name:<58} {ms:8.3f} ms   {stats(q, k)}", flush=True)


if __name__ == "__main__":
    main()
