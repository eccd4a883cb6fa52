"""lightq's own Triton kernels (the ``triton`` backend and the fused DiT block).

Importing any module here imports ``triton``; nothing in lightq imports this package unless the ``triton``
backend is selected. Each kernel module registers its op as a torch custom op (``lightq::...``) with a fake
implementation, so the ops run under ``torch.compile`` (as opaque calls) and inside CUDA graphs (no host syncs;
autotuning happens on the first eager call, so warm up before capturing).

Under ``TRITON_INTERPRET=1`` (set before the first import) the kernels run on CPU tensors through Triton's
interpreter with the first configuration of each tuning list: that is how the CPU tests check them.
"""

from __future__ import annotations

import os

import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class Tuned:
    """A ``@triton.jit`` kernel launched autotuned over ``configs`` (keyed on ``key``) on the GPU, and with the
    first config under the interpreter, which has nothing to time."""

    def __init__(self, kernel, configs: list, key: list[str]):
        self.kernel = kernel
        self.default = configs[0]
        self.tuned = triton.autotune(configs=configs, key=key)(kernel)

    def __getitem__(self, grid):
        if interpreting():
            def launch(*args, **kwargs):
                return self.kernel[grid](*args, **kwargs, **self.default.kwargs)
            return launch
        return self.tuned[grid]


# One-row-per-program kernels are memory-bound; the warps per row is all there is to tune.
ROW_CONFIGS = [triton.Config({}, num_warps=w) for w in (8, 4, 16)]
