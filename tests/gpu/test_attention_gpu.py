"""lightq's quantized-attention kernels (``lightq.kernels.attention``) on the GPU, against the torch reference
(``lightq.attention.numerics``) run on the same GPU.

Run on the GPU machine: ``python -m pytest tests/gpu/test_attention_gpu.py -q -n 0``. Skipped without CUDA /
triton; the fp8 schemes also below compute capability 8.9.

- the quantized operands (Q / K codes and block scales, V codes and scales): bit-identical to the reference's (the
  K mean is the same torch op on the same device; both divide correctly rounded; the casts round to nearest even);
- the output, on the kernel's own operands: the reference's up to fp32 accumulation order and ``exp2``
  (``ex2.approx`` on the GPU), which can flip the rounding of a P element or of an output:
  ``|out - ref| <= 4 u_p A + 2 u_out |ref| + 1e-5 A`` (``A`` = attention of |V|, float64), for odd token counts
  (partial query and key blocks), batch 2, bf16 / fp16, head dim 64 / 128, and views of one q/k/v buffer;
- at Wan2.1-14B 480p (32,760 tokens, 40 heads): cosine >= 0.999 against float64 on sampled query rows and the
  relative L2 error of the CPU tests' statement (tests/test_attention_numerics.py STATED_REL_L2), with headroom
  for the longer rows;
- ``torch.compile`` of a function calling the kernel gives its eager output; a CUDA-graph replay likewise.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from lightq.attention import numerics as N
from lightq.attention.inputs import wan_like_qkv

from .conftest import CAP, TRITON

pytestmark = TRITON
SCHEMES = [s for s in N.SCHEMES if CAP >= ((8, 0) if s == "int8-sage" else (8, 9))]
SHAPES = [(1, 1000, 777, 4, 128), (2, 4097, 4097, 2, 64), (1, 129, 65, 3, 128), (1, 1, 1, 1, 64)]  # B Lq Lk H D
STATED_REL_L2 = {"int8-sage": 5e-3, "int8fp8-sage2": 1.4e-2, "fp8-fa3": 2e-2}


@pytest.fixture(scope="module")
def kernels():
    """The kernels, launched untimed: every shape here would otherwise autotune the attention kernel's configs
    (``LIGHTQ_AUTOTUNE=0``: a shape the shipped table lacks takes the first config; correctness is per config)."""
    from lightq.kernels import attention, tuned_configs

    before = os.environ.get(tuned_configs.AUTOTUNE_ENV)
    os.environ[tuned_configs.AUTOTUNE_ENV] = "0"
    yield attention
    if before is None:
        del os.environ[tuned_configs.AUTOTUNE_ENV]
    else:
        os.environ[tuned_configs.AUTOTUNE_ENV] = before


def _differences(ref, got) -> str:
    """'' when ``got`` is ``ref`` bit for bit, else the shapes or the count and first place of the differences."""
    if ref.shape != got.shape:
        return f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
    bad = (ref.float() != got.float()).nonzero()
    if len(bad) == 0:
        return ""
    at = tuple(bad[0].tolist())
    return f"{len(bad)} of {ref.numel()} differ, first at {at}: {got[at].item()} != {ref[at].item()}"


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_the_reference(kernels, scheme, dtype, shape):
    b, lq, lk, h, d = shape
    q, k, v = wan_like_qkv(b, lq, h, d, dtype, device="cuda", seed=lq + lk, kv_tokens=lk)
    ref_ops = N.quantize_inputs(q, k, v, scheme)
    got_ops = kernels.quantize_operands(q, k, v, scheme)
    for name, ref, got in zip(("q codes", "q scales", "k codes", "k scales", "v", "v scales"), ref_ops, got_ops):
        if name == "v" and scheme == "int8-sage":
            got = got.transpose(1, 2)
        assert (ref is None) == (got is None), name
        assert ref is None or not _differences(ref, got), f"{name}: {_differences(ref, got)}"
    ref = N.attend(*ref_ops, scheme, dtype)
    got = kernels.quant_attention(q, k, v, scheme)
    assert got.shape == (b, lq, h * d) and got.dtype == dtype
    u_p = N.UNIT_ROUNDOFF[N.FP8_DTYPE if N.SCHEMES[scheme][1] == "fp8" else dtype]
    a = N.exact_attention(q, k, v.abs())
    tol = 4 * u_p * a + 2 * N.UNIT_ROUNDOFF[dtype] * ref.double().abs() + 1e-5 * a
    diff = (got.double() - ref.double()).abs()
    assert bool((diff <= tol).all()), float((diff / tol).max())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_views_of_one_qkv_buffer(kernels, scheme):
    q, k, v = wan_like_qkv(1, 3000, 4, 128, torch.bfloat16, device="cuda", seed=3)
    qkv = torch.stack([q, k, v])
    assert torch.equal(kernels.quant_attention(qkv[0], qkv[1], qkv[2], scheme),
                       kernels.quant_attention(q, k, v, scheme))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_wan14b_480p_error_against_float64(kernels, scheme):
    tokens, heads = 32760, 40
    q, k, v = wan_like_qkv(1, tokens, heads, 128, torch.bfloat16, device="cuda", seed=0)
    out = kernels.quant_attention(q, k, v, scheme)
    rows = torch.linspace(0, tokens - 1, 128, device="cuda").round().long()
    exact = []
    for head in range(heads):
        w = torch.softmax(q[:, rows, head].double() @ k[:, :, head].double().transpose(-1, -2) / math.sqrt(128), -1)
        exact.append(w @ v[:, :, head].double())
    err = N.errors(out[:, rows], torch.stack(exact, dim=2).flatten(2))
    assert err["cosine"] >= 0.999, err
    assert err["rel_l2"] <= STATED_REL_L2[scheme], err


@pytest.mark.parametrize("scheme", SCHEMES)
def test_compile_and_cuda_graph_replay(kernels, scheme):
    q, k, v = wan_like_qkv(1, 2048, 4, 128, torch.bfloat16, device="cuda", seed=4)
    eager = kernels.quant_attention(q, k, v, scheme)
    compiled = torch.compile(lambda a, b, c: kernels.quant_attention(a, b, c, scheme) * 1.0, fullgraph=True)
    assert torch.equal(compiled(q, k, v), eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.quant_attention(q, k, v, scheme)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
