"""load_component and conversion round trips on the tiny models; published layouts; corruption errors."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lightq.checkpoints.conversion import convert
from lightq.checkpoints.conventions import open_source
from lightq.checkpoints.sources import DictSource
from lightq.checkpoints.writers import save_safetensors_atomic
from lightq.checkpoints.loader import load_component
from lightq.errors import CheckpointError
from lightq.models import clip, family, t5, wan_dit
from lightq.models.tiny import ensure_tiny
from lightq.quant.linear import QLinear, swap_linears
from lightq.quant.method import QuantMethod
from lightq.quant.schemes import FP8_DTYPE, QuantizedWeight

DIT = family.QUANTIZABLE["dit"]


def build_dit():
    return wan_dit.WanDiT(wan_dit.DIT_ARCHS["tiny-i2v"])


@pytest.fixture(scope="module")
def tiny_dir():
    return ensure_tiny("tiny-i2v")


@pytest.fixture(scope="module")
def dit_src(tiny_dir):
    return open_source(tiny_dir)


def _run(model):
    """One deterministic forward of the tiny I2V DiT."""
    torch.manual_seed(1)
    arch = wan_dit.DIT_ARCHS["tiny-i2v"]
    x = torch.randn(1, arch.out_dim, 1, 4, 4)
    y = torch.randn(1, arch.in_dim - arch.out_dim, 1, 4, 4)
    ctx = torch.randn(1, 8, arch.text_dim)
    clip_fea = torch.randn(1, 257, arch.clip_dim)
    with torch.no_grad():
        return model(x.bfloat16(), torch.tensor([500.0]), ctx.bfloat16(), clip_fea=clip_fea.bfloat16(),
                     y=y.bfloat16())


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k].reshape(-1).view(torch.uint8), sb[k].reshape(-1).view(torch.uint8))
        for k in sa)


@pytest.mark.parametrize("scheme, layouts_", [
    ("fp8", ["single", "chunked", "blocks", "lightx2v"]),
    ("int8", ["single", "blocks", "lightx2v"]),
    ("fp8-b128", ["single", "chunked"]),
    ("int4-g128", ["single", "blocks"]),
    ("fp8-pertensor", ["single", "blocks", "comfyui"]),
])
def test_dit_convert_then_load_equals_load_time_quantization(tmp_path, dit_src, scheme, layouts_):
    reference = load_component(build_dit, dit_src, include=DIT, method=QuantMethod.portable(scheme), component="dit")
    assert isinstance(reference.blocks[0].cross_attn.k_img, QLinear)
    ref_out = _run(reference)
    for layout in layouts_:
        out = tmp_path / (layout if layout in ("chunked", "blocks") else f"{layout}.safetensors")
        written = convert(dit_src, component="dit", scheme=scheme, output=out, layout=layout, shard_bytes=150_000,
                          progress=False)
        loaded = load_component(build_dit, open_source(written), include=DIT, method=QuantMethod.portable(scheme), component="dit")
        assert _same_state(loaded, reference), layout
        assert torch.equal(_run(loaded), ref_out), layout


def test_skip_patterns_keep_linears_high_precision(tmp_path, dit_src):
    skip = ["blocks.0.*", "*.ffn.2"]
    out = convert(dit_src, component="dit", scheme="int8", output=tmp_path / "m.safetensors", skip=skip,
                  progress=False)
    meta = open_source(out).metadata
    assert meta["lightq.skip"] == '["blocks.0.*", "*.ffn.2"]' and meta["lightq.scheme"] == "int8"
    assert meta["lightq.source_sha256"] and meta["lightq.component"] == "dit" and meta["lightq.version"]
    m = load_component(build_dit, open_source(out), include=DIT, method=QuantMethod.portable("int8", skip=skip))
    assert isinstance(m.blocks[0].self_attn.q, nn.Linear) and isinstance(m.blocks[1].ffn[2], nn.Linear)
    assert isinstance(m.blocks[1].ffn[0], QLinear)
    # a skipped layer in the file is loaded as the mode's skip asks; dropping the skip then finds a float weight
    with pytest.raises(CheckpointError, match=r"'blocks.0.self_attn.q.weight' is not quantized .* skip patterns"):
        load_component(build_dit, open_source(out), include=DIT, method=QuantMethod.portable("int8"))


@pytest.mark.parametrize("source", ["file", "random"])
def test_on_block_sees_each_block_complete_before_the_next_is_read(dit_src, source):
    """``on_block(model, i)`` comes once per block, in order, when block i is whole (quantized linears swapped, a
    skipped one in high precision) and nothing after it is loaded yet (later blocks and the tensors outside the
    blocks still on meta); the model loaded so equals the one loaded in one pass."""
    src = dit_src if source == "file" else "random"
    method = QuantMethod.portable("fp8", skip=["blocks.1.ffn.2"])
    seen = []

    def on_block(model, i):
        done = [not any(t.is_meta for t in b.state_dict().values()) for b in model.blocks]
        outside = [t.is_meta for k, t in model.state_dict().items() if not k.startswith("blocks.")]
        seen.append((i, done, all(outside), isinstance(model.blocks[i].ffn[0], QLinear),
                     type(model.blocks[i].ffn[2]) is nn.Linear))

    blockwise = load_component(build_dit, src, include=DIT, method=method, on_block=on_block, progress=False)
    count = len(blockwise.blocks)
    assert count >= 2
    assert seen == [(i, [j <= i for j in range(count)], True, True, i == 1) for i in range(count)]
    assert _same_state(blockwise, load_component(build_dit, src, include=DIT, method=method, progress=False))


@pytest.mark.parametrize("component, scheme", [("t5", "int8"), ("t5", "fp8"), ("clip", "fp8"), ("clip", "int8")])
def test_encoders_lightx2v_pth_round_trip(tmp_path, tiny_dir, component, scheme):
    if component == "t5":
        build, file = (lambda: t5.UMT5Encoder(t5.T5_ARCHS["tiny"])), "models_t5_umt5-xxl-enc-bf16.pth"
        ignore = ()
    else:
        build, file = (lambda: clip.ClipVisual(clip.CLIP_ARCHS["tiny"])), \
            "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
        ignore = clip.IGNORED_PREFIXES
    src = open_source(tiny_dir / file)
    inc = family.QUANTIZABLE[component]
    out = convert(src, component=component, scheme=scheme, output=tmp_path, layout="lightx2v", progress=False)
    assert out.name.endswith(f"-{scheme}.pth")
    raw = torch.load(out, weights_only=True)
    qkeys = [k for k in raw if k.endswith(".weight_scale")]
    assert qkeys and all(raw[k].dtype == torch.float32 and raw[k].shape[1] == 1 for k in qkeys)
    assert all(raw[k[: -len("_scale")]].dtype == (FP8_DTYPE if scheme == "fp8" else torch.int8) for k in qkeys)
    assert not any(k.startswith("textual.") for k in raw)
    assert all(v.dtype in (torch.float32, torch.int8, FP8_DTYPE) for v in raw.values())  # LightX2V: rest in fp32
    ref = load_component(build, src, include=inc, method=QuantMethod.portable(scheme), ignore_prefixes=ignore, dtype=torch.float32)
    got = load_component(build, open_source(out), include=inc, method=QuantMethod.portable(scheme), ignore_prefixes=ignore,
                         dtype=torch.float32)
    assert _same_state(got, ref)


# --- files written the way LightX2V's converter writes them (ComfyUI's: test_checkpoints_comfyui.py), independently of lightq.convert ---

def _lightx2v_file(state: dict, dtype: torch.dtype) -> dict:
    """LightX2V tools/convert: 2-D keys whose 3rd part is self_attn/cross_attn/ffn are quantized per row in the
    source dtype (scale = amax.clamp(1e-5) / qmax, int8 clamp [-128, 127]) as ``key`` + ``key_scale``; the rest
    is cast to fp32."""
    out = {}
    for k, w in state.items():
        parts = k.split(".")
        if w.dim() == 2 and len(parts) > 2 and parts[2] in ("self_attn", "cross_attn", "ffn"):
            amax = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-5)
            if dtype == torch.int8:
                s = amax / 127
                q = torch.clamp(torch.round(w / s), -128, 127).to(torch.int8)
            else:
                s = amax / torch.finfo(FP8_DTYPE).max
                q = torch.clip(w / s, -448, 448).float().to(FP8_DTYPE)
            out[k], out[k + "_scale"] = q, s.view(w.shape[0], -1)
        else:
            out[k] = w.float()
    return out


def _expected_from(file: dict, scheme: str):
    """The reference: the DiT with exactly the file's (data, scale) put into QLinears by hand."""
    torch.manual_seed(0)
    model = build_dit()
    model.load_state_dict({k: v for k, v in file.items() if not k.endswith("_scale") and k in model.state_dict() and v.dtype.is_floating_point
                           and v.dtype != FP8_DTYPE}, strict=False)
    model = model.to(torch.bfloat16)

    def weight_for(name, lin):
        d = file[name + ".weight"]
        s = file[name + ".weight_scale"]
        return QuantizedWeight(scheme, d, s.float().contiguous(), d.shape[0], d.shape[1])

    from lightq.backends.registry import specs
    swap_linears(model, DIT, (), specs()["torch"].load(), scheme, weight_for)
    return model.eval()


