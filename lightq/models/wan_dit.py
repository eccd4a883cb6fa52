"""The Wan diffusion transformer (Wan2.1 T2V / I2V, Wan2.2 A14B experts and TI2V-5B), parameter for parameter in
the official checkpoint layout.

Every parameter name is a key of the official ``diffusion_pytorch_model*.safetensors`` (and of LightX2V's files):
``patch_embedding``, ``text_embedding.{0,2}``, ``time_embedding.{0,2}``, ``time_projection.1``,
``blocks.{i}.{modulation, self_attn.{q,k,v,o,norm_q,norm_k}, norm3, cross_attn.{q,k,v,o,norm_q,norm_k}, ffn.{0,2}}``
(Wan2.1 I2V adds ``cross_attn.{k_img,v_img,norm_k_img}`` and ``img_emb.proj.{0,1,3,4}``; Wan2.2's I2V expert has no
CLIP branch, ``clip_dim=None``), ``head.{head,modulation}``.
The model holds no buffers, so it builds under ``torch.device("meta")`` and loads with
``load_state_dict(sd, assign=True)``.

Forward, for latents ``x`` ``[B, out_dim, F, H, W]``, timesteps ``t`` ``[B]`` in [0, 1000] (or ``[B, L]``, one per
token, as Wan2.2's TI2V gives its kept first frame t = 0), text ``context`` ``[B, L <= 512, text_dim]`` (zero-padded
to 512 tokens, as the official model does):

    tokens   = patch_embedding(x ++ y) -> [B, F*H/2*W/2, dim]     (I2V: y [B, 20, F, H, W] joins x on channels)
    e        = time_embedding(sinusoid_256(t)),  e0 = time_projection(e) -> 6 vectors per sample (or per token)
    block:   x += gate1 * self_attn(LN(x) * (1 + scale1) + shift1)       (RMS-normed q/k, 3-D RoPE)
             x += cross_attn(LN_affine(x), text [, image])
             x += gate2 * ffn(LN(x) * (1 + scale2) + shift2)              (shift/scale/gate = modulation + e0)
    out      = head(LN(x) * (1 + scale) + shift), unpatchified to [B, out_dim, F, H, W]

Numerics follow the official model under bf16 autocast: the residual stream, norms, modulation, the time
embedding and the head run in fp32; every other linear, the patch conv and attention run in the dtype of the
model's weights (``patch_embedding.weight.dtype``), so quantized linears see bf16 activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LightqError
from .attention import attention, self_attention
from .rope import apply_rope, rope_tables
from .sequence import all_tokens, local_tokens

TEXT_LEN = 512
CLIP_TOKENS = 257


@dataclass(frozen=True)
class DiTArch:
    """Hyper-parameters of one Wan DiT size (the official ``config.json`` fields). ``model_type`` ``i2v`` takes the
    VAE conditioning ``y``; ``clip_dim`` (Wan2.1 I2V) adds the CLIP image branch, ``None`` (Wan2.2) has none."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    text_len: int = TEXT_LEN
    patch_size: tuple[int, int, int] = (1, 2, 2)
    model_type: str = "t2v"
    clip_dim: int | None = 1280
    eps: float = 1e-6

    def __post_init__(self):
        if self.model_type not in ("t2v", "i2v", "ti2v"):
            raise LightqError(f"DiT model_type must be 't2v', 'i2v' or 'ti2v', got '{self.model_type}'")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise LightqError(f"DiT dim {self.dim} must split into {self.num_heads} heads of even size")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def is_i2v(self) -> bool:
        """Takes the VAE image conditioning ``y`` on its input channels."""
        return self.model_type == "i2v"

    @property
    def has_clip(self) -> bool:
        """Takes CLIP image tokens ``clip_fea`` (the Wan2.1 I2V image branch)."""
        return self.is_i2v and self.clip_dim is not None


_TINY = DiTArch(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_dim=128)

