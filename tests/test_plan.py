"""The plan (mode -> backend, or why not) for every combination of the quant groups on fake devices."""

import importlib.util
from itertools import product

import pytest
from omegaconf import OmegaConf

from lightq import config, plan
from lightq.backends import registry
from lightq.hardware import PROFILES
from lightq.paths import conf_dir

PLUGIN_LIBS = {"vllm", "sgl_kernel", "torchao", "deep_gemm", "q8_kernels", "triton"}


def load_options(group):
    """Every option of a quant group as it composes: its YAML file, else the backend's generated mode."""
    generated = config.backend_modes()
    return {name: OmegaConf.load(conf_dir() / group / f"{name}.yaml") if name in config.yaml_modes(group)
            else OmegaConf.structured(generated[name]) for name in config.quant_modes(group)}


DIT, T5, CLIP = load_options("dit_quant"), load_options("t5_quant"), load_options("clip_quant")
# the attention modes are planned in tests/test_attention_modes.py
ATTN_NONE = OmegaConf.load(conf_dir() / "attn_quant" / "none.yaml")


def pretend_libraries(monkeypatch, present: bool):
    """Make the kernel libraries look installed or absent, whatever this machine has (find_spec only: planning
    imports nothing)."""
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        if name.split(".")[0] in PLUGIN_LIBS:
            return importlib.machinery.ModuleSpec(name, None) if present else None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


@pytest.fixture
def libraries_present(monkeypatch):
    pretend_libraries(monkeypatch, True)


@pytest.fixture
def libraries_absent(monkeypatch):
    pretend_libraries(monkeypatch, False)


def test_all_backends_are_registered():
    assert {"torch", "vllm", "sgl", "torchao", "deepgemm", "marlin", "q8f"} <= set(registry.specs())


def _expected(mode, hw, libs: bool):
    """What the plan must say, from the backend's own declaration; returns (ok, backend)."""
    if mode.scheme == "none":
        return True, None
    if mode.backend == "auto":
        return True, None  # checked separately: some backend is picked, torch at worst
    spec = registry.specs()[mode.backend]
    cap = spec.schemes[mode.scheme]
    if mode.backend == "torch":
        return True, "torch"
    if not libs or not hw.is_cuda or cap is None and not hw.is_cuda:
        return False, None
    if hw.capability < cap or (spec.max_capability is not None and hw.capability > spec.max_capability):
        return False, None
    return True, mode.backend


@pytest.mark.parametrize("profile", list(PROFILES))
@pytest.mark.parametrize("libs", [False, True])
def test_every_mode_of_every_component_on_every_profile(profile, libs, monkeypatch):
    pretend_libraries(monkeypatch, libs)
    hw = PROFILES[profile]
    expected = {}
    for comp, modes in (("dit", DIT), ("t5", T5), ("clip", CLIP)):
        for name, mode in modes.items():
            p = plan.plan_component(comp, mode, hw)
            ok, backend = _expected(mode, hw, libs)
            assert p.ok == ok, (profile, libs, comp, mode.name, p.reason)
            if ok and backend:
                assert p.backend == backend
            if mode.backend == "auto" and mode.scheme != "none":
                assert p.backend in registry.specs() and mode.scheme in registry.specs()[p.backend].schemes
            if not ok:
                # one line naming the mode, the reason and the portable alternative
                assert f"{comp}_quant={mode.name}" in p.reason and "\n" not in p.reason
                assert f"{comp}_quant={mode.scheme}-torch" in p.reason
            expected[comp, name] = p
    # a run's plan is its components' plans: each component is planned alone, whatever the others' modes
    combos = list(product(DIT, T5, CLIP))
    for dn, tn, cn in combos[:: max(1, len(combos) // 50)]:
        cfg = OmegaConf.create({"model": {"family": "wan2.1", "task": "i2v"}, "dit_quant": DIT[dn],
                                "t5_quant": T5[tn], "clip_quant": CLIP[cn], "attn_quant": ATTN_NONE})
        assert plan.plan_run(cfg, hw) == {"t5": expected["t5", tn], "clip": expected["clip", cn],
                                          "dit": expected["dit", dn], "attn": plan.plan_attention(ATTN_NONE, hw)}
    plans = plan.plan_run(OmegaConf.create({"model": {"family": "wan2.1", "task": "t2v"},
                                            "dit_quant": DIT["none"], "t5_quant": T5["none"],
                                            "clip_quant": CLIP["none"], "attn_quant": ATTN_NONE}), hw)
    assert set(plans) == {"t5", "dit", "attn"}, "CLIP exists only for I2V"


def test_pinned_hardware_facts(libraries_present):
    """Facts of the kernels themselves, independent of how the specs are written."""
    def p(mode, prof):
        return plan.plan_component("dit", DIT[mode], PROFILES[prof])

    assert not p("fp8-vllm", "sm80").ok, "fp8 tensor cores start at Ada (sm89)"
    assert p("fp8-vllm", "sm89").ok and p("fp8-vllm", "sm90").ok
    assert p("int8-vllm", "sm80").ok
    assert not p("fp8-b128-deepgemm", "sm89").ok and p("fp8-b128-deepgemm", "sm90").ok
    assert p("int4-g128-marlin", "sm80").ok
    assert p("fp8-q8f", "sm89").ok and not p("fp8-q8f", "sm90").ok, "Q8-Kernels are built for Ada only"
    for mode in ("fp8-torch", "int8-torch", "int4-g128-torch", "fp8-b128-torch"):
        for prof in PROFILES:
            assert p(mode, prof).ok and p(mode, prof).backend == "torch"


def test_auto_prefers_measured_fastest(libraries_present):
    """The orders measured on the H100 (docs/BACKENDS.md): fused triton blocks for the DiT, the fastest
    standalone linear for the encoders, dequantize+matmul over Marlin at DiT token counts."""
    def auto(comp, mode):
        return plan.plan_component(comp, {"dit": DIT, "t5": T5, "clip": CLIP}[comp][mode], PROFILES["sm90"]).backend

    assert auto("dit", "fp8-auto") == "triton" and auto("dit", "int8-auto") == "triton"
    assert auto("t5", "fp8-auto") == "sgl" and auto("t5", "int8-auto") == "vllm"
    assert auto("dit", "int4-g128-auto") == "torch" and auto("t5", "int4-g128-auto") == "marlin"
    assert auto("dit", "fp8-b128-auto") == "deepgemm"
    assert plan.plan_component("dit", DIT["fp8-auto"], PROFILES["sm80"]).backend == "torch", \
        "no fp8 tensor cores on sm80: only the portable emulation implements fp8"
    cpu = plan.plan_component("dit", DIT["fp8-auto"], PROFILES["cpu"])
    assert cpu.backend == "torch" and "vllm" in cpu.reason, "auto explains every rejection"


def test_missing_libraries_name_the_install_command(libraries_absent):
    p = plan.plan_component("dit", DIT["fp8-sgl"], PROFILES["sm90"])
    assert not p.ok and "install" in p.reason and "sgl" in p.reason
