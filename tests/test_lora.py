"""LoRA files in every published naming, built here from the tiny model's own layers: the merge against a hand-
computed W + s * (alpha / r) * B @ A, strength 0 bit-identical to no LoRA, merged vs unmerged within a derived bound,
the refusals, and the way it composes with conversion, pre-quantized files, offload, sweeps and result.json."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

from lightq import config, hardware, plan
from lightq.checkpoints.conversion import convert
from lightq.checkpoints.loader import load_component
from lightq.checkpoints.lora import load_loras, model_names
from lightq.checkpoints.conventions import open_source
from lightq.checkpoints.sources import DictSource
from lightq.convert import open_component_source
from lightq.errors import CheckpointError, LightqError
from lightq.models.family import QUANTIZABLE, WAN21
from lightq.paths import conf_dir
from lightq.pipeline import components as C
from lightq.quant.linear import QLinear
from lightq.quant.lora import LoraLinear, LowRankPath
from lightq.quant.method import QuantMethod
from lightq.quant.schemes import dequantize_weight, quantize_weight

FAST = ["hardware=cpu", "model.frames=5", "sampler.steps=2"]
DIFFUSERS = {  # official module -> diffusers module, for the layers of block 0 and the embeddings
    "blocks.0.self_attn.q": "blocks.0.attn1.to_q", "blocks.0.self_attn.k": "blocks.0.attn1.to_k",
    "blocks.0.self_attn.v": "blocks.0.attn1.to_v", "blocks.0.self_attn.o": "blocks.0.attn1.to_out.0",
    "blocks.0.cross_attn.q": "blocks.0.attn2.to_q", "blocks.0.cross_attn.o": "blocks.0.attn2.to_out.0",
    "blocks.0.cross_attn.k_img": "blocks.0.attn2.add_k_proj", "blocks.0.cross_attn.v_img": "blocks.0.attn2.add_v_proj",
    "blocks.0.ffn.0": "blocks.0.ffn.net.0.proj", "blocks.0.ffn.2": "blocks.0.ffn.net.2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2", "head.head": "proj_out",
}


@pytest.fixture(scope="module")
def cfg_of():
    config.register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        yield lambda *overrides: compose("config", overrides=[*FAST, *overrides])


def dit_source(model: str = "tiny"):
    return open_component_source(model, "dit")


def factors(source, modules, rank: int, seed: int = 0):
    """Random bf16 (down [r, K], up [N, r]) per module, sized from the checkpoint."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        n, k = source.shape(m + ".weight")
        out[m] = ((torch.randn(rank, k, generator=g) * 0.1).to(torch.bfloat16),
                  (torch.randn(n, rank, generator=g) * 0.1).to(torch.bfloat16))
    return out


def write(path: Path, tensors: dict) -> str:
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def hand_merged(w, pairs):
    """W + sum s * c * B @ A, B @ A as a sum of rank-one outer products in float64 (no matmul: exact for bf16
    factors), rounded to fp32 once."""
    acc = w.double().clone()
    for s, c, down, up in pairs:
        product = sum(torch.outer(up[:, j].double(), down[j].double()) for j in range(down.shape[0]))
        acc += product * (s * c)
    return acc.float()


def stack_for(model: str, entries, mode="merged", quantized=()):
    build = WAN21.components["dit"].build(model)
    with torch.device("meta"):
        shapes, linears = model_names(build())
    return build, load_loras(entries, mode, shapes, linears, set(quantized))


def load_fp32(model: str, entries, mode="merged", method=None):
    build, stack = stack_for(model, entries, mode)
    dit = load_component(build, dit_source(model), include=QUANTIZABLE["dit"], method=method, dtype=torch.float32,
                         progress=False, lora=stack)
    return dit, stack


NAMINGS = ["official-down-up", "official-A-B", "diffusers", "kohya", "comfyui-prefixed"]


