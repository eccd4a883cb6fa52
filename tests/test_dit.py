"""The Wan2.1 DiT: official key layout, meta build + assign-load, RoPE against the complex definition, shapes,
quantized-linear swap."""

import math

import pytest
import torch

from lightq.backends.torch_backend import SPEC as TORCH_SPEC
from lightq.backends.torch_backend import TorchBackend
from lightq.errors import LightqError
from lightq.models.family import QUANTIZABLE
from lightq.models.rope import apply_rope, axis_dims, rope_tables
from lightq.models.wan_dit import DIT_ARCHS, WanDiT, init_weights, random_dit
from lightq.quant.linear import QLinear, matches, swap_linears


def official_keys(a) -> dict[str, tuple]:
    """Key -> shape of an official Wan2.1 checkpoint, written out from ``wan/modules/model.py`` (WanModel)."""
    d, p = a.dim, math.prod(a.patch_size)
    keys = {
        "patch_embedding.weight": (d, a.in_dim, *a.patch_size), "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, a.text_dim), "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d), "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, a.freq_dim), "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d), "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d), "time_projection.1.bias": (6 * d,),
        "head.head.weight": (a.out_dim * p, d), "head.head.bias": (a.out_dim * p,),
        "head.modulation": (1, 2, d),
    }
    if a.has_clip:  # the Wan2.1 I2V CLIP branch (Wan2.2's I2V expert has none)
        c = a.clip_dim
        keys.update({
            "img_emb.proj.0.weight": (c,), "img_emb.proj.0.bias": (c,),
            "img_emb.proj.1.weight": (c, c), "img_emb.proj.1.bias": (c,),
            "img_emb.proj.3.weight": (d, c), "img_emb.proj.3.bias": (d,),
            "img_emb.proj.4.weight": (d,), "img_emb.proj.4.bias": (d,),
        })
    block = {
        "modulation": (1, 6, d),
        "self_attn.q.weight": (d, d), "self_attn.q.bias": (d,),
        "self_attn.k.weight": (d, d), "self_attn.k.bias": (d,),
        "self_attn.v.weight": (d, d), "self_attn.v.bias": (d,),
        "self_attn.o.weight": (d, d), "self_attn.o.bias": (d,),
        "self_attn.norm_q.weight": (d,), "self_attn.norm_k.weight": (d,),
        "norm3.weight": (d,), "norm3.bias": (d,),
        "cross_attn.q.weight": (d, d), "cross_attn.q.bias": (d,),
        "cross_attn.k.weight": (d, d), "cross_attn.k.bias": (d,),
        "cross_attn.v.weight": (d, d), "cross_attn.v.bias": (d,),
        "cross_attn.o.weight": (d, d), "cross_attn.o.bias": (d,),
        "cross_attn.norm_q.weight": (d,), "cross_attn.norm_k.weight": (d,),
        "ffn.0.weight": (a.ffn_dim, d), "ffn.0.bias": (a.ffn_dim,),
        "ffn.2.weight": (d, a.ffn_dim), "ffn.2.bias": (d,),
    }
    if a.has_clip:
        block.update({"cross_attn.k_img.weight": (d, d), "cross_attn.k_img.bias": (d,),
                      "cross_attn.v_img.weight": (d, d), "cross_attn.v_img.bias": (d,),
                      "cross_attn.norm_k_img.weight": (d,)})
    for i in range(a.num_layers):
        keys.update({f"blocks.{i}.{k}": s for k, s in block.items()})
    return keys


def inputs(a, batch=2, grid=(3, 8, 12), seed=1, text_tokens=20):
    g = torch.Generator().manual_seed(seed)
    kw = {}
    if a.model_type == "i2v":
        kw = {"y": torch.randn(batch, a.in_dim - a.out_dim, *grid, generator=g)}
        if a.has_clip:
            kw["clip_fea"] = torch.randn(batch, 257, a.clip_dim, generator=g)
    x = torch.randn(batch, a.out_dim if kw else a.in_dim, *grid, generator=g)
    t = torch.tensor([999.0, 437.0][:batch])
    return x, t, torch.randn(batch, text_tokens, a.text_dim, generator=g), kw


def tiny(name="tiny", seed=0):
    torch.manual_seed(seed)
    return WanDiT(DIT_ARCHS[name]).eval()


