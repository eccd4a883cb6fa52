"""Scheme numerics: what is stored for a quantized weight and how activations are quantized.

Shared by every backend; a backend only re-lays these tensors out and multiplies. All arithmetic is in fp32.

Schemes (``W`` is a float weight ``[N, K]`` = ``[out, in]``, ``x`` an activation row of length K):

``fp8``        W_q = fp8_e4m3(W / s_n),      s_n = max_k |W[n, k]| / 448          scale ``[N, 1]``
               x_q = fp8_e4m3(x / t),         t   = max_k |x[k]| / 448            per token, dynamic
``int8``       W_q = clamp(round(W / s_n), -127, 127),  s_n = max_k |W[n, k]| / 127   scale ``[N, 1]``
               x_q likewise with t = max_k |x[k]| / 127                          per token, dynamic
``fp8-b128``   s_ij = max |W| over the 128x128 block (i, j) / 448                 scale ``[ceil(N/128), ceil(K/128)]``
               x: one scale per 1x128 group along K                              act scale ``[M, ceil(K/128)]``
``int4-g128``  s_gn = max |W[n, 128g:128g+128]| / 7, W_q = clamp(round(W / s), -7, 7)   scale ``[K/128, N]``
               weight only: activations stay in bf16 / fp16.                     data: uint8 ``[N, K/2]``
``fp8-pertensor``  W_q = fp8_e4m3(W / s),  s = max_{n,k} |W[n, k]| / 448 (one value)        scale ``[]``
               x_q = fp8_e4m3(clamp(x / t, -448, 448)), one t for the whole input:        act scale ``[]``
               static: t = the layer's calibrated ``input_scale`` (read from a checkpoint, ``QuantizedWeight.
               input_scale``); dynamic (no ``input_scale``): t = max |x| / 448 over the whole input of the call.
               x / t is one fp32 division (LightX2V's, ComfyUI's and vLLM's own kernels round differently:
               docs/FORMATS.md). y = (x_q @ W_q^T) * (t * s) + b.

Rounding is round-to-nearest-even everywhere (``torch.round`` for ints, the fp8 cast for fp8), never truncation.
A zero row, block or group gets scale 1 (its quantized values are all 0, so it dequantizes to exactly 0).
NaN or Inf weights are refused. Shapes the scheme cannot hold (int4 with K not a multiple of 128) are
refused with the fix named; fp8-b128 takes partial edge blocks.

int4 packing: value v in [-7, 7] is stored as the nibble v + 8 (GPTQ's uint4b8); byte j of a row holds element
2j in its low nibble and element 2j+1 in its high nibble.

Error bounds that follow from the formats (``deq`` = dequantized value, ``s`` its scale):
  fp8 e4m3: |w - deq| <= max(|w| * 2**-4, s * 2**-10)   (3 mantissa bits; subnormal spacing 2**-9)
  int8, int4: |w - deq| <= s / 2
each plus the fp32 rounding of ``w / s`` and ``q * s`` (at most 2**-23 |w|). The scale is exactly ``amax / qmax``
(fp32 division) unless that is 0, where it is 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import QuantizationError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
INT4_MAX = 7.0
BLOCK = 128
GROUP = 128

PER_TENSOR = "fp8-pertensor"
SCHEMES = ("fp8", "int8", "fp8-b128", "int4-g128", PER_TENSOR)
WEIGHT_ONLY = frozenset({"int4-g128"})


@dataclass
class QuantizedWeight:
    """A quantized ``[out_features, in_features]`` weight as stored in checkpoints (the LightX2V layout).

    ``data``  fp8 / int8 ``[N, K]``, or uint8 ``[N, K/2]`` packed nibbles for int4-g128
    ``scale`` fp32: ``[N, 1]`` (fp8, int8), ``[ceil(N/128), ceil(K/128)]`` (fp8-b128), ``[K/128, N]`` (int4-g128),
              ``[]`` (fp8-pertensor)
    ``input_scale`` fp8-pertensor only: the calibrated static activation scale t (fp32 ``[]``), or None (dynamic)
    """

    scheme: str
    data: torch.Tensor
    scale: torch.Tensor
    out_features: int
    in_features: int
    input_scale: torch.Tensor | None = None

    def nbytes(self) -> int:
        extra = () if self.input_scale is None else (self.input_scale,)
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, *extra))

    def to(self, device) -> "QuantizedWeight":
        t = None if self.input_scale is None else self.input_scale.to(device)
        return QuantizedWeight(self.scheme, self.data.to(device), self.scale.to(device), self.out_features,
                               self.in_features, t)


def expected_layout(scheme: str, out_features: int, in_features: int) -> tuple[tuple, torch.dtype, tuple]:
    """(data shape, data dtype, scale shape) that a weight of this scheme and size must have in a checkpoint."""
    n, k = out_features, in_features
    if scheme == "fp8":
        return (n, k), FP8_DTYPE, (n, 1)
    if scheme == "int8":
        return (n, k), torch.int8, (n, 1)
    if scheme == "fp8-b128":
        return (n, k), FP8_DTYPE, (-(-n // BLOCK), -(-k // BLOCK))
    if scheme == "int4-g128":
        return (n, k // 2), torch.uint8, (k // GROUP, n)
    if scheme == PER_TENSOR:
        return (n, k), FP8_DTYPE, ()
    raise QuantizationError(f"unknown scheme '{scheme}': choose one of {', '.join(SCHEMES)}")


def check_quantizable(scheme: str, shape: tuple[int, ...], name: str = "weight") -> None:
    """Raise a QuantizationError when a ``[N, K]`` weight cannot be held by ``scheme``."""
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown scheme '{scheme}': choose one of {', '.join(SCHEMES)}")
    if len(shape) != 2:
        raise QuantizationError(f"{name}: only 2-D [out, in] weights can be quantized, got shape {tuple(shape)}")
    if scheme == "int4-g128" and shape[1] % GROUP:
        raise QuantizationError(
            f"{name}: int4-g128 needs in_features divisible by {GROUP}, got {shape[1]}; "
            "add this layer to the mode's skip patterns or use an int8 / fp8 mode"
        )


def all_finite(t: torch.Tensor) -> bool:
    """True when every value of ``t`` is finite. A sum is NaN or infinite as soon as one term is, so a finite sum
    proves it in one reduction (an order of magnitude faster than ``isfinite`` on a CPU, and no bool tensor of
    ``t``'s size on any device); only a non-finite sum (a bad value, or finite values whose sum overflows) is
    looked at element by element."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _check_finite(w: torch.Tensor, name: str) -> None:
    if not all_finite(w):
        bad = (~torch.isfinite(w)).sum().item()
        raise QuantizationError(f"{name}: {bad} NaN/Inf values in the weight; fix or re-export the checkpoint")


def safe_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """amax / qmax, with 1 where that is 0 (an all-zero row quantizes to zeros and dequantizes exactly; an amax
    so small that amax / qmax underflows would otherwise divide by zero).

    The divisor is a tensor on amax's device on purpose: CUDA divides by a Python scalar as a multiplication by
    its reciprocal (1/448 is inexact), which would make GPU scales differ from CPU scales by an ulp and flip
    rounding ties; a tensor divisor is a true IEEE division on every device, so CPU and GPU agree bit for bit."""
    scale = amax / torch.full_like(amax, qmax)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _to_fp8(v: torch.Tensor) -> torch.Tensor:
    return v.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _to_int(v: torch.Tensor, qmax: float) -> torch.Tensor:
    return torch.round(v).clamp(-qmax, qmax).to(torch.int8)


def _blocks_2d(w: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Zero-pad ``[N, K]`` to multiples of 128 and view it as ``[N/128, 128, K/128, 128]``."""
    n, k = w.shape
    pn, pk = -(-n // BLOCK) * BLOCK, -(-k // BLOCK) * BLOCK
    if (pn, pk) != (n, k):
        w = torch.nn.functional.pad(w, (0, pk - k, 0, pn - n))
    return w.view(pn // BLOCK, BLOCK, pk // BLOCK, BLOCK), n, k


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], ``[N, K]`` -> uint8 nibbles ``[N, K/2]`` (element 2j low, 2j+1 high, offset 8)."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: uint8 ``[N, K/2]`` -> int8 ``[N, K]``."""
    lo = (p & 0x0F).to(torch.int8) - 8
    hi = (p >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).reshape(p.shape[0], p.shape[1] * 2)


def quantize_weight(w: torch.Tensor, scheme: str, name: str = "weight",
                    input_scale: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize a float ``[N, K]`` weight (any float dtype, computed in fp32) into ``scheme``; ``input_scale``
    (fp8-pertensor only) is the layer's static activation scale, kept as given."""
    check_quantizable(scheme, tuple(w.shape), name)
    if input_scale is not None and scheme != PER_TENSOR:
        raise QuantizationError(f"{name}: only {PER_TENSOR} takes a static input_scale, not {scheme}")
    w = w.detach().float().contiguous()
    _check_finite(w, name)
    n, k = w.shape
    if scheme in ("fp8", "int8"):
        qmax = FP8_MAX if scheme == "fp8" else INT8_MAX
        scale = safe_scale(w.abs().amax(dim=1, keepdim=True), qmax)
        data = _to_fp8(w / scale) if scheme == "fp8" else _to_int(w / scale, INT8_MAX)
    elif scheme == PER_TENSOR:
        scale = safe_scale(w.abs().amax(), FP8_MAX)  # []
        data = _to_fp8(w / scale)
    elif scheme == "fp8-b128":
        blocks, _, _ = _blocks_2d(w)
        scale = safe_scale(blocks.abs().amax(dim=(1, 3)), FP8_MAX)  # [N/128, K/128]
        q = _to_fp8(blocks / scale[:, None, :, None])
        data = q.reshape(blocks.shape[0] * BLOCK, blocks.shape[2] * BLOCK)[:n, :k].contiguous()
    else:  # int4-g128
        groups = w.view(n, k // GROUP, GROUP)
        scale = safe_scale(groups.abs().amax(dim=2), INT4_MAX)  # [N, K/128]
        q = _to_int(groups / scale[:, :, None], INT4_MAX).view(n, k)
        data = pack_int4(q)
        scale = scale.t().contiguous()  # stored [K/128, N]
    return QuantizedWeight(scheme, data.contiguous(), scale.float().contiguous(), n, k, input_scale)


def dequantize_weight(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float ``[N, K]`` weight a quantized weight stands for (computed in fp32, returned in ``dtype``)."""
    n, k = qw.out_features, qw.in_features
    if qw.scheme in ("fp8", "int8", PER_TENSOR):
        w = qw.data.float() * qw.scale
    elif qw.scheme == "fp8-b128":
        s = qw.scale.repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]
        w = qw.data.float() * s
    elif qw.scheme == "int4-g128":
        q = unpack_int4(qw.data).float().view(n, k // GROUP, GROUP)
        w = (q * qw.scale.t()[:, :, None]).view(n, k)
    else:
        raise QuantizationError(f"unknown scheme '{qw.scheme}'")
    return w.to(dtype)


def quantize_activation(x: torch.Tensor, scheme: str, input_scale: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric activation quantization of ``x`` ``[M, K]`` (any float dtype, computed in fp32).

    fp8 / int8: one scale per row (token), ``[M, 1]``. fp8-b128: one scale per 1x128 group, ``[M, ceil(K/128)]``.
    fp8-pertensor: one scale ``[]``, ``input_scale`` (static) when given, else max |x| / 448 (dynamic).
    Returns (quantized ``[M, K]``, fp32 scales).
    """
    x = x.float()
    if scheme == PER_TENSOR:
        t = safe_scale(x.abs().amax(), FP8_MAX) if input_scale is None else input_scale.float().reshape(())
        return _to_fp8(x / t), t
    if input_scale is not None:
        raise QuantizationError(f"scheme '{scheme}' quantizes activations dynamically; only {PER_TENSOR} takes a "
                                "static input_scale")
    if scheme in ("fp8", "int8"):
        qmax = FP8_MAX if scheme == "fp8" else INT8_MAX
        scale = safe_scale(x.abs().amax(dim=-1, keepdim=True), qmax)
        q = _to_fp8(x / scale) if scheme == "fp8" else _to_int(x / scale, INT8_MAX)
        return q, scale
    if scheme == "fp8-b128":
        m, k = x.shape
        g = -(-k // GROUP)
        xp = torch.nn.functional.pad(x, (0, g * GROUP - k)) if g * GROUP != k else x
        groups = xp.reshape(m, g, GROUP)
        scale = safe_scale(groups.abs().amax(dim=-1), FP8_MAX)  # [M, G]
        q = _to_fp8(groups / scale[:, :, None]).reshape(m, g * GROUP)[:, :k].contiguous()
        return q, scale
    raise QuantizationError(f"scheme '{scheme}' has no activation quantization (weight-only or unknown)")


def dequantize_activation(q: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    """fp32 ``[M, K]`` from a quantized activation and its scales (inverse of ``quantize_activation``)."""
    if scheme in ("fp8", "int8", PER_TENSOR):
        return q.float() * scale
    if scheme == "fp8-b128":
        k = q.shape[1]
        return q.float() * scale.repeat_interleave(GROUP, 1)[:, :k]
    raise QuantizationError(f"scheme '{scheme}' has no activation quantization")
