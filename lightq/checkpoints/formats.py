"""Pre-quantized checkpoint layouts: recognise them, read one quantized linear, validate it against the mode.

Files are seen through ``lightq.checkpoints.conventions`` (wrapper prefixes dropped, ComfyUI's markers turned
into one per-layer table, legacy names renamed). Layouts (``<p>`` is a linear's key prefix, ``[N, K]`` =
``[out, in]``):

``lightx2v``  ``<p>.weight`` int8 / float8_e4m3fn ``[N, K]`` + ``<p>.weight_scale`` fp32 ``[N, 1]``; W = data * scale.
              LightX2V's converter computes scales in the source dtype, so files made from the bf16 release
              carry bf16 scales: those are accepted (bf16 -> fp32 is exact); any other non-fp32 scale is refused.
``lightq``    the same keys for every scheme of ``lightq.quant.schemes`` (fp8-b128 scale ``[ceil(N/128),
              ceil(K/128)]``, int4-g128 uint8 ``[N, K/2]`` + scale ``[K/128, N]``, fp8-pertensor scale ``[]``), and
              the header metadata
              ``lightq.scheme``, ``lightq.granularity``, ``lightq.component``, ``lightq.source_sha256``,
              ``lightq.version``.
``comfyui``   ComfyUI's per-layer table (``conventions``): format ``float8_e4m3fn`` (``<p>.weight`` fp8) or
              ``int8_tensorwise`` without ``convrot`` (int8), ``<p>.weight_scale`` fp32, one value per tensor or
              per output channel (``[N]`` / ``[N, 1]``), optional ``<p>.input_scale`` (a calibrated static
              activation scale, x_q = x / input_scale), optional ``full_precision_matrix_mult`` (weight-only:
              ComfyUI dequantizes the weight and multiplies in high precision). Other formats are refused by name.
``static-fp8`` no table, ``<p>.weight`` fp8 + ``<p>.weight_scale`` fp32 one value + ``<p>.input_scale`` fp32 one
              value, each of shape ``[]`` or ``[1]``: LightX2V's ``fp8-pertensor`` files (LTX-2's
              ``*-fp8.safetensors``: ``[]``), NVIDIA ModelOpt's FP8 export, AutoFP8 (``[]``) and compressed-tensors
              (``[1]``) static-fp8 checkpoints. A LightX2V ``fp8-pertensor`` file without ``input_scale`` reads as
              ``lightx2v``.
``fp8-cast``  ``<p>.weight`` float8_e4m3fn with no scale at all (kijai's ``*_fp8_e4m3fn`` files): scale 1.

An fp8 weight with one scale (``[]`` or ``[1]``) is stored as ``fp8-pertensor``, which a ``fp8`` mode also reads,
exactly: data unchanged, scale ``[N, 1]`` filled with s. How activations are handled is the layer's
``activation_of``: ``dynamic`` (the mode's per-token / per-group / per-tensor quantization), ``static`` (an
``input_scale``, the calibrated t of x_q = fp8(clamp(x / t)): only an ``fp8-pertensor`` mode honours it; any other
mode refuses the layer in one line naming that mode, never ignores the scale) or ``weight-only`` (only
``<component>_quant=none`` takes it: the weights are dequantized at load and multiplied in the run's dtype, as
ComfyUI does).

Every check names the tensor: wrong scheme for the mode, missing scale, scale of the wrong shape (transposed
included) or dtype, NaN/Inf in data or scale, an ``input_scale`` that is not one finite positive fp32 value, a
float weight where the mode expects a quantized one.
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch

from ..errors import CheckpointError
from ..quant import schemes
from .conventions import QUANT_METADATA, file_layers
from .sources import TensorSource

SCALE = ".weight_scale"
INPUT_SCALE = ".input_scale"
PER_TENSOR = schemes.PER_TENSOR
GRANULARITY = {"fp8": "per-channel", "int8": "per-channel", "fp8-b128": "block128", "int4-g128": "group128",
               PER_TENSOR: "per-tensor"}
QUANT_DTYPES = {schemes.FP8_DTYPE: "fp8", torch.int8: "int8", torch.uint8: "int4-g128", torch.float8_e5m2: "fp8-e5m2"}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
COMFY_FORMATS = {"float8_e4m3fn": "fp8", "int8_tensorwise": "int8"}
ACTIVATIONS = {"fp8": "fp8, dynamic per token", "int8": "int8, dynamic per token",
               "fp8-b128": "fp8, dynamic per 1x128 group", "int4-g128": "not quantized (weight-only scheme)",
               PER_TENSOR: "fp8, dynamic per tensor (max |x| / 448 of each call)"}
STATIC = "fp8, static per tensor (the file's calibrated input_scale: x_q = fp8(clamp(x / input_scale)))"
# a stored scheme -> the other schemes that read it exactly (a per-tensor scale held per channel)
READ_AS = {PER_TENSOR: ("fp8",)}


@lru_cache(maxsize=8)
def _table(raw: str) -> dict[str, dict]:
    return json.loads(raw)["layers"]


def comfy_layers(source: TensorSource) -> dict[str, dict]:
    """ComfyUI's per-layer table of ``source`` (layer -> its JSON object), empty for other layouts."""
    raw = source.metadata.get(QUANT_METADATA)
    if raw is None:
        return {}
    try:
        return _table(raw)
    except (ValueError, KeyError, TypeError):
        return file_layers(source)  # raises the one-line error


