"""The backend registry: every ``BackendSpec`` published under the entry-point group ``lightq.backends``.

Torch-free. ``specs()`` reads the entry points once; ``choose(scheme, backend, hw)`` picks the backend a mode
runs on, returning the choice and, for ``auto``, why every candidate before it was rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points

from ..hardware import Hardware
from .spec import BackendSpec

GROUP = "lightq.backends"

# Order ``backend: auto`` tries, per scheme, fastest first, as measured on the H100 by ``python -m lightq.bench``
# (docs/BACKENDS.md, docs/BENCHMARKS.md). Backends not named come last. The DiT has its own order: its linears
# run at M = 32760+ tokens inside blocks where a backend with ``fused_blocks`` runs the fused Wan block (the
# activation quantization fused into the norm/modulation/GELU that produce it; docs/BENCHMARKS.md "Issue 8
# targets"), and where Marlin's int4 kernel is slower than dequantize + bf16 matmul (docs/BACKENDS.md). T5 and
# CLIP (M = 512 / 257) take the fastest standalone linear. fp8-pertensor is not measured yet: it takes fp8's order
# (the same fp8 GEMMs, with a per-tensor quantizer), lightq's triton backend having no static-scale kernel.
PREFERENCE: dict[str, tuple[str, ...]] = {
    "fp8": ("sgl", "vllm", "triton", "q8f", "torch"),
    "int8": ("vllm", "sgl", "triton", "q8f", "torchao", "torch"),
    "fp8-b128": ("deepgemm", "torch"),
    "int4-g128": ("marlin", "torch"),
    "fp8-pertensor": ("sgl", "vllm", "torch"),
}
COMPONENT_PREFERENCE: dict[str, dict[str, tuple[str, ...]]] = {
    "dit": {
        "fp8": ("triton", "vllm", "sgl", "q8f", "torch"),
        "int8": ("triton", "vllm", "sgl", "q8f", "torchao", "torch"),
        "int4-g128": ("torch", "marlin"),
        "fp8-pertensor": ("vllm", "sgl", "torch"),
    },
}
COMPONENT_PREFERENCE["dit_low"] = COMPONENT_PREFERENCE["dit"]  # the low-noise expert of Wan2.2 A14B: the same DiT


@dataclass(frozen=True)
class KnownPlugin:
    """A plugin of this repository (``plugins/lightq-<name>``): how to install it and the schemes it declares."""

    install: str
    schemes: tuple[str, ...]


# Only so that a plugin's modes exist where it is not installed, and say how to install it. A plugin not listed
# here needs no entry: its ``<scheme>-<name>`` modes exist once it is installed (``lightq.config.backend_modes``).
KNOWN_PLUGINS: dict[str, KnownPlugin] = {
    "vllm": KnownPlugin("pip install -e 'plugins/lightq-vllm[kernel]' (pulls vllm)", ("fp8", "int8", "fp8-pertensor")),
    "sgl": KnownPlugin("pip install -e 'plugins/lightq-sgl[kernel]' (pulls sglang-kernel)",
                       ("fp8", "int8", "fp8-pertensor")),
    "torchao": KnownPlugin("pip install -e 'plugins/lightq-torchao[kernel]' (pulls torchao)", ("int8",)),
    "deepgemm": KnownPlugin("pip install -e 'plugins/lightq-deepgemm[kernel]' (pulls vllm, which bundles DeepGEMM)",
                            ("fp8-b128",)),
    "marlin": KnownPlugin("pip install -e 'plugins/lightq-marlin[kernel]' (pulls vllm)", ("int4-g128",)),
    "q8f": KnownPlugin("pip install -e plugins/lightq-q8f (needs Q8-Kernels built for an Ada GPU)", ("fp8", "int8")),
}


def scheme_backends() -> list[tuple[str, str]]:
    """(scheme, backend) of every scheme of every installed backend, then of every known plugin not installed."""
    have = specs()
    pairs = [(scheme, name) for name, spec in have.items() for scheme in spec.schemes]
    pairs += [(scheme, name) for name, known in KNOWN_PLUGINS.items()
              if not have.get(name, BackendSpec(name, {}, "")).schemes for scheme in known.schemes]
    return pairs


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
