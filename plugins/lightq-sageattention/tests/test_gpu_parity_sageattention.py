"""GPU parity of the ``sageattention`` attention backend (int8-sage-sageattention) against lightq's int8-sage
reference, on Wan-like inputs (``lightq.attention.inputs``), key counts with and without a partial 64-key block.

``sageattn`` differs from the reference in rounding rule, fp16 P.V accumulation and its tail-block handling
(``lightq_sageattention.impl``), so the check is against float64 attention: the plugin's relative L2 error at most
1.5x the reference's plus 1e-3, cosine >= 0.999; and the plugin's output must not move the caller's k.

The tail block: with ``n = (-Lk) mod 64`` missing keys, ``sageattn`` loads zero key codes and (masked) zero values
for them, so each enters the softmax with logit 0 and value 0: per query row and head its output is the exact
attention times ``Z / (Z + n)``, ``Z = sum_j exp(q . k'_j / sqrt(D))`` over the real (smoothed) keys. The float64
oracle the plugin is held to is that shrunken attention (``n = 0`` leaves it exact attention); the shrink alone
is asserted too, so a change in the library's tail handling shows. At Wan's 32,760 tokens (n = 8, Z in the
hundreds of thousands) the factor differs from 1 by about 1e-5; at 777 keys (n = 55) by about 1e-2.
Skipped without CUDA or without sageattention (with the reason).
"""

import importlib.util

import pytest
import torch

from lightq.attention import numerics as N
from lightq.attention.inputs import wan_like_qkv
from lightq_sageattention import SPEC

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the GPU machine)"),
              pytest.mark.skipif(importlib.util.find_spec("sageattention") is None,
                                 reason="needs sageattention (pip install 'sageattention==1.0.6')")]


@pytest.fixture(scope="module")
def sage():
    return SPEC.load().implementation("int8-sage")


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lq, lk, heads, d", [(4096, 4096, 4, 128), (1000, 777, 4, 128), (32760, 32760, 2, 128),
                                              (513, 300, 2, 64)])
def test_close_to_the_reference_against_float64(sage, in_dtype, lq, lk, heads, d):
    q, k, v = wan_like_qkv(1, lq, heads, d, in_dtype, device="cuda", seed=lq, kv_tokens=lk)
    k_before = k.clone()
    out = sage(q, k, v)
    assert torch.equal(k, k_before), "the plugin must not modify the caller's k"
    assert out.shape == (1, lq, heads * d) and out.dtype == in_dtype
    rows = torch.linspace(0, lq - 1, min(lq, 256), device="cuda").round().long()
    exact = N.exact_attention(q[:, rows], k, v)
    shrink = _tail_shrink(q[:, rows], k, lk)
    shrunk = (exact.unflatten(-1, (heads, d)) * shrink).flatten(2)
    ref = N.errors(N.reference_attention(q, k, v, "int8-sage")[:, rows], exact)
    got = N.errors(out[:, rows], shrunk)
    assert got["cosine"] >= 0.999, got
    assert got["rel_l2"] <= 1.5 * ref["rel_l2"] + 1e-3, (got, ref)
    if float((1 - shrink).mean()) > 1e-3:  # the shrink is the library's: the plain oracle is further off
        unshrunk = N.errors(out[:, rows], exact)["rel_l2"]
        assert unshrunk > got["rel_l2"], (unshrunk, got)


def _tail_shrink(q, k, lk):
    """``Z / (Z + n)`` per query row and head, ``[B, Lq, H, 1]`` float64 (module docstring), on the keys smoothed
    and rounded to their dtype as ``lightq_sageattention.impl.attend`` passes them."""
    n = (-lk) % 64
    smoothed = (k.float() - k.float().mean(dim=1, keepdim=True)).to(k.dtype).double()
    logits = torch.einsum("bqhd,bkhd->bqhk", q.double(), smoothed) / q.shape[-1] ** 0.5
    z = torch.exp(logits).sum(-1, keepdim=True)
    return z / (z + n)
