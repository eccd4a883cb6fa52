"""A model family in one record: what the rest of lightq asks instead of importing model classes or copying the
family's file names. ``WAN21`` is the Wan2.1 family (T2V 1.3B / 14B, I2V 14B); ``WAN22_A14B`` Wan2.2's two-expert
T2V / I2V A14B models; ``WAN22_TI2V`` Wan2.2's TI2V-5B (text- and image-to-video from one DiT, the Wan2.2 VAE).

A ``ModelFamily`` holds

- ``components``: per component (``dit``, ``t5``, ``clip``, ``vae``) a ``Component``: its model class and table of
  architectures (``build(arch)``, imported only when called), the linears that are quantized (``fnmatch``
  patterns over the official key prefixes; everything else — norms, modulation, embeddings, the patch conv, the
  head, time/text/image projections — stays in high precision), the official release's file name, LightX2V's
  pre-quantized file name, the Hub download patterns, and its subfolder in a diffusers model folder;
- ``tasks``: the quantizable components of each task, in pipeline order (``t2v``: umT5 then DiT; ``i2v`` adds CLIP);
- ``decoder``: the component that turns latents into frames (never quantized, loaded in fp32);
- ``experts``: for a mixture of denoising experts (Wan2.2 A14B), the DiT components from the high-noise one to the
  low-noise one; the model config's ``boundary`` says where the first hands over (``lightq.pipeline.sampler``);
- ``block_prefix``: the key prefix of the blocks that offload streams and the converter splits (``blocks.<i>.``);
- ``geometry(model)``: the latent geometry of a model config, from its VAE and DiT architectures
  (``LatentGeometry``: channels, the VAE's temporal and spatial strides, the DiT's patch), which gives the
  latent shape and the frame / size rules a config must follow;

Torch-free at import: ``lightq.plan`` and ``lightq.config`` read it before anything loads. A component's
``subfolder`` is where its files sit in the model folder (Wan2.2's ``high_noise_model/`` and ``low_noise_model/``).
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass, replace
from typing import Callable

from ..errors import LightqError


@dataclass(frozen=True)
class Component:
    """One component of a family (see the module docstring)."""

    name: str
    model: str  # "module:Class", the class taking one architecture record
    archs: str  # the name of the module's table of architectures (name -> record)
    quantizable: tuple[str, ...] = ()
    official: str = ""  # the bf16 file of the official release ("" for a file set found otherwise)
    lightx2v: str | None = None  # LightX2V's pre-quantized file, ``{}`` standing for the scheme
    hub: tuple[str, ...] = ()  # Hub download patterns of the official weights
    chunk_stem: str = ""  # stem of a chunked safetensors set (``<stem>-00001-of-00002.safetensors`` + index)
    ignored_prefixes: tuple[str, ...] = ()  # keys of the released file that the model does not use
    diffusers: str = ""  # the component's subfolder in a diffusers (-Diffusers) model folder
    subfolder: str = ""  # the folder of its files inside the model folder ("" for the model folder itself)

    @property
    def stem(self) -> str:
        return self.chunk_stem or self.name

    def arch_table(self) -> dict:
        module, _, _ = self.model.partition(":")
        return getattr(importlib.import_module(module), self.archs)

    def build(self, arch: str) -> Callable:
        """A constructor of the component for architecture ``arch`` (call it under ``torch.device("meta")``)."""
        module, _, cls = self.model.partition(":")
        table = self.arch_table()
        if arch not in table:
            raise LightqError(f"{self.name} architecture '{arch}' does not exist: choose one of {', '.join(table)}")
        model_cls = getattr(importlib.import_module(module), cls)
        return lambda: model_cls(table[arch])


@dataclass(frozen=True)
class LatentGeometry:
    """Latents ``[channels, 1 + (frames - 1) / temporal, height / spatial, width / spatial]``; the DiT then cuts
    them into ``patch`` (frames, height, width) pieces."""

    channels: int
    temporal: int
    spatial: int
    patch: tuple[int, int, int]

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (self.channels, (frames - 1) // self.temporal + 1, height // self.spatial, width // self.spatial)

    def max_area(self, height: int, width: int, aspect: float) -> tuple[int, int]:
        """LightX2V's I2V size (``WanRunner.run_vae_encoder``, no ``resize_mode``): the picture's ``aspect``
        (height / width) within ``height * width`` pixels, each latent side floored to a multiple of the patch:
        ``h = floor(sqrt(A * aspect) / spatial / patch_h) * patch_h * spatial``, ``w`` likewise with ``A / aspect``."""
        area, ph, pw = height * width, self.patch[1], self.patch[2]
        lat_h = int(math.sqrt(area * aspect) // self.spatial // ph * ph)
        lat_w = int(math.sqrt(area / aspect) // self.spatial // pw * pw)
        return lat_h * self.spatial, lat_w * self.spatial

    def check(self, frames: int, height: int, width: int) -> None:
        """Raise LightqError unless the video has ``1 + k * temporal`` frames and sizes the latent patch divides."""
        if frames < 1 or (frames - 1) % self.temporal:
            raise LightqError(f"model.frames={frames}: this model needs {self.temporal}k+1 frames "
                              f"(e.g. {20 * self.temporal + 1}, {8 * self.temporal + 1}, {2 * self.temporal + 1})")
        pixels = self.spatial * max(self.patch[1], self.patch[2])
        if height % pixels or width % pixels or height < pixels or width < pixels:
            raise LightqError(f"model.height/width={height}x{width}: both must be positive multiples of {pixels}")


@dataclass(frozen=True)
class ModelFamily:
    """Everything lightq knows of one model family (see the module docstring)."""

    name: str
    components: dict[str, Component]
    tasks: dict[str, tuple[str, ...]]
    decoder: str = "vae"
    block_prefix: str = "blocks"
    experts: tuple[str, ...] = ()

    @property
    def quantizable(self) -> dict[str, tuple[str, ...]]:
        """component -> fnmatch patterns of its quantized linears (components without any left out)."""
        return {name: c.quantizable for name, c in self.components.items() if c.quantizable}

    def components_of(self, task: str) -> tuple[str, ...]:
        if task not in self.tasks:
            raise LightqError(f"model.task='{task}': choose {' or '.join(self.tasks)}")
        return self.tasks[task]

    def pipeline(self, task: str) -> tuple[str, ...]:
        """Every component a task loads: its quantizable components, then the decoder."""
        return (*self.components_of(task), self.decoder)

    def block_key(self) -> re.Pattern:
        """Finds ``<block_prefix>.<i>.`` in a key (``i`` is group 1), at its start or after a dot (``.search``);
        ``.match`` accepts it at the start only."""
        return re.compile(rf"(?:^|\.){re.escape(self.block_prefix)}\.(\d+)\.")

    def geometry(self, model) -> LatentGeometry:
        """The latent geometry of ``model`` (a ModelConfig: its ``vae_arch`` and ``dit_arch``), from the VAE's
        latent channels and strides (``VAEArch``) and the DiT's patch (``DiTArch``)."""
        vae = self.components[self.decoder].arch_table()[model.vae_arch]
        dit = self.components["dit"].arch_table()[model.dit_arch]
        return LatentGeometry(vae.z_dim, vae.temporal_factor, vae.spatial_factor, tuple(dit.patch_size))


