"""The umT5-xxl encoder as Wan2.1 uses it, in the key layout of ``models_t5_umt5-xxl-enc-bf16.pth``.

Per block ``i`` (pre-norm, residual, no biases anywhere)::

    x = x + o(Attn(q(n1), k(n1), v(n1)) + B_i)          n1 = norm1(x)
    x = x + fc2(fc1(n2) * gelu_tanh(gate.0(n2)))       n2 = norm2(x)

``norm*`` is T5's RMS norm ``w * x / sqrt(mean(x^2) + 1e-6)`` computed in fp32 (weight only). Attention has no
``1/sqrt(d)`` scaling. ``B_i`` is block ``i``'s own relative position bias (umT5: not shared between layers):
``B_i[h, q, k] = pos_embedding.embedding[bucket(k - q), h]``, with T5's bidirectional log buckets, plus the key
padding mask. After the blocks comes the final RMS ``norm``; padding positions of the output are zeroed (Wan keeps
``context[i][:seq_len]``, the rest is padding that the DiT sees as zeros).

fp16: as in the official code, the residual stream is clamped to ``finfo(fp16).max - 1000`` when it overflows.
The module holds no buffers (relative positions are computed on the fly), so it builds under
``torch.device("meta")`` and loads with ``load_state_dict(assign=True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LightqError

MAX_DISTANCE = 128


@dataclass(frozen=True)
class T5Arch:
    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    text_len: int = 512

    def __post_init__(self):
        if self.dim_attn % self.num_heads:
            raise LightqError(f"T5Arch: dim_attn {self.dim_attn} is not divisible by num_heads {self.num_heads}")


T5_ARCHS: dict[str, T5Arch] = {
    "umt5-xxl": T5Arch(),
    "tiny": T5Arch(vocab=256, dim=128, dim_attn=128, dim_ffn=256, num_heads=2, num_layers=2, num_buckets=32,
                   text_len=64),
}


def relative_position_bucket(rel_pos: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative position ``rel_pos = key_pos - query_pos`` (long tensor, same shape).

    Bidirectional: half the buckets for ``rel_pos <= 0``, half (offset by ``num_buckets // 2``) for ``> 0``.
    Unidirectional: only ``rel_pos <= 0`` is distinguished. Within a half of ``n`` buckets, distances below
    ``n // 2`` get their own bucket; larger ones are spaced logarithmically up to ``max_distance`` and clipped to
    the last bucket. Computed in fp32 like the published T5 code, so bucket edges agree with it.
    """
    rel_pos = rel_pos.long()
    if bidirectional:
        num_buckets //= 2
        offset = (rel_pos > 0).long() * num_buckets
        distance = rel_pos.abs()
    else:
        offset = torch.zeros_like(rel_pos)
        distance = (-rel_pos).clamp(min=0)
    max_exact = num_buckets // 2
    # clamp(min=1) only keeps log() finite where the exact branch is taken anyway.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return offset + torch.where(distance < max_exact, distance, large)