@pytest.mark.parametrize("name", sorted(DIT_ARCHS))
def test_state_dict_matches_official_layout(name):
    a = DIT_ARCHS[name]
    with torch.device("meta"):
        model = WanDiT(a)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = official_keys(a)
    assert sorted(set(got) ^ set(want)) == []
    assert {k: s for k, s in got.items() if want[k] != s} == {}
    assert list(model.buffers()) == []


def test_official_sizes():
    # Parameter counts of the released checkpoints: 1.3B T2V (1.42e9), 14B T2V (1.43e10), 14B I2V (1.64e10).
    counts = {}
    for name in ("1.3b", "14b", "14b-i2v"):
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in WanDiT(DIT_ARCHS[name]).parameters())
    assert counts == {"1.3b": 1_418_996_800, "14b": 14_288_491_584, "14b-i2v": 16_394_878_784}


def test_quantizable_patterns_name_plain_linears():
    for name in ("tiny", "tiny-i2v"):
        with torch.device("meta"):
            model = WanDiT(DIT_ARCHS[name])
        linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        chosen = {n for n in linears if matches(n, QUANTIZABLE["dit"])}
        per_block = 12 if name == "tiny-i2v" else 10
        assert len(chosen) == per_block * DIT_ARCHS[name].num_layers
        # nothing outside the blocks' attention / FFN is quantized
        assert all(".self_attn." in n or ".cross_attn." in n or ".ffn." in n for n in chosen)


@pytest.mark.parametrize("name", ["tiny", "tiny-i2v"])
def test_forward_shape_and_scale(name):
    model = tiny(name)
    x, t, ctx, kw = inputs(model.arch)
    with torch.no_grad():
        out = model(x, t, ctx, **kw)
        out_other_t = model(x, torch.tensor([10.0, 10.0]), ctx, **kw)
        out_other_text = model(x, t, ctx.flip(0), **kw)
    assert out.shape == (2, 16, 3, 8, 12) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert 0.3 < out.std().item() < 3.0  # well-scaled at the default init
    assert (out - out_other_t).abs().mean() > 1e-2 * out.abs().mean()  # the output depends on t ...
    assert (out - out_other_text).abs().mean() > 1e-2 * out.abs().mean()  # ... and on the text


def test_batch_equals_single_samples():
    model = tiny("tiny-i2v")
    x, t, ctx, kw = inputs(model.arch)
    with torch.no_grad():
        both = model(x, t, ctx, **kw)
        for i in range(2):
            one = model(x[i:i + 1], t[i:i + 1], ctx[i:i + 1], **{k: v[i:i + 1] for k, v in kw.items()})
            torch.testing.assert_close(one[0], both[i], rtol=1e-5, atol=1e-5)


def test_unpatchify_matches_official_einsum():
    model = tiny()
    f, h, w, (p, q, r), c = 2, 3, 4, model.arch.patch_size, model.arch.out_dim
    u = torch.randn(2, f * h * w, p * q * r * c)
    want = torch.stack([torch.einsum("fhwpqrc->cfphqwr", s.view(f, h, w, p, q, r, c))
                        .reshape(c, f * p, h * q, w * r) for s in u])
    assert torch.equal(model._unpatchify(u, (f, h, w)), want)


def test_meta_build_and_assign_load_is_identical():
    model = tiny("tiny-i2v")
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}  # the synthetic checkpoint recipe
    model = model.to(torch.bfloat16)
    with torch.device("meta"):
        loaded = WanDiT(DIT_ARCHS["tiny-i2v"])
    result = loaded.load_state_dict(sd, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert not any(p.is_meta for p in loaded.parameters())
    x, t, ctx, kw = inputs(model.arch)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x, t, ctx, **kw), model(x, t, ctx, **kw))


def test_bf16_close_to_fp32():
    model = tiny()
    x, t, ctx, kw = inputs(model.arch)
    with torch.no_grad():
        ref = model(x, t, ctx)
        out = model.to(torch.bfloat16)(x, t, ctx)
    assert ((out - ref).norm() / ref.norm()).item() < 0.03


