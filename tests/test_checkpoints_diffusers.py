"""A ``-Diffusers`` model folder, built here from the tiny official files in the exact key layout that diffusers'
``scripts/convert_wan_to_diffusers.py`` and transformers' ``UMT5EncoderModel`` / ``CLIPVisionModelWithProjection``
write, loads exactly like the official folder (bf16 and quantized at load, every component), runs the pipeline,
and ``lightq.convert layout=diffusers`` writes files of that layout."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightq.checkpoints.conventions import open_source
from lightq.checkpoints.conversion import convert
from lightq.checkpoints.loader import load_component
from lightq.checkpoints.locate import find_component_file
from lightq.errors import CheckpointError
from lightq.models.family import WAN21
from lightq.models.tiny import ensure_tiny
from lightq.quant.method import QuantMethod

# diffusers' converter: str.replace of each pair, in this order, on every DiT key
DIT_RENAME = [
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"), ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"), ("modulation", "scale_shift_table"), ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"), ("norm2", "norm__placeholder"), ("norm3", "norm2"), ("norm__placeholder", "norm3"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"), ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"), ("self_attn.norm_q", "attn1.norm_q"), ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"), ("cross_attn.k", "attn2.to_k"), ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"), ("cross_attn.norm_q", "attn2.norm_q"), ("cross_attn.norm_k", "attn2.norm_k"),
    ("attn2.to_k_img", "attn2.add_k_proj"), ("attn2.to_v_img", "attn2.add_v_proj"),
    ("attn2.norm_k_img", "attn2.norm_added_k"),
]


def diffusers_dit(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for old, new in DIT_RENAME:
            key = key.replace(old, new)
        out[key] = value
    return out


def transformers_umt5(state: dict) -> dict:
    """transformers' UMT5EncoderModel names (T5 modules: SelfAttention, DenseReluDense wi_0 / wi_1 / wo)."""
    out = {"shared.weight": state["token_embedding.weight"],
           "encoder.embed_tokens.weight": state["token_embedding.weight"].clone(),
           "encoder.final_layer_norm.weight": state["norm.weight"]}
    for key, value in state.items():
        m = re.match(r"blocks\.(\d+)\.(.+)$", key)
        if not m:
            continue
        hf = f"encoder.block.{m.group(1)}.layer."
        out[hf + {"attn.q.weight": "0.SelfAttention.q.weight", "attn.k.weight": "0.SelfAttention.k.weight",
                  "attn.v.weight": "0.SelfAttention.v.weight", "attn.o.weight": "0.SelfAttention.o.weight",
                  "pos_embedding.embedding.weight": "0.SelfAttention.relative_attention_bias.weight",
                  "norm1.weight": "0.layer_norm.weight", "ffn.gate.0.weight": "1.DenseReluDense.wi_0.weight",
                  "ffn.fc1.weight": "1.DenseReluDense.wi_1.weight", "ffn.fc2.weight": "1.DenseReluDense.wo.weight",
                  "norm2.weight": "1.layer_norm.weight"}[m.group(2)]] = value
    return out


def transformers_clip(state: dict) -> dict:
    """transformers' CLIPVisionModelWithProjection names: separate q/k/v, 1-D class embedding, [T, D] positions."""
    v = "vision_model."
    out = {v + "embeddings.class_embedding": state["visual.cls_embedding"].reshape(-1),
           v + "embeddings.patch_embedding.weight": state["visual.patch_embedding.weight"],
           v + "embeddings.position_embedding.weight": state["visual.pos_embedding"][0],
           v + "pre_layrnorm.weight": state["visual.pre_norm.weight"],
           v + "pre_layrnorm.bias": state["visual.pre_norm.bias"],
           v + "post_layernorm.weight": state["visual.post_norm.weight"],
           v + "post_layernorm.bias": state["visual.post_norm.bias"],
           "visual_projection.weight": state["visual.head"].t().contiguous()}
    for key, value in state.items():
        m = re.match(r"visual\.transformer\.(\d+)\.(.+)\.(weight|bias)$", key)
        if not m:
            continue
        hf = f"{v}encoder.layers.{m.group(1)}."
        if m.group(2) == "attn.to_qkv":
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                out[f"{hf}self_attn.{name}.{m.group(3)}"] = part.clone()
        else:
            name = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
                    "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}[m.group(2)]
            out[f"{hf}{name}.{m.group(3)}"] = value
    return out


