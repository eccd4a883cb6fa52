"""GPU parity of the ``marlin`` backend (int4-g128-marlin) against float64 and lightq's torch reference.

Marlin is weight-only: the activation is used as given. Marlin rounds each group scale to the activation dtype and
the dequantized weight q*s once more, so |w_marlin - w| <= (2u + u^2)|w| per element against the exact q*s
(the reference rounds q*s once, u|w|). Hence, against the float64 product of the same x and exact weight:
|y - ref| <= 3u (|x| @ |W|^T) + u (|ref| + |bias|) + 2**-20 (|x| @ |W|^T)   (output rounding, bias rounding,
fp32 accumulation), and the relative Frobenius error stays under 2**-6; against ``int4-g128-torch`` rho = 2
(``plugins/conftest.py``). Skipped without CUDA or without vLLM.
"""

import pytest
import torch

from lightq_marlin import SPEC

pytestmark = pytest.mark.gpu
SCHEME = "int4-g128"


def test_gemm_against_float64(parity, case, dtype, with_bias):
    parity.check_weight_only_gemm(parity.load(SPEC, SCHEME), SCHEME, *case, dtype, with_bias, weight_roundings=3)


def test_apply_matches_torch_backend(parity, case, dtype, with_bias):
    parity.check_apply(parity.load(SPEC, SCHEME), SCHEME, *case, dtype, with_bias, rho=2.0)


def test_pack_from_cpu_weight_returns_cpu_tensors(parity):
    backend = parity.load(SPEC, SCHEME)
    qw, _ = parity.weight(SCHEME, 1536, 1536)
    packed = backend.pack(qw.to("cpu"))
    assert all(t.device.type == "cpu" for t in packed.values())
    on_gpu = {name: t.to(parity.device) for name, t in packed.items()}
    x = parity.activation(257, 1536, torch.bfloat16)
    y = backend.apply(x, on_gpu, SCHEME, None)
    ref = backend.apply(x, backend.pack(qw), SCHEME, None)
    assert torch.equal(y, ref), "packing on the CPU (repacked on the GPU, moved back) must give the same tiles"


def test_tiny_dit_matches_torch_mode(parity):
    parity.check_dit(parity.load(SPEC, SCHEME), SCHEME, rho=2.0)


def test_loading_keeps_torch_attention_backends(parity):
    parity.load(SPEC, SCHEME)
    parity.check_load_keeps_sdpa_switches(SPEC)
