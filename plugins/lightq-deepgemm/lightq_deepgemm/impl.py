"""DeepGEMM's ``fp8_gemm_nt`` for the ``fp8-b128`` scheme (Hopper, sm90).

    x_q, s_x = 1x128 group quantization of x: s_x[m, g] = max|x[m, 128g:128g+128]| / 448   (vLLM's CUDA kernel
               ``per_token_group_fp8_quant``), s_x written MN-major and TMA-aligned, the layout DeepGEMM reads:
               shape [M, K/128], strides (1, align(M, 4))
    y        = fp8_gemm_nt((x_q, s_x), (W_q, s_w), out)
             = sum_g (s_x[:, g] s_w[n/128, g]) * (x_q[:, g] @ W_q[:, g]^T)     promoted to fp32 per 128-wide group
    out      bf16 [M, N] (DeepGEMM writes bf16 only, and has no bias epilogue); the bias is then added in one
             elementwise pass that computes in fp32 and rounds once into x.dtype (in place when that is bf16)

``W_q`` [N, K] (row-major, "NT" = K-major operands) and its fp32 block scales ``[N/128, K/128]`` are the checkpoint
tensors unchanged: DeepGEMM on sm90 reads fp32 128x128 weight scales as they are stored.
Why sm90 only: on sm100 DeepGEMM takes UE8M0 (power-of-two) scales and would round lightq's fp32 scales up to powers
of two, silently changing the checkpoint's numerics; ``disable_ue8m0_cast=True`` keeps sm90 on the fp32 path.
Shapes: K a multiple of 128 (whole groups) and N a multiple of 64 (vLLM's rule for this kernel): in the spec.
DeepGEMM JIT-compiles each kernel configuration with nvcc on first use (cached in ``$DG_JIT_CACHE_DIR``).

Per call nothing is re-laid out: DeepGEMM on sm90 takes the fp32 ``[N/128, K/128]`` weight scales as stored (it
only checks them), and the activation scales are written by the quantizer directly in the MN-major, TMA-aligned
layout DeepGEMM would otherwise copy them into. So ``pack`` has nothing to re-lay out either, and ``apply`` is the
quantizer, the GEMM and the one bias pass. vLLM is imported through ``lightq_vllm.importing`` so that its import
does not switch off cuDNN attention for the rest of the process.
"""

from __future__ import annotations

import importlib
import os
import shutil

import torch

from lightq.backends.base import Backend
from lightq.errors import BackendUnavailable
from lightq.quant.schemes import FP8_DTYPE, FP8_MAX, GROUP, QuantizedWeight
from lightq_vllm.importing import import_vllm


def _require_nvcc() -> None:
    """DeepGEMM finds the CUDA toolkit as below and asserts at import if it cannot; say so clearly instead."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or shutil.which("nvcc") \
            or os.path.exists("/usr/local/cuda"):
        return
    raise BackendUnavailable("backend 'deepgemm': DeepGEMM compiles its kernels with nvcc at run time and no CUDA "
                             "toolkit was found; install it or set CUDA_HOME")


def _import_deep_gemm():
    """A standalone ``deep_gemm`` install first (the user chose its version), else the copy bundled in vLLM."""
    try:
        return importlib.import_module("deep_gemm")
    except ImportError:
        return import_vllm("vllm.third_party.deep_gemm")


_require_nvcc()
deep_gemm = _import_deep_gemm()  # any failure here becomes BackendUnavailable in BackendSpec.load()
import_vllm("vllm._custom_ops")  # registers torch.ops._C.per_token_group_fp8_quant

_EPS = 1e-10  # the kernel's floor on a group's max|x| (an all-zero group quantizes to zeros either way)


def _tma_aligned_scales(m: int, groups: int, device) -> torch.Tensor:
    """Empty fp32 ``[m, groups]`` with DeepGEMM's sm90 scale layout: MN-major, columns padded to 16 bytes."""
    aligned_m = -(-m // 4) * 4
    return torch.empty_strided((m, groups), (1, aligned_m), dtype=torch.float32, device=device)


class DeepGemmBackend(Backend):
    """``fp8-b128``: 1x128 fp8 activations x 128x128-block fp8 weights on DeepGEMM."""

    split_gemm = True

    def version(self) -> str:
        return getattr(deep_gemm, "__version__", "")

    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        self.check_scheme(qw.scheme)
        return {"data": qw.data.contiguous(), "scale": qw.scale.float().contiguous()}

    def quantize_activation(self, x2: torch.Tensor, scheme: str = "fp8-b128") -> tuple[torch.Tensor, torch.Tensor]:
        """1x128 group quantization of a contiguous ``[M, K]`` tensor: (x_q ``[M, K]``, s_x ``[M, K/128]`` TMA-aligned)."""
        m, k = x2.shape
        xq = torch.empty((m, k), dtype=FP8_DTYPE, device=x2.device)
        sx = _tma_aligned_scales(m, k // GROUP, x2.device)
        torch.ops._C.per_token_group_fp8_quant(x2, xq, sx, GROUP, _EPS, -FP8_MAX, FP8_MAX, False, True, True)
        return xq, sx

    def gemm_only(self, xq: torch.Tensor, sx: torch.Tensor, packed: dict[str, torch.Tensor],
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        """DeepGEMM on an already quantized activation, then the bias in one pass; ``[M, N]`` in ``out_dtype``."""
        out = torch.empty((xq.shape[0], packed["data"].shape[0]), dtype=torch.bfloat16, device=xq.device)
        deep_gemm.fp8_gemm_nt((xq, sx), (packed["data"], packed["scale"]), out, disable_ue8m0_cast=True)
        return _add_bias(out, bias, out_dtype)

    def apply(self, x, packed, scheme, bias):
        x2 = self.flat_input(x, packed["data"].shape[1], scheme)
        xq, sx = self.quantize_activation(x2)
        return self.gemm_only(xq, sx, packed, bias, x.dtype).reshape(*x.shape[:-1], -1)


def _add_bias(out: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """bf16 ``out`` + ``bias`` in ``out_dtype``: the sum is computed in fp32 (an fp32 bias promotes the add; a bf16
    or fp16 one is upcast inside the kernel) and rounded once. One read and one write of ``out``."""
    if out_dtype == torch.bfloat16:
        return out if bias is None else out.add_(bias)
    if bias is None:
        return out.to(out_dtype)
    return torch.add(out, bias.float(), out=torch.empty_like(out, dtype=out_dtype))


