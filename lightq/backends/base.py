"""Runtime half of the backend contract (see ``lightq.backends.spec`` for the whole contract).

Required: ``pack`` and ``apply``. Optional, each declared by a class attribute that ``__init_subclass__`` checks
against what the class implements, so callers ask the attribute and never probe with ``hasattr``:

- ``split_gemm = True``: the two halves of ``apply`` are available on their own (benchmarks time them apart),
  ``quantize_activation(x2, scheme) -> (xq, sx)`` on ``[M, K]`` and
  ``gemm_only(xq, sx, packed, bias, out_dtype) -> y [M, N]``;
- ``fused_blocks = True`` (needs ``split_gemm``): ``lightq.fused`` blocks may run on the backend: ``pack`` keeps the
  checkpoint layout (``{"data": codes [N, K], "scale": fp32 [N, 1]}``, so q/k/v concatenate along N) and
  ``gemm_only`` takes the per-token codes and fp32 scales ``[M, 1]`` of ``lightq.kernels.act_quant``;
- ``with_options(options)``: a copy configured by a mode's ``options``; the base takes none and refuses any.
"""

from __future__ import annotations

import torch

from ..errors import LightqError, QuantizationError
from ..quant.schemes import QuantizedWeight
from .spec import BackendSpec


class Backend:
    """Kernels for one or more schemes. Subclasses implement ``pack`` and ``apply``; they hold no weights."""

    split_gemm: bool = False
    fused_blocks: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        halves = cls.quantize_activation is not Backend.quantize_activation and cls.gemm_only is not Backend.gemm_only
        if cls.split_gemm and not halves:
            raise TypeError(f"{cls.__name__} declares split_gemm but does not implement quantize_activation and "
                            "gemm_only")
        if cls.fused_blocks and not cls.split_gemm:
            raise TypeError(f"{cls.__name__} declares fused_blocks, which needs split_gemm")

    def __init__(self, spec: BackendSpec):
        self.spec = spec
        self.name = spec.name

    def __deepcopy__(self, memo) -> "Backend":
        """A backend holds no weights, only kernels (some, as torch custom ops, cannot be copied at all): a copied
        model shares its layers' backends."""
        return self

    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """Re-lay ``qw`` out for this backend's kernels. Must not change what the weight represents."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor, packed: dict[str, torch.Tensor], scheme: str,
              bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W^T + bias`` for ``x`` ``[..., K]``; output in ``x.dtype`` with the same leading shape."""
        raise NotImplementedError

    def quantize_activation(self, x2: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
        """With ``split_gemm``: the backend's own activation quantizer on ``[M, K]``: (codes, scales)."""
        raise NotImplementedError(f"backend '{self.name}' has no separate activation quantizer (split_gemm)")

    def gemm_only(self, xq: torch.Tensor, sx: torch.Tensor, packed: dict[str, torch.Tensor],
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        """With ``split_gemm``: the GEMM (+ bias) on an already quantized activation, ``[M, N]`` in ``out_dtype``."""
        raise NotImplementedError(f"backend '{self.name}' has no separate GEMM (split_gemm)")

    def with_options(self, options: dict) -> "Backend":
        """This backend configured by a mode's ``options`` (a copy; this one is unchanged). The base takes none."""
        if options:
            raise LightqError(f"backend '{self.name}' takes no options, got {sorted(options)}; remove them from the "
                              "mode's options")
        return self

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
