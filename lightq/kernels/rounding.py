"""Rounding an fp32 value to a narrower float type inside a kernel, identically on the GPU and in the interpreter.

On the GPU the cast is the hardware's round-to-nearest-even conversion. Triton's CPU interpreter (3.6, 3.7) truncates
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


@triton.jit
def fp8_rne(v, SOFT: tl.constexpr):
    """fp32 ``v`` (|v| <= 448) as e4m3, round to nearest even. With ``SOFT`` (the interpreter, whose fp8 cast loses
    the rounding carry and rounds ties away) the value is first rounded in fp32 arithmetic, so the cast is exact:
    normals keep 3 mantissa bits (``bits + 0x7FFFF + lsb``, low 20 bits dropped; a carry into the exponent is the
    right result), subnormals (below 2**-6) are multiples of 2**-9 (``(|v| + 2**14) - 2**14``: fp32's spacing at
    2**14 is 2**-9)."""
    if SOFT:
        a = tl.abs(v)
        u = a.to(tl.uint32, bitcast=True)
        normal = ((u + 0x7FFFF + ((u >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
        r = tl.where(a < 0.015625, (a + 16384.0) - 16384.0, normal)
        v = tl.where(v < 0.0, -r, r)
    return v.to(tl.float8e4nv)
