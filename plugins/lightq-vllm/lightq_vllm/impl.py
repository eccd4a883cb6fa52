"""vLLM's CUTLASS kernels for the ``fp8``, ``int8`` and ``fp8-pertensor`` schemes.

    x_q, s_x = per-token dynamic quantization of x  (``scaled_fp8_quant(use_per_token_if_dynamic=True)``:
               s_x = max|x_m| / 448;  ``scaled_int8_quant``: s_x = max|x_m| / 127, round to nearest even)
    y        = cutlass_scaled_mm(x_q [M, K], W_q^T [K, N], s_x [M, 1], s_w [N, 1], out_dtype, bias)
             = (s_x s_w^T) * (x_q @ W_q^T) + bias      fp32 (fp8) / exact int32 (int8) accumulation, the scales
                                                       and the bias applied in the epilogue, one final rounding
    fp8-pertensor: x_q = ``scaled_fp8_quant(x, t)`` with the layer's static ``input_scale`` t (vLLM's
               ``static_scaled_fp8_quant``), or ``scaled_fp8_quant(x)`` (dynamic: t = max|x| / 448); either
               multiplies by 1 / t in fp32 where lightq's rule divides by t, which can move a code by one at a
               rounding tie. cutlass_scaled_mm takes the one-value scales t and s as they are.

``cutlass_scaled_mm`` wants its second operand column-major ``[K, N]``: that is the transpose *view* of the row-major
``[N, K]`` checkpoint tensor, so ``pack`` keeps the checkpoint tensors as they are (one checkpoint for every backend)
and ``gemm_only`` passes ``data.t()``, which costs nothing. CUTLASS needs K and N to be multiples of 16 (vLLM
otherwise silently switches to a Triton kernel); the spec declares it so ``can_implement`` rejects such layers.

Per call, ``apply`` launches the quantizer and the GEMM and nothing else: ``x`` is flattened to ``[M, K]`` as a
view (the fp8 quantizer reads rows with any stride, so a sliced ``[B, L, K]`` input is not copied; vLLM's int8
quantizer makes its own contiguous copy when it needs one), the weight and its scales are used as packed, and the
bias is fused into the GEMM's epilogue. vLLM is imported through ``lightq_vllm.importing`` so that its import
does not switch off cuDNN attention for the rest of the process.
"""

from __future__ import annotations

import torch

from lightq.backends.base import Backend
from lightq.quant.schemes import PER_TENSOR, QuantizedWeight

from .importing import import_vllm

ops = import_vllm("vllm._custom_ops")  # any failure here becomes BackendUnavailable in BackendSpec.load()



class VllmBackend(Backend):
    """``fp8`` / ``int8``: per-token activations x per-channel weights; ``fp8-pertensor``: one scale each, static
    or dynamic; on vLLM's CUTLASS GEMM."""

    split_gemm = True

    def version(self) -> str:
        import vllm

        return vllm.__version__

    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        self.check_scheme(qw.scheme)
        if qw.scheme != PER_TENSOR:
            return {"data": qw.data.contiguous(), "scale": qw.scale.float().contiguous()}
        packed = {"data": qw.data.contiguous(), "scale": qw.scale.float().reshape(1)}  # one value, as vLLM's [1]
        return packed if qw.input_scale is None else {**packed, "input_scale": qw.input_scale.float().reshape(1)}

    def quantize_activation(self, x2: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token quantization of an ``[M, K]`` bf16/fp16 tensor whose last dimension is contiguous (rows may be
        strided): (x_q ``[M, K]`` contiguous, s_x ``[M, 1]`` fp32)."""
        if scheme == "fp8":
            return ops.scaled_fp8_quant(x2, use_per_token_if_dynamic=True)
        if scheme == PER_TENSOR:  # dynamic per tensor (apply passes a layer's static input_scale itself)
            return ops.scaled_fp8_quant(x2.contiguous())
        xq, sx, _ = ops.scaled_int8_quant(x2)
        return xq, sx

    def gemm_only(self, xq: torch.Tensor, sx: torch.Tensor, packed: dict[str, torch.Tensor],
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        """The scaled GEMM alone (bias fused) on an already quantized activation; ``[M, N]`` in ``out_dtype``."""
        b = None if bias is None else bias.to(out_dtype)
        return ops.cutlass_scaled_mm(xq, packed["data"].t(), sx, packed["scale"], out_dtype, b)

    def apply(self, x, packed, scheme, bias):
        x2 = self.flat_input(x, packed["data"].shape[1], scheme, contiguous=False)
        static = packed.get("input_scale")
        if static is not None:
            xq, sx = ops.scaled_fp8_quant(x2.contiguous(), scale=static)
        else:
            xq, sx = self.quantize_activation(x2, scheme)
        return self.gemm_only(xq, sx, packed, bias, x.dtype).reshape(*x.shape[:-1], -1)