@pytest.mark.parametrize("qdtype, scheme", [(torch.int8, "int8"), (FP8_DTYPE, "fp8")])
def test_lightx2v_converter_file_loads_and_matches(tmp_path, dit_src, qdtype, scheme):
    state = {k: dit_src[k] for k in dit_src}
    file = _lightx2v_file(state, qdtype)
    assert any(v.dtype == torch.bfloat16 for k, v in file.items() if k.endswith("_scale"))
    save_file(file, tmp_path / "wan_lightx2v.safetensors")
    got = load_component(build_dit, open_source(tmp_path / "wan_lightx2v.safetensors"), include=DIT, method=QuantMethod.portable(scheme))
    assert torch.equal(_run(got), _run(_expected_from(file, scheme)))


# --- corruption and mismatch: each its own clear error ---

@pytest.fixture(scope="module")
def fp8_file(tmp_path_factory, dit_src):
    out = tmp_path_factory.mktemp("fp8") / "m.safetensors"
    return convert(dit_src, component="dit", scheme="fp8", output=out, progress=False)


def _edit(fp8_file, tmp_path, change, metadata=None):
    t = load_file(fp8_file)
    change(t)
    p = tmp_path / "bad.safetensors"
    save_safetensors_atomic(t, p, metadata if metadata is not None else open_source(fp8_file).metadata)
    return open_source(p)


