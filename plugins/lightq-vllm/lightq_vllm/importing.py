"""Import vLLM modules without letting the import change this process's torch settings.

``vllm.platforms.cuda`` (imported by ``vllm._custom_ops``, hence by every lightq backend built on vLLM) calls
``torch.backends.cuda.enable_cudnn_sdp(False)`` when it is imported. From then on every
``F.scaled_dot_product_attention`` in the process skips cuDNN's attention kernel, which on Hopper is the fastest
one for Wan's head size 128: a whole-model run with a vLLM-based mode would pay for slower attention in every
block, and so would every mode measured after it in the same process. ``import_vllm`` imports the module and puts
the SDPA backend switches back as they were (``lightq.models.attention.keep_sdpa_switches``;
``scripts/diag/plugin_overheads.py`` measures what is at stake).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from lightq.models.attention import keep_sdpa_switches


def import_vllm(name: str) -> ModuleType:
    """``importlib.import_module(name)``, with the SDPA backend switches restored afterwards (also on failure)."""
    with keep_sdpa_switches():
        return importlib.import_module(name)
