"""The built-in ``torch`` backend: every scheme, on CPU and CUDA, with nothing but torch.

It is the reference every plugin is checked against, and the portable fallback (modes ``*-torch``).
``x`` may have any leading shape (``[K]``, ``[M, K]``, ``[B, L, K]``); the output keeps it, in ``x.dtype``.

- fp8:       ``torch._scaled_mm``, x scaled per token, W per channel. For bf16 activations the row-wise scaled
             product with the bias fused, rounded once to bf16; for any other dtype the unscaled product in fp32
             (tensor-wise unit scales), then both scales in fp32, so an fp32 or fp16 model's output is rounded only
             to its own dtype. Where ``_scaled_mm`` cannot run (K or N not a multiple of 16, CUDA below sm89) the
             product is emulated: fp8 x fp8 products are exact in fp32 (and in TF32), accumulated in fp32, then
             scaled.
- int8:      ``torch._int_mm`` (exact int32 accumulation) then both scales; M is padded to 17 rows on CUDA, where
             ``_int_mm`` needs M > 16. Where it cannot run (CUDA, K or N not a multiple of 8) the integer sum is
             computed exactly in float64 (|sum| <= 127**2 K < 2**53), so the result is bitwise the ``_int_mm`` one.
- fp8-b128:  emulated the way block-scaled kernels compute: for each 128-wide group g along K, the exact fp8 partial
             product ``xq_g @ wq_g^T`` is scaled by ``sx[:, g] * sw[n // 128, g]`` and accumulated in fp32.
- int4-g128: weight-only: the weight is dequantized to the activation dtype, then one ``linear`` (bias fused).
- fp8-pertensor: x quantized with one scale t (the packed ``input_scale``: static; else dynamic, max |x| / 448),
             then ``torch._scaled_mm`` with tensor-wise scales t and s on CUDA: for bf16 / fp16 activations the bias
             fused and the output rounded once to x's dtype; for fp32 the scaled product in fp32, then the bias. On
             CPU, whose tensor-wise ``_scaled_mm`` is far slower than its row-wise one, the same scales go row-wise
             (t on every row, s on every column: the same product), the bias fused, in x's dtype. Where
             ``_scaled_mm`` cannot run (K or N not a multiple of 16, CUDA below sm89) the exact fp8 product
             accumulated in fp32, times (t * s).

Bias is added in fp32 and rounded once with the output (fused into ``_scaled_mm`` for bf16 fp8, into the ``linear``
in ``x.dtype`` for int4).
"""

from __future__ import annotations

import functools

import torch

from ..errors import QuantizationError
from ..quant import schemes
from .base import Backend
from .torch_spec import SPEC  # noqa: F401  (re-exported: the implementation's spec)



@functools.lru_cache(maxsize=None)
def _cpu_rowwise_scaled_mm() -> bool:
    """Whether this torch build's CPU ``_scaled_mm`` takes row-wise scales (2.13 does; 2.11 only per-tensor)."""
    a = torch.ones(16, 16).to(schemes.FP8_DTYPE)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
        return True
    except RuntimeError:
        return False


def scaled_mm_ok(device: torch.device, n: int, k: int) -> bool:
    """``_scaled_mm`` with row-wise scales: K and N multiples of 16, fp8 tensor cores (sm89+) on CUDA, and on
    CPU a torch build that supports row-wise scaling."""
    if n % 16 or k % 16:
        return False
    if device.type == "cpu":
        return _cpu_rowwise_scaled_mm()
    return torch.cuda.get_device_capability(device) >= (8, 9)


def tensorwise_scaled_mm_ok(device: torch.device, n: int, k: int) -> bool:
    """``_scaled_mm`` with tensor-wise scales: K and N multiples of 16, and sm89+ on CUDA (every CPU build)."""
    if n % 16 or k % 16:
        return False
    return device.type == "cpu" or torch.cuda.get_device_capability(device) >= (8, 9)


def _int_mm_ok(device: torch.device, n: int, k: int) -> bool:
    """``_int_mm`` needs K and N multiples of 8 on CUDA."""
    return device.type == "cpu" or not (n % 8 or k % 8)


def _in_features(packed: dict[str, torch.Tensor], scheme: str) -> int:
    data = packed["data"]
    return data.shape[1] * 2 if scheme == "int4-g128" else data.shape[1]


