"""GPU parity of the ``q8f`` backend (fp8-q8f, int8-q8f) against lightq's torch reference.

Q8-Kernels runs on Ada (sm89) only and is not obtainable on the project's GPU machine (H100): there these tests
skip with the reason, so this backend is unverified (see the README). Where it runs, the bounds are those of
``plugins/conftest.py``; its GEMMs write bf16, cast afterwards to the activation dtype (two roundings for fp16).
"""

import pytest
import torch

from lightq_q8f import SPEC

pytestmark = pytest.mark.gpu
SCHEMES = ("fp8", "int8")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_activation_quantizer_matches_reference(parity, scheme, qcase, dtype):
    parity.check_quantizer(parity.load(SPEC, scheme), scheme, *qcase, dtype)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gemm_exact_given_same_quantized_inputs(parity, scheme, case, dtype, with_bias):
    parity.check_gemm(parity.load(SPEC, scheme), scheme, *case, dtype, with_bias, roundings=(torch.bfloat16, dtype))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_apply_matches_torch_backend(parity, scheme, case, dtype, with_bias):
    parity.check_apply(parity.load(SPEC, scheme), scheme, *case, dtype, with_bias, rho=0.25)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_tiny_dit_matches_torch_mode(parity, scheme):
    parity.check_dit(parity.load(SPEC, scheme), scheme, rho=0.5)
