"""Which linears of each component are quantized, as ``fnmatch`` patterns over official checkpoint key prefixes.

These follow the official Wan2.1 release (and LightX2V, which keeps its keys). Everything not listed — norms,
modulation, embeddings, the patch conv, the head, time/text/image projections — stays in high precision.
"""

QUANTIZABLE: dict[str, tuple[str, ...]] = {
    # Wan2.1 DiT: self/cross attention q,k,v,o, the I2V image branch k_img/v_img, the FFN.
    "dit": (
        "blocks.*.self_attn.q", "blocks.*.self_attn.k", "blocks.*.self_attn.v", "blocks.*.self_attn.o",
        "blocks.*.cross_attn.q", "blocks.*.cross_attn.k", "blocks.*.cross_attn.v", "blocks.*.cross_attn.o",
        "blocks.*.cross_attn.k_img", "blocks.*.cross_attn.v_img",
        "blocks.*.ffn.0", "blocks.*.ffn.2",
    ),
    # umT5-xxl encoder: attention q,k,v,o and the gated FFN (gate.0, fc1, fc2). Token embedding and norms stay.
    "t5": (
        "blocks.*.attn.q", "blocks.*.attn.k", "blocks.*.attn.v", "blocks.*.attn.o",
        "blocks.*.ffn.gate.0", "blocks.*.ffn.fc1", "blocks.*.ffn.fc2",
    ),
    # open-clip XLM-RoBERTa ViT-H/14, vision tower only: fused qkv, out projection, MLP.
    "clip": (
        "visual.transformer.*.attn.to_qkv", "visual.transformer.*.attn.proj",
        "visual.transformer.*.mlp.0", "visual.transformer.*.mlp.2",
    ),
}

COMPONENTS = tuple(QUANTIZABLE)
