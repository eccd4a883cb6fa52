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

Quantized down-projection (``quantize_down``; the loader asks for it where the linear's backend splits activation
quantization from its GEMM, ``split_gemm``, and the scheme is per-token x per-channel, fp8 / int8): ``A`` is
quantized once, per rank row, in the linear's scheme (codes ``A_q``, scales ``s_A`` ``[R, 1]``; rows padded with
zeros to a multiple of 16, the fp8 GEMM's rule), and the down-projection is the backend's own GEMM on the linear's
quantized activation, ``h = gemm(x_q, s_x; A_q, s_A * scale)`` in the run's dtype (``add_codes``): the strengths
ride in that GEMM's per-channel scale, so no pass over ``x`` or ``h`` is added and ``set_strengths`` rewrites ``R``
floats; then ``y += h @ B^T`` in place (``addmm``, ``B`` in the run's dtype as before). What changes against the
bf16 down-projection is ``A``'s quantization error ``e(A) = dq(A_q) - A`` (fp8: ``|e| <= max(|A| 2**-4, s_A
2**-10)``, int8: ``|e| <= s_A / 2``) seen through ``x`` and ``B``: ``h`` moves by ``scale * dq(x_q) e(A)^T``
(docs/LORA.md, "unmerged", states the bound the tests check).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CODE_SCHEMES = ("fp8", "int8")  # per-token x per-channel: the down GEMM can share the linear's quantized activation
CODE_ROWS = 16  # the codes' rows are padded to a multiple of this (torch._scaled_mm's rule for N)


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
    """The merged tensor ``W'`` in fp32 on ``w``'s device (module docstring). The factors travel in their stored
    dtype and widen to float64 on ``w``'s device; the first term's float64 tensor takes ``w`` in place (``t_1 + W``
    is ``W + t_1``, bit for bit), so no float64 copy of ``W`` is made."""
    acc = None
    dev = w.device
    for term in terms:
        s = float(strengths[term.lora])
        if s == 0.0:
            continue
        d = term.delta
        if isinstance(d, LowRank):
            t = (d.up.to(dev).double() @ d.down.to(dev).double()).mul_(s * d.alpha_over_rank)
        else:
            t = d.to(dev).double().mul_(s)
        acc = t.add_(w.detach()) if acc is None else acc.add_(t)
    return w.detach().float() if acc is None else acc.float()


