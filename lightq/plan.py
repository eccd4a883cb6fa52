"""Planning: which backend runs each component's mode on this hardware, or why it cannot. Torch-free.

``plan_run(cfg, hw)`` gives one ``ComponentPlan`` per component that exists in the pipeline (CLIP only for I2V),
and one for the DiT's self-attention (``attn``, the ``attn_quant`` group; its backends come from the
``lightq.attention`` registry).
A plan that cannot run carries a one-line reason naming the mode, what blocks it first (a missing GPU before a
missing library: the install command only where installing would help), and the portable mode that would run
instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .attention import registry as attention_registry
from .backends import registry
from .hardware import Hardware
from .models.family import family

# Where the repository's plugins come from, for the hint when one is missing.
LINEAR_PLUGIN_INSTALL = {name: known.install for name, known in registry.KNOWN_PLUGINS.items()}
ATTENTION_PLUGIN_INSTALL = {
    "sageattention": "pip install -e 'plugins/lightq-sageattention[kernel]' (pulls sageattention)",
}


@dataclass
class ComponentPlan:
    component: str
    mode: str
    scheme: str
    backend: str | None  # None: bf16 (scheme none) or cannot run
    ok: bool
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def portable_mode(scheme: str) -> str:
    return f"{scheme}-torch"


def plan_component(component: str, quant, hw: Hardware) -> ComponentPlan:
    """Resolve one component's mode. ``quant`` is a QuantConfig (or anything with name/scheme/backend)."""
    if quant.scheme == "none":
        return ComponentPlan(component, quant.name, "none", None, True, "bf16, not quantized")
    spec, why = registry.choose(quant.scheme, quant.backend, hw, component=component)
    if spec is not None:
        return ComponentPlan(component, quant.name, quant.scheme, spec.name, True, why)
    return _refused(component, quant, why, LINEAR_PLUGIN_INSTALL, registry.specs(), hw)


def plan_attention(attn, hw: Hardware) -> ComponentPlan:
    """Resolve the self-attention mode (an AttnQuantConfig); ``none`` is torch's bf16 SDPA."""
    if attn.scheme == "none":
        return ComponentPlan("attn", attn.name, "none", None, True, "bf16 scaled_dot_product_attention, not quantized")
    spec, why = attention_registry.choose(attn.scheme, attn.backend, hw)
    if spec is not None:
        return ComponentPlan("attn", attn.name, attn.scheme, spec.name, True, why)
    return _refused("attn", attn, why, ATTENTION_PLUGIN_INSTALL, attention_registry.specs(), hw)


def _refused(component: str, quant, why: str, installs: dict[str, str], installed, hw: Hardware) -> ComponentPlan:
    """The plan of a mode that cannot run: why, how to install a missing plugin (where installing can help: every
    plugin needs a CUDA GPU), and the portable mode."""
    hint = ""
    if quant.backend in installs and quant.backend not in installed:
        if hw.is_cuda:
            hint = f"; install: {installs[quant.backend]}"
        else:
            why = f"backend '{quant.backend}' runs on CUDA GPUs only; {hw.no_gpu_reason()}"
    alt = portable_mode(quant.scheme)
    reason = f"{component}_quant={quant.name} cannot run here: {why}{hint}; portable alternative: {component}_quant={alt}"
    return ComponentPlan(component, quant.name, quant.scheme, None, False, reason)


def plan_run(cfg, hw: Hardware) -> dict[str, ComponentPlan]:
    """One plan per quantizable component of the model's task, in pipeline order (the model family says which),
    and the self-attention's."""
    from .config import quant_of

    components = family(cfg.model.family).components_of(cfg.model.task)
    plans = {c: plan_component(c, quant_of(cfg, c), hw) for c in components}
    plans["attn"] = plan_attention(cfg.attn_quant, hw)
    return plans


def first_problem(plans: dict[str, ComponentPlan]) -> str | None:
    bad = [p.reason for p in plans.values() if not p.ok]
    return " | ".join(bad) if bad else None