def diffusers_vae(state: dict) -> dict:
    """diffusers' converter for the Wan VAE (AutoencoderKLWan): fixed renames, down_blocks, grouped up_blocks."""
    residual = {"residual.0.gamma": "norm1.gamma", "residual.2.bias": "conv1.bias", "residual.2.weight": "conv1.weight",
                "residual.3.gamma": "norm2.gamma", "residual.6.bias": "conv2.bias", "residual.6.weight": "conv2.weight",
                "shortcut.bias": "conv_shortcut.bias", "shortcut.weight": "conv_shortcut.weight"}
    out = {}
    for key, value in state.items():
        m = re.match(r"(encoder|decoder)\.middle\.(\d)\.(.+)$", key)
        if m:
            i = int(m.group(2))
            new = (f"{m.group(1)}.mid_block.attentions.0.{m.group(3)}" if i == 1 else
                   f"{m.group(1)}.mid_block.resnets.{i // 2}.{residual[m.group(3)]}")
        elif re.match(r"(encoder|decoder)\.head\.", key):
            new = key.replace("head.0.", "norm_out.").replace("head.2.", "conv_out.")
        elif key.startswith(("conv1.", "conv2.")):
            new = ("quant_conv." if key.startswith("conv1.") else "post_quant_conv.") + key.split(".", 1)[1]
        elif re.match(r"(encoder|decoder)\.conv1\.", key):
            new = key.replace("conv1.", "conv_in.")
        elif key.startswith("encoder.downsamples."):
            new = key.replace("encoder.downsamples.", "encoder.down_blocks.")
            for old, rep in residual.items():
                new = new.replace("." + old, "." + rep)
        elif key.startswith("decoder.upsamples."):
            idx = int(key.split(".")[2])
            rest = key.split(".", 3)[3]
            if rest in residual and not rest.startswith("shortcut"):
                new = f"decoder.up_blocks.{idx // 4}.resnets.{idx % 4}.{residual[rest]}"
            elif rest.startswith("shortcut"):
                assert idx == 4
                new = f"decoder.up_blocks.1.resnets.0.{residual[rest]}"
            else:  # resample / time_conv of 3, 7, 11
                new = f"decoder.up_blocks.{idx // 4}.upsamplers.0.{rest}"
        else:
            new = key
        out[new] = value
    return out


@pytest.fixture(scope="module")
def official():
    return ensure_tiny("tiny-i2v")


def _state(path):
    src = open_source(path)
    return {k: src[k] for k in src}


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory, official):
    root = tmp_path_factory.mktemp("Wan2.1-I2V-tiny-Diffusers")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline"}))
    parts = {"transformer": ("diffusion_pytorch_model.safetensors", diffusers_dit(_state(official))),
             "text_encoder": ("model.safetensors",
                              transformers_umt5(_state(official / WAN21.components["t5"].official))),
             "image_encoder": ("model.safetensors",
                               transformers_clip({k: v for k, v in _state(official / WAN21.components["clip"].official)
                                                  .items() if k.startswith("visual.")})),
             "vae": ("diffusion_pytorch_model.safetensors",
                     diffusers_vae(_state(official / WAN21.components["vae"].official)))}
    for sub, (name, tensors) in parts.items():
        (root / sub).mkdir()
        save_file({k: v.contiguous() for k, v in tensors.items()}, root / sub / name)
    (root / "tokenizer").mkdir()
    return root


COMPONENTS = {"dit": "tiny-i2v", "t5": "tiny", "clip": "tiny", "vae": "tiny"}


def _load(folder, component, scheme):
    record = WAN21.components[component]
    method = QuantMethod.portable(scheme) if scheme else None
    source = open_source(find_component_file(folder, component, None))
    return load_component(record.build(COMPONENTS[component]), source,
                          include=record.quantizable, method=method, ignore_prefixes=record.ignored_prefixes,
                          progress=False, component=component)


