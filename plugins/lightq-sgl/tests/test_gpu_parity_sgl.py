"""GPU parity of the ``sgl`` backend (fp8-sgl, int8-sgl, fp8-pertensor-sgl) against lightq's torch reference.

Bounds and their derivation: ``plugins/conftest.py``. Skipped without CUDA or without sglang-kernel (with the
reason). sgl's fp8 per-token quantizer (and, for int8, lightq's own) follow lightq's rule, so the full ``apply``
must sit within rho = 0.25 of the activation quantization error from ``*-torch``; fp8_scaled_mm / int8_scaled_mm
round once, into the activation dtype. (With fp16 activations and a bias, the reference's own two bf16 roundings
dominate that difference at M = 1: the bound counts them, see ``reference_roundings`` in the conftest.)
The int8 activation quantizer must be a fused kernel (vLLM's or lightq's Triton one), not the eager reference,
and choosing it (which may import vLLM) must not switch off cuDNN attention.
"""

import pytest

from lightq_sgl import SPEC

pytestmark = pytest.mark.gpu
SCHEMES = ("fp8", "int8", "fp8-pertensor")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_activation_quantizer_matches_reference(parity, scheme, qcase, dtype):
    parity.check_quantizer(parity.load(SPEC, scheme), scheme, *qcase, dtype)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gemm_exact_given_same_quantized_inputs(parity, scheme, case, dtype, with_bias):
    parity.check_gemm(parity.load(SPEC, scheme), scheme, *case, dtype, with_bias, roundings=(dtype,))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_apply_matches_torch_backend(parity, scheme, case, dtype, with_bias):
    parity.check_apply(parity.load(SPEC, scheme), scheme, *case, dtype, with_bias, rho=0.25)


def test_apply_with_static_input_scale_matches_torch_backend(parity, case, dtype, with_bias):
    """fp8-pertensor with a calibrated input_scale that half the input's range exceeds (those values saturate):
    the plugin's static quantizer multiplies by 1 / t where lightq divides, isolated 1-ulp code differences."""
    parity.check_apply(parity.load(SPEC, "fp8-pertensor"), "fp8-pertensor", *case, dtype, with_bias, rho=0.25,
                       static=True)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_tiny_dit_matches_torch_mode(parity, scheme):
    parity.check_dit(parity.load(SPEC, scheme), scheme, rho=0.5)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_strided_input_equals_contiguous_copy(parity, scheme, dtype):
    parity.check_strided_input(parity.load(SPEC, scheme), scheme, dtype)


def test_int8_quantizer_is_a_fused_kernel(parity):
    backend = parity.load(SPEC, "int8")
    assert backend.int8_quantizer in ("vllm scaled_int8_quant", "lightq triton act_quant"), backend.int8_quantizer


def test_choosing_the_int8_quantizer_keeps_torch_attention_backends(parity):
    parity.load(SPEC, "int8")
    parity.check_load_keeps_sdpa_switches(SPEC, then="backend.int8_quantizer")
