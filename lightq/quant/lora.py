"""LoRA numerics: the merged weight, and the unmerged low-rank side path added to a linear's output.

A LoRA ``i`` with strength ``s_i`` changes a linear's weight ``W`` ``[N, K]`` by ``s_i * c_i * B_i @ A_i``, with
``A_i`` (``lora_down``) ``[r_i, K]``, ``B_i`` (``lora_up``) ``[N, r_i]`` and ``c_i = alpha_i / r_i`` (1 without
alpha); a full delta ``D_i`` (``.diff`` / ``.diff_b``) changes a tensor by ``s_i * D_i``.

merged (``merge``): ``W' = fp32(W + sum_i s_i c_i (B_i @ A_i) [+ s_i D_i])``, every operation in float64, each
product ``B_i @ A_i`` one matmul, then scaled and added as separate elementwise operations, then rounded to fp32
once. With bf16 / fp16 factors every product ``B[n, j] A[j, k]`` is exact in float64 and so, in practice, is their
sum (it would need the terms of one dot product to span more than 2**31 in magnitude to round), so ``W'`` is the
same bit for bit on every device and in every reduction order: a weight merged at load on the GPU is the weight
``lightq.convert`` merges on the CPU. ``W'`` then goes through the scheme's ``quantize_weight`` (quantized layers)
or is cast to the run's dtype (high-precision tensors). Strength 0 leaves ``W`` exactly as it was.

unmerged (``LowRankPath``): the base GEMM runs on the unchanged (quantized) weight and the path adds, on the same
activation ``x`` ``[M, K]``, ``((x @ A^T) * scale) @ B^T`` (``scale[j] = s_i c_i`` for the rank rows ``j`` of LoRA
``i``; several LoRAs of one layer are concatenated along the rank), as two small GEMMs in the run's dtype (fp32
accumulation), the second one accumulating into the base output (``addmm``). ``set_strengths`` changes ``scale``
in place: no reload. A path whose strengths are all 0 adds nothing (the output is the base GEMM's, bit for bit).
On a fused DiT block the bf16 activation is never written, so the path reads the block's quantized activation
(``add_quantized``: ``((x_q @ A^T) * s_x * scale) @ B^T``, ``x_q`` cast exactly to the run's dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LowRank:
    """One LoRA's factors for one linear: ``down`` ``[r, K]``, ``up`` ``[N, r]``, ``alpha / r``."""

    down: torch.Tensor
    up: torch.Tensor
    alpha_over_rank: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class Term:
    """One LoRA's change of one tensor: ``lora`` its index in the run's list, ``delta`` a LowRank or a full
    tensor of the target's shape."""

    lora: int
    delta: LowRank | torch.Tensor


def merge(w: torch.Tensor, terms: list[Term], strengths: list[float]) -> torch.Tensor:
    """The merged tensor ``W'`` in fp32 on ``w``'s device (module docstring)."""
    acc = w.detach().double()
    for term in terms:
        s = float(strengths[term.lora])
        if s == 0.0:
            continue
        d = term.delta
        if isinstance(d, LowRank):
            product = d.up.to(acc.device, torch.float64) @ d.down.to(acc.device, torch.float64)
            acc.add_(product.mul_(s * d.alpha_over_rank))
        else:
            acc.add_(d.to(acc.device, torch.float64).mul_(s))
    return acc.float()