def naming_file(naming: str, tmp_path: Path, src, alpha: float, rank: int = 4):
    """A LoRA file in ``naming`` on every linear of block 0 + embeddings/head (tiny-i2v), and its factors."""
    mods = list(DIFFUSERS)
    fac = factors(src, mods, rank)
    t = {}
    for m, (down, up) in fac.items():
        if naming == "official-down-up":
            t |= {f"{m}.lora_down.weight": down, f"{m}.lora_up.weight": up, f"{m}.alpha": torch.tensor(alpha)}
        elif naming == "official-A-B":
            t |= {f"{m}.lora_A.weight": down, f"{m}.lora_B.weight": up, f"{m}.alpha": torch.tensor(alpha)}
        elif naming == "diffusers":
            d = DIFFUSERS[m]
            t |= {f"transformer.{d}.lora_A.weight": down, f"transformer.{d}.lora_B.weight": up,
                  f"transformer.{d}.alpha": torch.tensor(alpha)}
        elif naming == "kohya":
            u = "lora_unet_" + m.replace(".", "_")
            t |= {f"{u}.lora_down.weight": down, f"{u}.lora_up.weight": up, f"{u}.alpha": torch.tensor(alpha)}
        else:
            t |= {f"diffusion_model.{m}.lora_down.weight": down, f"diffusion_model.{m}.lora_up.weight": up,
                  f"diffusion_model.{m}.alpha": torch.tensor(alpha)}
    return write(tmp_path / f"{naming}.safetensors", t), fac


@pytest.mark.parametrize("naming", NAMINGS)
def test_merge_matches_hand_computed_in_every_naming(naming, tmp_path):
    """Every targeted weight equals W + s * (alpha / r) * B @ A (computed here as outer products), every other tensor
    is the checkpoint's, bit for bit (fp32 load, no quantization)."""
    src = dit_source("tiny-i2v")
    path, fac = naming_file(naming, tmp_path, src, alpha=2.0)
    dit, stack = load_fp32("tiny-i2v", [{"path": path, "strength": 0.7}])
    state = dit.state_dict()
    for key in state:
        module = key.rpartition(".")[0]
        if module in fac and key.endswith(".weight"):
            down, up = fac[module]
            assert torch.equal(state[key], hand_merged(src[key], [(0.7, 2.0 / 4, down, up)])), key
        else:
            assert torch.equal(state[key], src[key].float()), f"{key} changed without a LoRA term"
    rec = stack.record()
    assert rec["layers"] == len(fac) and rec["loras"][0]["ranks"] == [4] and rec["mode"] == "merged"
    expected = {"official-down-up": "official", "official-A-B": "official", "comfyui-prefixed": "official"}
    assert rec["loras"][0]["naming"] == expected.get(naming, naming)


def test_no_alpha_scales_by_one_and_loras_stack_in_order(tmp_path):
    src = dit_source()
    m = "blocks.1.ffn.0"
    (d1, u1), = factors(src, [m], 3, seed=1).values()
    (d2, u2), = factors(src, [m], 5, seed=2).values()
    a = write(tmp_path / "a.safetensors", {f"{m}.lora_A.weight": d1, f"{m}.lora_B.weight": u1})
    b = write(tmp_path / "b.safetensors", {f"{m}.lora_down.weight": d2, f"{m}.lora_up.weight": u2,
                                           f"{m}.alpha": torch.tensor(10.0)})
    dit, _ = load_fp32("tiny", [{"path": a, "strength": 1.0}, {"path": b, "strength": -0.5}])
    want = hand_merged(src[m + ".weight"], [(1.0, 1.0, d1, u1), (-0.5, 2.0, d2, u2)])
    # two LoRAs are summed in float64 before the one fp32 rounding; the hand sum rounds once too
    assert torch.allclose(dit.state_dict()[m + ".weight"], want, rtol=0, atol=2e-7)


def test_diff_and_diff_b_full_deltas(tmp_path):
    """``.diff`` changes ``<p>.weight`` (or parameter ``<p>``: modulation), ``.diff_b`` and PEFT's ``lora_B.bias``
    change ``<p>.bias``, each scaled by the strength only."""
    src = dit_source()
    g = torch.Generator().manual_seed(3)
    deltas = {"blocks.0.norm3.weight": "blocks.0.norm3.diff", "blocks.1.modulation": "blocks.1.modulation.diff",
              "blocks.0.self_attn.q.bias": "blocks.0.self_attn.q.diff_b",
              "blocks.1.cross_attn.o.weight": "diffusion_model.blocks.1.cross_attn.o.diff",
              "head.head.bias": "transformer.proj_out.lora_B.bias"}
    t = {lkey: torch.randn(src.shape(key), generator=g) * 0.01 for key, lkey in deltas.items()}
    path = write(tmp_path / "diff.safetensors", t)
    dit, stack = load_fp32("tiny", [{"path": path, "strength": 0.5}])
    state = dit.state_dict()
    for key, lkey in deltas.items():
        assert torch.equal(state[key], (src[key].double() + 0.5 * t[lkey].double()).float()), key
    assert stack.record()["loras"][0]["full_deltas"] == len(deltas)


