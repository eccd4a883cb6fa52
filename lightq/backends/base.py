"""Runtime half of the backend contract (see ``lightq.backends.spec`` for the whole contract)."""

from __future__ import annotations

import torch

from ..errors import QuantizationError
from ..quant.schemes import QuantizedWeight
from .spec import BackendSpec


class Backend:
    """Kernels for one or more schemes. Subclasses implement ``pack`` and ``apply``; they hold no weights."""

    def __init__(self, spec: BackendSpec):
        self.spec = spec
        self.name = spec.name

    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """Re-lay ``qw`` out for this backend's kernels. Must not change what the weight represents."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor, packed: dict[str, torch.Tensor], scheme: str,
              bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W^T + bias`` for ``x`` ``[..., K]``; output in ``x.dtype`` with the same leading shape."""
        raise NotImplementedError

    # Optional, for backends that quantize activations (benchmarks time the two halves separately):
    #   quantize_activation(x2, scheme) -> (xq, sx)        the backend's own activation quantizer on [M, K]
    #   gemm_only(xq, sx, packed, bias, out_dtype) -> y    the GEMM (+ bias) on an already-quantized activation

    ACT_DTYPES = (torch.bfloat16, torch.float16)

    def check_scheme(self, scheme: str) -> None:
        if scheme not in self.spec.schemes:
            raise QuantizationError(f"backend '{self.name}' does not implement scheme '{scheme}' "
                                    f"(it has: {', '.join(self.spec.schemes)}); choose another mode")

    def flat_input(self, x: torch.Tensor, in_features: int, scheme: str, contiguous: bool = True) -> torch.Tensor:
        """``x`` ``[..., K]`` as ``[M, K]`` after checking scheme, dtype and K: contiguous, or (``contiguous=False``,
        for kernels that take a row stride) a view with unit stride along K where ``reshape`` gives one."""
        self.check_scheme(scheme)
        if x.dtype not in self.ACT_DTYPES:
            raise QuantizationError(f"backend '{self.name}' takes bf16 or fp16 activations, got {x.dtype}; "
                                    "run the model in bf16 / fp16")
        if x.shape[-1] != in_features:
            raise QuantizationError(f"backend '{self.name}': input has {x.shape[-1]} features but the weight "
                                    f"expects {in_features}; check the layer's input shape")
        x2 = x.reshape(-1, in_features)
        return x2.contiguous() if contiguous or x2.stride(-1) != 1 else x2

    def version(self) -> str:
        """Version of the kernel library behind this backend ("" if none)."""
        return ""
