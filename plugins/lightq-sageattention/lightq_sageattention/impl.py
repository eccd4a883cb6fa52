"""The ``int8-sage`` scheme on sageattention's ``sageattn`` (version 1.0.6, the one the package index serves: its
Triton kernels, SageAttention 1; SageAttention2's CUDA kernels are not on the index).

What its ``sageattn`` computes (read from its source), against lightq's ``int8-sage`` (lightq.attention.numerics):

- the same: Q scaled by ``log2(e) / sqrt(D)`` then int8 per block of 128 queries, K int8 per block of 64 keys, scale
  ``amax / 127``, ``exp2`` online softmax over blocks of 64 keys, fp32 row sums;
- K smoothing: lightq's (the token mean in fp32, subtracted in fp32) done here out of place, then rounded to the
  input type, and passed with ``smooth_k=False``: ``sageattn``'s own smoothing subtracts in place (it would modify
  the caller's k, a view of the fused block's q/k/v buffer) in the input type;
- different: codes round half away from zero (lightq: half to even); P and V in fp16 for every input type (bf16 V
  is converted), each 64-key block's P.V accumulated in fp16 before it joins the fp32 accumulator (lightq: P in the
  input's 16-bit type, fp32 accumulation); and its masked tail block loads zero key codes and zero values rather
  than excluding the keys, so with ``n = (-Lk) mod 64`` missing keys each enters the softmax with logit 0 and value
  0: every output row is its attention times ``Z / (Z + n)``, ``Z = sum_j exp(q . k'_j / sqrt(D))`` over the real
  keys (Wan 480p: 32760 = 511 x 64 + 56, n = 8 next to 32,760 real keys, a factor within about 1e-5 of 1; at a
  few hundred keys it reaches 1e-2).

The GPU parity test (tests/test_gpu_parity_sageattention.py) bounds the sum of these differences.
"""

from __future__ import annotations

import sageattention  # any failure here becomes BackendUnavailable in BackendSpec.load()
import torch

from lightq.attention.backends import AttentionBackend
from lightq.errors import LightqError

HEAD_DIMS = (64, 96, 128)  # what sageattn 1.0.6 takes


class SageAttentionBackend(AttentionBackend):
    """``int8-sage`` on ``sageattention.sageattn`` (NHD layout, no mask)."""

    def implementation(self, scheme: str):
        if scheme != "int8-sage":
            raise LightqError(f"the sageattention backend implements int8-sage, not '{scheme}'")
        return attend


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The seam's contract (``lightq.models.attention``): q ``[B, Lq, H, D]``, k / v ``[B, Lk, H, D]``, out
    ``[B, Lq, H * D]`` in q's dtype."""
    if q.shape[-1] not in HEAD_DIMS:
        raise LightqError(f"sageattention takes head_dim {', '.join(map(str, HEAD_DIMS))}, got {q.shape[-1]}: use "
                          "attn_quant=int8-sage-triton")
    smoothed = (k.float() - k.float().mean(dim=1, keepdim=True)).to(k.dtype)
    out = sageattention.sageattn(q.contiguous(), smoothed, v.contiguous(), tensor_layout="NHD", is_causal=False,
                                 smooth_k=False)
    return out.flatten(2)
