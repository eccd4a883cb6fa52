"""Runtime half of the backend contract (see ``lightq.backends.spec`` for the whole contract)."""

from __future__ import annotations

import torch

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

    def version(self) -> str:
        """Version of the kernel library behind this backend ("" if none)."""
        return ""
