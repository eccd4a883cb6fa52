"""The vision tower of open-clip XLM-RoBERTa-Large-ViT-H/14 as Wan2.1 I2V uses it.

Keys are those of ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` under ``visual.``; the file's text
tower (``textual.*``) and ``log_scale`` are not used by Wan and are listed in ``IGNORED_PREFIXES``.

    images [B, 3, H, W] in [-1, 1]
      -> bicubic resize to 224x224 (align_corners=False), (x + 1) / 2, normalise with the CLIP mean / std
      -> patch_embedding (conv 14x14 stride 14, no bias) -> prepend cls_embedding, add pos_embedding -> pre_norm
      -> blocks 0 .. L-2:  x = x + proj(MHA(to_qkv(norm1(x))));  x = x + mlp.2(gelu(mlp.0(norm2(x))))
      -> [B, 257, width]   (Wan's ``use_31_block=True``: the penultimate block's output, no final norm)

Layer norms are computed in fp32 (eps 1e-5); attention uses the usual ``1/sqrt(head_dim)`` scaling and the exact
(erf) GELU. The last block, ``post_norm`` and ``head`` exist only so the checkpoint loads with every ``visual.*``
key accounted for. No buffers: the module builds under ``torch.device("meta")``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LightqError
from .family import WAN21

IGNORED_PREFIXES = WAN21.components["clip"].ignored_prefixes
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipArch:
    image_size: int = 224
    patch_size: int = 14
    width: int = 1280
    num_layers: int = 32
    num_heads: int = 16
    mlp_ratio: int = 4
    embed_dim: int = 1024
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise LightqError(f"ClipArch: image_size {self.image_size} is not a multiple of patch_size "
                              f"{self.patch_size}")
        if self.width % self.num_heads:
            raise LightqError(f"ClipArch: width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.num_layers < 2:
            raise LightqError("ClipArch: num_layers must be >= 2 (the output is the penultimate block's)")

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


CLIP_ARCHS: dict[str, ClipArch] = {
    "vit-h-14": ClipArch(),
    "tiny": ClipArch(width=128, num_layers=2, num_heads=2, embed_dim=64),
}


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input / parameter dtype, returned in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class ClipSelfAttention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, width = x.shape
        q, k, v = self.to_qkv(x).view(b, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, length, width))


class ClipBlock(nn.Module):
    def __init__(self, arch: ClipArch):
        super().__init__()
        hidden = arch.width * arch.mlp_ratio
        self.norm1 = LayerNorm32(arch.width, eps=arch.norm_eps)
        self.attn = ClipSelfAttention(arch.width, arch.num_heads)
        self.norm2 = LayerNorm32(arch.width, eps=arch.norm_eps)
        self.mlp = nn.Sequential(nn.Linear(arch.width, hidden), nn.GELU(), nn.Linear(hidden, arch.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _gaussian(gain: float, *shape: int) -> torch.Tensor:
    """``gain * randn(shape)``, left empty when built on the meta device to be loaded (random init there imports
    torch's compiler stack: seconds of every job's load)."""
    t = torch.empty(*shape)
    return t if t.is_meta else gain * torch.randn(*shape)


class VisionTower(nn.Module):
    """The ``visual`` module: embeddings, pre-norm, the blocks; ``post_norm`` / ``head`` are held, not used."""

    def __init__(self, arch: ClipArch):
        super().__init__()
        gain = arch.width ** -0.5
        self.patch_embedding = nn.Conv2d(3, arch.width, arch.patch_size, stride=arch.patch_size, bias=False)
        self.cls_embedding = nn.Parameter(_gaussian(gain, 1, 1, arch.width))
        self.pos_embedding = nn.Parameter(_gaussian(gain, 1, arch.num_tokens, arch.width))
        self.pre_norm = LayerNorm32(arch.width, eps=arch.norm_eps)
        self.transformer = nn.Sequential(*(ClipBlock(arch) for _ in range(arch.num_layers)))
        self.post_norm = LayerNorm32(arch.width, eps=arch.norm_eps)
        self.head = nn.Parameter(_gaussian(gain, arch.width, arch.embed_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels`` [B, 3, S, S] already normalised -> penultimate block output [B, tokens, width]."""
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_embedding.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pre_norm(x + self.pos_embedding.to(x.dtype))
        return self.transformer[:-1](x)


class ClipVisual(nn.Module):
    """``forward(images [B, 3, H, W] in [-1, 1]) -> [B, 257, width]``, the features Wan I2V feeds the DiT."""

    def __init__(self, arch: ClipArch | str = "vit-h-14"):
        super().__init__()
        if isinstance(arch, str):
            if arch not in CLIP_ARCHS:
                raise LightqError(f"unknown CLIP architecture '{arch}'; choose one of: {', '.join(CLIP_ARCHS)}")
            arch = CLIP_ARCHS[arch]
        self.arch = arch
        self.visual = VisionTower(arch)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Wan's preprocessing, in fp32: bicubic resize to the model size, [-1, 1] -> [0, 1], CLIP normalisation."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise LightqError(f"CLIP image encoder: expected images [batch, 3, height, width], got "
                              f"{tuple(images.shape)}; pass RGB images as channels-first tensors in [-1, 1]")
        if not images.is_floating_point():
            raise LightqError(f"CLIP image encoder: expected float images in [-1, 1], got {images.dtype}; "
                              "convert uint8 pixels with x / 127.5 - 1")
        size = (self.arch.image_size, self.arch.image_size)
        x = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False)
        x = x * 0.5 + 0.5
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(self.preprocess(images))

