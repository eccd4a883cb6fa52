"""Checkpoints: lazy reading of every published layout, streamed atomic writing, loading into modules.

- ``io``       ``TensorSource`` / ``open_source`` (safetensors, chunked, block split, .pth), atomic writers
"""

from .io import TensorSource, open_source, save_safetensors_atomic

__all__ = ["TensorSource", "open_source", "save_safetensors_atomic"]
