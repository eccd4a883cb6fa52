"""Marlin int4 group-128 weight-only GEMM, through vLLM's compiled ops, for the ``int4-g128`` scheme.

    y = x @ (q * s)^T + bias,   q in [-7, 7] stored as uint4b8 nibbles, s one scale per 128 inputs per output

``pack`` turns the checkpoint into Marlin's tiles: ``gptq_marlin_repack`` (vLLM's CUDA op; so packing needs a CUDA
device, the result is returned on the weight's device) on the GPTQ view of the data, the group scales permuted
into Marlin's order (``layout.py``, written here) and cast to bf16 and fp16 (Marlin multiplies in the activation
dtype; both casts are kept, they cost N*K/64 bytes each, 1/32 of the int4 data). ``apply`` runs ``marlin_gemm``
with scalar type ``uint4b8``, no act-order (empty g_idx / perm), no zero points, fp32 global reduction, and a
per-device workspace of one int32 lock per SM (zeroed once; the kernel leaves it zeroed). The bias is added after
the GEMM (Marlin's fused bias wants its own permutation of the bias; the bias belongs to the layer, not the pack).

Numerics versus the ``int4-g128-torch`` reference: Marlin rounds each scale to the activation dtype and the
dequantized weight q*s once more, so a weight element may differ from the reference's (q*s rounded once) by up to
3 units of that dtype's roundoff; the GPU test bounds the output with exactly that.
Shapes: K a multiple of 128 and N a multiple of 64 (Marlin's thread tiles), declared in the spec.
"""

from __future__ import annotations

import torch

from lightq.backends.base import Backend
from lightq.errors import BackendUnavailable, QuantizationError
from lightq.quant.schemes import QuantizedWeight
from lightq_vllm.importing import import_vllm

from .layout import gptq_words, marlin_group_scales

# Through import_vllm: importing vLLM must not switch off cuDNN attention for the rest of the process.
ops = import_vllm("vllm._custom_ops")  # any failure here becomes BackendUnavailable in BackendSpec.load()
scalar_types = import_vllm("vllm.scalar_type").scalar_types

_SCALE_KEYS = {torch.bfloat16: "scale_bf16", torch.float16: "scale_fp16"}


class MarlinBackend(Backend):
    """``int4-g128`` on Marlin (bf16 / fp16 activations, fp32 accumulation)."""

    def __init__(self, spec):
        super().__init__(spec)
        self._workspaces: dict[torch.device, torch.Tensor] = {}

    def version(self) -> str:
        import vllm

        return vllm.__version__

    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        if qw.scheme not in self.spec.schemes:
            raise QuantizationError(f"backend 'marlin' implements int4-g128 only, not '{qw.scheme}'")
        home = qw.data.device
        if home.type == "cuda":
            gpu = home
        elif torch.cuda.is_available():
            gpu = torch.device("cuda", torch.cuda.current_device())
        else:
            raise BackendUnavailable("backend 'marlin' repacks weights with a CUDA kernel and no GPU is visible")
        n, k = qw.out_features, qw.in_features
        no_perm = torch.empty(0, dtype=torch.int32, device=gpu)
        qweight = ops.gptq_marlin_repack(gptq_words(qw.data.to(gpu)), no_perm, k, n, 4)
        scales = marlin_group_scales(qw.scale.to(gpu).float())
        packed = {"qweight": qweight}
        packed.update({key: scales.to(dtype) for dtype, key in _SCALE_KEYS.items()})
        return {name: t.to(home) for name, t in packed.items()}

    def apply(self, x, packed, scheme, bias):
        qweight = packed["qweight"]
        k = qweight.shape[0] * 16
        x2 = self.flat_input(x, k, scheme)
        scales = packed[_SCALE_KEYS[x.dtype]]
        n = scales.shape[1]
        empty = torch.empty(0, dtype=torch.int32, device=x.device)
        y = ops.marlin_gemm(x2, None, qweight, None, scales, None, None, empty, empty, empty,
                            self._workspace(x.device), scalar_types.uint4b8, size_m=x2.shape[0], size_n=n,
                            size_k=k, is_k_full=True, use_atomic_add=False, use_fp32_reduce=True,
                            is_zp_float=False)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], n)

    def _workspace(self, device: torch.device) -> torch.Tensor:
        """Marlin's lock buffer: one int32 per SM (vLLM's ``marlin_make_workspace_new`` size), zeroed."""
        if device not in self._workspaces:
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            self._workspaces[device] = torch.zeros(sms, dtype=torch.int32, device=device)
        return self._workspaces[device]