class T5RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` in fp32, cast back to the weight's dtype when it is half precision."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def _embedding(num: int, dim: int) -> nn.Embedding:
    """An ``nn.Embedding`` whose weight is left uninitialised (``UMT5Encoder.reset_parameters`` fills it): built
    under the meta device, ``nn.Embedding``'s own ``normal_`` init would import torch's compiler stack, seconds of
    every job's load (docs/BENCHMARKS.md, "The user's job")."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


class RelativePositionBias(nn.Module):
    """One layer's learned bias per (bucket, head); ``forward(L)`` gives ``[1, heads, L, L]``."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.num_buckets = num_buckets
        self.embedding = _embedding(num_buckets, num_heads)

    def forward(self, length: int) -> torch.Tensor:
        pos = torch.arange(length, device=self.embedding.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], True, self.num_buckets, MAX_DISTANCE)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class T5Attention(nn.Module):
    """Multi-head self-attention without score scaling; ``bias`` [B or 1, heads, L, L] is added to the scores."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, self.num_heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)),
                                             attn_mask=bias.to(x.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, length, -1))


class T5GatedFFN(nn.Module):
    """``fc2(fc1(x) * gelu_tanh(gate.0(x)))``."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """Official overflow guard: an fp16 residual stream that reached inf is clamped just inside the fp16 range."""
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


class T5Block(nn.Module):
    def __init__(self, arch: T5Arch):
        super().__init__()
        self.norm1 = T5RMSNorm(arch.dim)
        self.attn = T5Attention(arch.dim, arch.dim_attn, arch.num_heads)
        self.norm2 = T5RMSNorm(arch.dim)
        self.ffn = T5GatedFFN(arch.dim, arch.dim_ffn)
        self.pos_embedding = RelativePositionBias(arch.num_buckets, arch.num_heads)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor) -> torch.Tensor:
        """``key_padding`` [B, 1, 1, L] is True at padding keys."""
        bias = self.pos_embedding(x.shape[1]).to(x.dtype)
        bias = bias.masked_fill(key_padding, torch.finfo(x.dtype).min)
        x = _clamp_fp16(x + self.attn(self.norm1(x), bias))
        return _clamp_fp16(x + self.ffn(self.norm2(x)))

    def offload_phases(self) -> list[tuple[list[nn.Module], nn.Module, nn.Module]]:
        """The phases of ``forward`` for ``offload=phase`` (as ``wan_dit.Block.offload_phases``)."""
        return [([self.pos_embedding, self.norm1, self.attn], self, self.attn),
                ([self.norm2, self.ffn], self.norm2, self.ffn)]


class UMT5Encoder(nn.Module):
    """``forward(ids [B, L] long, mask [B, L]) -> [B, L, dim]``, zero at padding positions (``mask == 0``)."""

    def __init__(self, arch: T5Arch | str = "umt5-xxl"):
        super().__init__()
        if isinstance(arch, str):
            if arch not in T5_ARCHS:
                raise LightqError(f"unknown T5 architecture '{arch}'; choose one of: {', '.join(T5_ARCHS)}")
            arch = T5_ARCHS[arch]
        self.arch = arch
        self.token_embedding = _embedding(arch.vocab, arch.dim)
        self.blocks = nn.ModuleList(T5Block(arch) for _ in range(arch.num_layers))
        self.norm = T5RMSNorm(arch.dim)
        if not self.token_embedding.weight.is_meta:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official initialisation (Wan's ``init_weights``): unit-variance embeddings, fan-in scaled linears."""
        a = self.arch
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        for block in self.blocks:
            attn, ffn = block.attn, block.ffn
            nn.init.normal_(attn.q.weight, std=(a.dim * a.dim_attn) ** -0.5)
            nn.init.normal_(attn.k.weight, std=a.dim ** -0.5)
            nn.init.normal_(attn.v.weight, std=a.dim ** -0.5)
            nn.init.normal_(attn.o.weight, std=(a.num_heads * a.dim_attn) ** -0.5)
            nn.init.normal_(ffn.gate[0].weight, std=a.dim ** -0.5)
            nn.init.normal_(ffn.fc1.weight, std=a.dim ** -0.5)
            nn.init.normal_(ffn.fc2.weight, std=a.dim_ffn ** -0.5)
            nn.init.normal_(block.pos_embedding.embedding.weight, std=(2 * a.num_buckets * a.num_heads) ** -0.5)
            nn.init.ones_(block.norm1.weight)
            nn.init.ones_(block.norm2.weight)
        nn.init.ones_(self.norm.weight)

    def _check_inputs(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise LightqError(f"T5 encoder: ids must be an integer tensor [batch, length], got {ids.dtype} "
                              f"{tuple(ids.shape)}; tokenize the prompts first")
        if mask.shape != ids.shape:
            raise LightqError(f"T5 encoder: mask shape {tuple(mask.shape)} differs from ids shape "
                              f"{tuple(ids.shape)}; pass the mask the tokenizer returned with the ids")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.arch.vocab):
            raise LightqError(f"T5 encoder: token ids must lie in [0, {self.arch.vocab}), got "
                              f"[{int(ids.min())}, {int(ids.max())}]; the tokenizer does not match this model")

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self._check_inputs(ids, mask)
        keep = mask.to(ids.device) != 0
        key_padding = ~keep[:, None, None, :]
        x = self.token_embedding(ids)
        for block in self.blocks:
            x = block(x, key_padding)
        x = self.norm(x)
        return x * keep[..., None].to(x.dtype)
