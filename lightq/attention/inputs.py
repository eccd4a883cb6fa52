"""Attention inputs with the statistics of Wan2.1's self-attention, for numerics tests and the benchmark.

Wan's q and k leave an RMSNorm over the model width with learned per-channel weights, then RoPE; its keys carry
channel-wise offsets shared by all tokens (the outliers SageAttention smooths away), and video tokens attend to
their neighbourhood, so softmax rows are peaked rather than uniform. ``wan_like_qkv`` draws, per batch and head:

    g_c     ~ exp(N(0, 0.5^2))                      per-channel norm weight (heavy-tailed channels)
    z_t     = cluster centre of token t, 16 clusters of N(0, 1) in R^D (tokens in runs of L / 16: locality)
    q_t     = g * (z_t + 0.8 n_t)                   n ~ N(0, 1)
    k_t     = g * (z_t + 0.8 n'_t + o)              o_c ~ N(0, 2^2) on a quarter of the channels: the shared offset
    v_t     = N(0, 1) + N(0, 0.5^2) per channel      per-channel offsets

each then rescaled to unit RMS per token over the head dimension (as the RMSNorm makes the whole width), which
gives logits q.k / sqrt(D) of standard deviation about 2 and a mean top softmax weight of 1.5% at 4K keys
(about 360 keys' worth of entropy), more peaked than random weights give (docs/results/block_attention_inputs-*).
"""

from __future__ import annotations

import torch

CLUSTERS = 16


def _unit_rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))


def wan_like_qkv(batch: int, tokens: int, heads: int, head_dim: int, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", seed: int = 0, kv_tokens: int | None = None):
    """(q ``[B, L, H, D]``, k, v ``[B, Lk, H, D]``) in ``dtype`` on ``device`` (module docstring), drawn on
    ``device`` from ``seed`` (deterministic per device kind)."""
    g = torch.Generator(device=device).manual_seed(seed)
    lk = tokens if kv_tokens is None else kv_tokens

    def randn(*size):
        return torch.randn(size, generator=g, device=device)

    shape = (batch, 1, heads, head_dim)
    weight = torch.exp(0.5 * randn(*shape))
    centres = randn(batch, CLUSTERS, heads, head_dim)

    def located(n: int) -> torch.Tensor:
        return centres[:, torch.arange(n, device=device) * CLUSTERS // n]

    offset = 2.0 * randn(*shape) * (torch.rand(shape, generator=g, device=device) < 0.25)
    q = _unit_rms(weight * (located(tokens) + 0.8 * randn(batch, tokens, heads, head_dim))).to(dtype)
    k = _unit_rms(weight * (located(lk) + 0.8 * randn(batch, lk, heads, head_dim) + offset)).to(dtype)
    v = (randn(batch, lk, heads, head_dim) + 0.5 * randn(*shape)).to(dtype)
    return q, k, v
