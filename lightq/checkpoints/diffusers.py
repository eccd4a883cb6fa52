"""diffusers' and transformers' key names of the Wan2.1 components, seen through the official names.

A ``-Diffusers`` model folder holds ``transformer/`` (``WanTransformer3DModel``), ``text_encoder/`` (transformers'
``UMT5EncoderModel``), ``image_encoder/`` (``CLIPVisionModelWithProjection``, I2V), ``vae/`` (``AutoencoderKLWan``)
and ``tokenizer/``. ``kind_of(keys)`` recognises a file of each from its keys; ``official_view(source)`` shows it
under the official names the models load, ``diffusers_name(component, key)`` gives the diffusers name of an
official key and ``written_as`` how an official tensor is written (``lightq.convert layout=diffusers``). The
renames are those of diffusers'
``scripts/convert_wan_to_diffusers.py`` and transformers' T5 / CLIP module names:

- DiT: ``self_attn.{q,k,v,o}`` <-> ``attn1.to_{q,k,v}`` / ``attn1.to_out.0``, ``cross_attn`` <-> ``attn2`` (the
  image branch ``k_img`` / ``v_img`` / ``norm_k_img`` <-> ``add_k_proj`` / ``add_v_proj`` / ``norm_added_k``),
  ``ffn.0`` / ``ffn.2`` <-> ``ffn.net.0.proj`` / ``ffn.net.2``, ``norm3`` <-> ``norm2`` (the cross-attention norm;
  the official ``norm2`` holds no tensor), ``modulation`` <-> ``scale_shift_table``, ``head.head`` <-> ``proj_out``,
  the time / text / image embeddings <-> ``condition_embedder.*``.
- umT5: ``blocks.<i>.attn.*`` <-> ``encoder.block.<i>.layer.0.SelfAttention.*`` (its ``relative_attention_bias``
  is the block's ``pos_embedding.embedding``), ``ffn.gate.0`` / ``fc1`` / ``fc2`` <-> ``layer.1.DenseReluDense.wi_0``
  / ``wi_1`` / ``wo``, ``token_embedding`` <-> ``shared`` (transformers' tied ``encoder.embed_tokens`` copy is
  dropped).
- CLIP: ``visual.transformer.<i>`` <-> ``vision_model.encoder.layers.<i>``; the fused ``attn.to_qkv`` is the
  row-wise concatenation of ``self_attn.{q,k,v}_proj`` (weights, biases and per-channel scales), ``cls_embedding``
  / ``pos_embedding`` are ``class_embedding`` / ``position_embedding.weight`` reshaped, ``head`` is
  ``visual_projection.weight`` transposed.
- VAE: ``conv1`` / ``head.0`` / ``head.2`` <-> ``conv_in`` / ``norm_out`` / ``conv_out``, ``residual.{0,2,3,6}``
  <-> ``norm1`` / ``conv1`` / ``norm2`` / ``conv2``, ``shortcut`` <-> ``conv_shortcut``, ``middle.{0,1,2}`` <->
  ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``, the encoder's ``downsamples`` <-> ``down_blocks``
  (same indices), the decoder's flat ``upsamples`` list <-> ``up_blocks.<s>.resnets.<j>`` /
  ``up_blocks.<s>.upsamplers.0`` (``s * (R + 2) + j``, R + 1 residual blocks then one resample per stage),
  ``conv1`` / ``conv2`` <-> ``quant_conv`` / ``post_quant_conv``.
"""

from __future__ import annotations

import re
from typing import Callable

from ..errors import CheckpointError
from ..models.family import WAN21
from .sources import Derived, RenamedSource, TensorSource

SUBFOLDERS = {name: c.diffusers for name, c in WAN21.components.items()}
TOKENIZER_SUBFOLDER = "tokenizer"
AUX = (".weight_scale", ".input_scale")

