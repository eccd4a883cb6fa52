"""Import vLLM modules without letting the import change this process's torch settings.

``vllm.platforms.cuda`` (imported by ``vllm._custom_ops``, hence by every lightq backend built on vLLM) calls
``torch.backends.cuda.enable_cudnn_sdp(False)`` when it is imported. From then on every
``F.scaled_dot_product_attention`` in the process skips cuDNN's attention kernel, which on Hopper is the fastest
one for Wan's head size 128: a whole-model run with a vLLM-based mode would pay for slower attention in every
block, and so would every mode measured after it in the same process. ``import_vllm`` imports the module and puts
the four SDPA backend switches back as they were (``scripts/diag/plugin_overheads.py`` measures what is at stake).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

_SWITCHES = (  # (getter, setter) of each scaled_dot_product_attention backend switch
    (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.enable_flash_sdp),
    (torch.backends.cuda.mem_efficient_sdp_enabled, torch.backends.cuda.enable_mem_efficient_sdp),
    (torch.backends.cuda.math_sdp_enabled, torch.backends.cuda.enable_math_sdp),
    (torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.enable_cudnn_sdp),
)


def sdpa_switches() -> tuple[bool, ...]:
    """The current (flash, memory-efficient, math, cuDNN) SDPA backend switches."""
    return tuple(get() for get, _ in _SWITCHES)


def import_vllm(name: str) -> ModuleType:
    """``importlib.import_module(name)``, with the SDPA backend switches restored afterwards (also on failure)."""
    before = sdpa_switches()
    try:
        return importlib.import_module(name)
    finally:
        for (_, set_switch), on in zip(_SWITCHES, before):
            set_switch(on)
