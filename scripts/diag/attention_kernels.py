"""Self-attention kernels at the Wan2.1 480p shape, timed side by side (GPU only).

    python scripts/diag/attention_kernels.py [--tokens 32760] [--heads 40]

Times one bf16 self-attention ``[1, L, heads, 128]`` through each kernel that may be on the machine: torch SDPA
pinned to cuDNN, to its flash (FlashAttention-2) kernel and to memory-efficient attention, and vLLM's bundled
flash-attn varlen call (the call the official Wan2.1 code makes through ``flash_attn``) as FlashAttention 2 and 3.
Prints ms, TFLOP/s (4 L^2 heads head_dim) and the relative L2 difference from the cuDNN output.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightq.bench.timing import describe, device_info, time_ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32760)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    L, H, D = args.tokens, args.heads, 128
    q, k, v = (torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * L * L * H * D
    print(describe(device_info()))
    print(f"self-attention 1 x {L} tokens x {H} heads x {D}, bf16")
    ref = None

    def report(name, fn):
        nonlocal ref
        try:
            out = fn().reshape(1, L, H, D).float()
            ms = time_ms(fn, args.iters)
        except Exception as err:  # noqa: BLE001 - a diagnostic: say why and go on
            print(f"{name:<40} not run: {type(err).__name__}: {str(err)[:160]}")
            return
        ref = out if ref is None else ref
        diff = ((out - ref).norm() / ref.norm()).item()
        print(f"{name:<40} {ms:8.3f} ms  {flops / ms / 1e9:6.0f} TFLOP/s  rel diff {diff:.2e}", flush=True)

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
        report(f"torch SDPA {backend.name}", sdpa)
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except Exception as err:  # noqa: BLE001
        print(f"vLLM flash-attn not importable: {err}")
        return
    cu = torch.tensor([0, L], dtype=torch.int32, device="cuda")
    q2, k2, v2 = (t.reshape(L, H, D) for t in (q, k, v))
    for version in (2, 3):
        report(f"vLLM flash_attn_varlen_func fa{version}", lambda version=version: flash_attn_varlen_func(
            q2, k2, v2, max_seqlen_q=L, cu_seqlens_q=cu, max_seqlen_k=L, cu_seqlens_k=cu, fa_version=version))


if __name__ == "__main__":
    main()
