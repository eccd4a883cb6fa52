"""CLIP ViT-H/14 vision tower: official key layout, Wan's preprocessing, penultimate output, meta loading, fp8 swap."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightq.backends.torch_backend import SPEC as TORCH_SPEC
from lightq.errors import LightqError
from lightq.models.clip import CLIP_ARCHS, CLIP_MEAN, CLIP_STD, IGNORED_PREFIXES, ClipArch, ClipVisual
from lightq.models.family import QUANTIZABLE
from lightq.quant.linear import QLinear, selected, swap_linears

TINY = CLIP_ARCHS["tiny"]


def expected_shapes(a: ClipArch) -> dict[str, tuple[int, ...]]:
    """``visual.*`` keys of Wan's XLMRobertaCLIP (VisionTransformer, pool 'token', pre_norm: conv without bias)."""
    w, hidden, grid = a.width, a.width * a.mlp_ratio, a.image_size // a.patch_size
    keys = {
        "visual.patch_embedding.weight": (w, 3, a.patch_size, a.patch_size),
        "visual.cls_embedding": (1, 1, w),
        "visual.pos_embedding": (1, grid * grid + 1, w),
        "visual.pre_norm.weight": (w,), "visual.pre_norm.bias": (w,),
        "visual.post_norm.weight": (w,), "visual.post_norm.bias": (w,),
        "visual.head": (w, a.embed_dim),
    }
    for i in range(a.num_layers):
        p = f"visual.transformer.{i}."
        keys.update({
            p + "norm1.weight": (w,), p + "norm1.bias": (w,),
            p + "attn.to_qkv.weight": (3 * w, w), p + "attn.to_qkv.bias": (3 * w,),
            p + "attn.proj.weight": (w, w), p + "attn.proj.bias": (w,),
            p + "norm2.weight": (w,), p + "norm2.bias": (w,),
            p + "mlp.0.weight": (hidden, w), p + "mlp.0.bias": (hidden,),
            p + "mlp.2.weight": (w, hidden), p + "mlp.2.bias": (w,),
        })
    return keys


@pytest.mark.parametrize("name", sorted(CLIP_ARCHS))
def test_state_dict_keys_and_shapes_match_official_layout(name):
    with torch.device("meta"):
        model = ClipVisual(name)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes(CLIP_ARCHS[name])
    assert not list(model.buffers())


def test_vit_h_14_size():
    a = CLIP_ARCHS["vit-h-14"]
    assert (a.image_size, a.patch_size, a.width, a.num_layers, a.num_heads, a.mlp_ratio, a.embed_dim) == \
        (224, 14, 1280, 32, 16, 4, 1024)
    assert a.num_tokens == 257 and TINY.num_tokens == 257
    with torch.device("meta"):
        model = ClipVisual("vit-h-14")
    assert len(model.state_dict()) == 392  # the official visual tower: 8 + 32 * 12 tensors


def test_ignored_prefixes_cover_the_text_tower_only():
    assert IGNORED_PREFIXES == ("textual.", "log_scale")
    with torch.device("meta"):
        model = ClipVisual("tiny")
    assert not any(k.startswith(IGNORED_PREFIXES) for k in model.state_dict())


@pytest.mark.parametrize("name", sorted(CLIP_ARCHS))
def test_quantizable_patterns_select_exactly_the_block_linears(name):
    with torch.device("meta"):
        model = ClipVisual(name)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    per_block = ("attn.to_qkv", "attn.proj", "mlp.0", "mlp.2")
    assert linears == {f"visual.transformer.{i}.{s}" for i in range(CLIP_ARCHS[name].num_layers) for s in per_block}
    assert all(selected(n, QUANTIZABLE["clip"], ()) for n in linears)
    others = {n for n, _ in model.named_modules()} - linears
    assert not any(selected(n, QUANTIZABLE["clip"], ()) for n in others)


# --- numerics -----------------------------------------------------------------------------------------------------

