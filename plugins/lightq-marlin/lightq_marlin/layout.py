"""Marlin's weight and scale layouts, from lightq's int4-g128 checkpoint tensors. Pure torch; no vLLM import.

Checkpoint (``lightq.quant.schemes``): data uint8 ``[N, K/2]``, byte j of row n holds elements 2j (low nibble) and
2j+1 (high nibble), each stored as v + 8 (GPTQ's uint4b8); scales fp32 ``[K/128, N]``.

GPTQ layout (the input of vLLM's ``gptq_marlin_repack``): int32 ``[K/8, N]``, element (k, n) in bits 4(k % 8) of
word (k // 8, n). Four consecutive checkpoint bytes of a row are exactly one such word read little-endian
(byte b carries elements 2b, 2b+1 in bits 8b..8b+7), so the GPTQ tensor is the row's bytes viewed as int32,
transposed: no nibble is moved.

Marlin's group-scale layout: each run of 64 consecutive scales of the ``[K/128, N]`` tensor (row-major) is an 8x8
tile read column by column, i.e. position 8i + j holds the scale that sat at 8j + i. This matches how Marlin's
threads fetch scales for their mma fragments (IST-DASLab Marlin, "scale permutation" for grouped weights).
"""

from __future__ import annotations

import torch


def gptq_words(data: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, K/2]`` nibble-packed rows -> int32 ``[K/8, N]`` in GPTQ's packing (same bits, new grouping)."""
    n, half_k = data.shape
    if half_k % 4:
        raise ValueError(f"in_features {2 * half_k} is not a multiple of 8")
    return data.contiguous().view(torch.int32).t().contiguous()


def marlin_group_scales(scale: torch.Tensor) -> torch.Tensor:
    """``[K/128, N]`` group scales -> Marlin's order (8x8 transpose within each run of 64); N % 64 == 0."""
    groups, n = scale.shape
    return scale.reshape(-1, 8, 8).transpose(1, 2).reshape(groups, n).contiguous()
