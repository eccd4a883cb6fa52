"""TorchBackend.apply against a float64 reference built from the same quantized activation and weight.

The bound is derived in tests/torch_reference.py. Input shapes: ``[K]`` (one token, output ``[N]``), ``[M, K]``
and ``[B, L, K]``; the output keeps the leading shape and ``x.dtype``. On CPU, fp8 takes ``torch._scaled_mm``
(bf16 output) when K and N are multiples of 16 and the fp32 emulation otherwise; int8 always takes ``_int_mm``.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from lightq.backends import torch_backend as TB
from lightq.errors import QuantizationError
from lightq.quant import schemes as S
from lightq.quant.linear import QLinear, swap_linears
from torch_reference import assert_close_to_reference

BACKEND = TB.TorchBackend(TB.SPEC)

# (leading shape, N, K): K, N multiples of 16 (fast paths) and not (emulated fp8; int4 needs K % 128 == 0)
SHAPES = {
    "fp8": [((7,), 48, 256), ((2, 3), 40, 200), ((), 64, 384)],
    "int8": [((7,), 48, 256), ((2, 3), 40, 200), ((), 64, 384)],
    "fp8-b128": [((7,), 48, 256), ((2, 3), 200, 300), ((), 64, 384)],
    "int4-g128": [((7,), 48, 256), ((2, 3), 40, 384), ((), 64, 128)],
    "fp8-pertensor": [((7,), 48, 256), ((2, 3), 40, 200), ((), 64, 384)],
}
CASES = [(scheme, *shape) for scheme, shapes in SHAPES.items() for shape in shapes]


def make(lead, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g) * 3
    x[..., 1] *= 20  # an outlier channel
    w = torch.randn(n, k, generator=g) * 10.0 ** (torch.rand(n, 1, generator=g) * 2 - 2)
    bias = torch.randn(n, generator=g)
    return x.to(dtype), w, bias


def gemm_dtype(scheme, n, k, dtype):
    """bf16 when a bf16 fp8 GEMM goes through ``_scaled_mm`` (row-wise scaled, bias fused, rounded once to bf16)."""
    fast = scheme == "fp8" and TB.scaled_mm_ok(torch.device("cpu"), n, k)
    return torch.bfloat16 if fast and dtype == torch.bfloat16 else None


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("scheme,lead,n,k", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}x{c[3]}" for c in CASES])
def test_apply_matches_float64_reference(scheme, lead, n, k, dtype, with_bias):
    x, w, bias = make(lead, n, k, dtype)
    bias = bias if with_bias else None
    qw = S.quantize_weight(w, scheme)
    y = BACKEND.apply(x, BACKEND.pack(qw), scheme, bias)
    assert y.shape == (*lead, n) and y.dtype == dtype
    assert_close_to_reference(y, x, qw, bias, gemm_dtype=gemm_dtype(scheme, n, k, dtype))


def test_bias_in_16_bits_is_accepted_as_is():
    x, w, bias = make((5,), 48, 256, torch.bfloat16)
    qw = S.quantize_weight(w, "int8")
    y = BACKEND.apply(x, BACKEND.pack(qw), "int8", bias.to(torch.bfloat16))
    assert_close_to_reference(y, x, qw, bias.to(torch.bfloat16))


@pytest.mark.parametrize("m,n,k", [(1, 48, 256), (33, 40, 200), (16, 64, 128)])
def test_int8_accumulation_is_exact(m, n, k):
    """``_int_mm`` sums int8 products exactly in int32: compare with an int64 matmul."""
    x, w, _ = make((m,), n, k, torch.float32)
    qw = S.quantize_weight(w, "int8")
    xq, _ = S.quantize_activation(x, "int8")
    assert torch.equal(torch._int_mm(xq, qw.data.t()).long(), xq.long() @ qw.data.long().t())


def test_int8_emulated_path_is_bitwise_the_int_mm_path(monkeypatch):
    x, w, bias = make((4, 9), 48, 256, torch.bfloat16)
    qw = S.quantize_weight(w, "int8")
    fast = BACKEND.apply(x, BACKEND.pack(qw), "int8", bias)
    monkeypatch.setattr(TB, "_int_mm_ok", lambda device, n, k: False)
    emulated = BACKEND.apply(x, BACKEND.pack(qw), "int8", bias)
    assert torch.equal(fast, emulated)


def count_calls(monkeypatch, name):
    calls = []
    real = getattr(torch, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, name, spy)
    return calls


@pytest.mark.parametrize("n,k,fast", [(48, 256, True), (40, 256, False), (48, 200, False)])
def test_fp8_path_choice_and_agreement(monkeypatch, n, k, fast):
    """Multiples of 16 take ``_scaled_mm``; other shapes the emulation; both meet the same reference."""
    calls = count_calls(monkeypatch, "_scaled_mm")
    x, w, bias = make((9,), n, k, torch.float32)
    qw = S.quantize_weight(w, "fp8")
    y = BACKEND.apply(x, BACKEND.pack(qw), "fp8", bias)
    assert bool(calls) == fast
    assert y.dtype == torch.float32
    assert_close_to_reference(y, x, qw, bias)
    assert not torch.equal(y, y.to(torch.bfloat16).float()), "an fp32 model's fp8 linear is not rounded to bf16"
    if fast:  # the emulation of the same product agrees to fp32 rounding (the products are exact in both)
        monkeypatch.setattr(TB, "scaled_mm_ok", lambda device, n, k: False)
        emulated = BACKEND.apply(x, BACKEND.pack(qw), "fp8", bias)
        assert len(calls) == 1
        torch.testing.assert_close(y, emulated, rtol=1e-5, atol=1e-5 * float(emulated.abs().max()))


def test_int8_path_uses_int_mm(monkeypatch):
    calls = count_calls(monkeypatch, "_int_mm")
    x, w, _ = make((3,), 40, 200, torch.bfloat16)
    BACKEND.apply(x, BACKEND.pack(S.quantize_weight(w, "int8")), "int8", None)
    assert calls == ["_int_mm"]


def test_fp8_b128_matches_dequantized_fp32_product():
    """The block-wise accumulation equals dequantize-then-matmul up to fp32 accumulation."""
    x, w, _ = make((17,), 200, 300, torch.float32)
    qw = S.quantize_weight(w, "fp8-b128")
    y = BACKEND.apply(x, BACKEND.pack(qw), "fp8-b128", None)
    xq, sx = S.quantize_activation(x, "fp8-b128")
    dense = S.dequantize_activation(xq, sx, "fp8-b128") @ S.dequantize_weight(qw).t()
    scale = (S.dequantize_activation(xq, sx, "fp8-b128").abs() @ S.dequantize_weight(qw).abs().t())
    assert torch.all((y - dense).abs() <= 2 * (300 + 3) * 2.0 ** -24 * scale)


def test_wrong_input_width_and_unknown_scheme_refused():
    qw = S.quantize_weight(torch.randn(32, 256), "int4-g128")
    with pytest.raises(QuantizationError, match="input has 128 features but the int4-g128 weight expects 256"):
        BACKEND.apply(torch.randn(3, 128), BACKEND.pack(qw), "int4-g128", None)
    with pytest.raises(QuantizationError, match="unknown scheme 'fp4'"):
        BACKEND.apply(torch.randn(3, 256), BACKEND.pack(qw), "fp4", None)


def test_version_is_torch_version():
    assert BACKEND.version() == torch.__version__


class Attn(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.q, self.k, self.o = nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.o(self.q(self.norm(x)) * self.k(x).sigmoid())


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.attn = Attn(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.ffn(x)


def tiny_model(dim=128, depth=2):
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        embed=nn.Linear(64, dim), blocks=nn.Sequential(*[Block(dim) for _ in range(depth)]), head=nn.Linear(dim, 8)))


@pytest.mark.parametrize("scheme", S.SCHEMES)
def test_swap_linears_follows_include_and_skip(scheme):
    model = tiny_model()
    floats = {name: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
              for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    include = ["blocks.*.attn.q", "blocks.*.attn.k", "blocks.*.attn.o", "blocks.*.ffn.0", "blocks.*.ffn.2"]
    swapped = swap_linears(model, include, ["blocks.1.attn.*"], BACKEND, scheme)
    assert swapped == ["blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.o", "blocks.0.ffn.0", "blocks.0.ffn.2",
                       "blocks.1.ffn.0", "blocks.1.ffn.2"]
    for name, module in model.named_modules():
        if name in floats:
            assert isinstance(module, QLinear if name in swapped else nn.Linear), name
    assert isinstance(model.blocks[1].attn.norm, nn.LayerNorm)

    layer = model.get_submodule("blocks.0.ffn.0")
    assert (layer.scheme, layer.in_features, layer.out_features) == (scheme, 128, 256)
    weight, bias = floats["blocks.0.ffn.0"]
    qw = S.quantize_weight(weight, scheme)
    x = torch.randn(2, 5, 128, dtype=torch.bfloat16)
    assert torch.equal(layer(x), BACKEND.apply(x, BACKEND.pack(qw), scheme, bias))
    assert layer.weight_nbytes() == qw.nbytes() < weight.numel() * 2  # smaller than the bf16 weight
    assert model.blocks[0].attn.k.bias is None
    assert {"data", "scale"} <= {n.rsplit(".", 1)[-1] for n in model.get_submodule("blocks.0.attn").state_dict()}

    out = model(torch.randn(3, 64))
    assert out.shape == (3, 8) and torch.isfinite(out).all()


def test_swap_linears_uses_supplied_quantized_weights():
    model = tiny_model(depth=1)
    supplied = {}

    def weight_for(name, linear):
        supplied[name] = S.quantize_weight(torch.full_like(linear.weight, 0.5), "int8")
        return supplied[name]

    swapped = swap_linears(model, ["blocks.*.ffn.*"], [], BACKEND, "int8", weight_for=weight_for)
    assert swapped == ["blocks.0.ffn.0", "blocks.0.ffn.2"] == sorted(supplied)
    assert torch.equal(model.blocks[0].ffn[0].data, supplied["blocks.0.ffn.0"].data)


def test_swap_linears_refuses_a_layer_the_scheme_cannot_hold():
    model = nn.Sequential(OrderedDict(proj=nn.Linear(200, 64)))
    with pytest.raises(QuantizationError, match=r"proj\.weight: int4-g128 needs in_features divisible by 128"):
        swap_linears(model, ["proj"], [], BACKEND, "int4-g128")