@pytest.mark.parametrize("scheme", ["fp8", "int8", "fp8-b128", "int4-g128"])
def test_merged_quantized_is_quantize_of_the_merged_weight_and_equals_convert(scheme, tmp_path):
    """Merged at load = quantize_weight(merged weight) = lightq.convert with the LoRA = converting a float checkpoint
    that holds the merged fp32 weight: bit for bit."""
    src = dit_source()
    mods = ["blocks.0.self_attn.q", "blocks.1.ffn.2", "blocks.1.cross_attn.k"]
    fac = factors(src, mods, 8)
    t = {}
    for m, (d, u) in fac.items():
        t |= {f"{m}.lora_down.weight": d, f"{m}.lora_up.weight": u, f"{m}.alpha": torch.tensor(4.0)}
    path = write(tmp_path / "l.safetensors", t)
    entries = [{"path": path, "strength": 0.9}]
    dit, _ = load_fp32("tiny", entries, method=QuantMethod.portable(scheme))
    merged = {k: src[k] for k in src}
    for m, (d, u) in fac.items():
        merged[m + ".weight"] = hand_merged(src[m + ".weight"], [(0.9, 0.5, d, u)])
        q = dit.get_submodule(m)
        qw = quantize_weight(merged[m + ".weight"], scheme)
        assert torch.equal(q.data.view(torch.uint8), qw.data.view(torch.uint8)), m
        assert torch.equal(q.scale, qw.scale), m
    out_lora = convert(src, component="dit", scheme=scheme, output=tmp_path / "with-lora.safetensors",
                       progress=False, lora=stack_for("tiny", entries)[1])
    out_float = convert(DictSource(merged, "merged"), component="dit", scheme=scheme,
                        output=tmp_path / "of-merged.safetensors", progress=False)
    a, b = load_file(out_lora), load_file(out_float)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
    assert "lightq.lora" in open_source(out_lora).metadata


def test_pre_quantized_file_is_dequantized_merged_requantized_and_says_so(tmp_path):
    src = dit_source()
    fp8 = open_source(convert(src, component="dit", scheme="fp8", output=tmp_path / "fp8.safetensors",
                              progress=False))
    m = "blocks.0.ffn.0"
    (d, u), = factors(src, [m], 4).values()
    path = write(tmp_path / "l.safetensors", {f"{m}.lora_down.weight": d, f"{m}.lora_up.weight": u})
    build, stack = stack_for("tiny", [{"path": path, "strength": 1.0}], quantized=[m])
    dit = load_component(build, fp8, include=QUANTIZABLE["dit"], method=QuantMethod.portable("fp8"), progress=False,
                         lora=stack)
    from lightq.checkpoints.formats import read_quantized

    base = dequantize_weight(read_quantized(fp8, m, "fp8", tuple(src.shape(m + ".weight"))))
    want = quantize_weight(hand_merged(base, [(1.0, 1.0, d, u)]), "fp8")
    assert torch.equal(dit.get_submodule(m).data.view(torch.uint8), want.data.view(torch.uint8))
    rec = stack.record()
    assert rec["requantized_layers"] == 1 and "dequantized, merged and requantized" in rec["note"]


def tiny_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 2, 8, 8, generator=g), torch.tensor([600.0]), torch.randn(1, 7, 128, generator=g))


def all_linears_file(tmp_path: Path, rank=4, extra=None) -> str:
    src = dit_source()
    mods = [k[:-7] for k in src if k.endswith(".weight") and len(src.shape(k)) == 2]
    t = dict(extra or {})
    for m, (d, u) in factors(src, mods, rank, seed=5).items():
        t |= {f"{m}.lora_down.weight": d, f"{m}.lora_up.weight": u, f"{m}.alpha": torch.tensor(2.0 * rank)}
    return write(tmp_path / "all.safetensors", t)


def dit_of(cfg):
    hw = hardware.resolve("cpu")
    method = C.quant_methods(cfg, plan.plan_run(cfg, hw))["dit"]
    return C.load_dit(cfg, method, C.model_folder(cfg), torch.device("cpu"), torch.bfloat16, False)


