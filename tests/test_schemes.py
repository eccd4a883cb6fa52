"""Scheme numerics (lightq.quant.schemes) against fp32, with the error bounds the formats imply.

Bounds (from schemes.py's docstring), asserted per element, ``s`` the element's scale:
  fp8 e4m3   |w - deq| <= max(|w| * 2**-4, s * 2**-10) + |w| * 2**-23
  int8/int4  |w - deq| <= s / 2 + |w| * 2**-23
The last term is the fp32 rounding of ``w / s`` and ``q * s`` (two roundings of relative size 2**-24).
"""

from __future__ import annotations

import math

import pytest
import torch

from lightq.errors import LightqError, QuantizationError
from lightq.quant import schemes as S

SHAPES = [(16, 32), (128, 128), (257, 384), (1536, 1536)]
BIG = (5120, 5120)  # one Wan-14B-sized weight, for the per-channel schemes (1536 = Wan-1.3B covers the others)
FP32_SLACK = 2.0 ** -23
QMAX = {"fp8": S.FP8_MAX, "int8": S.INT8_MAX, "fp8-b128": S.FP8_MAX, "int4-g128": S.INT4_MAX,
        "fp8-pertensor": S.FP8_MAX}
FP8_SCHEMES = ("fp8", "fp8-b128", "fp8-pertensor")


def make_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Gaussian rows whose magnitudes span 5 decades, so fp8 values land in both the normal and subnormal range."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    row_scale = 10.0 ** (torch.rand(n, 1, generator=g) * 5 - 3)
    return w * row_scale


def scale_per_element(qw: S.QuantizedWeight) -> torch.Tensor:
    """The scale each element of the ``[N, K]`` weight was divided by, from the stored scale layout."""
    n, k = qw.out_features, qw.in_features
    if qw.scheme in ("fp8", "int8", "fp8-pertensor"):
        return qw.scale.expand(n, k)
    if qw.scheme == "fp8-b128":
        return qw.scale.repeat_interleave(S.BLOCK, 0)[:n].repeat_interleave(S.BLOCK, 1)[:, :k]
    return qw.scale.t().repeat_interleave(S.GROUP, 1)  # int4-g128: [K/128, N] -> [N, K]


