"""sglang-kernel's CUTLASS kernels for the ``fp8``, ``int8`` and ``fp8-pertensor`` schemes.

    x_q, s_x = per-token dynamic quantization of x:
               fp8  ``sgl_per_token_quant_fp8`` (sgl-kernel's CUDA kernel): s_x = max|x_m| / 448 in fp32, bf16 and
                    fp16 inputs alike
               int8 sglang-kernel 0.4.6 has no per-token int8 quantizer (its per-token-group kernel takes groups of
                    at most 128 elements, which is not this scheme), so the first fused one available is used, in
                    this order: vLLM's ``scaled_int8_quant`` (when vLLM and lightq-vllm are installed), lightq's
                    Triton ``act_quant`` (``torch.ops.lightq.act_quant``, when Triton is), else lightq's eager
                    reference quantizer. All three follow lightq's ``int8`` rule (s_x = max|x_m| / 127); vLLM
                    multiplies by 127 / max|x_m| instead of dividing, which can move a code by one.
                    ``SglBackend.int8_quantizer`` names the one in use.
    y        = fp8_scaled_mm / int8_scaled_mm(x_q [M, K], W_q^T [K, N] column-major, s_x [M, 1], s_w [N, 1],
               out_dtype, bias)  =  (s_x s_w^T) * (x_q @ W_q^T) + bias: fp32 epilogue, the bias (in out_dtype)
               added before the one final rounding into out_dtype (bf16 or fp16)

fp8-pertensor: x_q = e4m3(x / t), static with the layer's ``input_scale`` t, else dynamic (t = max|x| / 448), by
the first quantizer available, in this order: sglang-kernel's ``sgl_per_tensor_quant_fp8`` (newer releases than
0.4.6, which has none), vLLM's ``scaled_fp8_quant`` (with vLLM and lightq-vllm installed), lightq's eager reference.
The two kernels multiply by 1 / t in fp32 where lightq's rule divides by t (a code can move by one at a rounding
tie). ``SglBackend.per_tensor_quantizer`` names the one in use. ``fp8_scaled_mm`` takes row-wise scales only, so t
is given for every row and s for every column: the same product.

The column-major ``[K, N]`` operand is the free transpose view of the row-major ``[N, K]`` checkpoint tensor, so
``pack`` keeps the checkpoint tensors unchanged. The kernels need K a multiple of 16 and N a multiple of 16 (fp8;
8 for int8): declared in the spec. sgl's fp8 quantizer reads rows at a fixed pitch of K elements, so ``apply``
makes a non-contiguous input contiguous first (a no-op for the contiguous activations a model passes).
"""

from __future__ import annotations

import functools
from typing import Callable

import sgl_kernel  # any failure here becomes BackendUnavailable in BackendSpec.load()
import torch

from lightq.backends.base import Backend
from lightq.quant.schemes import FP8_DTYPE, PER_TENSOR, QuantizedWeight, quantize_activation

Int8Quantizer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
PerTensorQuantizer = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]



