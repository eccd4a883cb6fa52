"""Pre-quantized checkpoint layouts: recognise them, read one quantized linear, validate it against the mode.

Layouts (``<p>`` is a linear's key prefix, ``[N, K]`` = ``[out, in]``):

``lightx2v``  ``<p>.weight`` int8 / float8_e4m3fn ``[N, K]`` + ``<p>.weight_scale`` fp32 ``[N, 1]``; W = data * scale.
              LightX2V's converter computes scales in the source dtype, so files made from the bf16 release
              carry bf16 scales: those are accepted (bf16 -> fp32 is exact); any other non-fp32 scale is refused.
``lightq``    the same keys for every scheme of ``lightq.quant.schemes`` (fp8-b128 scale ``[ceil(N/128),
              ceil(K/128)]``, int4-g128 uint8 ``[N, K/2]`` + scale ``[K/128, N]``), and the header metadata
              ``lightq.scheme``, ``lightq.granularity``, ``lightq.component``, ``lightq.source_sha256``,
              ``lightq.version``.
``comfyui``   scaled fp8 (ComfyUI ``scaled_fp8_ops``): ``<p>.weight`` float8_e4m3fn + ``<p>.scale_weight`` fp32
              scalar (one scale per tensor, W = data * scale_weight), an optional ``<p>.scale_input`` (a static
              per-tensor activation scale, x_q = x / scale_input), and a ``scaled_fp8`` marker tensor whose dtype
              is the weights' fp8 dtype. A per-tensor scale s is converted exactly to lightq's per-channel fp8
              layout: data unchanged, scale ``[N, 1]`` filled with s. ``scale_input`` is validated and not used:
              lightq quantizes activations dynamically per token (a finer scale than one static per tensor).

Every check names the tensor: wrong scheme for the mode, missing scale, scale of the wrong shape (transposed
included) or dtype, NaN/Inf in data or scale, a float weight where the mode expects a quantized one.
"""

from __future__ import annotations

import math

import torch

from ..errors import CheckpointError
from ..quant import schemes
from .sources import TensorSource

SCALE = ".weight_scale"
COMFY_SCALE = ".scale_weight"
COMFY_INPUT_SCALE = ".scale_input"
COMFY_MARKER = "scaled_fp8"
GRANULARITY = {"fp8": "per-channel", "int8": "per-channel", "fp8-b128": "block128", "int4-g128": "group128"}
QUANT_DTYPES = {schemes.FP8_DTYPE: "fp8", torch.int8: "int8", torch.uint8: "int4-g128", torch.float8_e5m2: "fp8-e5m2"}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def layout_of(source: TensorSource) -> str:
    """``lightq`` | ``comfyui`` | ``lightx2v`` | ``float`` (no quantized tensor)."""
    if "lightq.scheme" in source.metadata:
        return "lightq"
    if COMFY_MARKER in source or any(k.endswith(COMFY_SCALE) for k in source):
        return "comfyui"
    if any(k.endswith(SCALE) for k in source):
        return "lightx2v"
    return "float"


def aux_keys(source: TensorSource, prefix: str) -> list[str]:
    """The scale keys that belong to linear ``prefix`` in this file (consumed with its weight)."""
    return [prefix + s for s in (SCALE, COMFY_SCALE, COMFY_INPUT_SCALE) if prefix + s in source]


def is_quantized(source: TensorSource, prefix: str) -> bool:
    """Does the file hold ``<prefix>.weight`` quantized (by its dtype, or by a scale next to it)?"""
    key = prefix + ".weight"
    return bool(aux_keys(source, prefix)) or (key in source and source.dtype(key) in QUANT_DTYPES)


