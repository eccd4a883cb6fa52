"""The torch backend on CUDA at Wan2.1 shapes, against the float64 reference and against the CPU backend.

Run on the GPU machine: ``python -m pytest tests/gpu -q -n 0``. Skipped without CUDA.

Bounds are tests/torch_reference.py's, with one device-specific term: fp8 tensor cores accumulate a K-chunk's
products with about 14 significant bits before cuBLAS promotes the partial sum to fp32 (DeepSeek-V3 report,
sec. 3.3.2; ``_scaled_mm`` runs without fast accumulation), so the fp8 ``_scaled_mm`` path gets ``2**-13 * A``.
``_int_mm`` sums exactly in int32 and is checked bit for bit. For the 16-bit int4 path, cuBLAS's reduced-precision
split-K reductions are switched off in these tests, so its accumulation is fp32 as the bound assumes.
M = 32760 rows are checked on every 64th row (activation quantization is per row, so a row subset is exact).
"""

from __future__ import annotations

import pytest
import torch

from lightq.backends import torch_backend as TB
from lightq.quant import schemes as S
from torch_reference import UNIT_ROUNDOFF, assert_close_to_reference, bound, reference

from .conftest import DEV, GPU

pytestmark = GPU
BACKEND = TB.TorchBackend(TB.SPEC)
WAN_NK = [(5120, 5120), (13824, 5120), (1536, 8960)]  # 14B attention, 14B FFN up, 1.3B FFN up
WAN_M = [1, 257, 32760]  # one token, CLIP's 257 tokens, 480p x 81 frames
FP8_TENSOR_CORE_ACC = 2.0 ** -13


@pytest.fixture(autouse=True)
def fp32_reductions():
    flags = torch.backends.cuda.matmul
    saved = (flags.allow_bf16_reduced_precision_reduction, flags.allow_fp16_reduced_precision_reduction)
    flags.allow_bf16_reduced_precision_reduction = flags.allow_fp16_reduced_precision_reduction = False
    yield
    flags.allow_bf16_reduced_precision_reduction, flags.allow_fp16_reduced_precision_reduction = saved


