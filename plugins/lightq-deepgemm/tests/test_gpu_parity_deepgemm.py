"""GPU parity of the ``deepgemm`` backend (fp8-b128-deepgemm) against lightq's torch reference.

Bounds: ``plugins/conftest.py``. vLLM's 1x128 group quantizer follows lightq's rule (scales compared group by
group, read through DeepGEMM's MN-major TMA-aligned layout); DeepGEMM writes bf16, the bias is added in fp32 and
the result rounded to the activation dtype (two roundings). Skipped without CUDA, without vLLM, or off sm90.
The first call of each shape JIT-compiles a kernel with nvcc (seconds).
"""

import pytest
import torch

from lightq_deepgemm import SPEC

pytestmark = pytest.mark.gpu
SCHEME = "fp8-b128"


def test_activation_quantizer_matches_reference(parity, qcase, dtype):
    parity.check_quantizer(parity.load(SPEC, SCHEME), SCHEME, *qcase, dtype)


def test_scale_layout_is_tma_aligned_mn_major(parity):
    backend = parity.load(SPEC, SCHEME)
    _, sx = backend.quantize_activation(parity.activation(257, 1536, torch.bfloat16), SCHEME)
    assert sx.shape == (257, 12) and sx.stride() == (1, 260), f"scale layout {sx.shape} {sx.stride()}"


def test_gemm_exact_given_same_quantized_inputs(parity, case, dtype, with_bias):
    parity.check_gemm(parity.load(SPEC, SCHEME), SCHEME, *case, dtype, with_bias, roundings=(torch.bfloat16, dtype))


def test_apply_matches_torch_backend(parity, case, dtype, with_bias):
    # DeepGEMM rounds into bf16, the bias pass into the activation dtype
    parity.check_apply(parity.load(SPEC, SCHEME), SCHEME, *case, dtype, with_bias, rho=0.25,
                       roundings=(torch.bfloat16, dtype))


def test_tiny_dit_matches_torch_mode(parity):
    parity.check_dit(parity.load(SPEC, SCHEME), SCHEME, rho=0.5)


def test_strided_input_equals_contiguous_copy(parity, dtype):
    parity.check_strided_input(parity.load(SPEC, SCHEME), SCHEME, dtype)


def test_loading_keeps_torch_attention_backends(parity):
    parity.load(SPEC, SCHEME)
    parity.check_load_keeps_sdpa_switches(SPEC)
