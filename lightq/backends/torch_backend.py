"""The built-in ``torch`` backend: every scheme, on CPU and CUDA, with nothing but torch.

It is the reference every plugin is checked against, and the portable fallback (modes ``*-torch``).

- fp8:       ``torch._scaled_mm`` with row-wise scales (x: per token, W: per channel), bias added after.
             Where ``_scaled_mm`` is missing (CUDA below sm89) the product is emulated exactly in fp32.
- int8:      ``torch._int_mm`` (exact int32 accumulation) then both scales; M is padded to 17+ rows on CUDA
             where ``_int_mm`` needs M > 16.
- fp8-b128:  emulated: activation groups and weight blocks dequantized to fp32, then one fp32 matmul.
- int4-g128: weight-only: the weight is dequantized to the activation dtype, then a plain matmul.
"""

from __future__ import annotations

import torch

from ..quant import schemes as S
from .base import Backend
from .spec import BackendSpec

SPEC = BackendSpec(
    name="torch",
    schemes={"fp8": None, "int8": None, "fp8-b128": None, "int4-g128": None},
    impl="lightq.backends.torch_backend:TorchBackend",
    description="portable reference: torch._scaled_mm / torch._int_mm where available, exact emulation otherwise",
)


def _scaled_mm_ok(device: torch.device, n: int, k: int) -> bool:
    """``_scaled_mm`` needs K and N multiples of 16, and fp8 tensor cores (sm89+) on CUDA."""
    if n % 16 or k % 16:
        return False
    return device.type == "cpu" or torch.cuda.get_device_capability(device) >= (8, 9)


def _int_mm_ok(device: torch.device, n: int, k: int) -> bool:
    """``_int_mm`` needs K and N multiples of 8 on CUDA."""
    return device.type == "cpu" or not (n % 8 or k % 8)


class TorchBackend(Backend):
    def version(self) -> str:
        return torch.__version__

    def pack(self, qw: S.QuantizedWeight) -> dict[str, torch.Tensor]:
        # GEMM kernels want W^T as a column-major [K, N] view: keep data [N, K] contiguous, transpose lazily.
        return {"data": qw.data, "scale": qw.scale}

    def apply(self, x, packed, scheme, bias):
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        w, sw = packed["data"], packed["scale"]
        if scheme == "fp8":
            y = self._fp8(x2, w, sw)
        elif scheme == "int8":
            y = self._int8(x2, w, sw)
        elif scheme == "fp8-b128":
            xq, sx = S.quantize_activation(x2, "fp8-b128")
            xd = S.dequantize_activation(xq, sx, "fp8-b128")
            wd = S.dequantize_weight(S.QuantizedWeight(scheme, w, sw, w.shape[0], k))
            y = xd @ wd.t()
        elif scheme == "int4-g128":
            wd = S.dequantize_weight(S.QuantizedWeight(scheme, w, sw, w.shape[0], k), x.dtype)
            y = x2 @ wd.t()
        else:
            raise ValueError(f"torch backend: unknown scheme {scheme}")
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.to(x.dtype).reshape(*lead, -1)

    @staticmethod
    def _fp8(x2, w, sw):
        xq, sx = S.quantize_activation(x2, "fp8")
        if _scaled_mm_ok(x2.device, w.shape[0], w.shape[1]):
            return torch._scaled_mm(xq, w.t(), scale_a=sx, scale_b=sw.t(), out_dtype=torch.bfloat16)
        return (xq.float() @ w.float().t()) * sx * sw.t()

    @staticmethod
    def _int8(x2, w, sw):
        xq, sx = S.quantize_activation(x2, "int8")
        if not _int_mm_ok(x2.device, w.shape[0], w.shape[1]):  # exact: |sum| < 2**53 in float64
            return (xq.double() @ w.double().t()).float() * sx * sw.t()
        m = xq.shape[0]
        if xq.is_cuda and m <= 16:
            xq = torch.nn.functional.pad(xq, (0, 0, 0, 17 - m))
        acc = torch._int_mm(xq, w.t())[:m]
        return acc.float() * sx * sw.t()
