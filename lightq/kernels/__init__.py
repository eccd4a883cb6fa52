"""lightq's own Triton kernels (the ``triton`` backend and the fused DiT block).

Importing any module here imports ``triton``; nothing in lightq imports this package unless the ``triton``
backend is selected. Each kernel module registers its op as a torch custom op (``lightq::...``) with a fake
implementation, so the ops run under ``torch.compile`` (as opaque calls) and inside CUDA graphs (no host syncs;
autotuning happens on the first eager call, so warm up before capturing).

Under ``TRITON_INTERPRET=1`` (set before the first import) the kernels run on CPU tensors through Triton's
interpreter with the first configuration of each tuning list: that is how the CPU tests check them. Entry points
are ``KernelOp``s: plain calls in eager mode, torch custom ops under ``torch.compile``.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from . import tuned_configs

_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # Triton reads it at import, so do we


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` when lightq.kernels was
    imported)."""
    return _INTERPRETING


class KernelOp:
    """A kernel entry point, registered as the torch custom op ``lightq::<name>`` (schema from the annotations).
    Calling it runs the Python implementation directly, except while ``torch.compile`` traces, where it emits the
    custom op (opaque to the compiler, with the fake implementation for shapes): the dispatcher costs tens of
    microseconds of host time per call (H100 machine, docs/results/act_quant_host-h100-2026-11-26.txt: 126 us
    per ``act_quant`` call through it, 78 us as a plain call, 18.5 us for a bare Triton launch), more than the GPU
    time of a small-M kernel. ``torch.ops.lightq.<name>`` stays
    available for callers that want the op itself."""

    def __init__(self, name: str, fn):
        self.impl = fn
        self.op = torch.library.custom_op(f"lightq::{name}", fn, mutates_args=())
        functools.update_wrapper(self, fn)

    def register_fake(self, fake):
        self.op.register_fake(fake)
        return fake

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        return self.impl(*args)


def kernel_op(name: str):
    """Decorator: ``@kernel_op("act_quant")`` makes the function a ``KernelOp`` named ``lightq::act_quant``."""
    return lambda fn: KernelOp(name, fn)


class Tuned:
    """A ``@triton.jit`` kernel launched autotuned over ``configs`` (keyed on ``key``) on the GPU, and with the
    first config under the interpreter, which has nothing to time. On the GPU the shipped table of this GPU
    (``tuned_configs``) answers first, then Triton's on-disk autotuning cache, then the table's nearest key, and only
    then (a kernel the table lacks) the autotuner times the configs."""

    def __init__(self, kernel, configs: list, key: list[str]):
        self.kernel = kernel
        self.name = kernel.__name__
        self.default = configs[0]
        self.tune(configs, key)

    def tune(self, configs: list, key: list[str]) -> None:
        """Autotune over ``configs`` on the GPU (the interpreter keeps the first config given to ``__init__``)."""
        self.tuned = triton.autotune(configs=configs, key=key, cache_results=True)(self.kernel)
        self._seeded = False
        tuned_configs.register(self.name, self.tuned)
        tuned_configs.fall_back_to_nearest(self.name, self.tuned)

    def __getitem__(self, grid):
        if interpreting():
            def launch(*args, **kwargs):
                return self.kernel[grid](*args, **kwargs, **self.default.kwargs)
            return launch
        if not self._seeded:
            tuned_configs.seed(self.name, self.tuned)
            self._seeded = True
        return self.tuned[grid]


def rows_grid(m: int):
    """The launch grid of a kernel that tiles ``m`` rows ``meta["ROWS"]`` at a time (an autotuned meta-parameter)."""
    return lambda meta: (triton.cdiv(m, meta["ROWS"]),)


# One-row-per-program kernels are memory-bound; the warps per row is all there is to tune.
ROW_CONFIGS = [triton.Config({}, num_warps=w) for w in (8, 4, 16)]
