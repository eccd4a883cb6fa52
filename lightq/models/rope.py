"""3-D rotary position embedding of the Wan2.1 DiT, in real fp32 arithmetic.

A token at grid position (f, h, w) of a ``[F, H, W]`` patch grid rotates the consecutive pairs
``(x[2j], x[2j+1])`` of each attention head (dimension ``d``) by an angle ``a_j``:

    out[2j]   = x[2j] cos a_j - x[2j+1] sin a_j
    out[2j+1] = x[2j] sin a_j + x[2j+1] cos a_j

The ``d/2`` angles are three blocks, one per axis, of sizes ``d_f/2, d_h/2, d_w/2`` with
``(d_f, d_h, d_w) = (d - 4*(d//6), 2*(d//6), 2*(d//6))``; within the block of an axis of size ``d_a`` at
position ``p``, ``a_j = p * theta**(-2j / d_a)``, ``theta = 10000``. This is the official Wan2.1 rotation (which
multiplies float64 complex numbers); here the angles are computed in float64, their cos/sin stored in fp32 and
the rotation done in fp32. The tables are cached per (grid, head dim, device): no module buffers.
"""

from __future__ import annotations

from functools import lru_cache

import torch

THETA = 10000.0


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Head-dimension share of the (frame, height, width) axes, as the official model splits it."""
    third = head_dim // 6
    return head_dim - 4 * third, 2 * third, 2 * third


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float = THETA) -> torch.Tensor:
    """float64 ``[F*H*W, head_dim/2]`` rotation angles, tokens in (frame, height, width) row-major order."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    per_axis = []
    for size, dim in zip(grid, axis_dims(head_dim)):
        inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        per_axis.append(torch.arange(size, dtype=torch.float64)[:, None] * inv_freq)  # [size, dim/2]
    f, h, w = grid
    angles = torch.cat([
        per_axis[0][:, None, None, :].expand(f, h, w, -1),
        per_axis[1][None, :, None, :].expand(f, h, w, -1),
        per_axis[2][None, None, :, :].expand(f, h, w, -1),
    ], dim=-1)
    return angles.reshape(f * h * w, head_dim // 2)


@lru_cache(maxsize=16)
def rope_tables(grid: tuple[int, int, int], head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (cos, sin), each ``[F*H*W, 1, head_dim/2]`` (broadcast over heads), on ``device``."""
    angles = rope_angles(tuple(grid), head_dim)[:, None, :]
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, L, heads, head_dim]`` (any float dtype) by the tables; returns fp32, same shape."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x_even, x_odd = pairs[..., 0], pairs[..., 1]
    return torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1).flatten(-2)
