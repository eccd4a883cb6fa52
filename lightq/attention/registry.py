"""The attention-backend registry: every ``BackendSpec`` published under the entry-point group ``lightq.attention``.

Torch-free. ``choose(scheme, backend, hw)`` works as the linear registry's (``lightq.backends.registry``), with
its own ``auto`` order: lightq's Triton kernels first (they implement every scheme and write the DiT's output
layout directly), then the sageattention library, then the reference. The order is not yet measured on the GPU
machine: ``python -m lightq.bench attention`` times every mode side by side.
"""

from __future__ import annotations

from functools import lru_cache

from ..backends.registry import choose_from, entry_point_specs
from ..backends.spec import BackendSpec
from ..hardware import Hardware
from .specs import TORCH, TRITON

GROUP = "lightq.attention"
PREFERENCE: dict[str, tuple[str, ...]] = {
    "int8-sage": ("triton", "sageattention", "torch"),
    "int8fp8-sage2": ("triton", "torch"),
    "fp8-fa3": ("triton", "torch"),
}


@lru_cache(maxsize=1)
def specs() -> dict[str, BackendSpec]:
    """name -> spec for every installed attention backend. The core's own two are there even when the installed
    package metadata predates the ``lightq.attention`` group (an editable install made before it existed)."""
    return {TORCH.name: TORCH, TRITON.name: TRITON, **entry_point_specs(GROUP)}


def choose(scheme: str, backend: str, hw: Hardware) -> tuple[BackendSpec | None, str]:
    """(spec, reason): the attention backend for ``scheme`` (``backend`` a name or ``auto``), or (None, why not)."""
    return choose_from(specs(), PREFERENCE.get(scheme, ()), scheme, backend, hw)