WAN21 = ModelFamily(
    name="wan2.1",
    components={
        # DiT: self/cross attention q,k,v,o, the I2V image branch k_img/v_img, the FFN. Official weights are
        # ``diffusion_pytorch_model*.safetensors`` chunks with an index; lightq finds them by content
        # (``checkpoints.locate``), so no single file name is recorded.
        "dit": Component(
            "dit", "lightq.models.wan_dit:WanDiT", "DIT_ARCHS",
            quantizable=(
                "blocks.*.self_attn.q", "blocks.*.self_attn.k", "blocks.*.self_attn.v", "blocks.*.self_attn.o",
                "blocks.*.cross_attn.q", "blocks.*.cross_attn.k", "blocks.*.cross_attn.v", "blocks.*.cross_attn.o",
                "blocks.*.cross_attn.k_img", "blocks.*.cross_attn.v_img",
                "blocks.*.ffn.0", "blocks.*.ffn.2",
            ),
            hub=("diffusion_pytorch_model*",),
            chunk_stem="diffusion_pytorch_model",
            diffusers="transformer",
        ),
        # umT5-xxl encoder: attention q,k,v,o and the gated FFN (gate.0, fc1, fc2). Token embedding and norms stay.
        "t5": Component(
            "t5", "lightq.models.t5:UMT5Encoder", "T5_ARCHS",
            quantizable=(
                "blocks.*.attn.q", "blocks.*.attn.k", "blocks.*.attn.v", "blocks.*.attn.o",
                "blocks.*.ffn.gate.0", "blocks.*.ffn.fc1", "blocks.*.ffn.fc2",
            ),
            official="models_t5_umt5-xxl-enc-bf16.pth",
            lightx2v="models_t5_umt5-xxl-enc-{}.pth",
            hub=("models_t5_umt5-xxl-enc-bf16.pth",),
            diffusers="text_encoder",
        ),
        # open-clip XLM-RoBERTa ViT-H/14, vision tower only: fused qkv, out projection, MLP.
        "clip": Component(
            "clip", "lightq.models.clip:ClipVisual", "CLIP_ARCHS",
            quantizable=(
                "visual.transformer.*.attn.to_qkv", "visual.transformer.*.attn.proj",
                "visual.transformer.*.mlp.0", "visual.transformer.*.mlp.2",
            ),
            official="models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
            lightx2v="models_clip_open-clip-xlm-roberta-large-vit-huge-14-{}.pth",
            hub=("models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",),
            ignored_prefixes=("textual.", "log_scale"),  # the released file's text tower, unused by Wan
            diffusers="image_encoder",
        ),
        "vae": Component("vae", "lightq.models.vae:WanVAE", "VAE_ARCHS", official="Wan2.1_VAE.pth",
                         hub=("Wan2.1_VAE.pth",), diffusers="vae"),
    },
    tasks={"t2v": ("t5", "dit"), "i2v": ("t5", "clip", "dit")},
)