@pytest.mark.parametrize("mode", ["none", "fp8-torch", "int4-g128-torch"])
def test_strength_zero_is_bit_identical_to_no_lora(cfg_of, tmp_path, mode):
    """Merged and unmerged at strength 0: the same DiT output, bit for bit, as without any LoRA (bf16, a per-channel
    and the weight-only scheme; the merge is one code path for every scheme, checked bit for bit per scheme above)."""
    diff = {"blocks.0.norm3.diff": torch.full((128,), 0.25)}
    path = all_linears_file(tmp_path, extra=diff)
    ref = dit_of(cfg_of(f"dit_quant={mode}"))(*tiny_inputs())
    for lora_mode in ("merged", "unmerged"):
        dit = dit_of(cfg_of(f"dit_quant={mode}", f"lora=[{{path: '{path}', strength: 0}}]", f"lora_mode={lora_mode}"))
        assert torch.equal(dit(*tiny_inputs()), ref), lora_mode
        on = dit_of(cfg_of(f"dit_quant={mode}", f"lora=[{{path: '{path}', strength: 1}}]", f"lora_mode={lora_mode}"))
        assert not torch.equal(on(*tiny_inputs()), ref), f"{lora_mode}: the LoRA at strength 1 changed nothing"


def test_unmerged_strengths_change_without_reloading(cfg_of, tmp_path):
    """set_strengths rescales every side path and re-merges full deltas in place: strength 0 gives the no-LoRA output
    and back to 0.8 the 0.8 output, bit for bit, with the same modules."""
    path = all_linears_file(tmp_path, extra={"blocks.1.norm3.diff": torch.full((128,), 0.5)})
    dit = dit_of(cfg_of("dit_quant=fp8-torch", f"lora=[{{path: '{path}', strength: 0.8}}]", "lora_mode=unmerged"))
    paths = [m for m in dit.modules() if isinstance(m, LowRankPath)]
    assert isinstance(dit.blocks[0].self_attn.q, QLinear) and dit.blocks[0].self_attn.q.lora is not None
    assert isinstance(dit.text_embedding[0], LoraLinear) and dit.time_embedding[0].lora is not None
    at_08 = dit(*tiny_inputs())
    dit.lora_stack.set_strengths(dit, [0.0])
    assert torch.equal(dit(*tiny_inputs()), dit_of(cfg_of("dit_quant=fp8-torch"))(*tiny_inputs()))
    dit.lora_stack.set_strengths(dit, [0.8])
    assert torch.equal(dit(*tiny_inputs()), at_08)
    assert [m for m in dit.modules() if isinstance(m, LowRankPath)] == paths
    merged = dit_of(cfg_of("dit_quant=fp8-torch", f"lora=[{{path: '{path}', strength: 0.8}}]"))
    with pytest.raises(LightqError, match="merged"):
        merged.lora_stack.set_strengths(merged, [0.5])


def test_merged_and_unmerged_layer_agree_within_the_derived_bound(tmp_path):
    """One fp8 linear (torch backend, bf16 activations), merged vs unmerged, D = s c B A:

    merged   y_m = Q(x) . Q(W + D)^T
    unmerged y_u = Q(x) . Q(W)^T + ((x A^T) s c) B^T

    so, exactly, y_m - y_u = Q(x) . (e(W + D) - e(W))^T + (Q(x) - x) . D^T, with e(V) = Q(V) - V the weight
    quantization error and Q(x) - x the activation's (both known here). What the computed outputs may add to that
    is rounding only, so per element

      |y_m - y_u - Q(x) (e(W + D) - e(W))^T - (Q(x) - x) D^T|
          <= u (|y_m| + |y_base| + |y_u|) + 2 u (|h| s c) |B|^T + 2 K 2**-24 (|Q(x)| (|W| + |W + D|)^T + |x| |D|^T)

    u = 2**-8: the bf16 roundings of the two outputs, of the base output inside the unmerged one, and of the side
    path's h = x A^T and h s c; the last term the fp32 accumulations over K. The format bounds of e(.) (fp8:
    max(|v| 2**-4, s_v 2**-10)) then bound the first two terms for any weights."""
    g = torch.Generator().manual_seed(7)
    n, k, r, s, c = 96, 160, 8, 0.8, 0.5
    w = torch.randn(n, k, generator=g) / k ** 0.5
    down, up = (torch.randn(r, k, generator=g) * 0.2).bfloat16(), (torch.randn(n, r, generator=g) * 0.2).bfloat16()
    x = torch.randn(33, k, generator=g).to(torch.bfloat16)
    m = "blocks.0.self_attn.q"
    method = QuantMethod.portable("fp8")
    lora = write(tmp_path / "l.safetensors", {f"{m}.lora_down.weight": down, f"{m}.lora_up.weight": up,
                                              f"{m}.alpha": torch.tensor(c * r)})
    stack = load_loras([{"path": lora, "strength": s}], "unmerged", {m + ".weight": (n, k)}, {m}, {m})
    merged_w = stack.merged(m + ".weight", w)
    d = merged_w.double() - w.double()
    qw_m, qw = quantize_weight(merged_w, "fp8"), quantize_weight(w, "fp8")
    qm, qu, base = (method.linear(m, q, None) for q in (qw_m, qw, qw))
    stack.attach_side_path(qu, m, torch.bfloat16, "cpu")
    y_m, y_u, y_base = (lin(x).double() for lin in (qm, qu, base))

    from lightq.quant.schemes import dequantize_activation, quantize_activation

    qx = dequantize_activation(*quantize_activation(x, "fp8"), "fp8").double()
    xd = x.double()
    e_m = dequantize_weight(qw_m).double() - merged_w.double()
    e_w = dequantize_weight(qw).double() - w.double()
    explained = qx @ (e_m - e_w).t() + (qx - xd) @ d.t()
    u = 2 ** -8
    h = (xd @ down.double().t()).abs()
    bound = (u * (y_m.abs() + y_base.abs() + y_u.abs()) + 2 * u * (h * s * c) @ up.double().abs().t()
             + 2 * k * 2 ** -24 * (qx.abs() @ (w.double().abs() + merged_w.double().abs()).t() + xd.abs() @ d.abs().t()))
    excess = (y_m - y_u - explained).abs() - bound
    assert bool((excess <= 0).all()), f"worst excess {excess.max().item():.3e}"
    assert (y_u - y_base).abs().mean() > 4 * bound.mean(), "the bound is too loose to tell a missing side path"