# (official module path, diffusers module path); ``{i}`` is a block index. Matched on whole dotted segments.
DIT_RULES = (
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("blocks.{i}.modulation", "blocks.{i}.scale_shift_table"),
    ("blocks.{i}.self_attn.q", "blocks.{i}.attn1.to_q"),
    ("blocks.{i}.self_attn.k", "blocks.{i}.attn1.to_k"),
    ("blocks.{i}.self_attn.v", "blocks.{i}.attn1.to_v"),
    ("blocks.{i}.self_attn.o", "blocks.{i}.attn1.to_out.0"),
    ("blocks.{i}.self_attn.norm_q", "blocks.{i}.attn1.norm_q"),
    ("blocks.{i}.self_attn.norm_k", "blocks.{i}.attn1.norm_k"),
    ("blocks.{i}.cross_attn.q", "blocks.{i}.attn2.to_q"),
    ("blocks.{i}.cross_attn.k", "blocks.{i}.attn2.to_k"),
    ("blocks.{i}.cross_attn.v", "blocks.{i}.attn2.to_v"),
    ("blocks.{i}.cross_attn.o", "blocks.{i}.attn2.to_out.0"),
    ("blocks.{i}.cross_attn.norm_q", "blocks.{i}.attn2.norm_q"),
    ("blocks.{i}.cross_attn.norm_k", "blocks.{i}.attn2.norm_k"),
    ("blocks.{i}.cross_attn.k_img", "blocks.{i}.attn2.add_k_proj"),
    ("blocks.{i}.cross_attn.v_img", "blocks.{i}.attn2.add_v_proj"),
    ("blocks.{i}.cross_attn.norm_k_img", "blocks.{i}.attn2.norm_added_k"),
    ("blocks.{i}.ffn.0", "blocks.{i}.ffn.net.0.proj"),
    ("blocks.{i}.ffn.2", "blocks.{i}.ffn.net.2"),
    ("blocks.{i}.norm3", "blocks.{i}.norm2"),
    ("blocks.{i}.norm2", "blocks.{i}.norm3"),
)
T5_RULES = (
    ("token_embedding", "shared"),
    ("blocks.{i}.attn.q", "encoder.block.{i}.layer.0.SelfAttention.q"),
    ("blocks.{i}.attn.k", "encoder.block.{i}.layer.0.SelfAttention.k"),
    ("blocks.{i}.attn.v", "encoder.block.{i}.layer.0.SelfAttention.v"),
    ("blocks.{i}.attn.o", "encoder.block.{i}.layer.0.SelfAttention.o"),
    ("blocks.{i}.pos_embedding.embedding", "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias"),
    ("blocks.{i}.norm1", "encoder.block.{i}.layer.0.layer_norm"),
    ("blocks.{i}.ffn.gate.0", "encoder.block.{i}.layer.1.DenseReluDense.wi_0"),
    ("blocks.{i}.ffn.fc1", "encoder.block.{i}.layer.1.DenseReluDense.wi_1"),
    ("blocks.{i}.ffn.fc2", "encoder.block.{i}.layer.1.DenseReluDense.wo"),
    ("blocks.{i}.norm2", "encoder.block.{i}.layer.1.layer_norm"),
    ("norm", "encoder.final_layer_norm"),
)
CLIP_RULES = (
    ("visual.patch_embedding", "vision_model.embeddings.patch_embedding"),
    ("visual.pre_norm", "vision_model.pre_layrnorm"),
    ("visual.post_norm", "vision_model.post_layernorm"),
    ("visual.transformer.{i}.norm1", "vision_model.encoder.layers.{i}.layer_norm1"),
    ("visual.transformer.{i}.norm2", "vision_model.encoder.layers.{i}.layer_norm2"),
    ("visual.transformer.{i}.attn.proj", "vision_model.encoder.layers.{i}.self_attn.out_proj"),
    ("visual.transformer.{i}.mlp.0", "vision_model.encoder.layers.{i}.mlp.fc1"),
    ("visual.transformer.{i}.mlp.2", "vision_model.encoder.layers.{i}.mlp.fc2"),
)
RULES = {"dit": DIT_RULES, "t5": T5_RULES, "clip": CLIP_RULES}
FUSED_QKV = re.compile(r"^visual\.transformer\.(\d+)\.attn\.to_qkv(\.\w+)$")
CLIP_TEXT_TOWER = ("textual.", "log_scale")
CLIP_QKV = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj(\.\w+)$")
DROPPED = {"t5": ("encoder.embed_tokens.weight",), "clip": ("vision_model.embeddings.position_ids",)}
VAE_RESIDUAL = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
                "conv_shortcut": "shortcut"}