class LowRankPath(nn.Module):
    """The unmerged side path of one linear (module docstring). ``down`` ``[R, K]``, ``up`` ``[N, R]`` in the run's
    dtype; ``scale`` fp32 ``[R]``; per rank row, the index of its LoRA (``rank_lora``) and its ``alpha / r``
    (``rank_alpha``), from which ``set_strengths`` recomputes ``scale``. After ``quantize_down`` the path holds
    ``down_codes`` ``[Rp, K]``, ``down_code_scale`` and ``down_gemm_scale`` ``[Rp, 1]`` instead of ``down``.

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
        self.rank, self.in_features = down.shape
        self.rank_lora = list(rank_lora)
        self.segments = segments
        self.active = bool((self.scale != 0).any())
        self.codes_scheme: str | None = None  # set by quantize_down

    @classmethod
    def of(cls, parts: list[Term], strengths: list[float], dtype: torch.dtype, device) -> "LowRankPath":
        """The path of one linear from its LoRAs' low-rank terms, concatenated along the rank."""
        downs, ups, lora, alpha = [], [], [], []
        for t in parts:
            downs.append(t.delta.down.to(device).to(dtype))
            ups.append(t.delta.up.to(device).to(dtype))
            lora += [t.lora] * t.delta.rank
            alpha += [t.delta.alpha_over_rank] * t.delta.rank
        rank_alpha = torch.tensor(alpha, dtype=torch.float32, device=device)
        return cls(torch.cat(downs), torch.cat(ups, dim=1), lora, rank_alpha, _scale(lora, rank_alpha, strengths))

    @classmethod
    def shared_input(cls, paths: list["LowRankPath | None"], out_features: int) -> "LowRankPath | None":
        """One path for linears of ``out_features`` outputs each that share their input, their outputs concatenated
        in order (class docstring); ``None`` entries are linears without a LoRA. Quantized parts (all of one
        scheme) give a quantized joint path: per-row codes, so the joint codes are the parts' rows concatenated."""
        present = [(i, p) for i, p in enumerate(paths) if p is not None]
        if not present:
            return None
        segments, row = [], 0
        for i, p in present:
            segments.append((i * out_features, row, p.rank))
            row += p.rank
        ps = [p for _, p in present]
        schemes = {p.codes_scheme for p in ps}
        if len(schemes) != 1:
            raise ValueError(f"shared_input: the paths mix down-projections {sorted(map(str, schemes))}")
        scheme = schemes.pop()
        if scheme is None:
            down = torch.cat([p.down for p in ps])
        else:  # a placeholder of the right shape; the codes are taken below
            down = torch.empty(row, ps[0].in_features, dtype=ps[0].up.dtype, device=ps[0].up.device)
        joint = cls(down, torch.cat([p.up for p in ps], dim=1), [j for p in ps for j in p.rank_lora],
                    torch.cat([p.rank_alpha for p in ps]), torch.cat([p.scale for p in ps]), segments)
        if scheme is not None:
            joint._hold_codes(scheme, torch.cat([p.down_codes[:p.rank] for p in ps]),
                              torch.cat([p.down_code_scale[:p.rank] for p in ps]))
        return joint

    def quantize_down(self, scheme: str) -> None:
        """Replace ``down`` by its ``scheme`` codes, per rank row (module docstring), for ``add_codes``."""
        from .schemes import quantize_weight

        if scheme not in CODE_SCHEMES:
            raise ValueError(f"quantize_down takes one of {CODE_SCHEMES}, got {scheme!r}")
        qw = quantize_weight(self.down, scheme, name="lora_down")
        self._hold_codes(scheme, qw.data, qw.scale)

    def _hold_codes(self, scheme: str, codes: torch.Tensor, code_scale: torch.Tensor) -> None:
        """Keep ``codes`` ``[R, K]`` / ``code_scale`` ``[R, 1]`` padded with zero rows (scale 1, as ``quantize_weight``
        gives a zero row) to a multiple of ``CODE_ROWS``; drop ``down``."""
        pad = -(-self.rank // CODE_ROWS) * CODE_ROWS - self.rank
        codes = torch.cat([codes, codes.new_zeros(pad, codes.shape[1])])
        code_scale = torch.cat([code_scale.float(), code_scale.new_ones(pad, 1, dtype=torch.float32)])
        del self.down
        self.register_buffer("down_codes", codes.contiguous(), persistent=False)
        self.register_buffer("down_code_scale", code_scale.contiguous(), persistent=False)
        self.register_buffer("down_gemm_scale", torch.zeros_like(code_scale), persistent=False)
        self.codes_scheme = scheme
        self._scale_codes()

    def _scale_codes(self) -> None:
        """``down_gemm_scale = down_code_scale * scale`` on the rank rows, 0 on the padding rows (in place)."""
        self.down_gemm_scale[:self.rank].copy_(self.down_code_scale[:self.rank] * self.scale[:, None])

    def set_strengths(self, strengths: list[float]) -> None:
        """Recompute ``scale`` in place (the tensor offload placed stays bound) from one strength per LoRA."""
        self.scale.copy_(_scale(self.rank_lora, self.rank_alpha, strengths))
        self.active = any(float(strengths[i]) != 0.0 for i in self.rank_lora)
        if self.codes_scheme is not None:
            self._scale_codes()

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

    def add_codes(self, y: torch.Tensor, xq: torch.Tensor, sx: torch.Tensor, backend) -> torch.Tensor:
        """``y + gemm(x_q, s_x; A_q, s_A * scale) @ B^T`` (the quantized down-projection on ``backend``'s
        ``gemm_only``) for the linear's quantized activation ``x_q`` ``[M, K]`` and output ``y`` ``[M, N]``."""
        if not self.active:
            return y
        h = backend.gemm_only(xq, sx, {"data": self.down_codes, "scale": self.down_gemm_scale}, None, y.dtype)
        return self._add_up(y, h[:, :self.rank], inplace=True)

    def add(self, y: torch.Tensor, xq: torch.Tensor, sx: torch.Tensor, backend) -> torch.Tensor:
        """The side path on a quantized activation: ``add_codes`` when the down-projection is quantized, else
        ``add_quantized``."""
        if self.codes_scheme is not None:
            return self.add_codes(y, xq, sx, backend)
        return self.add_quantized(y, xq, sx)

    def _add_up(self, y2: torch.Tensor, h: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``y2 + h @ up^T`` (``[M, N]``): one ``addmm`` (into ``y2`` when ``inplace``), or per segment in place
        into its output columns."""
        up = self.up.to(y2.dtype)
        if self.segments is None:
            return y2.addmm_(h, up.t()) if inplace else torch.addmm(y2, h, up.t())
        for out, row, rank in self.segments:
            y2[:, out:out + up.shape[0]].addmm_(h[:, row:row + rank], up[:, row:row + rank].t())
        return y2

    def extra_repr(self) -> str:
        down = f", down={self.codes_scheme}" if self.codes_scheme else ""
        return f"rank={self.rank}, in={self.in_features}, out={self.up.shape[0]}{down}"


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