def make(m, n, k, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(m, k, generator=g, device=DEV) * 3
    x[:, 1] *= 20  # an outlier channel
    w = torch.randn(n, k, generator=g, device=DEV) * 10.0 ** (torch.rand(n, 1, generator=g, device=DEV) * 2 - 2)
    bias = torch.randn(n, generator=g, device=DEV)
    return x.to(dtype), w, bias


def fast_fp8(n, k):
    return TB.scaled_mm_ok(DEV, n, k)


def check(y, x, qw, bias):
    """Compare (a row subset of) ``y`` with the float64 reference on the GPU. fp8-pertensor's activation scale is
    one for the whole input (static, or dynamic from all of ``x``): the reference takes it from the packed layer,
    so a row subset is exact there too."""
    rows = torch.arange(0, x.shape[0], 64 if x.shape[0] > 4096 else 1, device=x.device)
    fast = qw.scheme in ("fp8", S.PER_TENSOR) and fast_fp8(qw.out_features, qw.in_features)
    if qw.scheme == S.PER_TENSOR and qw.input_scale is None:  # the dynamic scale of the whole input
        qw = S.QuantizedWeight(qw.scheme, qw.data, qw.scale, qw.out_features, qw.in_features,
                               S.quantize_activation(x, S.PER_TENSOR)[1])
    bf16_gemm = fast and qw.scheme == "fp8" and x.dtype == torch.bfloat16
    assert_close_to_reference(y[rows], x[rows], qw, bias, gemm_dtype=torch.bfloat16 if bf16_gemm else None,
                              extra_acc=FP8_TENSOR_CORE_ACC if fast else 0.0)


@pytest.mark.parametrize("n,k", WAN_NK, ids=lambda v: str(v))
@pytest.mark.parametrize("m", WAN_M)
@pytest.mark.parametrize("scheme", S.SCHEMES)
def test_apply_at_wan_shapes(scheme, m, n, k):
    x, w, bias = make(m, n, k, torch.bfloat16)
    qw = S.quantize_weight(w, scheme)
    y = BACKEND.apply(x, BACKEND.pack(qw), scheme, bias)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16 and y.is_cuda
    check(y, x, qw, bias)
    del x, w, y
    torch.cuda.empty_cache()


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scheme", S.SCHEMES)
def test_dtypes_bias_and_batch_shape(scheme, dtype, with_bias):
    x, w, bias = make(2 * 257, 1536, 8960, dtype)
    bias = bias if with_bias else None
    qw = S.quantize_weight(w, scheme)
    y = BACKEND.apply(x.view(2, 257, 8960), BACKEND.pack(qw), scheme, bias)
    assert y.shape == (2, 257, 1536) and y.dtype == dtype
    check(y.view(-1, 1536), x, qw, bias)


@pytest.mark.parametrize("n,k", WAN_NK, ids=lambda v: str(v))
@pytest.mark.parametrize("m", [1, 16, 17, 257, 32760])
def test_int_mm_is_exact(m, n, k):
    """The int32 accumulation of ``_int_mm`` (M <= 16 padded to 17) equals the exact integer sum."""
    x, w, _ = make(m, n, k, torch.bfloat16)
    qw = S.quantize_weight(w, "int8")
    xq, _ = S.quantize_activation(x, "int8")
    padded = torch.nn.functional.pad(xq, (0, 0, 0, max(0, 17 - m)))
    acc = torch._int_mm(padded, qw.data.t())[:m]
    rows = torch.arange(0, m, 64 if m > 4096 else 1, device=DEV)
    exact = xq[rows].double() @ qw.data.double().t()  # |sum| <= 127**2 * K < 2**53: exact in float64
    assert torch.equal(acc[rows].double(), exact)


def test_paths_taken(monkeypatch):
    """fp8 uses ``_scaled_mm`` on sm89+ and int8 uses ``_int_mm``: the fast paths are what is measured."""
    calls = []
    for name in ("_scaled_mm", "_int_mm"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    x, w, _ = make(33, 512, 256, torch.bfloat16)
    for scheme in ("fp8", "int8", S.PER_TENSOR):
        qw = S.quantize_weight(w, scheme)
        BACKEND.apply(x, BACKEND.pack(qw), scheme, None)
    fp8 = ["_scaled_mm"] if torch.cuda.get_device_capability() >= (8, 9) else []
    expected = fp8 + ["_int_mm"] + fp8
    assert calls == expected


@pytest.mark.parametrize("scheme", S.SCHEMES)
def test_gpu_agrees_with_cpu_backend(scheme):
    """Same quantized inputs on both devices: outputs differ by at most the sum of the two bounds."""
    x, w, bias = make(257, 1536, 8960, torch.bfloat16)
    qw = S.quantize_weight(w, scheme)
    y_gpu = BACKEND.apply(x, BACKEND.pack(qw), scheme, bias)
    qw_cpu = qw.to("cpu")
    y_cpu = BACKEND.apply(x.cpu(), BACKEND.pack(qw_cpu), scheme, bias.cpu())
    check(y_gpu, x, qw, bias)
    if scheme == S.PER_TENSOR:  # the dynamic scale of the whole input, as both devices computed it
        qw_cpu.input_scale = S.quantize_activation(x.cpu(), S.PER_TENSOR)[1]
    assert_close_to_reference(y_cpu, x.cpu(), qw_cpu, bias.cpu(),
                              gemm_dtype=torch.bfloat16 if scheme == "fp8" else None)
    no_bias, ref, abs_sum = reference(x.cpu(), qw_cpu, bias.cpu())
    tol = bound(no_bias, ref, abs_sum, bias.cpu(), 8960, UNIT_ROUNDOFF[torch.bfloat16], scheme, torch.bfloat16,
                FP8_TENSOR_CORE_ACC if scheme in ("fp8", S.PER_TENSOR) else 0.0)
    assert torch.all((y_gpu.cpu().double() - y_cpu.double()).abs() <= 2 * tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fp8_keeps_the_activation_dtype(dtype):
    """An fp32 / fp16 model's fp8 linear is rounded to its own dtype only (tensor-wise ``_scaled_mm`` in fp32)."""
    x, w, bias = make(257, 1536, 8960, dtype)
    qw = S.quantize_weight(w, "fp8")
    y = BACKEND.apply(x, BACKEND.pack(qw), "fp8", bias)
    assert y.dtype == dtype
    assert_close_to_reference(y, x, qw, bias, extra_acc=FP8_TENSOR_CORE_ACC if fast_fp8(1536, 8960) else 0.0)


@pytest.mark.parametrize("scheme", S.SCHEMES)
def test_quantize_on_gpu_is_bitwise_the_cpu_result(scheme):
    x, w, _ = make(257, 1536, 8960, torch.float32)
    on_gpu, on_cpu = S.quantize_weight(w, scheme), S.quantize_weight(w.cpu(), scheme)
    assert torch.equal(on_gpu.data.cpu().view(torch.uint8), on_cpu.data.view(torch.uint8))
    assert torch.equal(on_gpu.scale.cpu(), on_cpu.scale)
    if scheme not in S.WEIGHT_ONLY:
        (qg, sg), (qc, sc) = S.quantize_activation(x, scheme), S.quantize_activation(x.cpu(), scheme)
        assert torch.equal(qg.cpu().view(torch.uint8), qc.view(torch.uint8)) and torch.equal(sg.cpu(), sc)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("n,k", WAN_NK, ids=lambda v: str(v))
@pytest.mark.parametrize("m", [1, 257, 32760])
def test_fp8_pertensor_static_scale_tensorwise_scaled_mm(m, n, k, dtype, monkeypatch):
    """fp8-pertensor with a calibrated input_scale (half this input's range: the largest activations saturate) on
    ``torch._scaled_mm`` with tensor-wise scales (0-d t and s), bias fused for 16-bit outputs, fp32 output for fp32
    activations; against the float64 statement of x_q = fp8(clamp(x / t)), y = x_q @ W_q^T * t * s + b."""
    seen = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: seen.append(kw["scale_a"].shape) or real(*a, **kw))
    x, w, bias = make(m, n, k, dtype)
    t = x.float().abs().max() * 0.5 / S.FP8_MAX
    qw = S.quantize_weight(w, S.PER_TENSOR, input_scale=t)
    y = BACKEND.apply(x, BACKEND.pack(qw), S.PER_TENSOR, bias)
    assert y.shape == (m, n) and y.dtype == dtype and y.is_cuda
    assert (x.float().abs() / t > S.FP8_MAX).any(), "some activations saturate"
    check(y, x, qw, bias)
    if fast_fp8(n, k):
        assert seen == [torch.Size([])], "tensor-wise scales: one 0-d scale for the activation"