def _compile(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + r"(?=\.|$)")


_FORWARD = {c: [(_compile(o), d) for o, d in rules] for c, rules in RULES.items()}
_BACKWARD = {c: [(_compile(d), o) for o, d in rules] for c, rules in RULES.items()}


def _apply(compiled, key: str) -> str:
    for pattern, template in compiled:
        m = pattern.match(key)
        if m:
            return template.replace("{i}", m.groupdict().get("i") or "") + key[m.end():]
    return key


def kind_of(keys) -> str | None:
    """The component whose diffusers / transformers layout these keys are in (None: not such a layout)."""
    keys = list(keys)
    if any(k.startswith(("condition_embedder.", "scale_shift_table")) or ".attn1.to_q." in k for k in keys):
        return "dit"
    if any(k.startswith("encoder.block.") or k == "shared.weight" for k in keys):
        return "t5"
    if any(k.startswith("vision_model.") for k in keys):
        return "clip"
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "quant_conv.")) for k in keys):
        return "vae"
    return None


def diffusers_name(component: str, key: str) -> str:
    """The diffusers / transformers name of official key ``key`` (DiT, umT5 and CLIP's unfused keys)."""
    return _apply(_FORWARD[component], key)


def official_view(source: TensorSource) -> TensorSource:
    """``source`` under the official key names when it is in a diffusers / transformers layout, else itself."""
    kind = kind_of(source)
    if kind is None:
        return source
    names: dict[str, str | Derived] = {}
    keys = [k for k in source if k not in DROPPED.get(kind, ())]
    if kind == "vae":
        rename = _vae_namer(keys)
    else:
        rename = lambda k: _apply(_BACKWARD[kind], k)  # noqa: E731
    qkv: dict[tuple[str, str], dict[str, str]] = {}
    for key in keys:
        m = CLIP_QKV.match(key) if kind == "clip" else None
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = key
            continue
        names[rename(key)] = key
    if kind == "clip":
        _clip_specials(source, names, qkv)
    return RenamedSource(source, names, convention="diffusers")


def _clip_specials(source: TensorSource, names: dict, qkv: dict) -> None:
    for (i, leaf), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{source.name}: layer {i} has self_attn {', '.join(sorted(parts))}_proj{leaf} "
                                  "but not all of q, k, v; the file is incomplete")
        if leaf == ".input_scale":
            raise CheckpointError(f"{source.name}: '{parts['q']}' is a calibrated static activation scale of one of "
                                  "q, k, v, which lightq's CLIP runs as one fused projection with one input_scale: "
                                  "load the bf16 image encoder (quantized at load)")
        stored = [parts[c] for c in "qkv"]
        shapes = [tuple(source.shape(k)) for k in stored]
        if leaf == ".weight_scale" and any(len(s) != 2 or s[1] != 1 for s in shapes):
            raise CheckpointError(f"{source.name}: '{stored[0]}' has shape {shapes[0]}; a fused q/k/v needs "
                                  "per-channel "
                                  "[N, 1] scales: load the bf16 image encoder (quantized at load)")
        shape = (sum(s[0] for s in shapes), *shapes[0][1:])
        names[f"visual.transformer.{i}.attn.to_qkv{leaf}"] = Derived(tuple(stored), shape, "cat")
    emb = "vision_model.embeddings."
    for official, stored in (("visual.cls_embedding", emb + "class_embedding"),
                             ("visual.pos_embedding", emb + "position_embedding.weight")):
        names.pop(stored, None)
        if stored in source:
            names[official] = Derived((stored,), (1, *(1,) * (stored.endswith("class_embedding")),
                                                   *source.shape(stored)), "view")
    names.pop("visual_projection.weight", None)
    if "visual_projection.weight" in source:
        names["visual.head"] = Derived(("visual_projection.weight",),
                                       tuple(reversed(source.shape("visual_projection.weight"))), "t")