def reference_forward(sd: dict[str, torch.Tensor], a: ClipArch, images: torch.Tensor) -> torch.Tensor:
    """Wan's ``CLIPModel.visual`` (``use_31_block=True``) written from the official formulas, in fp32."""
    sd = {k: v.float() for k, v in sd.items()}
    x = F.interpolate(images.float(), size=(a.image_size,) * 2, mode="bicubic", align_corners=False)
    x = (x * 0.5 + 0.5 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    x = F.conv2d(x, sd["visual.patch_embedding.weight"], stride=a.patch_size).flatten(2).transpose(1, 2)
    b, w, h = x.shape[0], a.width, a.num_heads
    x = torch.cat([sd["visual.cls_embedding"].expand(b, -1, -1), x], 1) + sd["visual.pos_embedding"]

    def ln(t, name):
        return F.layer_norm(t, (w,), sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    x = ln(x, "visual.pre_norm")
    for i in range(a.num_layers - 1):
        p = f"visual.transformer.{i}."
        qkv = F.linear(ln(x, p + "norm1"), sd[p + "attn.to_qkv.weight"], sd[p + "attn.to_qkv.bias"])
        q, k, v = qkv.view(b, -1, 3, h, w // h).unbind(2)
        scores = torch.einsum("bihc,bjhc->bhij", q, k) / (w // h) ** 0.5
        attn = torch.einsum("bhij,bjhc->bihc", scores.softmax(-1), v).reshape(b, -1, w)
        x = x + F.linear(attn, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        hid = F.gelu(F.linear(ln(x, p + "norm2"), sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"]))
        x = x + F.linear(hid, sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"])
    return x


def images(batch=2, height=160, width=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return ClipVisual(TINY).eval()


def test_forward_matches_reference_formulas(tiny_model):
    x = images()
    with torch.no_grad():
        out = tiny_model(x)
        want = reference_forward(tiny_model.state_dict(), TINY, x)
    assert out.shape == (2, 257, TINY.width)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    assert out.std(1).mean() > 0.05  # tokens differ: not degenerate


def test_preprocessing_of_a_constant_image():
    model = ClipVisual(TINY)
    value = torch.tensor([0.2, -0.6, 1.0])
    pixels = model.preprocess(value.view(1, 3, 1, 1).expand(1, 3, 97, 301))
    assert pixels.shape == (1, 3, 224, 224)
    want = ((value * 0.5 + 0.5) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(pixels, want.view(1, 3, 1, 1).expand_as(pixels), rtol=1e-5, atol=1e-5)


def test_output_is_the_penultimate_block(tiny_model):
    model = ClipVisual(TINY).eval()
    model.load_state_dict(tiny_model.state_dict())
    x = images(batch=1)
    with torch.no_grad():
        before = model(x)
        last = model.visual.transformer[-1]
        for p in last.parameters():
            p.add_(1.0)
        model.visual.post_norm.weight.mul_(3.0)
        model.visual.head.mul_(3.0)
        assert torch.equal(model(x), before)
        model.visual.transformer[0].mlp[2].bias.add_(1.0)
        assert not torch.allclose(model(x), before)


def test_meta_construction_and_assign_load_reproduce_outputs(tiny_model, tmp_path):
    path = tmp_path / "clip.pth"
    state = {k: v.half() for k, v in tiny_model.state_dict().items()}
    state.update({"textual.token_embedding.weight": torch.zeros(4, 8), "log_scale": torch.tensor(4.6)})
    torch.save(state, path)
    loaded_file = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    visual = {k: v for k, v in loaded_file.items() if not k.startswith(IGNORED_PREFIXES)}
    with torch.device("meta"):
        loaded = ClipVisual(TINY)
    loaded.load_state_dict(visual, assign=True, strict=True)
    loaded.eval()
    assert all(p.device.type == "cpu" and p.dtype == torch.float16 for p in loaded.parameters())
    eager = ClipVisual(TINY).eval()
    eager.load_state_dict(visual)
    x = images()
    with torch.no_grad():
        out = loaded(x)
        want = reference_forward(visual, TINY, x)
    assert out.dtype == torch.float16
    with torch.no_grad():
        assert torch.equal(out, eager.half()(x))
    assert (out.float() - want).norm() / want.norm() < 0.01


def test_fp8_torch_swap_stays_close_and_keeps_norms_and_embeddings(tiny_model):
    model = ClipVisual(TINY).eval()
    model.load_state_dict(tiny_model.state_dict())
    model = model.bfloat16()
    x = images()
    with torch.no_grad():
        want = model(x).float()
    untouched = {k: v.clone() for k, v in model.state_dict().items() if ".attn." not in k and ".mlp." not in k}
    swapped = swap_linears(model, QUANTIZABLE["clip"], (), TORCH_SPEC.load(), "fp8")
    assert len(swapped) == 4 * TINY.num_layers
    assert all(isinstance(model.get_submodule(n), QLinear) for n in swapped)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    after = model.state_dict()
    for k, v in untouched.items():
        assert torch.equal(after[k], v), k
    with torch.no_grad():
        got = model(x).float()
    assert (got - want).norm() / want.norm() < 0.1


@pytest.mark.parametrize("bad, what", [
    (torch.zeros(3, 224, 224), "expected images \\[batch, 3, height, width\\]"),
    (torch.zeros(1, 4, 224, 224), "expected images"),
    (torch.zeros(1, 3, 224, 224, dtype=torch.uint8), "float images"),
])
def test_bad_images_raise_clear_errors(tiny_model, bad, what):
    with pytest.raises(LightqError, match=what):
        tiny_model(bad)


def test_unknown_and_bad_arch():
    with pytest.raises(LightqError, match="unknown CLIP architecture 'vit-l-14'"):
        ClipVisual("vit-l-14")
    with pytest.raises(LightqError, match="not a multiple of patch_size"):
        ClipArch(image_size=225)
    with pytest.raises(LightqError, match="not divisible by num_heads"):
        ClipArch(width=100, num_heads=16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_and_fp8_torch_match_cpu_reference(tiny_model, dtype):
    x = images()
    with torch.no_grad():
        want = reference_forward(tiny_model.state_dict(), TINY, x)
    model = ClipVisual(TINY).eval()
    model.load_state_dict(tiny_model.state_dict())
    model = model.to("cuda", dtype)
    with torch.no_grad():
        half = model(x.cuda()).float().cpu()
    assert (half - want).norm() / want.norm() < 0.03
    swap_linears(model, QUANTIZABLE["clip"], (), TORCH_SPEC.load(), "fp8")
    with torch.no_grad():
        fp8 = model(x.cuda()).float().cpu()
    assert (fp8 - want).norm() / want.norm() < 0.1
