"""The plan (mode -> backend, or why not) for every combination of the quant groups on fake devices."""

import importlib.util
from itertools import product

import pytest
from omegaconf import OmegaConf

from lightq import plan
from lightq.backends import registry
from lightq.hardware import PROFILES
from lightq.paths import conf_dir

PLUGIN_LIBS = {"vllm", "sgl_kernel", "torchao", "deep_gemm", "q8_kernels", "triton"}


def load_options(group):
    return {p.stem: OmegaConf.load(p) for p in sorted((conf_dir() / group).glob("*.yaml"))}


DIT, T5, CLIP = load_options("dit_quant"), load_options("t5_quant"), load_options("clip_quant")
ATTN_NONE = load_options("attn_quant")["none"]  # the attention modes are planned in tests/test_attention_modes.py


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
def test_every_combination_on_every_profile(profile, libs, monkeypatch):
    pretend_libraries(monkeypatch, libs)
    hw = PROFILES[profile]
    count = 0
    for (dn, d), (tn, t), (cn, c) in product(DIT.items(), T5.items(), CLIP.items()):
        cfg = OmegaConf.create({"model": {"task": "i2v"}, "dit_quant": d, "t5_quant": t, "clip_quant": c,
                                "attn_quant": ATTN_NONE})
        plans = plan.plan_run(cfg, hw)
        assert set(plans) == {"t5", "clip", "dit", "attn"}
        for comp, mode in (("dit", d), ("t5", t), ("clip", c)):
            p = plans[comp]
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
        count += 1
    assert count == len(DIT) * len(T5) * len(CLIP)
    plans = plan.plan_run(OmegaConf.create({"model": {"task": "t2v"}, "dit_quant": DIT["none"],
                                            "t5_quant": T5["none"], "clip_quant": CLIP["none"],
                                            "attn_quant": ATTN_NONE}), hw)
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