@pytest.mark.parametrize("bad", ["missing-layer", "rank-mismatch", "nan", "wrong-size", "unknown-key",
                                 "text-encoder", "dora", "down-without-up"])
def test_bad_lora_refused_in_one_line_naming_the_key(bad, tmp_path):
    src = dit_source()
    m = "blocks.0.self_attn.q"
    (d, u), = factors(src, [m], 4).values()
    t = {f"{m}.lora_down.weight": d, f"{m}.lora_up.weight": u}
    key = {"missing-layer": "blocks.7.self_attn.q.lora_down.weight", "rank-mismatch": f"{m}.lora_down.weight",
           "nan": f"{m}.lora_up.weight", "wrong-size": "blocks.0.ffn.0.lora_down.weight",
           "unknown-key": f"{m}.magnitude", "text-encoder": "lora_te_text_model_encoder_layers_0_q.lora_down.weight",
           "dora": f"{m}.dora_scale", "down-without-up": "blocks.1.ffn.2.lora_down.weight"}[bad]
    if bad == "missing-layer":
        t |= {key: d, "blocks.7.self_attn.q.lora_up.weight": u}
    elif bad == "rank-mismatch":
        t[key] = d[:3]
    elif bad == "nan":
        t[key] = u.clone()
        t[key][2, 1] = float("nan")
    elif bad == "wrong-size":
        t |= {key: d, "blocks.0.ffn.0.lora_up.weight": u}
    elif bad == "down-without-up":
        t[key] = torch.zeros(4, 256)
    else:
        t[key] = torch.zeros(4)
    path = write(tmp_path / "bad.safetensors", t)
    with pytest.raises(CheckpointError) as err:
        stack_for("tiny", [{"path": path, "strength": 1.0}])
    msg = str(err.value)
    assert "\n" not in msg and key in msg and "bad.safetensors" in msg, msg


def test_unmerged_refuses_a_full_delta_of_a_quantized_weight(tmp_path):
    m = "blocks.0.ffn.2"
    path = write(tmp_path / "d.safetensors", {f"{m}.diff": torch.zeros(dit_source().shape(m + ".weight"))})
    with pytest.raises(CheckpointError, match="lora_mode=merged"):
        stack_for("tiny", [{"path": path}], "unmerged", quantized=[m])
    stack_for("tiny", [{"path": path}], "unmerged")  # kept in high precision: re-merged, allowed


def test_config_option_and_sweep_override(cfg_of):
    cfg = cfg_of("lora=[{path: a.safetensors, strength: 0.8}, {path: owner/repo/b.safetensors}]", "lora.0.strength=0.5")
    assert [(e.path, e.strength) for e in cfg.lora] == [("a.safetensors", 0.5), ("owner/repo/b.safetensors", 1.0)]
    assert cfg.lora_mode == "merged"
    with pytest.raises(Exception):
        cfg_of("lora=[{path: a.safetensors, strenght: 0.8}]")  # a misspelt key fails at compose time
    bad = cfg_of("lora=[{path: a.safetensors}]", "lora.0.strength=inf")
    with pytest.raises(LightqError, match=r"lora\[0\].strength"):
        config.validate(bad)
    with pytest.raises(LightqError, match="lora_mode"):
        config.validate(cfg_of("lora_mode=fused"))
    with pytest.raises(LightqError, match="experts"):  # which expert a LoRA is for is not said: refused
        config.validate(cfg_of("model=tiny-t2v-a14b", "lora=[{path: a.safetensors}]"))


