"""Rounding an fp32 value to a narrower float type inside a kernel, identically on the GPU and in the interpreter.

On the GPU the cast is the hardware's round-to-nearest-even conversion. Triton's CPU interpreter (3.6) truncates
fp32 -> bf16 and mis-carries fp32 -> fp8, so with ``SOFT`` (passed as ``interpreting()``) bf16 rounding is done in
integer arithmetic instead: ``bits + 0x7FFF + lsb`` then dropping the low 16 bits is round-to-nearest-even for every
finite value.
"""

import triton
import triton.language as tl


@triton.jit
def round_to(xf, DTYPE: tl.constexpr, SOFT: tl.constexpr):
    """``xf`` (fp32) rounded to ``DTYPE`` and returned as fp32; ``SOFT`` only with ``DTYPE`` bf16 (see
    ``soft_rounding``)."""
    if SOFT:
        u = xf.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        r = u.to(tl.float32, bitcast=True)
    else:
        r = xf.to(DTYPE).to(tl.float32)
    return r


def soft_rounding(dtype) -> bool:
    """The ``SOFT`` flag for rounding to torch ``dtype``: integer rounding under the interpreter, for bf16."""
    import torch

    from . import interpreting

    return interpreting() and dtype == torch.bfloat16