def file_scheme(source: TensorSource, prefix: str) -> str:
    """The scheme the file stores linear ``prefix`` in (from metadata, dtype and scale shape)."""
    key = prefix + ".weight"
    kind = QUANT_DTYPES.get(source.dtype(key), "float")
    if kind == "float" and not aux_keys(source, prefix):
        return "float"
    meta = source.metadata.get("lightq.scheme")
    if meta:
        return meta
    if prefix + COMFY_SCALE in source:
        return "fp8"
    if kind == "fp8" and prefix + SCALE in source:
        n, k = source.shape(key)
        if tuple(source.shape(prefix + SCALE)) == (-(-n // schemes.BLOCK), -(-k // schemes.BLOCK)) and n > 1:
            return "fp8-b128"
    return kind


def check_file_scheme(source: TensorSource, scheme: str | None, component: str | None = None) -> None:
    """File-level check of lightq header metadata against the requested scheme and component."""
    meta = source.metadata
    have = meta.get("lightq.scheme")
    if have is not None:
        if scheme is None:
            raise CheckpointError(f"{source.name} is quantized ({have}, lightq.scheme) but the mode is 'none': pick "
                                  f"a {have} mode or load the bf16 checkpoint")
        if have != scheme:
            raise CheckpointError(f"{source.name} holds scheme '{have}' (lightq.scheme) but the mode expects "
                                  f"'{scheme}': pick a {have} mode or convert the bf16 checkpoint to {scheme}")
        gran = meta.get("lightq.granularity")
        if gran is not None and gran != GRANULARITY.get(scheme):
            raise CheckpointError(f"{source.name}: lightq.granularity '{gran}' does not match scheme '{scheme}' "
                                  f"(expected '{GRANULARITY.get(scheme)}'); the file header is inconsistent")
    comp = meta.get("lightq.component")
    if component is not None and comp is not None and comp != component:
        raise CheckpointError(f"{source.name} is a '{comp}' checkpoint (lightq.component), not '{component}'")
    if COMFY_MARKER in source:
        dt = source.dtype(COMFY_MARKER)
        if dt == torch.float8_e5m2:
            raise CheckpointError(f"{source.name}: ComfyUI scaled_fp8 marker says float8_e5m2 weights; lightq runs "
                                  "e4m3 only: use the e4m3fn file or the bf16 original")


def read_quantized(source: TensorSource, prefix: str, scheme: str, shape: tuple[int, int],
                   device: torch.device | str = "cpu") -> schemes.QuantizedWeight:
    """The validated ``QuantizedWeight`` of linear ``prefix`` (module weight ``shape`` = (N, K)) in ``scheme``."""
    key, n, k = prefix + ".weight", shape[0], shape[1]
    if key not in source:
        raise CheckpointError(f"{source.name}: missing tensor '{key}'")
    have = file_scheme(source, prefix)
    if have == "float" or source.dtype(key) in FLOAT_DTYPES:
        raise CheckpointError(f"{source.file_of(key)}: '{key}' is not quantized ({source.dtype(key)}) but the mode "
                              f"expects {scheme} and the rest of the file is pre-quantized; add '{prefix}' to the "
                              "mode's skip patterns or convert again")
    if have != scheme:
        raise CheckpointError(f"{source.file_of(key)}: '{key}' is stored as {have} but the mode expects {scheme}: "
                              f"pick a {have} mode or convert the bf16 checkpoint to {scheme}")
    data_shape, data_dtype, scale_shape = schemes.expected_layout(scheme, n, k)
    if source.dtype(key) != data_dtype:
        raise CheckpointError(f"{source.file_of(key)}: '{key}' has dtype {source.dtype(key)}, {scheme} needs "
                              f"{data_dtype}")
    if tuple(source.shape(key)) != tuple(data_shape):
        raise CheckpointError(f"{source.file_of(key)}: '{key}' has shape {tuple(source.shape(key))}, the model "
                              f"needs {tuple(data_shape)} for {scheme}")
    if prefix + COMFY_SCALE in source:
        data = source[key].to(device)
        scale = _comfy_scale(source, prefix, n).to(device)
    else:
        scale_key = prefix + SCALE
        if scale_key not in source:
            raise CheckpointError(f"{source.file_of(key)}: '{key}' is {data_dtype} but its scale '{scale_key}' is "
                                  "missing; the file is incomplete, convert again")
        _check_scale_layout(source, scale_key, scale_shape, bf16_ok="lightq.scheme" not in source.metadata)
        data = source[key].to(device)
        scale = source[scale_key].to(device)
        _check_scale_values(source, scale_key, scale)
    if data.dtype == schemes.FP8_DTYPE:
        bad = torch.isnan(data.float()).sum().item()
        if bad:
            raise CheckpointError(f"{source.file_of(key)}: '{key}' holds {bad} NaN values; the file is corrupt")
    return schemes.QuantizedWeight(scheme, data.contiguous(), scale.float().contiguous(), n, k)


def _check_scale_layout(source: TensorSource, scale_key: str, want: tuple, bf16_ok: bool) -> None:
    dtype, shape = source.dtype(scale_key), tuple(source.shape(scale_key))
    where = source.file_of(scale_key)
    if dtype != torch.float32 and not (bf16_ok and dtype == torch.bfloat16):
        raise CheckpointError(f"{where}: scale '{scale_key}' is {dtype}, lightq needs float32 scales; convert again "
                              "with python -m lightq.convert")
    if shape != tuple(want):
        hint = " (it is transposed)" if shape == tuple(reversed(want)) else ""
        raise CheckpointError(f"{where}: scale '{scale_key}' has shape {shape}, expected {tuple(want)}{hint}")


def _check_scale_values(source: TensorSource, scale_key: str, scale: torch.Tensor) -> None:
    if not torch.isfinite(scale).all():
        raise CheckpointError(f"{source.file_of(scale_key)}: scale '{scale_key}' holds NaN/Inf values; the file is "
                              "corrupt")
    if (scale <= 0).any():
        raise CheckpointError(f"{source.file_of(scale_key)}: scale '{scale_key}' holds zero or negative values; "
                              "the file is corrupt")


def _comfy_scale(source: TensorSource, prefix: str, n: int) -> torch.Tensor:
    """ComfyUI's per-tensor ``scale_weight`` as lightq's per-channel ``[N, 1]`` (every row the same scale)."""
    skey = prefix + COMFY_SCALE
    if source.dtype(skey) != torch.float32 or math.prod(source.shape(skey)) != 1:
        raise CheckpointError(f"{source.file_of(skey)}: ComfyUI scale '{skey}' must be one float32 value, got "
                              f"{source.dtype(skey)} {tuple(source.shape(skey))}")
    s = source[skey].reshape(())
    _check_scale_values(source, skey, s)
    ikey = prefix + COMFY_INPUT_SCALE
    if ikey in source:
        si = source[ikey]
        if si.numel() != 1:
            raise CheckpointError(f"{source.file_of(ikey)}: '{ikey}' must be one value, got shape {tuple(si.shape)}")
        _check_scale_values(source, ikey, si.float())
    return s.float().expand(n, 1).contiguous()


def quantize_fp8_per_tensor(w: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI scaled-fp8: one scale for the whole tensor, s = max|W| / 448 (1 for an all-zero tensor).

    Returns (float8_e4m3fn data, fp32 scalar scale); same rounding and NaN/Inf refusal as ``quantize_weight``.
    """
    schemes.check_quantizable("fp8", tuple(w.shape), name)
    w = w.detach().float()
    if not torch.isfinite(w).all():
        raise CheckpointError(f"{name}: NaN/Inf values in the weight; fix or re-export the checkpoint")
    amax = w.abs().amax()
    scale = torch.where(amax > 0, amax / schemes.FP8_MAX, torch.ones_like(amax))
    return (w / scale).clamp(-schemes.FP8_MAX, schemes.FP8_MAX).to(schemes.FP8_DTYPE), scale.reshape(())
