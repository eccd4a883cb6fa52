"""``QLinear`` (a quantized drop-in for ``nn.Linear``) and the module swap driven by explicit patterns.

A ``QLinear`` holds the backend's packed tensors as buffers (so ``.to(device)`` and offloading move them), the
high-precision bias, and calls ``backend.apply``; an unmerged LoRA adds its side path ``lora``
(``lightq.quant.lora.LowRankPath``) to that output (with a quantized down-projection the activation is quantized
once, by the backend's ``quantize_activation``, for both GEMMs). Which linears of a model are quantized is decided by two lists
of ``fnmatch`` patterns over module names: ``include`` (the component's quantizable linears, e.g.
``blocks.*.self_attn.q``) and ``skip`` (the user's exceptions). A name must match ``include`` and no ``skip``.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Callable, Iterable

import torch
from torch import nn

from ..backends.base import Backend
from .lora import LowRankPath
from .schemes import QuantizedWeight, quantize_weight


class QLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` quantized by ``scheme`` and computed by ``backend``."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, backend: Backend):
        super().__init__()
        self.scheme = qw.scheme
        self.in_features, self.out_features = qw.in_features, qw.out_features
        self.backend = backend
        packed = backend.pack(qw)
        self._packed_names = tuple(packed)
        for name, t in packed.items():
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.lora: LowRankPath | None = None

    def packed(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._packed_names}

    def weight_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.packed().values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora is not None and self.lora.codes_scheme is not None:
            x2 = self.backend.flat_input(x, self.in_features, self.scheme, contiguous=False)
            xq, sx = self.backend.quantize_activation(x2, self.scheme)
            y = self.backend.gemm_only(xq, sx, self.packed(), self.bias, x.dtype)
            return self.lora.add_codes(y, xq, sx, self.backend).view(*x.shape[:-1], -1)
        y = self.backend.apply(x, self.packed(), self.scheme, self.bias)
        return y if self.lora is None else self.lora(x, y)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, "
                f"backend={self.backend.name}, bias={self.bias is not None}")


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def selected(name: str, include: Iterable[str], skip: Iterable[str]) -> bool:
    """True when module ``name`` is to be quantized: it matches ``include`` and no ``skip`` pattern."""
    return matches(name, include) and not matches(name, skip)


def check_skip(names: Iterable[str], include: Iterable[str], skip: Iterable[str], where: str) -> None:
    """Raise QuantizationError for a ``skip`` pattern that matches none of the quantizable ``names`` (those
    ``include`` selects): it would change nothing, so it is a typo or names a layer that is never quantized."""
    from ..errors import QuantizationError

    include = tuple(include)
    candidates = [n for n in names if matches(n, include)]
    for pattern in skip:
        if not any(fnmatchcase(n, pattern) for n in candidates):
            example = f" (they are named like '{candidates[0]}')" if candidates else ""
            raise QuantizationError(f"{where}: skip pattern '{pattern}' matches none of the {len(candidates)} "
                                    f"quantizable linears{example}: fix the pattern or remove it")


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def swap_linears(model: nn.Module, include: Iterable[str], skip: Iterable[str], backend: Backend, scheme: str,
                 weight_for: Callable[[str, nn.Linear], QuantizedWeight] | None = None) -> list[str]:
    """Replace every selected ``nn.Linear`` of ``model`` by a ``QLinear``; returns the names swapped.

    ``weight_for(name, linear)`` supplies the quantized weight (e.g. from a pre-quantized checkpoint); by
    default the linear's own float weight is quantized (load-time quantization). Each float weight is freed as
    soon as its layer is swapped, so peak memory grows by one layer, not one model.
    """
    include, skip = tuple(include), tuple(skip)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and selected(n, include, skip)]
    for name in names:
        lin = model.get_submodule(name)
        qw = weight_for(name, lin) if weight_for else quantize_weight(lin.weight, scheme, name=f"{name}.weight")
        qw = qw.to(lin.weight.device)
        set_submodule(model, name, QLinear(qw, lin.bias, backend))
        del lin
    return names
