"""GPU parity of the ``sgl`` backend (fp8-sgl, int8-sgl) against lightq's torch reference.

Bounds and their derivation: ``plugins/conftest.py``. Skipped without CUDA or without sglang-kernel (with the
reason). sgl's fp8 per-token quantizer (and, for int8, lightq's own) follow lightq's rule, so the full ``apply``
must sit within rho = 0.25 of the activation quantization error from ``*-torch``; fp8_scaled_mm / int8_scaled_mm
round once, into the activation dtype.
"""

import pytest

from lightq_sgl import SPEC

pytestmark = pytest.mark.gpu
SCHEMES = ("fp8", "int8")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_activation_quantizer_matches_reference(parity, scheme, qcase, dtype):
    parity.check_quantizer(parity.load(SPEC, scheme), scheme, *qcase, dtype)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gemm_exact_given_same_quantized_inputs(parity, scheme, case, dtype, with_bias):
    parity.check_gemm(parity.load(SPEC, scheme), scheme, *case, dtype, with_bias, roundings=(dtype,))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_apply_matches_torch_backend(parity, scheme, case, dtype, with_bias):
    parity.check_apply(parity.load(SPEC, scheme), scheme, *case, dtype, with_bias, rho=0.25)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_tiny_dit_matches_torch_mode(parity, scheme):
    parity.check_dit(parity.load(SPEC, scheme), scheme, rho=0.5)