def layout_of(source: TensorSource) -> str:
    """``lightq`` | ``comfyui`` | ``static-fp8`` | ``lightx2v`` | ``fp8-cast`` | ``float`` (no quantized tensor)."""
    if "lightq.scheme" in source.metadata:
        return "lightq"
    if comfy_layers(source):
        return "comfyui"
    if any(k.endswith(INPUT_SCALE) for k in source):
        return "static-fp8"
    if any(k.endswith(SCALE) for k in source):
        return "lightx2v"
    if any(k.endswith(".weight") and source.dtype(k) == schemes.FP8_DTYPE and len(source.shape(k)) == 2
           for k in source):
        return "fp8-cast"
    return "float"


def aux_keys(source: TensorSource, prefix: str) -> list[str]:
    """The scale keys that belong to linear ``prefix`` in this file (consumed with its weight)."""
    return [prefix + s for s in (SCALE, INPUT_SCALE) if prefix + s in source]


def is_quantized(source: TensorSource, prefix: str) -> bool:
    """Does the file hold ``<prefix>.weight`` quantized (a 2-D weight of a quantized dtype, or a scale next to it)?"""
    key = prefix + ".weight"
    return bool(aux_keys(source, prefix)) or (key in source and source.dtype(key) in QUANT_DTYPES
                                              and len(source.shape(key)) == 2)


