"""The backend contract.

A backend has two halves:

1. A **spec** (``BackendSpec``): plain data, importable without torch or the kernel library. It says which
   schemes the backend implements and from which CUDA compute capability (``None`` = also on CPU), which
   Python packages it needs and how to install them, and where its implementation lives. Plugins publish their
   spec under the entry-point group ``lightq.backends``.
2. An **implementation** (a ``Backend`` subclass, loaded from ``spec.impl`` only when a run needs it):

   ``pack(qw: QuantizedWeight) -> dict[str, Tensor]``
       re-lay the shared quantized weight out for the kernels (transpose, interleave, repack). The numerics never
       change: every backend of a scheme packs the same checkpoint.
   ``apply(x, packed, scheme, bias) -> Tensor``
       ``y = x @ W^T + bias`` for ``x`` of any leading shape ``[..., K]`` in bf16 / fp16, with the activation
       quantized as the scheme says; the output has ``x``'s dtype.

Checks return ``(ok, reason)`` and never raise, so ``backend: auto`` can explain every rejection.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from ..errors import BackendUnavailable
from ..hardware import Hardware

Check = tuple[bool, str]


@dataclass(frozen=True)
class BackendSpec:
    """What a backend implements, and where; torch-free.

    ``schemes`` maps a scheme name to the minimum compute capability it needs (``None``: runs on CPU too).
    ``requires`` are import names checked with ``find_spec`` (nothing is imported); ``install`` is the command
    that provides them. ``impl`` is ``"module:Class"`` of the ``Backend`` implementation. ``max_capability``
    excludes newer GPUs the kernels were never built for (e.g. Q8-Kernels is Ada-only).
    ``k_multiple`` / ``n_multiple``: the kernels need ``in_features`` / ``out_features`` to be multiples of these
    (``fits``, checked per layer at load by ``lightq.quant.method``). ``precompiles``: the kernels are lightq's own
    Triton kernels, whose recorded specializations a job compiles in the background while it loads
    (``lightq.kernels.precompile``).
    """

    name: str
    schemes: dict[str, float | None]
    impl: str
    requires: tuple[str, ...] = ()
    install: str = ""
    description: str = ""
    max_capability: float | None = None
    k_multiple: int = 1
    n_multiple: int = 1
    precompiles: bool = False

    def is_available(self, hw: Hardware) -> Check:
        """Can this backend run at all here (packages present, device kind right)? Never raises."""
        try:
            return self._is_available(hw)
        except Exception as exc:  # a malformed spec or hardware record must not take planning down
            return False, f"cannot check availability ({type(exc).__name__}: {exc})"

    def can_implement(self, scheme: str, hw: Hardware, shape: tuple[int, int] | None = None) -> Check:
        """Does it implement ``scheme`` on ``hw`` (and, if given, for a weight of ``shape`` = (N, K))? Never raises."""
        try:
            return self._can_implement(scheme, hw, shape)
        except Exception as exc:
            return False, f"cannot check '{scheme}' ({type(exc).__name__}: {exc})"

    # Reasons are verb phrases ("needs ...", "is ..."), read after the backend's name: "backend 'sgl' needs ...".
    # The device is checked before the packages: where no GPU can run the backend, installing its library cannot
    # help, so the install command is named only when the device would do.

    def _device_problem(self, hw: Hardware, cap: float | None, scheme: str = "") -> str | None:
        """Why ``hw`` cannot run kernels needing compute capability ``cap`` (None: the CPU will do), or None."""
        if cap is None:
            return None
        need = f"compute capability >= {cap}" + (f" for {scheme}" if scheme else "")
        if not hw.is_cuda:
            return f"needs a CUDA GPU ({need}); {hw.no_gpu_reason()}"
        if hw.capability is None:
            return "cannot tell the GPU's compute capability"
        if hw.capability < cap:
            return f"needs {need}; this GPU is {hw.describe()}"
        if self.max_capability is not None and hw.capability > self.max_capability:
            return f"is built for compute capability <= {self.max_capability}; this GPU is {hw.describe()}"
        return None

    def _missing_package(self) -> str | None:
        for mod in self.requires:
            try:
                found = importlib.util.find_spec(mod) is not None
            except Exception as exc:  # a broken parent package raises from find_spec
                return f"cannot look up the package '{mod}' ({type(exc).__name__}: {exc}); install: {self.install}"
            if not found:
                return f"needs the package '{mod}', which is not installed; install: {self.install}"
        return None

    def _is_available(self, hw: Hardware) -> Check:
        if not self.schemes:
            return False, f"is unusable: {self.description or 'it declares no scheme'}"
        caps = [cap for cap in self.schemes.values() if cap is not None]
        least = min(caps) if len(caps) == len(self.schemes) else None  # None: some scheme runs on the CPU
        problem = self._device_problem(hw, least) or self._missing_package()
        return (False, problem) if problem else (True, "available")

    def _can_implement(self, scheme: str, hw: Hardware, shape: tuple[int, int] | None) -> Check:
        if not isinstance(scheme, str) or scheme not in self.schemes:
            return False, f"does not implement scheme '{scheme}' (it has: {', '.join(self.schemes) or 'none'})"
        problem = self._device_problem(hw, self.schemes[scheme], scheme)
        if problem:
            return False, problem
        ok, why = self.is_available(hw)
        if not ok:
            return ok, why
        return self.fits(shape) if shape is not None else (True, "ok")

    def fits(self, shape: tuple[int, int]) -> Check:
        """Do the kernels take a weight of ``shape`` = (N, K) = (out_features, in_features)? Never raises."""
        if not isinstance(shape, (tuple, list)) or len(shape) != 2 \
                or not all(isinstance(d, int) and d > 0 for d in shape):
            return False, f"weight shape must be (out_features, in_features) positive ints, got {shape!r}"
        n, k = shape
        if k % self.k_multiple or n % self.n_multiple:
            return False, (f"needs in_features % {self.k_multiple} == 0 and out_features % {self.n_multiple} == 0,"
                           f" got [{n}, {k}]")
        return True, "ok"

    def load(self) -> "object":
        """Import and instantiate the implementation; any import failure becomes one BackendUnavailable."""
        from ..models.attention import keep_sdpa_switches  # torch is imported only when a backend loads

        module, _, cls = self.impl.partition(":")
        # a kernel library's import must not change torch's attention-backend switches for the whole process
        with keep_sdpa_switches():
            try:
                impl = getattr(importlib.import_module(module), cls)
                return impl(self)
            except BackendUnavailable:
                raise
            except Exception as exc:  # ImportError, OSError from a .so, RuntimeError from an ABI mismatch, ...
                raise BackendUnavailable(
                    f"backend '{self.name}' failed to load ({type(exc).__name__}: {exc}); install: {self.install}"
                ) from exc