Q = "blocks.1.ffn.0"


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop(Q + ".weight_scale"), rf"its scale '{Q}.weight_scale' is missing"),
    (lambda t: t.__setitem__(Q + ".weight_scale", t[Q + ".weight_scale"].t().contiguous()), r"\(it is transposed\)"),
    (lambda t: t.__setitem__(Q + ".weight_scale", t[Q + ".weight_scale"].half()), r"is torch.float16, lightq needs float32"),
    (lambda t: t.__setitem__(Q + ".weight_scale", t[Q + ".weight_scale"].bfloat16()), r"is torch.bfloat16, lightq needs float32"),
    (lambda t: t[Q + ".weight"].view(torch.uint8)[0, 0].fill_(0x7F), rf"'{Q}.weight' holds 1 NaN values"),
    (lambda t: t[Q + ".weight_scale"].__setitem__((0, 0), float("inf")), r"holds NaN/Inf values"),
    (lambda t: t[Q + ".weight_scale"].__setitem__((0, 0), 0.0), r"zero or negative"),
    (lambda t: t.__setitem__(Q + ".weight", t[Q + ".weight"].float()), rf"'{Q}.weight' is not quantized"),
])
def test_corrupt_quantized_tensors(tmp_path, fp8_file, change, message):
    src = _edit(fp8_file, tmp_path, change)
    with pytest.raises(CheckpointError, match=message):
        load_component(build_dit, src, include=DIT, method=QuantMethod.portable("fp8"))


