"""The ``triton`` backend: lightq's own fast path for ``fp8`` and ``int8`` (per-channel weights x per-token
activations), on CUDA.

    x_q, s_x = lightq.kernels.act_quant          one pass over x, bit-identical to ``quantize_activation``
    fp8:  y  = torch._scaled_mm(x_q, W_q^T, s_x, s_w^T, bias, bf16)     row-wise scales, bias fused (CUTLASS)
    int8: y  = lightq.kernels.int8_gemm          Triton int8 GEMM, scales and bias fused in the epilogue

Options (``with_options``; a mode's ``options`` in the config): ``fast_accum`` (default False) lets ``_scaled_mm``
accumulate in the fp8 tensor cores' reduced-precision accumulator instead of promoting partial sums to fp32 every
few k-blocks: faster, less accurate (``scripts/diag/scaled_mm_variants.py`` measures both on the GPU);
``fuse_bias`` (default True) adds the bias in ``_scaled_mm``'s fp32 epilogue (one rounding) instead of to its
bf16 output.

``_scaled_mm``'s row-wise path outputs bf16 only: for fp16 activations the bias is added in fp32 after it and the
result rounded to fp16 (two roundings, as the torch backend does). ``gemm_only(x_q, s_x, packed, bias, out_dtype)``
is the GEMM alone, and is what the fused DiT block (``lightq.fused.wan_block``) calls after its fused
norm + modulation + quantization kernels.

The first weight of a scheme packed on a CUDA machine runs that scheme's kernels once on a small input of the
layer's width and compares them with the torch reference: a kernel that fails to build or disagrees on this GPU
makes the load fail with ``BackendUnavailable`` naming the kernel, instead of crashing a run half-way. Only the
job's own scheme is compiled, at the width the model uses (so the check shares its compiled kernels with the job).
"""

from __future__ import annotations

import copy

import torch

from ..errors import BackendUnavailable, LightqError
from ..quant import schemes
from .base import Backend
from .spec import BackendSpec
from .triton_spec import SPEC  # noqa: F401  (re-exported for callers that build the backend directly)

OPTIONS = {"fast_accum": False, "fuse_bias": True}


class TritonBackend(Backend):
    """``fp8`` / ``int8`` on lightq's Triton kernels (see the module docstring)."""

    split_gemm = True
    fused_blocks = True  # pack keeps the checkpoint layout; gemm_only takes lightq.kernels.act_quant's output

    def __init__(self, spec: BackendSpec):
        super().__init__(spec)
        self.options = dict(OPTIONS)
        import triton  # noqa: F401  (a failure here is reported by BackendSpec.load)

        from ..kernels.act_quant import act_quant
        from ..kernels.int8_gemm import int8_scaled_mm

        self._act_quant, self._int8_scaled_mm = act_quant, int8_scaled_mm
        self._tested: set[str] = set()  # schemes whose kernels passed the self-test (shared by with_options copies)

    def with_options(self, options: dict) -> "TritonBackend":
        """A copy of this backend with ``options`` (keys of ``OPTIONS``, bool values) applied; others untouched."""
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise LightqError(f"backend 'triton' has no option {', '.join(sorted(unknown))}; its options are "
                              f"{', '.join(OPTIONS)}")
        bad = {k: v for k, v in options.items() if not isinstance(v, bool)}
        if bad:
            raise LightqError(f"backend 'triton': options take true / false, got {bad}")
        other = copy.copy(self)
        other.options = {**self.options, **options}
        return other

    def version(self) -> str:
        import triton

        return triton.__version__

    def pack(self, qw: schemes.QuantizedWeight) -> dict[str, torch.Tensor]:
        self.check_scheme(qw.scheme)
        if qw.scheme not in self._tested and torch.cuda.is_available():
            self._tested.add(qw.scheme)  # before the test, which packs a weight of its own
            self._self_test(qw.scheme, qw.in_features)
        return {"data": qw.data.contiguous(), "scale": qw.scale.float().contiguous()}

    def quantize_activation(self, x2: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token quantization of ``[M, K]`` (unit column stride): (codes, fp32 scales ``[M, 1]``)."""
        return self._act_quant(x2, scheme == "fp8", False)

    def gemm_only(self, xq: torch.Tensor, sx: torch.Tensor, packed: dict[str, torch.Tensor],
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        """``(x_q @ W_q^T) * s_x * s_w^T + bias`` as ``[M, N]`` in ``out_dtype``, on already quantized ``x_q``."""
        w, sw = packed["data"], packed["scale"]
        if w.dtype == torch.int8:
            return self._int8_scaled_mm(xq, w, sx, sw, bias, out_dtype)
        fused_bias = bias is not None and out_dtype == torch.bfloat16 and self.options["fuse_bias"]
        y = torch._scaled_mm(xq, w.t(), scale_a=sx, scale_b=sw.reshape(1, -1), out_dtype=torch.bfloat16,
                             bias=bias.to(torch.bfloat16) if fused_bias else None,
                             use_fast_accum=self.options["fast_accum"])
        if bias is not None and not fused_bias:
            return (y.float() + bias.float()).to(out_dtype)
        return y.to(out_dtype)

    def apply(self, x, packed, scheme, bias):
        x2 = self.flat_input(x, packed["data"].shape[1], scheme, contiguous=False)
        xq, sx = self.quantize_activation(x2, scheme)
        return self.gemm_only(xq, sx, packed, bias, x.dtype).reshape(*x.shape[:-1], -1)

    def _self_test(self, scheme: str, k: int) -> None:
        """Run ``scheme``'s kernels once on a ``[33, k]`` input against the torch reference."""
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(33, k, device="cuda", generator=gen).to(torch.bfloat16)
        w = torch.randn(48, k, device="cuda", generator=gen)
        try:
            xq, sx = self.quantize_activation(x, scheme)
            rq, rs = schemes.quantize_activation(x, scheme)
            if not (torch.equal(xq.view(torch.int8), rq.view(torch.int8)) and torch.equal(sx, rs)):
                raise RuntimeError("activation codes differ from quantize_activation")
            qw = schemes.quantize_weight(w, scheme)
            y = self.gemm_only(xq, sx, self.pack(qw), None, torch.float32 if scheme == "int8" else torch.bfloat16)
            ref = (xq.float() @ qw.data.float().t()) * sx * qw.scale.t()
            if not torch.allclose(y.float(), ref, rtol=2 ** -7, atol=1e-3 * ref.abs().max().item()):
                raise RuntimeError("GEMM result differs from the float reference")
        except Exception as exc:
            raise BackendUnavailable(f"backend 'triton': the {scheme} kernels fail on this GPU "
                                     f"({type(exc).__name__}: {exc}); use mode {scheme}-torch or another "
                                     f"{scheme} backend") from exc