def error_bound(scheme: str, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    w, s = w.double().abs(), s.double()
    if scheme in FP8_SCHEMES:
        fmt = torch.maximum(w * 2.0 ** -4, s * 2.0 ** -10)
    else:
        fmt = s / 2
    return fmt + w * FP32_SLACK


def assert_within_bound(scheme: str, w: torch.Tensor, deq: torch.Tensor, s: torch.Tensor) -> None:
    err = (w.double() - deq.double()).abs()
    bound = error_bound(scheme, w, s)
    bad = err > bound
    assert not bad.any(), (f"{scheme}: {int(bad.sum())} elements exceed the format bound, worst excess "
                           f"{float((err - bound).max()):.3e}")


def reference_amax(scheme: str, w: torch.Tensor) -> torch.Tensor:
    """amax over each scale's elements, in the stored scale layout, computed independently of schemes.py."""
    n, k = w.shape
    a = w.abs()
    if scheme == "fp8-pertensor":
        return a.max()
    if scheme in ("fp8", "int8"):
        return a.amax(dim=1, keepdim=True)
    if scheme == "fp8-b128":
        rows, cols = math.ceil(n / 128), math.ceil(k / 128)
        out = torch.empty(rows, cols)
        for i in range(rows):
            for j in range(cols):
                out[i, j] = a[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].max()
        return out
    return a.reshape(n, k // 128, 128).amax(dim=2).t()


def shapes_for(scheme: str) -> list[tuple[int, int]]:
    shapes = [s for s in SHAPES if scheme != "int4-g128" or s[1] % 128 == 0]
    return shapes + ([BIG] if scheme in ("fp8", "int8") else [])


CASES = [(scheme, shape) for scheme in S.SCHEMES for shape in shapes_for(scheme)]


@pytest.mark.parametrize("scheme,shape", CASES, ids=[f"{s}-{n}x{k}" for s, (n, k) in CASES])
def test_weight_roundtrip_within_format_bound(scheme, shape):
    w = make_weight(*shape)
    qw = S.quantize_weight(w, scheme)
    data_shape, data_dtype, scale_shape = S.expected_layout(scheme, *shape)
    assert (tuple(qw.data.shape), qw.data.dtype, tuple(qw.scale.shape)) == (data_shape, data_dtype, scale_shape)
    assert qw.scale.dtype == torch.float32
    assert torch.equal(qw.scale, reference_amax(scheme, w) / QMAX[scheme])
    deq = S.dequantize_weight(qw)
    assert deq.dtype == torch.float32 and deq.shape == w.shape
    assert_within_bound(scheme, w, deq, scale_per_element(qw))


@pytest.mark.parametrize("scheme", S.SCHEMES)
def test_quantized_values_stay_in_range(scheme):
    w = make_weight(257, 384, seed=1)
    qw = S.quantize_weight(w, scheme)
    q = S.unpack_int4(qw.data).float() if scheme == "int4-g128" else qw.data.float()
    assert torch.all(reference_amax(scheme, q) == QMAX[scheme])  # each row/block/group's amax maps to +-qmax


def test_int8_rounds_to_nearest_even_never_truncates():
    s = 2.0 ** -7  # a power of two: w / s is exact, so the ties below are real ties
    v = torch.tensor([127.0, 2.6, -2.6, 2.4, -2.4, 2.5, -2.5, 3.5, 0.5, -0.5, 1.5, 0.49])
    qw = S.quantize_weight((v * s)[None, :], "int8")
    assert qw.scale.item() == s
    expected = torch.tensor([127, 3, -3, 2, -2, 2, -2, 4, 0, 0, 2, 0], dtype=torch.int8)
    assert torch.equal(qw.data[0], expected)
    xq, xs = S.quantize_activation((v * s)[None, :], "int8")
    assert xs.item() == s and torch.equal(xq[0], expected)


def test_int4_rounds_to_nearest_even():
    s = 2.0 ** -5
    v = torch.zeros(128)
    v[:8] = torch.tensor([7.0, 2.6, -2.6, 2.5, -3.5, 0.5, 6.4, -6.6])
    qw = S.quantize_weight((v * s)[None, :], "int4-g128")
    assert qw.scale.item() == s
    assert S.unpack_int4(qw.data)[0, :8].tolist() == [7, 3, -3, 2, -4, 0, 6, -7]


@pytest.mark.parametrize("scheme", S.SCHEMES)
def test_zero_rows_blocks_groups_get_scale_one_and_exact_zeros(scheme):
    w = make_weight(256, 384, seed=2)
    if scheme == "fp8-pertensor":
        w.zero_()
        zero_scales = ()
    elif scheme in ("fp8", "int8"):
        w[3] = 0
        zero_scales = (slice(3, 4), slice(None))
    elif scheme == "fp8-b128":
        w[128:256, 128:256] = 0
        zero_scales = (slice(1, 2), slice(1, 2))
    else:
        w[5, 256:384] = 0
        zero_scales = (slice(2, 3), slice(5, 6))
    qw = S.quantize_weight(w, scheme)
    assert torch.all(qw.scale[zero_scales] == 1)
    deq = S.dequantize_weight(qw)
    zeros = w == 0
    assert torch.all(deq[zeros] == 0)
    assert_within_bound(scheme, w, deq, scale_per_element(qw))


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_underflowing_scale_becomes_one(scheme):
    w = torch.zeros(2, 64)
    w[0, 0] = 1e-44  # amax / qmax underflows to 0 in fp32: the scale must not be 0 (0/0 = NaN)
    w[1] = 1.0
    qw = S.quantize_weight(w, scheme)
    assert qw.scale[0].item() == 1.0
    deq = S.dequantize_weight(qw)
    assert torch.isfinite(deq).all()
    assert_within_bound(scheme, w, deq, scale_per_element(qw))


@pytest.mark.parametrize("scheme", S.SCHEMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_weights_refused_naming_the_tensor(scheme, bad):
    w = make_weight(16, 128)
    w[4, 7] = bad
    with pytest.raises(QuantizationError, match=r"blocks\.3\.ffn\.0\.weight: 1 NaN/Inf"):
        S.quantize_weight(w, scheme, name="blocks.3.ffn.0.weight")


def test_int4_with_k_not_multiple_of_128_refused_naming_the_fix():
    with pytest.raises(QuantizationError) as err:
        S.quantize_weight(make_weight(64, 200), "int4-g128", name="head.weight")
    msg = str(err.value)
    assert "head.weight" in msg and "divisible by 128" in msg and "200" in msg
    assert "skip patterns" in msg and "int8 / fp8" in msg
    assert isinstance(err.value, LightqError)


def test_unknown_scheme_and_non_2d_weight_refused():
    with pytest.raises(QuantizationError, match="choose one of fp8, int8, fp8-b128, int4-g128, fp8-pertensor"):
        S.quantize_weight(make_weight(8, 128), "int3")
    with pytest.raises(QuantizationError, match=r"conv\.weight: only 2-D .* \(4, 4, 3\)"):
        S.quantize_weight(torch.ones(4, 4, 3), "fp8", name="conv.weight")
    with pytest.raises(QuantizationError, match="choose one of"):
        S.expected_layout("int3", 8, 8)


def test_fp8_b128_partial_edge_blocks():
    w = make_weight(200, 300, seed=3)
    qw = S.quantize_weight(w, "fp8-b128")
    assert tuple(qw.scale.shape) == (2, 3) and tuple(qw.data.shape) == (200, 300)
    # The corner block holds rows 128..199 and columns 256..299 only: its scale is their amax, not the padding's.
    assert qw.scale[1, 2].item() == (w[128:, 256:].abs().max() / S.FP8_MAX).item()
    assert_within_bound("fp8-b128", w, S.dequantize_weight(qw), scale_per_element(qw))


def test_non_contiguous_weight_quantizes_like_its_copy():
    w = make_weight(384, 256, seed=4).t()  # a [256, 384] view with transposed strides
    for scheme in S.SCHEMES:
        a, b = S.quantize_weight(w, scheme), S.quantize_weight(w.contiguous(), scheme)
        assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)) and torch.equal(a.scale, b.scale)


def test_pack_unpack_all_16_nibbles_in_documented_order():
    q = torch.arange(-8, 8, dtype=torch.int8)[None, :]  # every representable nibble value once
    packed = S.pack_int4(q)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (1, 8)
    # byte j = (q[2j] + 8) | (q[2j+1] + 8) << 4: element 2j in the low nibble, offset 8 (uint4b8)
    expected = [(2 * j) | ((2 * j + 1) << 4) for j in range(8)]
    assert packed[0].tolist() == expected
    assert torch.equal(S.unpack_int4(packed), q)
    assert torch.equal(S.unpack_int4(S.pack_int4(q.flip(1))), q.flip(1))


def test_pack_unpack_roundtrip_random():
    q = torch.randint(-8, 8, (33, 256), dtype=torch.int8, generator=torch.Generator().manual_seed(5))
    packed = S.pack_int4(q)
    assert tuple(packed.shape) == (33, 128)
    assert torch.equal(S.unpack_int4(packed), q)


def make_activation(m: int, k: int, seed: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 10.0 ** (torch.rand(m, 1, generator=g) * 4 - 2)
    x[:, 5] *= 50  # an outlier channel, as real DiT activations have
    return x


def activation_scale_per_element(scheme: str, scale: torch.Tensor, k: int) -> torch.Tensor:
    if scheme == "fp8-b128":
        return scale.repeat_interleave(S.GROUP, 1)[:, :k]
    return scale.expand(-1, k)


@pytest.mark.parametrize("scheme", ["fp8", "int8", "fp8-b128"])
@pytest.mark.parametrize("shape", [(1, 32), (257, 300), (64, 5120)])
def test_activation_roundtrip_within_format_bound(scheme, shape):
    m, k = shape
    x = make_activation(m, k)
    x[-1] = 0  # a zero token
    q, scale = S.quantize_activation(x, scheme)
    assert q.shape == x.shape and q.dtype == (torch.int8 if scheme == "int8" else S.FP8_DTYPE)
    groups = math.ceil(k / 128)
    assert tuple(scale.shape) == ((m, groups) if scheme == "fp8-b128" else (m, 1))
    if scheme == "fp8-b128":
        padded = torch.nn.functional.pad(x.abs(), (0, groups * 128 - k))
        amax = padded.reshape(m, groups, 128).amax(dim=2)
    else:
        amax = x.abs().amax(dim=1, keepdim=True)
    nonzero = amax > 0
    assert torch.equal(scale[nonzero], (amax / QMAX[scheme])[nonzero])
    assert torch.all(scale[-1] == 1)
    deq = S.dequantize_activation(q, scale, scheme)
    assert torch.all(deq[-1] == 0)
    assert_within_bound(scheme, x, deq, activation_scale_per_element(scheme, scale, k))


@pytest.mark.parametrize("shape", [(1, 32), (257, 300)])
def test_per_tensor_activation_dynamic_and_static(shape):
    """fp8-pertensor: one scale t for the whole input; dynamic t = max |x| / 448, static t = the given input_scale,
    x / t clamped to +-448 (a calibrated scale can be exceeded: those values saturate, never become NaN)."""
    x = make_activation(*shape)
    q, t = S.quantize_activation(x, "fp8-pertensor")
    assert t.shape == () and t.item() == (x.abs().max() / S.FP8_MAX).item()
    assert_within_bound("fp8-pertensor", x, S.dequantize_activation(q, t, "fp8-pertensor"), t.expand(*shape))
    static = torch.tensor(t.item() / 4)  # a calibration that saw a quarter of this input's range
    q, t = S.quantize_activation(x, "fp8-pertensor", static)
    assert t.item() == static.item() and not torch.isnan(q.float()).any()
    deq = S.dequantize_activation(q, t, "fp8-pertensor").double()
    clamped = x.double().clamp(-S.FP8_MAX * static.item(), S.FP8_MAX * static.item())
    assert (q.float().abs() == S.FP8_MAX).any() and (x.abs() > S.FP8_MAX * static.item()).any()  # saturated
    assert_within_bound("fp8-pertensor", clamped, deq, t.expand(*shape))
    with pytest.raises(QuantizationError, match="only fp8-pertensor takes a static input_scale"):
        S.quantize_activation(x, "fp8", static)


def test_weight_only_scheme_has_no_activation_quantization():
    with pytest.raises(QuantizationError, match="int4-g128"):
        S.quantize_activation(torch.ones(2, 128), "int4-g128")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", S.SCHEMES)
def test_input_dtype_does_not_change_the_result(scheme, dtype):
    w = make_weight(130, 256, seed=7).to(dtype)
    a, b = S.quantize_weight(w, scheme), S.quantize_weight(w.float(), scheme)
    assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)) and torch.equal(a.scale, b.scale)
    if scheme in S.WEIGHT_ONLY:
        return
    x = make_activation(9, 256).to(dtype)
    (qa, sa), (qb, sb) = S.quantize_activation(x, scheme), S.quantize_activation(x.float(), scheme)
    assert torch.equal(qa.view(torch.uint8), qb.view(torch.uint8)) and torch.equal(sa, sb)