def file_scheme(source: TensorSource, prefix: str) -> str:
    """The scheme the file stores linear ``prefix`` in (from metadata, ComfyUI's table, dtype and scale shape)."""
    key = prefix + ".weight"
    kind = QUANT_DTYPES.get(source.dtype(key), "float")
    if kind == "float" and not aux_keys(source, prefix):
        return "float"
    meta = source.metadata.get("lightq.scheme")
    if meta:
        return meta
    conf = comfy_layers(source).get(prefix)
    if conf is not None:
        fmt = conf.get("format")
        if fmt not in COMFY_FORMATS or conf.get("convrot") or (conf.get("params") or {}).get("convrot"):
            what = f"{fmt} with convrot" if fmt in COMFY_FORMATS else fmt
            raise CheckpointError(f"{source.file_of(key)}: layer '{prefix}' is ComfyUI format '{what}'; lightq reads "
                                  f"{' and '.join(COMFY_FORMATS)} layers: use a float8_e4m3fn file or the bf16 "
                                  "original (quantized at load)")
        kind = COMFY_FORMATS[fmt]
        return PER_TENSOR if kind == "fp8" and _one_scale(source, prefix) else kind
    if kind == "fp8" and prefix + SCALE in source:
        n, k = source.shape(key)
        if tuple(source.shape(prefix + SCALE)) == (-(-n // schemes.BLOCK), -(-k // schemes.BLOCK)) and n > 1:
            return "fp8-b128"
        if _one_scale(source, prefix):
            return PER_TENSOR
    if kind == "fp8" and prefix + INPUT_SCALE in source and prefix + SCALE not in source:
        return PER_TENSOR  # a static per-tensor layer without its weight scale: read_quantized names what is missing
    return kind


def _one_scale(source: TensorSource, prefix: str) -> bool:
    """Is ``<prefix>.weight_scale`` one value for the whole tensor (shape ``[]`` or ``[1]``)?"""
    return prefix + SCALE in source and tuple(source.shape(prefix + SCALE)) in ((), (1,))


def activation_of(source: TensorSource, prefix: str) -> str:
    """How the file means linear ``prefix``'s activations to be handled: ``weight-only`` | ``static`` | ``dynamic``."""
    if (comfy_layers(source).get(prefix) or {}).get("full_precision_matrix_mult"):
        return "weight-only"
    return "static" if prefix + INPUT_SCALE in source else "dynamic"


def weight_only_file(source: TensorSource) -> bool:
    """True when the file's every quantized layer is weight-only (ComfyUI ``full_precision_matrix_mult``)."""
    table = comfy_layers(source)
    return bool(table) and all(conf.get("full_precision_matrix_mult") for conf in table.values())


def check_activations(source: TensorSource, prefix: str, scheme: str, component: str | None) -> None:
    """Refuse, in one line, a layer whose activation handling the mode's ``scheme`` would not honour."""
    how = activation_of(source, prefix)
    where, option = source.file_of(prefix + ".weight"), f"{component or '<component>'}_quant"
    if how == "weight-only":
        raise CheckpointError(f"{where}: '{prefix}' is weight-only (ComfyUI full_precision_matrix_mult: dequantized "
                              f"weights, high-precision GEMM), but the mode computes in {scheme}: run it with "
                              f"{option}=none, which does exactly that, or quantize the bf16 original at load")
    if how == "static" and scheme != PER_TENSOR:
        fix = (f"run it with {option}={PER_TENSOR}-auto (LightX2V's fp8-pertensor: x / input_scale, one scale per "
               "tensor)" if file_scheme(source, prefix) == PER_TENSOR else
               f"only {PER_TENSOR} takes a static activation scale, and it needs one weight scale per tensor")
        raise CheckpointError(f"{where}: '{prefix}' carries a calibrated static activation scale "
                              f"('{prefix}{INPUT_SCALE}') but {scheme} quantizes activations dynamically: {fix}, or "
                              "load the bf16 original (quantized at load)")


def numerics(source: TensorSource | str, scheme: str | None, dtype: torch.dtype,
             static: tuple[int, int] = (0, 0)) -> dict[str, str]:
    """What result.json records of a loaded component: the file's layout, where the weights came from, and how
    activations are computed. ``static``: (layers run with the file's input_scale, quantized layers)."""
    layout = "random" if isinstance(source, str) else layout_of(source)
    names = {"key_names": getattr(source, "convention", "") or "official"} if not isinstance(source, str) else {}
    high = str(dtype).replace("torch.", "")
    if scheme is None:
        weights = (f"the file's quantized weights dequantized to {high} at load (weight-only)"
                   if layout not in ("float", "random") else f"{high}")
        return {"layout": layout, **names, "weights": weights, "activations": f"{high} (not quantized)"}
    weights = f"{scheme}, quantized at load" if layout in ("float", "random") else f"{scheme}, read from the file"
    if scheme in ("fp8", "int8") and not isinstance(source, str) and layout in ("comfyui", "static-fp8", "fp8-cast"):
        weights += " (per-tensor scales held per channel)" if layout != "fp8-cast" else " (scale 1)"
    return {"layout": layout, **names, "weights": weights, "activations": _activations(scheme, *static)}


def _activations(scheme: str, static: int, layers: int) -> str:
    if not static:
        return ACTIVATIONS.get(scheme, scheme)
    if static == layers:
        return STATIC
    return (f"{STATIC} on {static} of {layers} layers; the other {layers - static} (no input_scale in the file): "
            f"{ACTIVATIONS[scheme]}")


# components that load the same model's checkpoints: a Wan2.2 A14B expert is a DiT (lightq.convert writes "dit")
SAME_MODEL = {"dit_low": "dit"}


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
    if component is not None and comp is not None and SAME_MODEL.get(comp, comp) != SAME_MODEL.get(component, component):
        raise CheckpointError(f"{source.name} is a '{comp}' checkpoint (lightq.component), not '{component}'")


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
    if have != scheme and scheme not in READ_AS.get(have, ()):
        modes = " or ".join((have, *READ_AS.get(have, ())))
        raise CheckpointError(f"{source.file_of(key)}: '{key}' is stored as {have} but the mode expects {scheme}: "
                              f"pick an {modes} mode or convert the bf16 checkpoint to {scheme}")
    data_shape, data_dtype, scale_shape = schemes.expected_layout(scheme, n, k)
    if source.dtype(key) != data_dtype:
        raise CheckpointError(f"{source.file_of(key)}: '{key}' has dtype {source.dtype(key)}, {scheme} needs "
                              f"{data_dtype}")
    if tuple(source.shape(key)) != tuple(data_shape):
        raise CheckpointError(f"{source.file_of(key)}: '{key}' has shape {tuple(source.shape(key))}, the model "
                              f"needs {tuple(data_shape)} for {scheme}")
    data = source[key].to(device)
    scale = _scale(source, prefix, scheme, n, scale_shape, data_dtype).to(device)
    input_scale = _one_value(source, prefix + INPUT_SCALE) if prefix + INPUT_SCALE in source else None
    if data.dtype == schemes.FP8_DTYPE:
        bad = torch.isnan(data.float()).sum().item()
        if bad:
            raise CheckpointError(f"{source.file_of(key)}: '{key}' holds {bad} NaN values; the file is corrupt")
    static = input_scale.to(device) if scheme == PER_TENSOR and input_scale is not None else None
    return schemes.QuantizedWeight(scheme, data.contiguous(), scale.float().contiguous(), n, k, static)


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


def _scale(source: TensorSource, prefix: str, scheme: str, n: int, want: tuple, data_dtype) -> torch.Tensor:
    """The weight's scale in lightq's layout: as stored, or a per-tensor / ``[N]`` scale as ``[N, 1]``, or 1 for
    an fp8 weight stored without any scale (a plain cast)."""
    key, scale_key = prefix + ".weight", prefix + SCALE
    if scale_key not in source:
        if data_dtype == schemes.FP8_DTYPE and scheme == "fp8" and layout_of(source) == "fp8-cast":
            return torch.ones(n, 1)
        raise CheckpointError(f"{source.file_of(key)}: '{key}' is {data_dtype} but its scale '{scale_key}' is "
                              "missing; the file is incomplete, convert again")
    shape = tuple(source.shape(scale_key))
    if scheme == PER_TENSOR:
        if shape not in ((), (1,)):
            raise CheckpointError(f"{source.file_of(scale_key)}: scale '{scale_key}' has shape {shape}; "
                                  f"{PER_TENSOR} has one weight scale per tensor (shape [] or [1]): pick an fp8 mode "
                                  "for per-channel scales")
        return _one_value(source, scale_key)
    if scheme in ("fp8", "int8") and shape in ((), (1,)):
        return _one_value(source, scale_key).expand(n, 1).contiguous()
    if scheme in ("fp8", "int8") and shape == (n,) and n > 1:
        want = shape
    _check_scale_layout(source, scale_key, want, bf16_ok="lightq.scheme" not in source.metadata)
    scale = source[scale_key]
    _check_scale_values(source, scale_key, scale)
    return scale.float().reshape(n, 1) if want == (n,) else scale


def _one_value(source: TensorSource, key: str) -> torch.Tensor:
    """A per-tensor fp32 scale (shape ``()`` or ``(1,)``), checked finite and positive, as a 0-d fp32 tensor."""
    if source.dtype(key) != torch.float32 or tuple(source.shape(key)) not in ((), (1,)):
        raise CheckpointError(f"{source.file_of(key)}: '{key}' must be one float32 value (shape [] or [1]: one scale "
                              f"per tensor), got {str(source.dtype(key)).replace('torch.', '')} "
                              f"{list(source.shape(key))}; the file is not a per-tensor fp8 checkpoint lightq reads")
    value = source[key].reshape(())
    _check_scale_values(source, key, value)
    return value.float()
