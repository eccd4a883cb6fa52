"""The attention seam (``lightq.models.attention``): the default is exact softmax attention, an installed
implementation serves every attention call of the DiT for the ``with`` block only, and the SDPA switch guard."""

import pytest
import torch

from lightq.models import attention as attn
from lightq.models.wan_dit import DIT_ARCHS, random_dit


def naive(q, k, v):
    """softmax(q k^T / sqrt(d)) v per batch and head, in float64, as ``[B, Lq, heads * head_dim]``."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (weights @ v).transpose(1, 2).flatten(2)


def test_default_is_softmax_attention_in_the_documented_layout():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 3, 8, generator=g)
    k, v = torch.randn(2, 7, 3, 8, generator=g), torch.randn(2, 7, 3, 8, generator=g)
    out = attn.attention(q, k, v)
    assert out.shape == (2, 5, 24) and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), naive(q, k, v), rtol=1e-5, atol=1e-5)


def dit_and_inputs(name: str, dtype=torch.float32):
    """A random tiny DiT and (x, t, context, I2V kwargs) for it, on a (2, 4, 4) latent grid (8 tokens)."""
    arch = DIT_ARCHS[name]
    model = random_dit(arch, device="cpu", dtype=dtype, seed=3)
    g = torch.Generator().manual_seed(1)
    grid = (2, 4, 4)
    x = torch.randn(1, arch.out_dim, *grid, generator=g)
    t, ctx = torch.tensor([500.0]), torch.randn(1, 6, arch.text_dim, generator=g)
    kw = {}
    if arch.is_i2v:
        kw = {"clip_fea": torch.randn(1, 257, arch.clip_dim, generator=g),
              "y": torch.randn(1, arch.in_dim - arch.out_dim, *grid, generator=g)}
    return arch, model, x, t, ctx, kw


@pytest.mark.parametrize("name, calls_per_block", [("tiny", 2), ("tiny-i2v", 3)])
def test_an_installed_implementation_serves_every_dit_attention(name, calls_per_block):
    arch, model, x, t, ctx, kw = dit_and_inputs(name)
    shapes = []

    def recording(q, k, v):
        shapes.append((tuple(q.shape), tuple(k.shape)))
        return naive(q, k, v).to(q.dtype)

    with torch.no_grad():
        expected = model(x, t, ctx, **kw)
        with attn.use_attention(recording):
            assert attn.current_attention() is recording
            got = model(x, t, ctx, **kw)
    assert len(shapes) == calls_per_block * arch.num_layers
    assert all(q[2:] == (arch.num_heads, arch.head_dim) for q, _ in shapes)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert attn.current_attention() is attn.sdpa


def test_the_previous_implementation_returns_after_an_error():
    def broken(q, k, v):
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError, match="kernel failed"):
        with attn.use_attention(broken):
            attn.attention(*(torch.zeros(1, 1, 1, 2) for _ in range(3)))
    assert attn.current_attention() is attn.sdpa
    with pytest.raises(TypeError, match="callable"):
        with attn.use_attention("sage"):
            pass


def test_keep_sdpa_switches_restores_on_error():
    before = attn.sdpa_switches()
    with pytest.raises(ValueError):
        with attn.keep_sdpa_switches():
            torch.backends.cuda.enable_cudnn_sdp(not before[3])
            torch.backends.cuda.enable_math_sdp(not before[2])
            raise ValueError
    assert attn.sdpa_switches() == before


@pytest.mark.parametrize("name", ["tiny", "tiny-i2v"])
def test_the_self_attention_seam_serves_self_attention_only(name):
    """``use_self_attention`` (the attn_quant modes) replaces the blocks' self-attention and never the text or
    image cross-attention; int8-sage's reference in its place keeps the output close."""
    from lightq.attention.numerics import reference_attention

    arch, model, x, t, ctx, kw = dit_and_inputs(name, torch.bfloat16)
    calls = []

    def quantized(q, k, v):
        calls.append((q.shape[1], k.shape[1]))
        return reference_attention(q, k, v, "int8-sage")

    with torch.no_grad():
        exact = model(x, t, ctx, **kw)
        with attn.use_self_attention(quantized):
            assert attn.current_self_attention() is quantized and attn.current_attention() is attn.sdpa
            got = model(x, t, ctx, **kw)
    assert calls == [(8, 8)] * arch.num_layers
    assert attn.current_self_attention() is attn.sdpa
    cos = torch.nn.functional.cosine_similarity(got.flatten().double(), exact.flatten().double(), dim=0)
    assert 0.999 < cos < 1.0
