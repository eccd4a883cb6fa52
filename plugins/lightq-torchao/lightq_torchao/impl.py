"""torchao's int8 dynamic-activation / int8-weight linear, fed with lightq's int8 checkpoint, under torch.compile.

What runs is exactly torchao 0.18's ``Int8DynamicActivationInt8WeightConfig`` linear: the weight is torchao's
``Int8Tensor`` (plain layout, ``PerRow`` granularity, block size ``[1, K]``) and ``F.linear`` dispatches to its
implementation, which

    quantizes x per token:  t = bf16/fp16(max|x_m| / 127.5),  x_q = clamp(round(x / t), -128, 127)
    y = (int_scaled_matmul(x_q, W_q^T, t) rounded to x.dtype) * s_w + bias

The weight is not re-quantized: ``Int8Tensor(qdata=W_q, scale=s_w)`` wraps the checkpoint's int8 data ``[N, K]`` and
fp32 scales ``[N, 1]`` as they are (the values lie in [-127, 127], a subset of torchao's range), so one int8
checkpoint serves this backend and every other int8 backend. The activation rule is torchao's, not lightq's
``int8`` rule (max|x| / 127, range +-127): the two grids differ by 0.4 % in step and torchao rounds its scale to
16 bits; the GPU test bounds the difference against ``int8-torch`` and checks torchao's own rule exactly.

Speed: eager torchao runs the quantization as a chain of separate torch ops and is about 10x slower than a bf16
matmul; under ``torch.compile`` inductor fuses the quantization and the scale multiply into the int8 matmul
(``force_fuse_int_mm_with_mul``). ``apply`` therefore always runs the compiled function (dynamic shapes: one graph
per in_features, activation dtype and bias / no bias; the first call of each compiles, taking seconds). ``apply_eager`` runs
the same code without compilation, for checks and benchmarks only. The inductor settings torchao recommends are
passed as options of this compiled function only; no process-wide setting is changed. ``quantize_activation``
(torchao's quantizer alone, a benchmark and test hook) stays eager, so that the test can hold it to torchao's rule
exactly (inductor keeps intermediates in fp32, so a compiled quantizer need not round the scale to the activation
dtype as eager torchao does); ``apply`` never calls it: there the quantization is fused into the compiled graph.

Small M: the compiled int8 matmul is ``torch._int_mm``, which on CUDA needs more than 16 rows. Inputs of at most 16
rows are padded with zero rows to 17 (a zero row quantizes to zero codes) and the result is sliced back; the
padded rows never reach the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchao.kernel import int_scaled_matmul  # any failure here becomes BackendUnavailable in BackendSpec.load()
from torchao.quantization import Int8Tensor, MappingType, PerRow
from torchao.quantization.quantize_.workflows.int8.int8_tensor import QuantizeTensorToInt8Kwargs

from lightq.backends.base import Backend
from lightq.quant.schemes import QuantizedWeight

# Int8DynamicActivationInt8WeightConfig() defaults: symmetric per-row activations, full int8 range.
_ACT_QUANT = QuantizeTensorToInt8Kwargs(granularity=PerRow(), mapping_type=MappingType.SYMMETRIC)
_INDUCTOR_OPTIONS = {"force_fuse_int_mm_with_mul": True, "coordinate_descent_tuning": True,
                     "coordinate_descent_check_all_directions": True}


def torchao_weight(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> Int8Tensor:
    """torchao's ``Int8Tensor`` around an existing int8 ``[N, K]`` weight and its fp32 ``[N, 1]`` scales (no copy)."""
    return Int8Tensor(qdata, scale, [1, qdata.shape[1]], dtype, act_quant_kwargs=_ACT_QUANT)


def _linear(x2: torch.Tensor, weight: Int8Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x2, weight, bias)


def _gemm(xq, sx, qdata, scale, bias, out_dtype):
    y = int_scaled_matmul(xq, qdata.t(), sx.reshape(-1, 1).float()).to(out_dtype) * scale.reshape(-1)
    if bias is not None:
        y = y + bias
    return y.to(out_dtype)


# dynamic=True: one graph serves every M. The weight subclass's metadata (block size [1, K], dtype) is guarded
# on, so each (K, dtype, bias or not) gets its own graph; a Wan model has 2-3 K values, a benchmark sweep more,
# hence the higher recompile limit applied around these calls only (past the limit dynamo would silently run eager).
_compiled_linear = torch.compile(_linear, dynamic=True, options=_INDUCTOR_OPTIONS)
_compiled_gemm = torch.compile(_gemm, dynamic=True, options=_INDUCTOR_OPTIONS)

_MAX_GRAPHS = 64
_INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA: M > 16


def _more_graphs():
    return torch._dynamo.config.patch(recompile_limit=max(_MAX_GRAPHS, torch._dynamo.config.recompile_limit))


class TorchaoBackend(Backend):
    """``int8`` with torchao's Int8Tensor linear, compiled."""

    split_gemm = True

    def version(self) -> str:
        import torchao

        return torchao.__version__

    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        self.check_scheme(qw.scheme)
        return {"data": qw.data.contiguous(), "scale": qw.scale.float().contiguous()}

    def apply(self, x, packed, scheme, bias):
        with _more_graphs():
            return self._run(_compiled_linear, x, packed, scheme, bias)

    def apply_eager(self, x, packed, scheme, bias):
        """``apply`` without torch.compile (about 10x slower): for checks and benchmarks."""
        return self._run(_linear, x, packed, scheme, bias)

    def quantize_activation(self, x2: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
        """torchao's per-token activation quantization (eager): (x_q ``[M, K]`` int8, t ``[M, 1]`` fp32)."""
        self.check_scheme(scheme)
        act = Int8Tensor.from_hp(x2, _ACT_QUANT.granularity, mapping_type=_ACT_QUANT.mapping_type)
        return act.qdata, act.scale.reshape(-1, 1)

    def gemm_only(self, xq: torch.Tensor, sx: torch.Tensor, packed: dict[str, torch.Tensor],
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        """torchao's scaled int8 GEMM (``int_scaled_matmul`` then the weight scales and bias), compiled."""
        b = None if bias is None else bias.to(out_dtype)
        m = xq.shape[0]
        with _more_graphs():
            y = _compiled_gemm(_pad_rows(xq), _pad_rows(sx), packed["data"], packed["scale"], b, out_dtype)
        return y[:m]

    def _run(self, linear, x, packed, scheme, bias):
        x2 = self.flat_input(x, packed["data"].shape[1], scheme)
        b = None if bias is None else bias.to(x.dtype)
        weight = torchao_weight(packed["data"], packed["scale"], x.dtype)
        return linear(_pad_rows(x2), weight, b)[: x2.shape[0]].reshape(*x.shape[:-1], -1)


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with zero rows appended up to 17 rows where ``torch._int_mm`` needs them (CUDA, at most 16 rows)."""
    if t.is_cuda and t.shape[0] < _INT_MM_MIN_ROWS:
        return torch.nn.functional.pad(t, (0, 0, 0, _INT_MM_MIN_ROWS - t.shape[0]))
    return t