class LowRankPath(nn.Module):
    """The unmerged side path of one linear (module docstring). ``down`` ``[R, K]``, ``up`` ``[N, R]`` in the run's
    dtype; ``scale`` fp32 ``[R]``; per rank row, the index of its LoRA (``rank_lora``) and its ``alpha / r``
    (``rank_alpha``), from which ``set_strengths`` recomputes ``scale``.

    ``segments`` (``shared_input``): one path for linears that share their input and whose outputs are
    concatenated (the fused q/k/v GEMM): ``(output offset, first rank row, rank)`` per linear, ``up`` ``[n, R]``
    their ups side by side; each adds ``h[:, rows] @ up[:, rows]^T`` into its own output columns in place."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, rank_lora: list[int], rank_alpha: torch.Tensor,
                 scale: torch.Tensor, segments: list[tuple[int, int, int]] | None = None):
        super().__init__()
        # not persistent: a model's state dict stays its checkpoint's keys; offload moves them with the linear
        self.register_buffer("down", down.contiguous(), persistent=False)
        self.register_buffer("up", up.contiguous(), persistent=False)
        self.register_buffer("rank_alpha", rank_alpha.float().contiguous(), persistent=False)
        self.register_buffer("scale", scale.float().contiguous(), persistent=False)
        self.rank_lora = list(rank_lora)
        self.segments = segments
        self.active = bool((self.scale != 0).any())

    @classmethod
    def of(cls, parts: list[Term], strengths: list[float], dtype: torch.dtype, device) -> "LowRankPath":
        """The path of one linear from its LoRAs' low-rank terms, concatenated along the rank."""
        downs, ups, lora, alpha = [], [], [], []
        for t in parts:
            downs.append(t.delta.down.to(device, dtype))
            ups.append(t.delta.up.to(device, dtype))
            lora += [t.lora] * t.delta.rank
            alpha += [t.delta.alpha_over_rank] * t.delta.rank
        rank_alpha = torch.tensor(alpha, dtype=torch.float32, device=device)
        return cls(torch.cat(downs), torch.cat(ups, dim=1), lora, rank_alpha, _scale(lora, rank_alpha, strengths))

    @classmethod
    def shared_input(cls, paths: list["LowRankPath | None"], out_features: int) -> "LowRankPath | None":
        """One path for linears of ``out_features`` outputs each that share their input, their outputs concatenated
        in order (class docstring); ``None`` entries are linears without a LoRA."""
        present = [(i, p) for i, p in enumerate(paths) if p is not None]
        if not present:
            return None
        segments, row = [], 0
        for i, p in present:
            segments.append((i * out_features, row, p.down.shape[0]))
            row += p.down.shape[0]
        ps = [p for _, p in present]
        return cls(torch.cat([p.down for p in ps]), torch.cat([p.up for p in ps], dim=1),
                   [j for p in ps for j in p.rank_lora], torch.cat([p.rank_alpha for p in ps]),
                   torch.cat([p.scale for p in ps]), segments)

    def set_strengths(self, strengths: list[float]) -> None:
        """Recompute ``scale`` in place (the tensor offload placed stays bound) from one strength per LoRA."""
        self.scale.copy_(_scale(self.rank_lora, self.rank_alpha, strengths))
        self.active = any(float(strengths[i]) != 0.0 for i in self.rank_lora)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y + ((x @ A^T) * scale) @ B^T`` for the linear's input ``x`` ``[..., K]`` and output ``y`` ``[..., N]``."""
        if not self.active:
            return y
        dt = y.dtype
        h = torch.mm(x.reshape(-1, x.shape[-1]).to(dt), self.down.to(dt).t())
        return self._add_up(y.reshape(-1, y.shape[-1]), (h.float() * self.scale).to(dt)).view(y.shape)

    def add_quantized(self, y: torch.Tensor, xq: torch.Tensor, sx: torch.Tensor) -> torch.Tensor:
        """``y + ((x_q @ A^T) * s_x * scale) @ B^T`` for a per-token quantized activation (codes ``[M, K]``, fp32
        scales ``[M, 1]``) and the output ``y`` ``[M, N]`` of its GEMM."""
        if not self.active:
            return y
        dt = y.dtype
        h = torch.mm(xq.to(dt), self.down.to(dt).t())
        return self._add_up(y, (h.float() * sx * self.scale).to(dt))

    def _add_up(self, y2: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``y2 + h @ up^T`` (``[M, N]``): one ``addmm``, or per segment in place into its output columns."""
        up = self.up.to(y2.dtype)
        if self.segments is None:
            return torch.addmm(y2, h, up.t())
        for out, row, rank in self.segments:
            y2[:, out:out + up.shape[0]].addmm_(h[:, row:row + rank], up[:, row:row + rank].t())
        return y2

    def extra_repr(self) -> str:
        return f"rank={self.down.shape[0]}, in={self.down.shape[1]}, out={self.up.shape[0]}"


class LoraLinear(nn.Linear):
    """An ``nn.Linear`` kept in high precision with an unmerged LoRA side path ``lora`` (same parameters and
    state-dict keys; made by ``attach`` changing the class in place)."""

    lora: LowRankPath

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora(x, F.linear(x, self.weight, self.bias))


def attach(linear: nn.Module, path: LowRankPath) -> None:
    """Give ``linear`` (a QLinear or an ``nn.Linear``) the side path ``path``."""
    if type(linear) is nn.Linear:
        linear.__class__ = LoraLinear
    linear.lora = path


def _scale(rank_lora: list[int], rank_alpha: torch.Tensor, strengths: list[float]) -> torch.Tensor:
    """``scale[j] = s_i * alpha_i / r_i`` for rank row ``j`` of LoRA ``i`` (fp32, on ``rank_alpha``'s device)."""
    s = torch.tensor([float(strengths[i]) for i in rank_lora], dtype=torch.float32)
    return s.to(rank_alpha.device) * rank_alpha
