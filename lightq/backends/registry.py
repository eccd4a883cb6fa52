"""The backend registry: every ``BackendSpec`` published under the entry-point group ``lightq.backends``.

Torch-free. ``specs()`` reads the entry points once; ``choose(scheme, backend, hw)`` picks the backend a mode
runs on, returning the choice and, for ``auto``, why every candidate before it was rejected.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import entry_points

from ..hardware import Hardware
from .spec import BackendSpec

GROUP = "lightq.backends"

# Order ``backend: auto`` tries, per scheme, fastest first, as measured on the H100 by ``python -m lightq.bench``
# (docs/BACKENDS.md, docs/BENCHMARKS.md). Backends not named come last. The DiT has its own order: its linears
# run at M = 32760+ tokens inside blocks where lightq's triton backend fuses the activation quantization into the
# norm/modulation/GELU that produce it (14B block 1.36x bf16 vs sgl 1.09x, vLLM 0.85x), and where Marlin's
# int4 kernel is slower than dequantize + bf16 matmul (0.40-0.50x vs 0.86-0.98x bf16). T5 and CLIP (M = 512 /
# 257) take the fastest standalone linear.
PREFERENCE: dict[str, tuple[str, ...]] = {
    "fp8": ("sgl", "vllm", "triton", "q8f", "torch"),
    "int8": ("vllm", "sgl", "triton", "q8f", "torchao", "torch"),
    "fp8-b128": ("deepgemm", "torch"),
    "int4-g128": ("marlin", "torch"),
}
COMPONENT_PREFERENCE: dict[str, dict[str, tuple[str, ...]]] = {
    "dit": {
        "fp8": ("triton", "vllm", "sgl", "q8f", "torch"),
        "int8": ("triton", "vllm", "sgl", "q8f", "torchao", "torch"),
        "int4-g128": ("torch", "marlin"),
    },
}


def preference(scheme: str, component: str | None = None) -> tuple[str, ...]:
    return COMPONENT_PREFERENCE.get(component or "", {}).get(scheme, PREFERENCE.get(scheme, ()))


def entry_point_specs(group: str) -> dict[str, BackendSpec]:
    """name -> spec for every spec published under the entry-point ``group``. A broken entry point is reported as a
    spec that cannot load."""
    found: dict[str, BackendSpec] = {}
    for ep in entry_points(group=group):
        try:
            spec = ep.load()
        except Exception as exc:  # a broken plugin must not take the registry down
            spec = BackendSpec(name=ep.name, schemes={}, impl="", install=f"reinstall the package providing '{ep.name}'",
                               description=f"entry point failed to load: {type(exc).__name__}: {exc}")
        found[spec.name] = spec
    return found


@lru_cache(maxsize=1)
def specs() -> dict[str, BackendSpec]:
    """name -> spec for every installed linear backend (entry-point group ``lightq.backends``)."""
    return entry_point_specs(GROUP)


def ordered(found: dict[str, BackendSpec], scheme: str, order: tuple[str, ...]) -> list[BackendSpec]:
    """The specs of ``found`` that declare ``scheme``, those named in ``order`` first (in that order), then by name."""
    have = [s for s in found.values() if scheme in s.schemes]
    return sorted(have, key=lambda s: (order.index(s.name) if s.name in order else len(order), s.name))


def candidates(scheme: str, component: str | None = None) -> list[BackendSpec]:
    """Installed backends that declare ``scheme``, in ``auto`` preference order (for ``component``)."""
    return ordered(specs(), scheme, preference(scheme, component))


def choose(scheme: str, backend: str, hw: Hardware, shape: tuple[int, int] | None = None,
           component: str | None = None) -> tuple[BackendSpec | None, str]:
    """(spec, reason): the backend for ``scheme`` (``backend`` a name or ``auto``), or (None, why not)."""
    return choose_from(specs(), preference(scheme, component), scheme, backend, hw, shape)


def choose_from(found: dict[str, BackendSpec], order: tuple[str, ...], scheme: str, backend: str, hw: Hardware,
                shape: tuple[int, int] | None = None) -> tuple[BackendSpec | None, str]:
    """``choose`` over the specs ``found`` with ``auto`` trying them in ``order`` (unnamed ones last, by name)."""
    if backend != "auto":
        spec = found.get(backend)
        if spec is None:
            return None, f"backend '{backend}' is not installed (installed: {', '.join(sorted(found)) or 'none'})"
        ok, why = spec.can_implement(scheme, hw, shape)
        return (spec, f"requested: {backend}") if ok else (None, f"backend '{backend}' {why}")
    rejected = []
    for spec in ordered(found, scheme, order):
        ok, why = spec.can_implement(scheme, hw, shape)
        if ok:
            note = f"auto: {spec.name}" + (f" ({'; '.join(rejected)})" if rejected else "")
            return spec, note
        rejected.append(f"{spec.name}: {why}")
    return None, f"no installed backend implements '{scheme}' here ({'; '.join(rejected) or 'none declares it'})"