@pytest.mark.parametrize("offload", [("block",), ("phase",), ("block", "lazy")])
def test_unmerged_and_merged_compose_with_offload(cfg_of, tmp_path, offload):
    """Side paths move with their linears (and are attached as lazily read blocks arrive): the DiT output under
    offload equals the resident one, bit for bit, merged and unmerged."""
    path = all_linears_file(tmp_path, extra={"blocks.0.norm3.diff": torch.full((128,), 0.25)})
    split = convert(dit_source(), component="dit", scheme="fp8", output=tmp_path / "split", layout="blocks",
                    progress=False)
    for lora_mode in ("unmerged", "merged"):
        common = ["dit_quant=fp8-torch", f"lora=[{{path: '{path}', strength: 0.6}}]", f"lora_mode={lora_mode}"]
        if "lazy" not in offload:  # a block linear in bf16: its side path is attached before its block is packed
            common.append("dit_quant.skip=[blocks.1.ffn.2]")
        ref = dit_of(cfg_of(*common))(*tiny_inputs())
        extra = [f"dit_quant.ckpt={split}", "offload.lazy_load=true"] if "lazy" in offload else []
        cfg = cfg_of(*common, f"offload={offload[0]}", *extra)
        if "lazy" in offload:  # the split is pre-quantized: merged requantizes, the reference must read it too
            ref = dit_of(cfg_of(*common, f"dit_quant.ckpt={split}"))(*tiny_inputs())
        hw = hardware.resolve("cpu")
        method = C.quant_methods(cfg, plan.plan_run(cfg, hw))["dit"]
        for through in (False, True):  # packed after loading, or each block as it loads
            off = C.Offload(cfg.offload, torch.device("cpu"), cfg)
            dit = C.load_dit(cfg, method, C.model_folder(cfg), torch.device("cpu"), torch.bfloat16, False,
                             offload=off if through else None)
            placement = off._placement(dit)
            if placement.resident is not None:  # every tensor, side paths included, lives in a pack
                packs = [*placement.resident.packs, placement.outside]
                spans = [(p.host.data_ptr(), p.host.data_ptr() + p.nbytes) for p in packs]
                assert all(any(lo <= t.data_ptr() < hi for lo, hi in spans)
                           for t in [*dit.parameters(), *dit.buffers()] if t.numel())
            with off.active(dit):
                out = dit(*tiny_inputs())
            off.release(dit)
            assert torch.equal(out, ref), f"{lora_mode} offload={offload} packed while loading: {through}"


