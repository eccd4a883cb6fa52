"""Published key conventions seen through lightq's names: ``open_source(path)`` = ``normalize(open_files(path))``
is what every loader reads.

- Wrapper prefixes: when every key sits under one of ``model.diffusion_model.``, ``diffusion_model.`` or
  ``model.`` (ComfyUI's full checkpoints, kijai's WanVideoWrapper files, diffusers' single-file exports), the
  prefix is dropped. A file with keys both inside and outside the prefix is left as it is (the loader then lists
  the keys that do not match).
- ComfyUI's per-layer quantization table, in ComfyUI's own form: the header metadata ``_quantization_metadata``
  = ``{"layers": {<layer>: {"format": ..., "full_precision_matrix_mult": bool, ...}}}`` (what ComfyUI's
  ``convert_old_quants`` builds), filled from
  - the current format's ``<layer>.comfy_quant`` tensors (uint8 bytes of the layer's JSON object), which are
    consumed (hidden from the keys), and the file's own ``_quantization_metadata`` header;
  - the legacy ``scaled_fp8`` format: the marker tensor (its dtype is the weights' fp8 dtype; two elements
    mean ``full_precision_matrix_mult``: weight-only) and ``<layer>.scale_weight`` / ``<layer>.scale_input``,
    renamed to the current ``<layer>.weight_scale`` / ``<layer>.input_scale``. A legacy ``scale_input`` of
    exactly 1 is dropped, as ComfyUI drops it (it stands for "no calibrated activation scale").

- diffusers / transformers names (``-Diffusers`` folders' components): the official names
  (``lightq.checkpoints.diffusers``).

Layer names in the table lose the wrapper prefix with the keys. The result is a ``RenamedSource`` (or the source
itself when nothing changes); ``lightq.checkpoints.formats`` reads the table.
"""

from __future__ import annotations

import json
import os

import torch

from ..errors import CheckpointError
from .diffusers import official_view
from .sources import RenamedSource, TensorSource, open_files

WRAPPER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
QUANT_METADATA = "_quantization_metadata"
COMFY_CONF = ".comfy_quant"
COMFY_MARKER = "scaled_fp8"
LEGACY_SCALES = {".scale_weight": ".weight_scale", ".scale_input": ".input_scale"}
FP8_E4M3 = "float8_e4m3fn"


def open_source(path: str | os.PathLike) -> TensorSource:
    """The checkpoint file or folder at ``path`` (``sources.open_files``), seen through ``normalize`` and, for a
    diffusers / transformers file, under the official names (``diffusers.official_view``)."""
    return official_view(normalize(open_files(path)))


def wrapper_prefix(keys: list[str]) -> str:
    """The wrapper prefix every key sits under ("" for none); the legacy marker may sit outside it."""
    for prefix in WRAPPER_PREFIXES:
        inside = [k for k in keys if k.startswith(prefix)]
        if inside and all(k.startswith(prefix) or k == COMFY_MARKER for k in keys):
            return prefix
    return ""


def normalize(source: TensorSource) -> TensorSource:
    """``source`` with the wrapper prefix dropped and ComfyUI's markers turned into the one table (module doc)."""
    keys = list(source)
    prefix = wrapper_prefix(keys)
    layers = {_strip(name, prefix): conf for name, conf in file_layers(source).items()}
    marker = next((m for m in (prefix + COMFY_MARKER, COMFY_MARKER) if m in source), None)
    legacy = marker is not None or any(k.endswith(".scale_weight") for k in keys)
    weight_only = marker is not None and _legacy_weight_only(source, marker)
    names: dict[str, str] = {}
    for key in keys:
        if key == marker:
            continue
        new = _strip(key, prefix)
        if new.endswith(COMFY_CONF):
            layers[new[:-len(COMFY_CONF)]] = _conf_tensor(source, key)
            continue
        if legacy:
            for old, current in LEGACY_SCALES.items():
                if new.endswith(old):
                    layer = new[:-len(old)]
                    new = layer + current
                    if old == ".scale_weight":
                        layers[layer] = {"format": FP8_E4M3, **({"full_precision_matrix_mult": True}
                                                                if weight_only else {})}
                    elif source[key].numel() == 1 and float(source[key].float()) == 1.0:
                        new = ""
        if new:
            names[new] = key
    if not prefix and not layers and marker is None and all(k == v for k, v in names.items()):
        return source
    metadata = dict(source.metadata)
    if layers:
        metadata[QUANT_METADATA] = json.dumps({"layers": layers}, sort_keys=True)
    return RenamedSource(source, names, metadata)


def file_layers(source: TensorSource) -> dict[str, dict]:
    """The per-layer table of the header metadata ``_quantization_metadata`` (empty when there is none)."""
    raw = source.metadata.get(QUANT_METADATA)
    if raw is None:
        return {}
    try:
        layers = json.loads(raw)["layers"]
        if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
            raise TypeError("'layers' is not an object of layer -> object")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{source.name}: header metadata {QUANT_METADATA} is not ComfyUI's "
                              f"{{\"layers\": {{<layer>: {{\"format\": ...}}}}}} ({exc}); the file is damaged") from exc
    return dict(layers)


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix):] if prefix and key.startswith(prefix) else key


def _conf_tensor(source: TensorSource, key: str) -> dict:
    t = source[key]
    try:
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise TypeError(f"{t.dtype} {tuple(t.shape)}, expected 1-D uint8")
        conf = json.loads(bytes(t.tolist()).decode("utf-8"))
        if not isinstance(conf, dict):
            raise TypeError("not a JSON object")
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{source.file_of(key)}: '{key}' is not a ComfyUI layer description (uint8 bytes of "
                              f"a JSON object: {exc}); the file is damaged") from exc
    return conf


def _legacy_weight_only(source: TensorSource, marker: str) -> bool:
    dtype = source.dtype(marker)
    if dtype == torch.float8_e5m2:
        raise CheckpointError(f"{source.name}: ComfyUI scaled_fp8 marker says float8_e5m2 weights; lightq runs "
                              "e4m3 only: use the e4m3fn file or the bf16 original")
    return int(torch.Size(source.shape(marker)).numel()) == 2
