"""Checkpoints: lazy reading of every published layout, streamed atomic writing, loading into modules.

- ``sources``         ``TensorSource`` / ``open_files`` (safetensors, chunked, block split, .pth), file hashes
- ``conventions``     ``open_source``: files seen through the published key conventions (wrapper prefixes,
                      ComfyUI's per-layer markers)
- ``writers``         ``SafetensorsWriter`` / ``save_safetensors_atomic``: streamed atomic writing
- ``formats``         pre-quantized layouts (lightq, LightX2V, ComfyUI, ModelOpt fp8, plain fp8 casts): detection
                      and validation
- ``diffusers``       diffusers' / transformers' key names of the Wan2.1 components <-> the official ones
- ``loader``          ``load_component``: meta-device build, tensor-by-tensor fill, QLinear swap
- ``conversion``      streaming quantized conversion behind ``python -m lightq.convert``
- ``hub``             Hugging Face Hub references (``owner/repo[/file]``), offline-aware
- ``locate``          ``find_component_file``: a component's file in a model folder, by LightX2V's names

Names are imported lazily, so ``hub`` works without importing torch. LightX2V's JSON configs: ``lightq.lightx2v``.
"""

from importlib import import_module

_EXPORTS = {
    "TensorSource": "sources", "open_source": "conventions", "save_safetensors_atomic": "writers",
    "load_component": "loader", "find_component_file": "locate",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
