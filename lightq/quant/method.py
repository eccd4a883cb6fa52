"""The quantization method of one component in one run: how its linears are quantized and computed.

``QuantMethod.build(plan, quant)`` is made once per component, from the component's plan (the backend that the
registry chose on this hardware, ``lightq.plan``) and its mode config (``QuantConfig``). It holds

- ``scheme``: the numerics (``lightq.quant.schemes``); ``"none"`` keeps the component in high precision;
- ``backend``: the chosen implementation, loaded once, with the mode's kernel options applied;
- ``fuse``: whether ``lightq.fused`` blocks replace the model's blocks;
- ``skip`` and ``ckpt``: the mode's high-precision exceptions and its weights file, if any;
- the per-layer choice ``linear(name, qw, bias)``: a ``QLinear`` on the backend when the backend's shape rule
  (``BackendSpec.fits``: ``k_multiple`` / ``n_multiple``) takes the layer's weight; otherwise on the portable
  ``torch`` backend, with the reason kept in ``fallbacks`` (result.json: ``components.<c>.fallback_layers``); a
  layer that the portable backend cannot take either is refused with a QuantizationError naming the fix.

A mode's ``options`` have one reader, here: ``fuse`` (bool, default: the backend's ``fused_blocks``
capability) is the method's own; every other key goes to the backend's ``with_options``, which refuses keys it
does not know. Asking to fuse on a backend without the capability is an error, not ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..backends.base import Backend
from ..errors import LightqError, QuantizationError
from .linear import QLinear
from .schemes import QuantizedWeight

if TYPE_CHECKING:
    from ..plan import ComponentPlan

PORTABLE = "torch"
METHOD_OPTIONS = ("fuse",)


class QuantMethod:
    """One component's quantization in this run (module docstring)."""

    def __init__(self, scheme: str, backend: Backend | None, *, fuse: bool | None = None, skip=(),
                 ckpt: str | None = None, component: str = ""):
        if scheme != "none" and backend is None:
            raise QuantizationError(f"scheme '{scheme}' needs a backend")
        self.scheme, self.backend, self.component = scheme, backend, component
        self.skip, self.ckpt = tuple(skip), ckpt
        capable = backend is not None and backend.fused_blocks
        if fuse and not capable:
            name = backend.name if backend is not None else "none"
            raise LightqError(f"backend '{name}' cannot run fused blocks; remove options.fuse from the mode")
        self.fuse = capable if fuse is None else fuse
        self.fallbacks: dict[str, str] = {}
        self._portable: Backend | None = None

    @classmethod
    def build(cls, plan: "ComponentPlan", quant) -> "QuantMethod":
        """From a component's plan (which must be runnable) and its QuantConfig (options, skip, ckpt)."""
        skip, ckpt = tuple(quant.skip or ()), quant.ckpt
        if plan.scheme == "none":
            return cls("none", None, skip=skip, ckpt=ckpt, component=plan.component)
        if not plan.ok:
            raise LightqError(plan.reason)
        from ..backends.registry import specs

        options = dict(quant.options or {})
        fuse = options.pop("fuse", None)
        try:
            if fuse is not None and not isinstance(fuse, bool):
                raise LightqError(f"option fuse takes true / false, got {fuse!r}")
            backend = specs()[plan.backend].load().with_options(options)
            return cls(plan.scheme, backend, fuse=fuse, skip=skip, ckpt=ckpt, component=plan.component)
        except LightqError as exc:
            raise type(exc)(f"{quant.name}: {exc}") from exc

    @classmethod
    def portable(cls, scheme: str | None, component: str = "", skip=()) -> "QuantMethod":
        """``scheme`` on the portable ``torch`` backend (tests, tools): every layer fits, nothing fuses.
        ``None`` or ``"none"``: not quantized."""
        if scheme in (None, "none"):
            return cls("none", None, skip=skip, component=component)
        from ..backends.registry import specs

        return cls(scheme, specs()[PORTABLE].load(), skip=skip, component=component)

    @property
    def quantizes(self) -> bool:
        return self.scheme != "none"

    def linear(self, name: str, qw: QuantizedWeight, bias: torch.Tensor | None) -> QLinear:
        """The QLinear of layer ``name`` on the backend whose shape rule takes it (module docstring)."""
        shape = (qw.out_features, qw.in_features)
        ok, why = self.backend.spec.fits(shape)
        if ok:
            return QLinear(qw, bias, self.backend)
        portable = self._portable_backend()
        where = f"{self.component}: " if self.component else ""
        if portable is None or not portable.spec.fits(shape)[0]:
            raise QuantizationError(f"{where}layer {name} {list(shape)}: backend '{self.backend.name}' {why}, and no "
                                    f"portable backend takes it; keep it in high precision with skip=['{name}']")
        self.fallbacks[name] = f"backend '{self.backend.name}' {why}; runs on '{PORTABLE}'"
        return QLinear(qw, bias, portable)

    def _portable_backend(self) -> Backend | None:
        if self.backend.name == PORTABLE:
            return None
        if self._portable is None:
            from ..backends.registry import specs

            spec = specs().get(PORTABLE)
            if spec is None or self.scheme not in spec.schemes:
                return None
            self._portable = spec.load()
        return self._portable

    def record(self) -> dict:
        """What result.json keeps of the per-layer choice: the layers that left the chosen backend, and why."""
        return {"fallback_layers": dict(self.fallbacks)} if self.fallbacks else {}

    def __repr__(self) -> str:
        backend = self.backend.name if self.backend is not None else "-"
        return f"QuantMethod({self.component or '?'}: {self.scheme} on {backend}, fuse={self.fuse})"