def _vae_namer(keys: list[str]):
    """diffusers ``AutoencoderKLWan`` name -> official ``WanVAE`` name; the decoder's stage length is read from the
    keys (``up_blocks.0`` holds R + 1 residual blocks)."""
    resnets = {int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))}
    stage = len(resnets) + 1  # R + 1 residual blocks and one resample

    def residual(rest: str) -> str:
        name, _, tail = rest.partition(".")
        return f"{VAE_RESIDUAL.get(name, name)}.{tail}" if tail else rest

    def rename(key: str) -> str:
        for side in ("encoder", "decoder"):
            fixed = {f"{side}.conv_in.": f"{side}.conv1.", f"{side}.norm_out.": f"{side}.head.0.",
                     f"{side}.conv_out.": f"{side}.head.2."}
            for new, old in fixed.items():
                if key.startswith(new):
                    return old + key[len(new):]
            m = re.match(rf"{side}\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", key)
            if m:
                index = 1 if m.group(1) == "attentions" else 2 * int(m.group(2))
                rest = m.group(3) if m.group(1) == "attentions" else residual(m.group(3))
                return f"{side}.middle.{index}.{rest}"
        m = re.match(r"encoder\.down_blocks\.(\d+)\.(.+)$", key)
        if m:
            return f"encoder.downsamples.{m.group(1)}.{residual(m.group(2))}"
        m = re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key)
        if m:
            return f"decoder.upsamples.{int(m.group(1)) * stage + int(m.group(2))}.{residual(m.group(3))}"
        m = re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", key)
        if m:
            return f"decoder.upsamples.{int(m.group(1)) * stage + stage - 1}.{m.group(2)}"
        for new, old in (("quant_conv.", "conv1."), ("post_quant_conv.", "conv2.")):
            if key.startswith(new):
                return old + key[len(new):]
        return key
    return rename


def written_as(component: str, key: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], Callable | None]]:
    """How official tensor ``key`` (of ``shape``) is written in the diffusers layout: ``(name, shape, transform)``
    pieces (``transform`` maps the official tensor to the piece, None: unchanged); none for CLIP's text tower."""
    if component != "clip":
        return [(diffusers_name(component, key), shape, None)]
    if key.startswith(CLIP_TEXT_TOWER):
        return []
    m = FUSED_QKV.match(key)
    if m:
        rows = shape[0] // 3
        return [(f"vision_model.encoder.layers.{m.group(1)}.self_attn.{c}_proj{m.group(2)}", (rows, *shape[1:]),
                 lambda t, j=j: t.chunk(3, dim=0)[j].contiguous()) for j, c in enumerate("qkv")]
    emb = "vision_model.embeddings."
    if key == "visual.cls_embedding":
        return [(emb + "class_embedding", shape[-1:], lambda t: t.reshape(-1))]
    if key == "visual.pos_embedding":
        return [(emb + "position_embedding.weight", shape[1:], lambda t: t[0].contiguous())]
    if key == "visual.head":
        return [("visual_projection.weight", tuple(reversed(shape)), lambda t: t.t().contiguous())]
    return [(diffusers_name(component, key), shape, None)]