class SglBackend(Backend):
    """``fp8`` / ``int8``: per-token activations x per-channel weights on sglang-kernel's GEMMs."""

    split_gemm = True

    def version(self) -> str:
        from importlib.metadata import version

        return version("sglang-kernel")

    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        self.check_scheme(qw.scheme)
        if qw.scheme != PER_TENSOR:
            return {"data": qw.data.contiguous(), "scale": qw.scale.float().contiguous()}
        # fp8_scaled_mm's weight scales are per column: the one value s on each of the N columns
        packed = {"data": qw.data.contiguous(), "scale": qw.scale.float().reshape(1, 1).expand(qw.out_features, 1)
                  .contiguous()}
        return packed if qw.input_scale is None else {**packed, "input_scale": qw.input_scale.float().reshape(1)}

    @property
    def int8_quantizer(self) -> str:
        """Which per-token int8 quantizer ``int8`` uses here (see the module doc)."""
        return _int8_quantizer()[0]

    def quantize_activation(self, x2: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token quantization of a contiguous ``[M, K]`` bf16/fp16 tensor: (x_q ``[M, K]``, s_x ``[M, 1]`` fp32)."""
        if scheme == "int8":
            return _int8_quantizer()[1](x2)
        if scheme == PER_TENSOR:  # dynamic per tensor (apply passes a layer's static input_scale itself)
            return self._per_tensor(x2, None)
        xq = torch.empty(x2.shape, dtype=FP8_DTYPE, device=x2.device)
        sx = torch.empty((x2.shape[0], 1), dtype=torch.float32, device=x2.device)
        sgl_kernel.sgl_per_token_quant_fp8(x2, xq, sx)
        return xq, sx

    @property
    def per_tensor_quantizer(self) -> str:
        """Which per-tensor fp8 quantizer ``fp8-pertensor`` uses here (see the module doc)."""
        return _per_tensor_quantizer()[0]

    @staticmethod
    def _per_tensor(x2: torch.Tensor, static: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_q, t ``[1]``): static with ``static`` as t, else dynamic."""
        xq, t = _per_tensor_quantizer()[1](x2, static)
        return xq, t.float().reshape(1)

    def gemm_only(self, xq: torch.Tensor, sx: torch.Tensor, packed: dict[str, torch.Tensor],
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        """The scaled GEMM alone (bias fused) on an already quantized activation; ``[M, N]`` in ``out_dtype``."""
        b = None if bias is None else bias.to(out_dtype)
        if sx.numel() == 1:  # fp8-pertensor (or one token): row-wise scales only, t on every row
            sx = sx.reshape(1, 1).expand(xq.shape[0], 1).contiguous()
        gemm = sgl_kernel.fp8_scaled_mm if xq.dtype == FP8_DTYPE else sgl_kernel.int8_scaled_mm
        return gemm(xq, packed["data"].t(), sx, packed["scale"], out_dtype, b)

    def apply(self, x, packed, scheme, bias):
        x2 = self.flat_input(x, packed["data"].shape[1], scheme)
        static = packed.get("input_scale")
        xq, sx = self._per_tensor(x2, static) if static is not None else self.quantize_activation(x2, scheme)
        return self.gemm_only(xq, sx, packed, bias, x.dtype).reshape(*x.shape[:-1], -1)


@functools.cache
def _int8_quantizer() -> tuple[str, Int8Quantizer]:
    """(name, function) of the fastest per-token int8 quantizer importable here; chosen once, on first use, so
    that fp8-sgl never imports vLLM."""
    try:
        from lightq_vllm.importing import import_vllm

        vllm_ops = import_vllm("vllm._custom_ops")
        return "vllm scaled_int8_quant", lambda x2: vllm_ops.scaled_int8_quant(x2)[:2]
    except Exception:  # lightq-vllm or vLLM missing or broken: not an error, the next quantizer serves
        pass
    try:
        from lightq.kernels import act_quant  # noqa: F401  (imports Triton, registers torch.ops.lightq.act_quant)

        return "lightq triton act_quant", lambda x2: torch.ops.lightq.act_quant(x2, False, False)
    except Exception:  # no Triton here
        return "lightq eager reference", lambda x2: quantize_activation(x2, "int8")




@functools.cache
def _per_tensor_quantizer() -> tuple[str, PerTensorQuantizer]:
    """(name, function) of the per-tensor fp8 quantizer importable here (the module doc's order), chosen once."""
    if hasattr(sgl_kernel, "sgl_per_tensor_quant_fp8"):
        def sgl(x2, static):
            xq = torch.empty(x2.shape, dtype=FP8_DTYPE, device=x2.device)
            t = torch.zeros(1, dtype=torch.float32, device=x2.device) if static is None else static.float().clone()
            sgl_kernel.sgl_per_tensor_quant_fp8(x2, xq, t, static is not None)
            return xq, t
        return "sgl sgl_per_tensor_quant_fp8", sgl
    try:
        from lightq_vllm.importing import import_vllm

        vllm_ops = import_vllm("vllm._custom_ops")
        return ("vllm scaled_fp8_quant",
                lambda x2, static: vllm_ops.scaled_fp8_quant(x2, None if static is None else static.float()))
    except Exception:  # lightq-vllm or vLLM missing or broken: the reference serves
        return "lightq eager reference", lambda x2, static: quantize_activation(x2, PER_TENSOR, static)