def _bits(model) -> dict:
    return {k: v.reshape(-1).view(torch.uint8) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("component, scheme", [("dit", None), ("dit", "fp8"), ("t5", None), ("t5", "int8"),
                                               ("clip", None), ("clip", "fp8"), ("vae", None)])
def test_diffusers_folder_loads_exactly_like_the_official_one(official, diffusers_folder, component, scheme):
    got, want = _load(diffusers_folder, component, scheme), _load(official, component, scheme)
    a, b = _bits(got), _bits(want)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert got.checkpoint_numerics["key_names"] == "diffusers"


def test_pipeline_runs_from_the_diffusers_folder(run_lightq, tmp_path, official, diffusers_folder):
    from PIL import Image

    Image.new("RGB", (40, 24), (200, 80, 30)).save(tmp_path / "in.png")
    latents = {}
    for label, folder in (("official", official), ("diffusers", diffusers_folder)):
        proc = run_lightq("model=tiny-i2v", f"model.weights={folder}", "model.frames=5", "dit_quant=fp8-torch",
                          f"image={tmp_path / 'in.png'}", f"hydra.run.dir={tmp_path / label}", "quality.baseline=never")
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads((tmp_path / label / "result.json").read_text())
        assert result["components"]["dit"]["checkpoint"]["key_names"] == ("diffusers" if label == "diffusers"
                                                                          else "official")
        latents[label] = torch.load(tmp_path / label / "latents.pt", weights_only=True)
    assert torch.equal(latents["diffusers"], latents["official"])


def test_convert_writes_the_diffusers_layout(tmp_path, official, diffusers_folder):
    for component, sub in (("dit", "transformer"), ("t5", "text_encoder"), ("clip", "image_encoder")):
        src = open_source(find_component_file(official, component, None))
        out = convert(src, component=component, scheme="fp8", output=tmp_path / f"{component}.safetensors",
                      layout="diffusers", progress=False)
        names = set(load_file(out))
        bf16 = set(load_file(next((diffusers_folder / sub).glob("*.safetensors"))))
        quantized = {k for k in names if k.endswith(".weight_scale")}
        assert quantized and names - quantized == bf16 - {"encoder.embed_tokens.weight"}
        record = WAN21.components[component]
        got = load_component(record.build(COMPONENTS[component]), open_source(out), include=record.quantizable,
                             method=QuantMethod.portable("fp8"), ignore_prefixes=record.ignored_prefixes)
        want = load_component(record.build(COMPONENTS[component]), src, include=record.quantizable,
                              method=QuantMethod.portable("fp8"), ignore_prefixes=record.ignored_prefixes)
        a, b = _bits(got), _bits(want)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_diffusers_folder_without_the_component(tmp_path, diffusers_folder):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "transformer").mkdir()
    with pytest.raises(CheckpointError, match="diffusers model folder without image_encoder/"):
        find_component_file(tmp_path, "clip", None)


def test_modelopt_fp8_transformer_runs_fp8_pertensor_and_is_refused_by_fp8(tmp_path, official):
    """NVIDIA ModelOpt's FP8 export: fp8 weight + fp32 scalar weight_scale + static input_scale per linear: the
    static per-tensor numerics run under fp8-pertensor; a per-token fp8 mode refuses it, naming the mode to use."""
    state = diffusers_dit(_state(official))
    file = {}
    for key, value in state.items():
        if re.search(r"\.(attn1|attn2)\.to_[qkv]\.weight$|\.ffn\.net\.(0\.proj|2)\.weight$", key):
            s = value.float().abs().amax() / 448
            file[key] = (value.float() / s).to(torch.float8_e4m3fn)
            file[key[:-len("weight")] + "weight_scale"] = s
            file[key[:-len("weight")] + "input_scale"] = torch.tensor(0.01)
        else:
            file[key] = value
    (tmp_path / "transformer").mkdir()
    save_file(file, tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "model_index.json").write_text("{}")
    src = open_source(find_component_file(tmp_path, "dit", "fp8"))
    record = WAN21.components["dit"]
    with pytest.raises(CheckpointError, match=r"static activation scale \('blocks\.0\.self_attn\.q\.input_scale'\) "
                                              r"but fp8 quantizes activations dynamically: run it with "
                                              r"dit_quant=fp8-pertensor-auto"):
        load_component(record.build("tiny-i2v"), src, include=record.quantizable, method=QuantMethod.portable("fp8"),
                       component="dit")
    got = load_component(record.build("tiny-i2v"), src, method=QuantMethod.portable("fp8-pertensor"), component="dit")
    static = {n: float(m.input_scale) for n, m in got.named_modules() if hasattr(m, "input_scale")}
    # per block: q, k, v of both attentions, ffn.0, ffn.2
    assert len(static) == 2 * 8 and set(static.values()) == {torch.tensor(0.01).item()}
    assert got.checkpoint_numerics["layout"] == "static-fp8"
    assert got.checkpoint_numerics["activations"].startswith("fp8, static per tensor")
