"""lightq's quantized-attention Triton kernels (``lightq.kernels.attention``) in Triton's CPU interpreter
(``TRITON_INTERPRET=1``, set before the kernels are imported) against the torch reference
(``lightq.attention.numerics``) on small shapes: the quantized operands bit for bit, and the output bit for bit
for bf16 (fp16: to one output ulp, from fp32 accumulation order), for token counts that leave partial query and
key blocks, batch 2, and inputs that are views of one q/k/v buffer as the fused block passes them.

The outputs are the reference's up to the order of fp32 accumulation, which can flip the rounding of a P element
(one ulp of P's format) or of an output: each element within ``2 u_p A + 2 u_out |ref|`` (``A`` = attention of
|V|), and at most 1% of the elements differing at all.
tests/gpu/test_attention_gpu.py checks the compiled kernels on the GPU."""

import importlib.util
import os

import pytest
import torch

from lightq.attention import numerics as N
from lightq.attention.inputs import wan_like_qkv

HAVE_TRITON = importlib.util.find_spec("triton") is not None
if HAVE_TRITON and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytestmark = pytest.mark.skipif(not HAVE_TRITON or torch.cuda.is_available(),
                                reason="needs triton (pip install triton) and no CUDA: on a GPU "
                                       "tests/gpu/test_attention_gpu.py covers the kernels")

SHAPES = [(1, 200, 128, 2, 64), (2, 130, 70, 1, 64), (1, 64, 1, 1, 128)]  # B Lq Lk H D: full, full + tail, tail


@pytest.fixture(scope="module")
def kernels():
    from triton.runtime.interpreter import InterpretedFunction

    from lightq.kernels import attention

    if not isinstance(attention._attn_kernel, InterpretedFunction):
        pytest.skip("lightq.kernels was imported before TRITON_INTERPRET=1 was set in this process")
    return attention


def _same(ref, got) -> bool:
    return ref.shape == got.shape and torch.equal(ref.float(), got.float())


@pytest.mark.parametrize("scheme", list(N.SCHEMES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_the_reference(kernels, scheme, dtype, shape):
    b, lq, lk, h, d = shape
    q, k, v = wan_like_qkv(b, lq, h, d, dtype, seed=lq + lk, kv_tokens=lk)
    ref_ops = N.quantize_inputs(q, k, v, scheme)
    got_ops = kernels.quantize_operands(q, k, v, scheme)
    for name, ref, got in zip(("q codes", "q scales", "k codes", "k scales", "v", "v scales"), ref_ops, got_ops):
        if name == "v" and scheme == "int8-sage":
            got = got.transpose(1, 2)  # the kernel reads the 16-bit V in the input's [B, L, H, D] layout
        assert (ref is None and got is None) or _same(ref, got), name
    ref = N.attend(*ref_ops, scheme, dtype)
    got = kernels.quant_attention(q, k, v, scheme)
    assert got.shape == (b, lq, h * d) and got.dtype == dtype
    diff = (got.double() - ref.double()).abs()
    u_p = N.UNIT_ROUNDOFF[N.FP8_DTYPE if N.SCHEMES[scheme][1] == "fp8" else dtype]
    tol = 2 * u_p * N.exact_attention(q, k, v.abs()) + 2 * N.UNIT_ROUNDOFF[dtype] * ref.double().abs() + 1e-6
    assert bool((diff <= tol).all()), float((diff / tol).max())
    assert (diff > 0).sum() <= diff.numel() // 100


def test_views_of_one_qkv_buffer_and_fp32_inputs(kernels):
    """The fused block passes q, k, v as views of one [3, B, L, H, D] buffer; CPU runs may use fp32."""
    q, k, v = wan_like_qkv(1, 100, 2, 64, torch.float32, seed=7)
    qkv = torch.stack([q, k, v])
    for scheme in N.SCHEMES:
        got = kernels.quant_attention(qkv[0], qkv[1], qkv[2], scheme)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, N.reference_attention(q, k, v, scheme), rtol=1e-6, atol=1e-6)


def test_bad_shapes_are_refused(kernels):
    with pytest.raises(ValueError, match="D 64 or 128"):
        kernels.quant_attention(*(torch.zeros(1, 4, 2, 96),) * 3, "int8-sage")
    with pytest.raises(ValueError, match="unknown attention scheme"):
        kernels.quant_attention(*(torch.zeros(1, 4, 2, 64),) * 3, "int4")
    with pytest.raises(ValueError, match="contiguous last"):
        x = torch.zeros(1, 4, 64, 2).transpose(-1, -2)
        kernels.quant_attention(x, x, x, "int8-sage")


def test_fused_triton_block_runs_quantized_self_attention(kernels):
    """dit_quant=int8-triton's fused block with attn_quant=int8-sage-triton: the installed kernel serves the block's
    self-attention (once, on the fused q/k/v views) and the block matches the unfused block with the same
    attention."""
    from lightq.backends.registry import specs
    from lightq.backends.triton_backend import TritonBackend
    from lightq.checkpoints.loader import load_component
    from lightq.fused import wan_block
    from lightq.models.attention import use_self_attention
    from lightq.models.family import QUANTIZABLE
    from lightq.models.rope import rope_tables
    from lightq.models.wan_dit import DiTArch, WanDiT
    from lightq.quant.method import QuantMethod

    arch = DiTArch(dim=128, ffn_dim=256, num_heads=2, num_layers=1, text_dim=128)
    model = load_component(lambda: WanDiT(arch), "random", include=QUANTIZABLE["dit"],
                           method=QuantMethod("int8", TritonBackend(specs()["triton"])), dtype=torch.bfloat16,
                           progress=False)
    gen = torch.Generator().manual_seed(7)
    block, seq_len = model.blocks[0], 16
    args = (torch.randn(1, seq_len, 128, generator=gen), torch.randn(1, 6, 128, generator=gen) * 0.1,
            rope_tables((2, 2, 4), 64, torch.device("cpu")),
            torch.randn(1, 8, 128, generator=gen).to(torch.bfloat16), None, torch.bfloat16)
    calls = []

    def sage(q, k, v):
        calls.append(q.shape)
        return kernels.quant_attention(q, k, v, "int8-sage")

    with use_self_attention(sage):
        unfused = block(*args)
        assert wan_block.fuse_dit_blocks(model) == 1
        fused = block(*args)
    assert calls == [(1, seq_len, 2, 64)] * 2
    err = ((fused - unfused).norm() / (unfused - args[0]).norm()).item()
    assert err < 1e-3, f"fused block with quantized attention differs from the unfused one by {err:.2e}"