def test_init_is_deterministic():
    a = tiny(seed=3).state_dict()
    b = tiny(seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    m1, m2 = init_weights(tiny(seed=1), g1), init_weights(tiny(seed=2), g2)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    r1, r2, r3 = (random_dit(DIT_ARCHS["tiny"], device="cpu", dtype=torch.bfloat16, seed=s) for s in (7, 7, 8))
    assert {p.dtype for p in r1.parameters()} == {torch.bfloat16}
    assert all(torch.equal(p, q) for p, q in zip(r1.parameters(), r2.parameters()))
    assert not torch.equal(r1.blocks[0].ffn[0].weight, r3.blocks[0].ffn[0].weight)
    assert r1.head.head.weight.abs().sum() > 0  # not zero-initialised, unlike the official init


def complex_rope_reference(x: torch.Tensor, grid, theta=10000.0) -> torch.Tensor:
    """Published definition, in float64 complex numbers: the pair (x[2j], x[2j+1]) is the complex number
    x[2j] + i x[2j+1], multiplied by exp(i * pos_axis * theta**(-2k/d_axis)) with the head dim split
    d - 4(d//6) (frames), 2(d//6) (height), 2(d//6) (width)."""
    b, seq, n, d = x.shape
    d_h = 2 * (d // 6)
    d_f = d - 2 * d_h
    f, h, w = grid
    ff, hh, ww = torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij")
    angles = []
    for pos, dim in ((ff, d_f), (hh, d_h), (ww, d_h)):
        k = torch.arange(dim // 2, dtype=torch.float64)
        angles.append(pos.reshape(-1, 1).double() * theta ** (-2 * k / dim))
    rot = torch.polar(torch.ones(seq, d // 2, dtype=torch.float64), torch.cat(angles, dim=1))
    xc = torch.view_as_complex(x.double().reshape(b, seq, n, d // 2, 2).contiguous())
    return torch.view_as_real(xc * rot[None, :, None, :]).reshape(b, seq, n, d)


@pytest.mark.parametrize("head_dim,grid", [(64, (3, 4, 5)), (128, (21, 30, 52))])
def test_rope_matches_float64_complex_reference(head_dim, grid):
    seq = math.prod(grid)
    x = torch.randn(1, seq, 2, head_dim)
    cos, sin = rope_tables(grid, head_dim, torch.device("cpu"))
    got = apply_rope(x, cos, sin)
    want = complex_rope_reference(x, grid)
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max().item() < 2e-5 * x.abs().max().item()


def test_rope_axis_split():
    assert axis_dims(128) == (44, 42, 42) and axis_dims(64) == (24, 20, 20)


@pytest.mark.parametrize("name", ["tiny", "tiny-i2v"])
def test_fp8_swap_stays_close(name):
    model = tiny(name).to(torch.bfloat16)
    x, t, ctx, kw = inputs(model.arch)
    with torch.no_grad():
        ref = model(x, t, ctx, **kw)
        swapped = swap_linears(model, QUANTIZABLE["dit"], [], TorchBackend(TORCH_SPEC), "fp8")
        out = model(x, t, ctx, **kw)
    assert len(swapped) == sum(isinstance(m, QLinear) for m in model.modules()) > 0
    assert ((out - ref).norm() / ref.norm()).item() < 0.1


def test_bad_inputs_are_clear_errors():
    t2v, i2v = tiny(), tiny("tiny-i2v")
    x, t, ctx, kw = inputs(i2v.arch)
    with pytest.raises(LightqError, match="clip_fea"):
        i2v(x, t, ctx)
    with pytest.raises(LightqError, match="text-to-video"):
        t2v(x, t, ctx, **kw)
    with pytest.raises(LightqError, match="latents"):
        t2v(x[:, :8], t, ctx)
    with pytest.raises(LightqError, match="context"):
        t2v(x, t, torch.randn(2, 513, t2v.arch.text_dim))
    with pytest.raises(LightqError, match="patch size"):
        t2v(torch.randn(2, 16, 2, 7, 8), t, ctx)
    with pytest.raises(LightqError, match="y must be"):
        i2v(x, t, ctx, clip_fea=kw["clip_fea"], y=kw["y"][:, :4])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
@pytest.mark.parametrize("name", ["tiny", "tiny-i2v"])
def test_cuda_bf16_matches_cpu_and_fp8_swap(name):
    model = tiny(name).to(torch.bfloat16)
    x, t, ctx, kw = inputs(model.arch)
    with torch.no_grad():
        ref = model(x, t, ctx, **kw)
        model = model.cuda()
        cuda_kw = {k: v.cuda() for k, v in kw.items()}
        out = model(x.cuda(), t.cuda(), ctx.cuda(), **cuda_kw).cpu()
        assert ((out - ref).norm() / ref.norm()).item() < 0.02
        swap_linears(model, QUANTIZABLE["dit"], [], TorchBackend(TORCH_SPEC), "fp8")
        out8 = model(x.cuda(), t.cuda(), ctx.cuda(), **cuda_kw).cpu()
    assert ((out8 - ref).norm() / ref.norm()).item() < 0.1