def test_mode_file_mismatch(fp8_file):
    with pytest.raises(CheckpointError, match="holds scheme 'fp8' .* mode expects 'int8'"):
        load_component(build_dit, open_source(fp8_file), include=DIT, method=QuantMethod.portable("int8"))
    with pytest.raises(CheckpointError, match="quantized .* mode is 'none'"):
        load_component(build_dit, open_source(fp8_file), include=DIT, method=QuantMethod.portable(None))
    with pytest.raises(CheckpointError, match="'dit' checkpoint .* not 't5'"):
        load_component(build_dit, open_source(fp8_file), include=DIT, method=QuantMethod.portable("fp8"), component="t5")


def test_lightx2v_layout_mismatch_without_metadata(tmp_path, fp8_file):
    src = _edit(fp8_file, tmp_path, lambda t: None, metadata={})  # no lightq header: detected from dtypes
    with pytest.raises(CheckpointError, match=r"'blocks.0.self_attn.q.weight' is stored as fp8 but the mode expects int8"):
        load_component(build_dit, src, include=DIT, method=QuantMethod.portable("int8"))


def test_nan_weight_in_float_checkpoint(dit_src):
    t = {k: dit_src[k].clone() for k in dit_src}
    t["blocks.1.self_attn.v.weight"][3, 2] = float("nan")
    with pytest.raises(Exception, match=r"blocks.1.self_attn.v.weight: 1 NaN/Inf"):
        load_component(build_dit, DictSource(t), include=DIT, method=QuantMethod.portable("int8"))


def test_key_errors_are_listed(dit_src):
    t = {k: dit_src[k] for k in dit_src}
    missing = [k for k in t if k.startswith("blocks.1.")]
    for k in missing:
        del t[k]
    t["extra.thing"] = torch.zeros(1)
    t["head.head.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as err:
        load_component(build_dit, DictSource(t, "ckpt"), include=DIT, method=QuantMethod.portable("fp8"))
    msg = str(err.value)
    assert f"and {len(missing) - 5} more" in msg and "unexpected: extra.thing" in msg
    assert "mis-shaped: head.head.weight (file (3, 3)" in msg


def test_random_weights_are_seeded_and_real_architecture():
    a = load_component(build_dit, "random", include=DIT, method=QuantMethod.portable("int8"), seed=3)
    b = load_component(build_dit, "random", include=DIT, method=QuantMethod.portable("int8"), seed=3)
    c = load_component(build_dit, "random", include=DIT, method=QuantMethod.portable("int8"), seed=4)
    assert _same_state(a, b) and not _same_state(a, c)
    assert isinstance(a.blocks[0].self_attn.q, QLinear) and torch.isfinite(_run(a).float()).all()


def test_building_the_models_on_meta_does_not_import_the_compiler():
    """Every model is built on the meta device to be loaded; random init there (``normal_``, ``randn``) goes
    through torch's reference ops, which import torch._dynamo: seconds of every job's load stage."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from lightq.models.t5 import UMT5Encoder, T5_ARCHS\n"
            "from lightq.models.clip import ClipVisual, CLIP_ARCHS\n"
            "from lightq.models.vae import WanVAE, VAE_ARCHS\n"
            "from lightq.models.wan_dit import WanDiT, DIT_ARCHS\n"
            "with torch.device('meta'):\n"
            "    [UMT5Encoder(T5_ARCHS['tiny']), ClipVisual(CLIP_ARCHS['tiny']), WanVAE(VAE_ARCHS['tiny']),\n"
            "     WanDiT(DIT_ARCHS['tiny-i2v'])]\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_include_left_out_keeps_a_pre_quantized_file_quantized(fp8_file, dit_src):
    """Without include=, a quantized mode on a pre-quantized file takes every linear the file holds quantized
    (it used to dequantize them all); on float weights it asks for include= instead of quantizing nothing."""
    method = QuantMethod.portable("fp8")
    default = load_component(build_dit, open_source(fp8_file), method=method, progress=False)
    named = load_component(build_dit, open_source(fp8_file), include=DIT, method=method, progress=False)
    count = sum(isinstance(m, QLinear) for m in default.modules())
    assert count > 0 and count == sum(isinstance(m, QLinear) for m in named.modules())
    assert _same_state(default, named)
    with pytest.raises(CheckpointError, match="needs include="):
        load_component(build_dit, dit_src, method=method, progress=False)