DIT_ARCHS: dict[str, DiTArch] = {
    "tiny": _TINY,
    "tiny-i2v": DiTArch(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_dim=128, in_dim=36,
                        model_type="i2v", clip_dim=128),
    "1.3b": DiTArch(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14b": DiTArch(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "14b-i2v": DiTArch(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, model_type="i2v"),
    # Wan2.2: each A14B expert is a 14B DiT (the T2V one is Wan2.1's 14B); TI2V-5B works on the Wan2.2 VAE's 48 channels
    "tiny-i2v-a14b": DiTArch(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_dim=128, in_dim=36,
                             model_type="i2v", clip_dim=None),
    "tiny-ti2v": DiTArch(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_dim=128, in_dim=48, out_dim=48,
                         model_type="ti2v"),
    "a14b-i2v": DiTArch(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, model_type="i2v",
                        clip_dim=None),
    "ti2v-5b": DiTArch(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48,
                       model_type="ti2v"),
}


# --- building blocks ---------------------------------------------------------------------------------------------

def modulation_terms(modulation: torch.Tensor, e: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """The ``n`` fp32 terms (shift, scale, gate, ...) of ``modulation [1, n, dim] + e``, each ``[B, 1, dim]`` for
    per-sample ``e [B, n, dim]`` or ``[B, L, dim]`` for per-token ``e [B, L, n, dim]``: both broadcast over tokens."""
    m = modulation.float()
    if e.dim() == 3:
        return (m + e).chunk(n, dim=1)
    return tuple(c.squeeze(2) for c in (m.unsqueeze(0) + e).chunk(n, dim=2))


def _linear_fp32(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` computed in fp32 whatever the weight dtype (time embedding and head, as officially), plus the
    linear's unmerged LoRA side path ``lora(x, y)`` when it has one (``lightq.quant.lora``)."""
    bias = None if linear.bias is None else linear.bias.float()
    y = F.linear(x.float(), linear.weight.float(), bias)
    side = getattr(linear, "lora", None)
    return y if side is None else side(x.float(), y)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``[cos(t * w), sin(t * w)]`` with ``w_j = 10000**(-j / (dim/2))``, computed in float64; returns fp32."""
    half = dim // 2
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` in fp32, returned in the input dtype (the official ``WanRMSNorm``)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


class LayerNorm32(nn.Module):
    """LayerNorm computed in fp32 and returned in fp32; ``affine`` adds ``weight``/``bias`` parameters."""

    def __init__(self, dim: int, eps: float, affine: bool = False):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), (self.dim,), w, b, self.eps)


class SelfAttention(nn.Module):
    def __init__(self, arch: DiTArch):
        super().__init__()
        dim = arch.dim
        self.num_heads, self.head_dim = arch.num_heads, arch.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, arch.eps), RMSNorm(dim, arch.eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        heads = (self.num_heads, self.head_dim)
        q = apply_rope(self.norm_q(self.q(x)).unflatten(-1, heads), *rope).to(x.dtype)
        k = apply_rope(self.norm_k(self.k(x)).unflatten(-1, heads), *rope).to(x.dtype)
        v = self.v(x).unflatten(-1, heads)
        return self.o(self_attention(q, k, v))


class CrossAttention(nn.Module):
    """Attention from video tokens to the text tokens; I2V adds a second attention to the image tokens."""

    def __init__(self, arch: DiTArch):
        super().__init__()
        dim = arch.dim
        self.num_heads, self.head_dim = arch.num_heads, arch.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, arch.eps), RMSNorm(dim, arch.eps)
        if arch.has_clip:
            self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, arch.eps)

    def forward(self, x: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        heads = (self.num_heads, self.head_dim)
        q = self.norm_q(self.q(x)).unflatten(-1, heads)
        k = self.norm_k(self.k(text)).unflatten(-1, heads)
        out = attention(q, k, self.v(text).unflatten(-1, heads))
        if image is not None:
            k_img = self.norm_k_img(self.k_img(image)).unflatten(-1, heads)
            out = out + attention(q, k_img, self.v_img(image).unflatten(-1, heads))
        return self.o(out)


class Block(nn.Module):
    def __init__(self, arch: DiTArch):
        super().__init__()
        dim = arch.dim
        self.norm1 = LayerNorm32(dim, arch.eps)
        self.self_attn = SelfAttention(arch)
        self.norm3 = LayerNorm32(dim, arch.eps, affine=True)
        self.cross_attn = CrossAttention(arch)
        self.norm2 = LayerNorm32(dim, arch.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, arch.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(arch.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))

    def forward(self, x, e0, rope, text, image, dtype):
        """``x`` fp32 residual stream ``[B, L, dim]``; ``e0`` fp32 ``[B, 6, dim]`` (or ``[B, L, 6, dim]`` per token);
        ``text``/``image`` in ``dtype``."""
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation_terms(self.modulation, e0, 6)
        y = self.self_attn((self.norm1(x) * (1 + scale1) + shift1).to(dtype), rope)
        x = x + y.float() * gate1
        x = x + self.cross_attn(self.norm3(x).to(dtype), text, image).float()
        y = self.ffn((self.norm2(x) * (1 + scale2) + shift2).to(dtype))
        return x + y.float() * gate2

    def offload_phases(self) -> list[tuple[list[nn.Module], nn.Module, nn.Module]]:
        """The phases of ``forward`` in order, for ``offload=phase``: (modules whose tensors the phase needs, the
        module whose call starts it, the module whose return ends it). The block's own tensors (``modulation``)
        go with the first phase."""
        return [([self.norm1, self.self_attn], self, self.self_attn),
                ([self.norm3, self.cross_attn], self.norm3, self.cross_attn),
                ([self.norm2, self.ffn], self.norm2, self.ffn)]


class Head(nn.Module):
    def __init__(self, arch: DiTArch):
        super().__init__()
        self.norm = LayerNorm32(arch.dim, arch.eps)
        self.head = nn.Linear(arch.dim, math.prod(arch.patch_size) * arch.out_dim)
        self.modulation = nn.Parameter(torch.empty(1, 2, arch.dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """``e`` fp32 ``[B, dim]`` (or ``[B, L, dim]`` per token)."""
        shift, scale = modulation_terms(self.modulation, e.unsqueeze(-2), 2)
        return _linear_fp32(self.head, self.norm(x) * (1 + scale) + shift)


class ImageProjection(nn.Module):
    """CLIP image tokens -> DiT width: LayerNorm, Linear, GELU, Linear, LayerNorm (official ``MLPProj``)."""

    def __init__(self, clip_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(LayerNorm32(clip_dim, 1e-5, affine=True), nn.Linear(clip_dim, clip_dim),
                                  nn.GELU(), nn.Linear(clip_dim, dim), LayerNorm32(dim, 1e-5, affine=True))

    def forward(self, clip_fea: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        norm_in, fc1, act, fc2, norm_out = self.proj
        h = act(fc1(norm_in(clip_fea).to(dtype)))
        return norm_out(fc2(h)).to(dtype)


# --- the model ---------------------------------------------------------------------------------------------------

class WanDiT(nn.Module):
    """The Wan2.1 DiT. ``WanDiT(arch)`` is randomly initialised (see ``init_weights``) unless built on meta."""

    def __init__(self, arch: DiTArch):
        super().__init__()
        self.arch = arch
        dim = arch.dim
        self.patch_embedding = nn.Conv3d(arch.in_dim, dim, kernel_size=arch.patch_size, stride=arch.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(arch.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(arch.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(Block(arch) for _ in range(arch.num_layers))
        self.head = Head(arch)
        if arch.has_clip:
            self.img_emb = ImageProjection(arch.clip_dim, dim)
        if not self.patch_embedding.weight.is_meta:
            init_weights(self)

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the linears, attention and patch conv (that of the weights)."""
        return self.patch_embedding.weight.dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                clip_fea: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity ``[B, out_dim, F, H, W]`` (fp32) for latents ``x`` at timesteps ``t``; see the module doc."""
        arch, dtype = self.arch, self.dtype
        self._check_inputs(x, t, context, clip_fea, y)
        b = x.shape[0]
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)

        tokens = self.patch_embedding(x.to(dtype))
        grid = tuple(tokens.shape[2:])
        x = tokens.flatten(2).transpose(1, 2).float()
        rope = rope_tables(grid, arch.head_dim, x.device)

        t = t.to(x.device)
        per_token = t.dim() == 2
        t = t.reshape(-1) if per_token else t.reshape(-1).expand(b)
        time_mlp0, _, time_mlp2 = self.time_embedding
        e = _linear_fp32(time_mlp2, F.silu(_linear_fp32(time_mlp0, sinusoidal_embedding(t, arch.freq_dim))))
        e0 = _linear_fp32(self.time_projection[1], F.silu(e)).unflatten(1, (6, arch.dim))
        if per_token:  # [B * L, ...] -> [B, L, ...]
            e, e0 = e.unflatten(0, (b, -1)), e0.unflatten(0, (b, -1))
        x, rope, *per = local_tokens(x, rope, *((e, e0) if per_token else ()))  # this process's tokens (sequence.py)
        if per_token:
            e, e0 = per

        text = F.pad(context.to(dtype), (0, 0, 0, arch.text_len - context.shape[1]))
        text = self.text_embedding(text)
        image = self.img_emb(clip_fea, dtype) if arch.has_clip else None

        for block in self.blocks:
            x = block(x, e0, rope, text, image, dtype)
        return self._unpatchify(all_tokens(self.head(x, e)), grid)

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``[B, f*h*w, p*q*r*C]`` -> ``[B, C, f*p, h*q, w*r]`` (patch offsets before channels, as officially)."""
        (f, h, w), (p, q, r) = grid, self.arch.patch_size
        x = x.reshape(x.shape[0], f, h, w, p, q, r, self.arch.out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], self.arch.out_dim, f * p, h * q, w * r)

    def _check_inputs(self, x, t, context, clip_fea, y) -> None:
        arch = self.arch
        if arch.has_clip and (clip_fea is None or y is None):
            raise LightqError("the I2V DiT needs clip_fea (CLIP image tokens) and y (VAE image conditioning)")
        if arch.is_i2v and y is None:
            raise LightqError("the I2V DiT needs y (VAE image conditioning)")
        if not arch.is_i2v and (clip_fea is not None or y is not None):
            raise LightqError("clip_fea / y are image-to-video inputs; this DiT is text-to-video")
        if not arch.has_clip and clip_fea is not None:
            raise LightqError("clip_fea is the Wan2.1 I2V CLIP input; this DiT has no CLIP image branch")
        x_channels = arch.out_dim if arch.is_i2v else arch.in_dim
        if x.dim() != 5 or x.shape[1] != x_channels:
            raise LightqError(f"DiT input latents must be [B, {x_channels}, F, H, W], got {tuple(x.shape)}")
        b, spatial = x.shape[0], tuple(x.shape[2:])
        if any(s % p for s, p in zip(spatial, arch.patch_size)):
            raise LightqError(f"latent size {spatial} is not divisible by the patch size {arch.patch_size}; "
                              "choose a resolution that is a multiple of 16 pixels")
        tokens = math.prod(s // p for s, p in zip(spatial, arch.patch_size))
        if not (t.numel() in (1, b) or tuple(t.shape) == (b, tokens)):
            raise LightqError(f"DiT timesteps must have one value per sample ({b}) or per token ([{b}, {tokens}]), "
                              f"got shape {tuple(t.shape)}")
        if context.dim() != 3 or context.shape[0] != b or context.shape[2] != arch.text_dim \
                or context.shape[1] > arch.text_len:
            raise LightqError(f"DiT text context must be [{b}, L <= {arch.text_len}, {arch.text_dim}], "
                              f"got {tuple(context.shape)}")
        if not arch.is_i2v:
            return
        if arch.has_clip and (clip_fea.dim() != 3 or clip_fea.shape[0] != b or clip_fea.shape[2] != arch.clip_dim):
            raise LightqError(f"clip_fea must be [{b}, {CLIP_TOKENS}, {arch.clip_dim}], got {tuple(clip_fea.shape)}")
        y_shape = (b, arch.in_dim - x_channels, *spatial)
        if tuple(y.shape) != y_shape:
            raise LightqError(f"y must be {list(y_shape)}, got {list(y.shape)}")


# --- initialisation ----------------------------------------------------------------------------------------------

@torch.no_grad()
def init_weights(model: WanDiT, generator: torch.Generator | None = None) -> WanDiT:
    """Random weights giving well-scaled outputs, deterministic for a given ``generator`` (or global seed).

    As the official ``init_weights``: Xavier-uniform linears and patch conv, N(0, 0.02) time embedding,
    N(0, 1/dim) modulation, unit norms. Where the official code zero-inits (biases, the output head) small random
    values are used instead, so that an untrained model's output is not identically zero; the text embedding is
    Xavier-uniform rather than N(0, 0.02), so that the text visibly conditions an untrained model's output.
    """
    def normal(p, std):
        p.normal_(0.0, std, generator=generator)

    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight, generator=generator)
            if m.bias is not None:
                normal(m.bias, 0.02)
        elif isinstance(m, (RMSNorm, LayerNorm32)) and m.weight is not None:
            m.weight.fill_(1.0)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    conv = model.patch_embedding
    nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1), generator=generator)
    normal(conv.bias, 0.02)
    for m in model.time_embedding:
        if isinstance(m, nn.Linear):
            normal(m.weight, 0.02)
    for name, p in model.named_parameters():
        if name.endswith("modulation"):
            normal(p, p.shape[-1] ** -0.5)
    return model


def random_dit(arch: DiTArch, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
               seed: int = 0) -> WanDiT:
    """A randomly initialised DiT allocated once, directly in ``dtype`` on ``device`` (for ``weights=random``)."""
    with torch.device("meta"):
        model = WanDiT(arch)
    model = model.to(dtype=dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    return init_weights(model, generator).eval().requires_grad_(False)
