"""The Wan2.1 DiT block on lightq's fused kernels, for blocks whose linears run on a backend declaring
``fused_blocks`` (``lightq.backends.base``).

``fuse_dit_blocks(model)`` turns, in place, every block of a ``WanDiT`` whose linears (self-attention q/k/v/o,
cross-attention q/o, ffn.0/2) are such QLinears, of one scheme and one backend, into a ``FusedBlock`` (a ``Block`` subclass:
same parameters, same state-dict keys; nothing is copied). Its forward computes what ``Block.forward`` computes,
with the quantization moved into the kernels that produce each linear's input:

    xq, sx = norm_quant(x; shift1, scale1)                      LayerNorm + modulation + bf16 rounding + quant
    qkv    = one GEMM over the concatenated [3 dim, dim] q/k/v weight (per-channel scales concatenate), bias fused
    q, k, v = qkv_rms_rope(qkv)                                  RMSNorm + RoPE of q and k, v copied: one kernel,
                                                                  three contiguous [B, L, heads, head_dim] tensors
    y      = o(self_attention(q, k, v))
    x, xq, sx = add_norm_quant(x, y; gate1; norm3 affine)       residual update + LayerNorm + quant (cross q)
    y      = cross_attn.o(attention(rms(q_gemm(xq, sx)), norm_k(k(text)), v(text)))   (+ the I2V image branch)
    x, xq, sx = add_norm_quant(x, y; shift2, scale2)            residual update + LayerNorm + modulation + quant
    y      = ffn.2(gemm_only(act_quant_gelu(ffn.0(xq, sx))))    GELU fused into the quantization of ffn.2's input
    x      = add_gated(x, y; gate2)                              one pass over x, y and the gate

so no bf16 normalised activation is written and re-read, q/k/v are quantized once for one GEMM, and the RMSNorm /
RoPE chain (7 elementwise passes in fp32 in the unfused block) is one kernel per tensor. An unmerged LoRA's side
path is added to each GEMM's output from that GEMM's quantized activation (``LowRankPath.add``: the quantized
down-projection on the backend's GEMM, or the bf16 one; q/k/v share one path on their input, ``qkv_lora``); o and the text k/v run as QLinears, with theirs. The numerics are the
unfused block's up to reduction order (see ``lightq.kernels.fused_norm_quant``). The q/k/v QLinears keep their buffers as views of
the concatenated weight, so a fused model holds no second copy (moving it to another device materialises the views
separately: fuse after placing the model).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LightqError
from ..models.attention import attention, self_attention
from ..models.wan_dit import Block, CrossAttention, SelfAttention
from ..quant.linear import QLinear
from ..quant.lora import LowRankPath
from ..kernels.act_quant import act_quant
from ..kernels.fused_norm_quant import add_gated, add_norm_quant, norm_quant, qkv_rms_rope, rms_rope

FUSED_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o",
                 "ffn.0", "ffn.2")


def fusable(block: nn.Module) -> tuple[bool, str]:
    """(ok, why not): can ``block`` run as a ``FusedBlock``?"""
    if not isinstance(block, Block):
        return False, f"not a Wan DiT Block ({type(block).__name__})"
    schemes, backends = set(), set()
    for name in FUSED_LINEARS:
        lin = block.get_submodule(name)
        if not isinstance(lin, QLinear) or not lin.backend.fused_blocks:
            return False, f"{name} is not a quantized linear on a backend that runs fused blocks (fused_blocks)"
        schemes.add(lin.scheme)
        backends.add(id(lin.backend))
    if len(schemes) != 1:
        return False, f"its linears mix schemes {sorted(schemes)}"
    if len(backends) != 1:
        return False, "its linears run on different backend instances (the fused GEMMs use the q projection's)"
    return True, "ok"


def fuse_block(block: nn.Module) -> bool:
    """Make ``block`` a ``FusedBlock`` (in place) if it is fusable; whether it is one now."""
    if not isinstance(block, FusedBlock) and fusable(block)[0]:
        FusedBlock.convert(block)
    return isinstance(block, FusedBlock)


def fuse_dit_blocks(model: nn.Module) -> int:
    """Make every fusable block of ``model.blocks`` a ``FusedBlock`` (in place); returns how many are fused."""
    return sum(fuse_block(block) for block in model.blocks)


def _gemm(lin: QLinear, xq: torch.Tensor, sx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The linear's GEMM on an activation quantized by a fused kernel, plus its unmerged LoRA side path if any."""
    y = lin.backend.gemm_only(xq, sx, lin.packed(), lin.bias, dtype)
    return y if lin.lora is None else lin.lora.add(y, xq, sx, lin.backend)


class FusedSelfAttention(SelfAttention):
    """Self-attention from the block's fp32 residual: fused LayerNorm + modulation + quant, one q/k/v GEMM over
    ``qkv_data`` (the q/k/v codes concatenated), RMSNorm + RoPE in one kernel, attention, ``o``."""

    def forward(self, x2, mod, seq_len, b, rope, eps, dtype):
        return self.attend(self.norm_qkv(x2, mod, seq_len, eps, dtype), b, seq_len, rope)

    def norm_qkv(self, x2: torch.Tensor, mod: torch.Tensor, seq_len: int, eps: float, dtype) -> torch.Tensor:
        """``[M, 3 dim]`` q/k/v projections of ``LN(x) * (1 + scale1) + shift1`` (fused norm + quant, one GEMM)."""
        xq, sx = norm_quant(x2, seq_len, None, None, mod, 0, 1, eps, self.q.scheme == "fp8", dtype)
        packed = {"data": self.qkv_data, "scale": self.qkv_scale}
        qkv = self.q.backend.gemm_only(xq, sx, packed, self.qkv_bias, dtype)
        return qkv if self.qkv_lora is None else self.qkv_lora.add(qkv, xq, sx, self.q.backend)

    def attend(self, qkv: torch.Tensor, b: int, seq_len: int, rope) -> torch.Tensor:
        cos, sin = rope
        q, k, v = qkv_rms_rope(qkv, self.norm_q.weight, self.norm_k.weight, cos, sin, seq_len, self.head_dim,
                               self.norm_q.eps).view(3, b, seq_len, self.num_heads, self.head_dim)
        return self.o(self_attention(q, k, v)).reshape(b * seq_len, -1).contiguous()