_WAN21_DIT = WAN21.components["dit"]
_T5, _VAE21 = WAN21.components["t5"], WAN21.components["vae"]

# Wan2.2 A14B: two 14B DiT experts in the official subfolders (each a chunked set with its index, or LightX2V's
# single files / block splits placed there), umT5 and the Wan2.1 VAE at the top. ``dit`` is the high-noise expert
# (the first steps), ``dit_low`` the low-noise one; their architectures are ``model.dit_arch`` / ``dit_low_arch``.
WAN22_A14B = ModelFamily(
    name="wan2.2-a14b",
    components={
        "dit": replace(_WAN21_DIT, subfolder="high_noise_model", hub=("high_noise_model/diffusion_pytorch_model*",)),
        "dit_low": replace(_WAN21_DIT, name="dit_low", subfolder="low_noise_model",
                           hub=("low_noise_model/diffusion_pytorch_model*",), diffusers="transformer_2"),
        "t5": _T5,
        "vae": _VAE21,
    },
    tasks={"t2v": ("t5", "dit", "dit_low"), "i2v": ("t5", "dit", "dit_low")},
    experts=("dit", "dit_low"),
)

# Wan2.2 TI2V-5B: one DiT (chunked, in the model folder) on the Wan2.2 VAE's 48 latent channels; image-to-video
# replaces the first latent frame instead of adding input channels, so both tasks have the same components.
WAN22_TI2V = ModelFamily(
    name="wan2.2-ti2v",
    components={
        "dit": _WAN21_DIT,
        "t5": _T5,
        # no diffusers subfolder: diffusers' key names of the Wan2.2 VAE are not mapped (checkpoints.diffusers)
        "vae": Component("vae", "lightq.models.vae22:Wan22VAE", "VAE22_ARCHS", official="Wan2.2_VAE.pth",
                         hub=("Wan2.2_VAE.pth",)),
    },
    tasks={"t2v": ("t5", "dit"), "i2v": ("t5", "dit")},
)

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (WAN21, WAN22_A14B, WAN22_TI2V)}
QUANTIZABLE = WAN21.quantizable


def family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise LightqError(f"model.family='{name}': choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]