def test_cli_sweep_over_strength_and_result_json(tmp_path):
    """``-m lora.0.strength=0,1`` runs two jobs; result.json names the LoRA, the mode and the layer count, and the
    strength-0 job's latents equal the no-LoRA job's."""
    path = all_linears_file(tmp_path)
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "lightq", "-m", "dit_quant=fp8-torch", *FAST, "quality.compare=false",
                           f"lora=[{{path: '{path}', strength: 1}}]", "lora.0.strength=0,1", "lora_mode=unmerged",
                           f"hydra.sweep.dir={sweep}"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = {}
    for f in sweep.rglob("result.json"):
        r = json.loads(f.read_text())
        lora = r["components"]["dit"]["lora"]
        results[lora["loras"][0]["strength"]] = (f.parent, lora)
    assert sorted(results) == [0.0, 1.0]
    for folder, lora in results.values():
        assert lora["mode"] == "unmerged" and lora["loras"][0]["path"] == path and lora["layers"] == 26
        assert lora["loras"][0]["layers"] == 26 and lora["loras"][0]["naming"] == "official"
    plain = tmp_path / "plain"
    proc = subprocess.run([sys.executable, "-m", "lightq", "dit_quant=fp8-torch", *FAST, "quality.compare=false",
                           f"hydra.run.dir={plain}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.equal(torch.load(results[0.0][0] / "latents.pt"), torch.load(plain / "latents.pt"))


def test_cli_bad_lora_one_line_exit_2_and_convert_writes_nothing(tmp_path):
    path = write(tmp_path / "bad.safetensors", {"blocks.9.ffn.0.lora_down.weight": torch.zeros(2, 128),
                                               "blocks.9.ffn.0.lora_up.weight": torch.zeros(256, 2)})
    proc = subprocess.run([sys.executable, "-m", "lightq", *FAST, f"lora=[{{path: '{path}'}}]",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "blocks.9.ffn.0.lora_down.weight" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "latents.pt").exists()
    out = tmp_path / "dit.safetensors"
    proc = subprocess.run([sys.executable, "-m", "lightq.convert", "source=tiny", f"output={out}", "progress=false",
                           f"lora=[{{path: '{path}'}}]"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "blocks.9.ffn.0.lora_down.weight" in proc.stderr and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]  # a job that never ran leaves nothing


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_shared_input_path_equals_separate_paths_on_quantized_activations(scheme, tmp_path):
    """The fused q/k/v side path (one down-projection, each up added into its third of the output, LoRAs on q and v
    only) equals the separate paths of q and v on the same quantized activation; and ``add_quantized`` equals
    ``forward`` on the dequantized activation up to the bf16 rounding of the dequantized input."""
    from lightq.quant.schemes import dequantize_activation, quantize_activation

    src = dit_source()
    mods = ["blocks.0.self_attn.q", "blocks.0.self_attn.v"]
    t = {}
    for m, (d, u) in factors(src, mods, 4).items():
        t |= {f"{m}.lora_down.weight": d, f"{m}.lora_up.weight": u}
    stack = stack_for("tiny", [{"path": write(tmp_path / "l.safetensors", t), "strength": 0.7}], "unmerged")[1]
    paths = {m: LowRankPath.of(stack.low_rank(m + ".weight"), stack.strengths, torch.bfloat16, "cpu") for m in mods}
    joint = LowRankPath.shared_input([paths[mods[0]], None, paths[mods[1]]], 128)
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(1)).bfloat16()
    xq, sx = quantize_activation(x, scheme)
    y = torch.randn(40, 384).bfloat16()
    got = joint.add_quantized(y.clone(), xq, sx)
    for i, m in ((0, mods[0]), (2, mods[1])):
        want = paths[m].add_quantized(y[:, i * 128:(i + 1) * 128].contiguous(), xq, sx)
        assert torch.allclose(got[:, i * 128:(i + 1) * 128].float(), want.float(), rtol=2 ** -7, atol=1e-3), m
        deq = dequantize_activation(xq, sx, scheme).bfloat16()
        assert torch.allclose(want.float(), paths[m](deq, y[:, i * 128:(i + 1) * 128]).float(), rtol=2 ** -6,
                              atol=2e-2), m
    assert torch.equal(got[:, 128:256], y[:, 128:256]), "k has no LoRA: its third must not change"
    joint.set_strengths([0.0])
    assert torch.equal(joint.add_quantized(y.clone(), xq, sx), y)


def test_offload_budget_counts_unmerged_side_paths(cfg_of, tmp_path):
    """offload.max_gpu_gib's count grows by the side paths' bytes (read from the LoRA header) when unmerged, by
    nothing when merged (the LoRA is inside the weights)."""
    from lightq.offload import gpu_weight_need

    src = dit_source()
    mods = ["blocks.0.self_attn.q", "blocks.1.ffn.0"]
    t = {}
    for m, (d, u) in factors(src, mods, 8).items():
        t |= {f"lora_unet_{m.replace('.', '_')}.lora_down.weight": d, f"lora_unet_{m.replace('.', '_')}.lora_up.weight": u}
    path = write(tmp_path / "k.safetensors", t)
    base, _ = gpu_weight_need(cfg_of("dit_quant=fp8-torch"))
    merged, _ = gpu_weight_need(cfg_of("dit_quant=fp8-torch", f"lora=[{{path: '{path}'}}]"))
    unmerged, _ = gpu_weight_need(cfg_of("dit_quant=fp8-torch", f"lora=[{{path: '{path}'}}]", "lora_mode=unmerged"))
    aligned = lambda n: -(-n // 256) * 256  # noqa: E731
    side = sum(aligned(8 * k * 2) + aligned(n * 8 * 2) + 2 * aligned(8 * 4)
               for n, k in (src.shape(m + ".weight") for m in mods))
    assert merged == base and unmerged == base + side


def test_two_expert_model_applies_each_lora_to_the_expert_it_names(cfg_of, tmp_path):
    """Wan2.2 A14B (tiny): ``expert: high`` changes the high-noise DiT only (the low-noise one is the no-LoRA one bit
    for bit), ``low`` the low-noise one only, ``both`` each; each expert's stack holds its own entries (result.json
    per expert, strengths per expert, the run's list index in its record). A missing expert is refused in one line
    that suggests the one the file name says; an expert on a one-DiT model is refused."""
    high = write(tmp_path / "style_high_noise.safetensors", load_file(all_linears_file(tmp_path)))
    low = write(tmp_path / "style_low_noise.safetensors", load_file(all_linears_file(tmp_path, rank=2)))
    a14b = ("model=tiny-t2v-a14b", "dit_quant=fp8-torch")

    def experts(*overrides):
        cfg = cfg_of(*a14b, *overrides)
        config.validate(cfg)
        methods = C.quant_methods(cfg, plan.plan_run(cfg, hardware.resolve("cpu")))
        return {c: C.load_dit(cfg, methods[c], C.model_folder(cfg), torch.device("cpu"), torch.bfloat16, False, c)
                for c in ("dit", "dit_low")}

    plain = {c: m(*tiny_inputs()) for c, m in experts().items()}
    run = experts(f"lora=[{{path: '{high}', expert: high}}, {{path: '{low}', strength: 0.5, expert: low}}, "
                  f"{{path: '{high}', strength: 0.25, expert: both}}]", "lora_mode=unmerged")
    assert [f.index for f in run["dit"].lora_stack.files] == [0, 2]
    assert [f.index for f in run["dit_low"].lora_stack.files] == [1, 2]
    assert run["dit_low"].lora_stack.strengths == [0.5, 0.25]
    for c, m in run.items():
        assert not torch.equal(m(*tiny_inputs()), plain[c]), c
        m.lora_stack.set_strengths(m, [0.0, 0.0])
        assert torch.equal(m(*tiny_inputs()), plain[c]), f"{c} at strength 0"
    only_high = experts(f"lora=[{{path: '{high}', expert: high}}]")
    assert not torch.equal(only_high["dit"](*tiny_inputs()), plain["dit"])
    assert torch.equal(only_high["dit_low"](*tiny_inputs()), plain["dit_low"]) and only_high["dit_low"].lora_stack is None
    with pytest.raises(LightqError, match=r"lora\[0\] .*two denoising experts.*lora\.0\.expert=high\|low\|both "
                                          r"\(the file name says high_noise: expert: high\)$"):
        config.validate(cfg_of(*a14b, f"lora=[{{path: '{high}'}}]"))
    with pytest.raises(LightqError, match=r"lora\[0\]\.expert='middle': choose high \| low \| both"):
        config.validate(cfg_of(*a14b, f"lora=[{{path: '{high}', expert: middle}}]"))
    with pytest.raises(LightqError, match=r"lora\[0\]\.expert=low: model=.* has one DiT; drop expert"):
        config.validate(cfg_of(f"lora=[{{path: '{high}', expert: low}}]"))


def test_lightx2v_lora_names_pick_the_wan22_expert(tmp_path):
    """LightX2V's Wan2.2 MoE lora_configs route each entry by name (high_noise_model / low_noise_model): imported as
    expert high / low; a MoE entry without a known name is refused in one line; on Wan2.1 the name stays a note."""
    from lightq.lightx2v.importer import Imported, LightX2VError, _lora

    f = tmp_path / "a.safetensors"
    f.write_bytes(b"")
    cfg = {"lora_configs": [{"name": "low_noise_model", "path": str(f), "strength": 0.7},
                            {"name": "high_noise_model", "path": str(f)}], "lora_dynamic_apply": True}
    out = Imported(tmp_path / "c.json", "wan2.2_moe_distill")
    _lora(cfg, set(), out)
    assert out.values["lora"] == [{"path": str(f), "strength": 0.7, "expert": "low"},
                                  {"path": str(f), "strength": 1.0, "expert": "high"}]
    assert out.values["lora_mode"] == "unmerged"
    with pytest.raises(LightX2VError, match=r"lora_configs\[0\]\.name=None: a wan2.2_moe LoRA names its expert"):
        _lora({"lora_configs": [{"path": str(f)}]}, set(), Imported(tmp_path / "c.json", "wan2.2_moe"))
    wan21 = Imported(tmp_path / "c.json", "wan2.1")
    _lora(cfg, set(), wan21)
    assert "expert" not in wan21.values["lora"][0] and any("name='low_noise_model' is unused" in n for n in wan21.notes)