class FusedCrossAttention(CrossAttention):
    """The residual update by the self-attention output fused with norm3 and the quantization of ``q``'s input,
    then cross-attention to the text (and I2V image) tokens; returns (updated residual, cross-attention output)."""

    def forward(self, x2, y, mod, norm3, seq_len, b, text, image, dtype):
        fp8 = self.q.scheme == "fp8"
        x2, xq, sx = add_norm_quant(x2, y, seq_len, norm3.weight, norm3.bias, mod, -1, -1, 2, norm3.eps, fp8, dtype)
        heads = (self.num_heads, self.head_dim)
        q = rms_rope(_gemm(self.q, xq, sx, dtype), self.norm_q.weight, None, None, seq_len, self.head_dim,
                     self.norm_q.eps).view(b, seq_len, *heads)
        k = self.norm_k(self.k(text)).unflatten(-1, heads)
        out = attention(q, k, self.v(text).unflatten(-1, heads))
        if image is not None:
            k_img = self.norm_k_img(self.k_img(image)).unflatten(-1, heads)
            out = out + attention(q, k_img, self.v_img(image).unflatten(-1, heads))
        return x2, self.o(out).reshape(b * seq_len, -1).contiguous()


class FusedFFN(nn.Sequential):
    """The residual update by the cross-attention output fused with LayerNorm + modulation + quantization, then
    ``ffn.2(GELU(ffn.0(.)))`` with GELU fused into the quantization of ffn.2's input; returns (residual, output)."""

    def forward(self, x2, y, mod, seq_len, eps, dtype):
        fp8 = self[0].scheme == "fp8"
        x2, xq, sx = add_norm_quant(x2, y, seq_len, None, None, mod, 3, 4, -1, eps, fp8, dtype)
        hq, hs = act_quant(_gemm(self[0], xq, sx, dtype), fp8, True)
        return x2, _gemm(self[2], hq, hs, dtype)


class FusedBlock(Block):
    """A ``Block`` whose forward runs on the fused kernels (module docstring). Build with ``convert``.
    Its three phases are calls of ``self_attn``, ``cross_attn`` and ``ffn``, each using only its own tensors,
    norm3's, and the block's modulation (``offload_phases``)."""

    @classmethod
    def convert(cls, block: Block) -> "FusedBlock":
        ok, why = fusable(block)
        if not ok:
            raise ValueError(f"cannot fuse this DiT block: {why}")
        attn = block.self_attn
        parts = (attn.q, attn.k, attn.v)
        dim = attn.q.out_features
        data = torch.cat([p.data for p in parts])
        scale = torch.cat([p.scale for p in parts])
        biases = [p.bias for p in parts]
        bias = None
        if any(b is not None for b in biases):
            ref = next(b for b in biases if b is not None)
            bias = torch.cat([b.detach() if b is not None else torch.zeros_like(ref) for b in biases])
        for i, part in enumerate(parts):  # the separate codes become views of the concatenation: no second copy
            part.data = data[i * dim:(i + 1) * dim]
            part.scale = scale[i * dim:(i + 1) * dim]
        attn.register_buffer("qkv_data", data, persistent=False)
        attn.register_buffer("qkv_scale", scale, persistent=False)
        attn.register_buffer("qkv_bias", bias, persistent=False)
        # unmerged LoRAs of q / k / v: one side path on their shared input, each up into its own third of the output
        attn.qkv_lora = LowRankPath.shared_input([p.lora for p in parts], dim)
        for part in parts:
            part.lora = None
        attn.__class__ = FusedSelfAttention
        block.cross_attn.__class__ = FusedCrossAttention
        block.ffn.__class__ = FusedFFN
        block.__class__ = cls
        return block

    def offload_phases(self):
        return [([self.norm1, self.self_attn], self, self.self_attn),
                ([self.norm3, self.cross_attn], self.cross_attn, self.cross_attn),
                ([self.norm2, self.ffn], self.ffn, self.ffn)]

    def norm_qkv(self, x2: torch.Tensor, mod: torch.Tensor, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
        """``[M, 3 dim]`` q/k/v projections of the block input (see ``FusedSelfAttention.norm_qkv``)."""
        return self.self_attn.norm_qkv(x2, mod, seq_len, self.norm1.eps, dtype)

    def forward(self, x, e0, rope, text, image, dtype):
        b, seq_len, dim = x.shape
        if e0.dim() != 3:
            raise LightqError("the fused Wan block takes one timestep per sample; per-token timesteps (TI2V "
                              "image-to-video) need the unfused block: set dit_quant.options.fuse=false")
        mod = (self.modulation.float() + e0).contiguous()  # [B, 6, dim]: shift1 scale1 gate1 shift2 scale2 gate2
        x2 = x.reshape(b * seq_len, dim).contiguous()
        y = self.self_attn(x2, mod, seq_len, b, rope, self.norm1.eps, dtype)
        x2, y = self.cross_attn(x2, y, mod, self.norm3, seq_len, b, text, image, dtype)
        x2, y = self.ffn(x2, y, mod, seq_len, self.norm2.eps, dtype)
        return add_gated(x2, y, mod, 5, seq_len).view(b, seq_len, dim)