@pytest.mark.parametrize("scheme", S.SCHEMES)
def test_dequantize_to_16_bit_is_the_fp32_result_rounded(scheme):
    qw = S.quantize_weight(make_weight(128, 256, seed=8), scheme)
    ref = S.dequantize_weight(qw)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(S.dequantize_weight(qw, dtype), ref.to(dtype))


def test_quantized_weight_nbytes_and_to():
    qw = S.quantize_weight(make_weight(256, 512), "int4-g128")
    assert qw.nbytes() == 256 * 256 + 4 * 256 * 4  # packed nibbles + fp32 [K/128, N] scales
    moved = qw.to("cpu")
    assert moved.scheme == qw.scheme and torch.equal(moved.data, qw.data)
    assert (moved.out_features, moved.in_features) == (256, 512)


def test_all_finite_is_exact_also_when_the_sum_overflows():
    """all_finite: a finite sum proves every value finite; a NaN / Inf anywhere is found, and finite values whose
    sum overflows (the fast proof fails) are still reported finite by the element-wise check."""
    from lightq.quant.schemes import all_finite

    t = torch.randn(1000, 37)
    assert all_finite(t) and all_finite(t.bfloat16()) and all_finite(torch.empty(0))
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[999, 36] = bad
        assert not all_finite(u) and not all_finite(u.bfloat16())
    big = torch.full((64,), 3e38)
    assert not bool(torch.isfinite(big.sum())) and all_finite(big)
    with pytest.raises(QuantizationError, match="1 NaN/Inf"):
        S.quantize_weight(torch.cat([big[None, :4], torch.tensor([[1.0, float("nan"), 2.0, 3.0]])]), "fp8")
