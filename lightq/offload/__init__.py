"""Offload: where component weights live while a pipeline runs, and how they reach the device.

- ``binding``    flat, aligned packing of a group of module tensors (from the host, or from the device by DMA
                 into page-locked buffers made ahead); re-binding modules to views (no copies)
- ``units``      how the Wan DiT / umT5 split into streamed units: blocks, or attention / cross-attention / FFN
- ``streaming``  the ring of device slots, side-stream prefetch and CUDA events (``Streamer``)
- ``lazy``       blocks read from a block-split checkpoint by a background thread (``load_lazy``)
- ``placement``  per-component placement for offload=model / block / phase (``place``)
- ``budget``     the ``offload.max_gpu_gib`` check, from the architectures, before loading
"""

from .budget import check_budget, gpu_weight_need
from .lazy import load_lazy
from .placement import place

__all__ = ["check_budget", "gpu_weight_need", "load_lazy", "place"]
