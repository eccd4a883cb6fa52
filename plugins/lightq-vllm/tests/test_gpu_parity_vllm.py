"""GPU parity of the ``vllm`` backend (fp8-vllm, int8-vllm, fp8-pertensor-vllm) against lightq's torch
reference.

Bounds and their derivation: ``plugins/conftest.py``. Skipped without CUDA or without vLLM (with the reason).
vLLM's per-token quantizers follow lightq's rule, so its full ``apply`` must sit within rho = 0.25 of the
activation quantization error from ``*-torch``; cutlass_scaled_mm rounds once, into the activation dtype. The fp8
quantizer reads strided rows (``apply`` does not copy a sliced input): checked bit for bit against the contiguous
copy. Loading the backend must not switch off cuDNN attention (vLLM's import does).
"""

import pytest

from lightq_vllm import SPEC

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


def test_loading_keeps_torch_attention_backends(parity):
    parity.load(SPEC, "fp8")
    parity.check_load_keeps_sdpa_switches(SPEC)