class TorchBackend(Backend):
    def version(self) -> str:
        return torch.__version__

    def pack(self, qw: schemes.QuantizedWeight) -> dict[str, torch.Tensor]:
        # GEMM kernels want W^T as a column-major [K, N] view: keep data [N, K] contiguous, transpose lazily.
        packed = {"data": qw.data, "scale": qw.scale}
        return packed if qw.input_scale is None else {**packed, "input_scale": qw.input_scale}

    def apply(self, x, packed, scheme, bias):
        if scheme not in schemes.SCHEMES:
            raise QuantizationError(f"torch backend: unknown scheme '{scheme}': choose one of {', '.join(schemes.SCHEMES)}")
        lead, k = x.shape[:-1], x.shape[-1]
        if k != _in_features(packed, scheme):
            raise QuantizationError(f"torch backend: input has {k} features but the {scheme} weight expects "
                                    f"{_in_features(packed, scheme)}; check the layer's input shape")
        x2 = x.reshape(-1, k)
        w, sw = packed["data"], packed["scale"]
        if scheme == "int4-g128":
            wd = schemes.dequantize_weight(schemes.QuantizedWeight(scheme, w, sw, w.shape[0], k), x.dtype)
            y = torch.nn.functional.linear(x2, wd, None if bias is None else bias.to(x.dtype))
            return y.reshape(*lead, -1)
        if scheme == "fp8":
            y, bias = self._fp8(x2, w, sw, bias)
        elif scheme == schemes.PER_TENSOR:
            y, bias = self._fp8_per_tensor(x2, w, sw, packed.get("input_scale"), bias)
        elif scheme == "int8":
            y = self._int8(x2, w, sw)
        else:
            y = self._fp8_b128(x2, w, sw)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.to(x.dtype).reshape(*lead, -1)

    @staticmethod
    def _fp8(x2, w, sw, bias):
        """(the product, the bias still to add: None once ``_scaled_mm`` fused it)."""
        xq, sx = schemes.quantize_activation(x2, "fp8")
        if not scaled_mm_ok(x2.device, w.shape[0], w.shape[1]):
            return (xq.float() @ w.float().t()) * sx * sw.t(), bias
        if x2.dtype == torch.bfloat16:
            fused = None if bias is None else bias.to(torch.bfloat16)
            return torch._scaled_mm(xq, w.t(), scale_a=sx, scale_b=sw.t(), bias=fused, out_dtype=torch.bfloat16), None
        one = torch.ones((), device=x2.device)
        acc = torch._scaled_mm(xq, w.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        return acc * sx * sw.t(), bias

    @staticmethod
    def _fp8_per_tensor(x2, w, sw, input_scale, bias):
        """(the product, the bias still to add: None once ``_scaled_mm`` fused it)."""
        xq, t = schemes.quantize_activation(x2, schemes.PER_TENSOR, input_scale)
        n, k = w.shape
        if not tensorwise_scaled_mm_ok(x2.device, n, k):
            return (xq.float() @ w.float().t()) * (t * sw), bias
        if x2.device.type == "cpu" and _cpu_rowwise_scaled_mm():
            fused = None if bias is None else bias.to(x2.dtype)
            rows, cols = torch.ones(xq.shape[0], 1) * t, torch.ones(1, n) * sw  # t, s exactly, unit-stride
            return torch._scaled_mm(xq, w.t(), scale_a=rows, scale_b=cols, bias=fused, out_dtype=x2.dtype), None
        if x2.dtype in (torch.bfloat16, torch.float16):
            fused = None if bias is None else bias.to(x2.dtype)
            return torch._scaled_mm(xq, w.t(), scale_a=t, scale_b=sw, bias=fused, out_dtype=x2.dtype), None
        return torch._scaled_mm(xq, w.t(), scale_a=t, scale_b=sw, out_dtype=torch.float32), bias

    @staticmethod
    def _int8(x2, w, sw):
        xq, sx = schemes.quantize_activation(x2, "int8")
        if not _int_mm_ok(x2.device, w.shape[0], w.shape[1]):
            return (xq.double() @ w.double().t()).to(torch.int32).float() * sx * sw.t()
        m = xq.shape[0]
        if xq.is_cuda and m <= 16:
            xq = torch.nn.functional.pad(xq, (0, 0, 0, 17 - m))
        acc = torch._int_mm(xq, w.t())[:m]
        return acc.float() * sx * sw.t()

    @staticmethod
    def _fp8_b128(x2, w, sw):
        xq, sx = schemes.quantize_activation(x2, "fp8-b128")  # [M, K] fp8, [M, G]
        n, k = w.shape
        sw_rows = sw.repeat_interleave(schemes.BLOCK, 0)[:n]  # [N, G]: row n's scale for each K block
        y = torch.zeros(x2.shape[0], n, dtype=torch.float32, device=x2.device)
        for g in range(sx.shape[1]):
            cols = slice(g * schemes.GROUP, min((g + 1) * schemes.GROUP, k))
            partial = xq[:, cols].float() @ w[:, cols].float().t()  # fp8 products, exact
            y += partial * sx[:, g:g + 1] * sw_rows[:, g][None, :]
        return y
