"""``QuantMethod``: one component's quantization in a run — the per-layer shape rule with its fallback or refusal,
the mode's options read in one place, fusion decided by a declared capability, and the Backend contract."""

import pytest
import torch
from omegaconf import OmegaConf

from lightq.backends.base import Backend
from lightq.backends.spec import BackendSpec
from lightq.backends.torch_backend import TorchBackend
from lightq.checkpoints.loader import load_component
from lightq.config import QuantConfig
from lightq.errors import LightqError, QuantizationError
from lightq.models.family import QUANTIZABLE
from lightq.models.wan_dit import DIT_ARCHS, WanDiT
from lightq.pipeline.components import describe
from lightq.plan import ComponentPlan
from lightq.quant.method import QuantMethod

ARCH = DIT_ARCHS["tiny"]  # dim 128, ffn_dim 256: only ffn.2 has in_features 256


def picky(name: str, k_multiple: int) -> Backend:
    """The torch kernels behind a spec whose shape rule takes only in_features % k_multiple == 0."""
    return TorchBackend(BackendSpec(name=name, schemes={"int8": None}, impl="-", k_multiple=k_multiple))


def load(method: QuantMethod):
    return load_component(lambda: WanDiT(ARCH), "random", include=QUANTIZABLE["dit"], method=method,
                          dtype=torch.float32, progress=False, seed=5)


def test_a_layer_the_backend_cannot_take_runs_on_the_portable_backend_and_is_recorded():
    method = QuantMethod("int8", picky("picky", 256), component="dit")
    model = load(method)
    on = {name: m.backend.name for name, m in model.named_modules() if hasattr(m, "backend")}
    assert {n for n, b in on.items() if b == "picky"} == {f"blocks.{i}.ffn.2" for i in range(ARCH.num_layers)}
    assert set(method.fallbacks) == {n for n, b in on.items() if b == "torch"} and len(method.fallbacks) > 0
    why = method.fallbacks["blocks.0.self_attn.q"]
    assert "in_features % 256 == 0" in why and "[128, 128]" in why and "runs on 'torch'" in why
    assert describe(model, method)["fallback_layers"] == method.fallbacks
    # the fallback changes the kernels, never the numbers: the same weights on the torch backend agree exactly
    reference = load(QuantMethod.portable("int8"))
    x, t, ctx = torch.randn(1, 16, 1, 4, 4), torch.tensor([300.0]), torch.randn(1, 5, ARCH.text_dim)
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), reference(x, t, ctx))
    assert "fallback_layers" not in describe(reference, QuantMethod.portable("int8"))


def test_a_layer_the_portable_backend_cannot_take_is_refused_with_the_fix():
    with pytest.raises(QuantizationError, match=r"dit: layer blocks\.0\.self_attn\.q \[128, 128\]: backend 'torch' "
                                                r"needs in_features % 256 == 0.*skip=\['blocks\.0\.self_attn\.q'\]"):
        load(QuantMethod("int8", picky("torch", 256), component="dit"))


def plan(backend: str, scheme: str = "fp8") -> ComponentPlan:
    return ComponentPlan("dit", f"{scheme}-{backend}", scheme, backend, True, "requested")


def mode(**fields) -> QuantConfig:
    return OmegaConf.structured(QuantConfig(**{"name": "fp8-torch", "scheme": "fp8", "backend": "torch", **fields}))


def test_options_have_one_reader():
    assert not QuantMethod.build(plan("torch"), mode()).fuse
    assert not QuantMethod.build(plan("torch"), mode(options={"fuse": False})).fuse
    with pytest.raises(LightqError, match=r"^fp8-torch: backend 'torch' takes no options, got \['fast_accum'\]"):
        QuantMethod.build(plan("torch"), mode(options={"fast_accum": True}))
    with pytest.raises(LightqError, match=r"^fp8-torch: backend 'torch' cannot run fused blocks"):
        QuantMethod.build(plan("torch"), mode(options={"fuse": True}))
    with pytest.raises(LightqError, match="option fuse takes true / false, got 'yes'"):
        QuantMethod.build(plan("torch"), mode(options={"fuse": "yes"}))


def test_build_carries_skip_and_ckpt_and_refuses_an_unrunnable_plan():
    method = QuantMethod.build(plan("torch", "int8"), mode(scheme="int8", skip=["blocks.0.*"], ckpt="x.safetensors"))
    assert (method.scheme, method.backend.name, method.skip, method.ckpt) == ("int8", "torch", ("blocks.0.*",),
                                                                               "x.safetensors")
    none = QuantMethod.build(ComponentPlan("t5", "none", "none", None, True, "bf16"), mode(name="none"))
    assert not none.quantizes and none.backend is None
    bad = ComponentPlan("dit", "fp8-sgl", "fp8", None, False, "dit_quant=fp8-sgl cannot run here: ...")
    with pytest.raises(LightqError, match="cannot run here"):
        QuantMethod.build(bad, mode(name="fp8-sgl"))


def test_optional_capabilities_are_declared_and_checked():
    assert not TorchBackend.split_gemm and not TorchBackend.fused_blocks
    with pytest.raises(TypeError, match="declares split_gemm but does not implement"):
        type("Halfway", (Backend,), {"split_gemm": True, "gemm_only": lambda *a: None})
    with pytest.raises(TypeError, match="fused_blocks, which needs split_gemm"):
        type("Fuses", (Backend,), {"fused_blocks": True})
    with pytest.raises(NotImplementedError, match="no separate GEMM"):
        picky("p", 1).gemm_only(None, None, {}, None, torch.bfloat16)
    assert picky("p", 1).with_options({}).name == "p"


def test_fits_is_the_shape_rule_and_never_raises():
    spec = BackendSpec(name="s", schemes={"int8": None}, impl="-", k_multiple=16, n_multiple=8)
    assert spec.fits((24, 32)) == (True, "ok")
    assert not spec.fits((20, 32))[0] and not spec.fits((24, 40))[0]
    assert not spec.fits(7)[0] and not spec.fits((0, 16))[0]
