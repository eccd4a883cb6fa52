"""Quality of a run against its bf16 baseline: PSNR and SSIM of the decoded frames, cosine of the final latents.

Metrics (float64 internally, python floats out):
    psnr(a, b)   = 10 log10(R^2 / mean((a - b)^2)), R the data range; ``inf`` for identical inputs.
    ssim(a, b)   = mean over all positions of every 2-D image ``[..., H, W]`` of the SSIM map of
                   Wang, Bovik, Sheikh & Simoncelli, "Image quality assessment: from error visibility to
                   structural similarity", IEEE TIP 13(4), 2004, eq. (13):
                   ((2 mu_a mu_b + C1)(2 s_ab + C2)) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2)),
                   local statistics under an 11x11 Gaussian window (sigma 1.5) at every 'valid' position,
                   C1 = (0.01 R)^2, C2 = (0.03 R)^2. On ``[F, 3, H, W]`` it is the average over frames and channels.
    cosine(a, b) = <a, b> / (|a| |b|) of the flattened tensors; ``nan`` if either is all zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import LightqError


def compare(video: torch.Tensor, ref_video: torch.Tensor, latents: torch.Tensor, ref_latents: torch.Tensor) -> dict:
    """``video``/``ref_video`` ``[F, 3, H, W]`` in [-1, 1]; metrics on frames mapped to [0, 1] (data range 1)."""
    if video.shape != ref_video.shape or latents.shape != ref_latents.shape:
        return {"error": f"baseline shape {tuple(ref_video.shape)} differs from {tuple(video.shape)}"}
    a, b = (video.float() + 1) / 2, (ref_video.float() + 1) / 2
    return {
        "psnr_db": round(float(psnr(a, b, data_range=1.0)), 4),
        "ssim": round(float(ssim(a, b, data_range=1.0)), 6),
        "latent_cosine": round(float(cosine(latents, ref_latents)), 6),
    }


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.as_tensor(a).detach().to("cpu", torch.float64)
    b = torch.as_tensor(b).detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        raise LightqError(f"cannot compare tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}: "
                          "compare outputs of the same resolution, frame count and seed")
    return a, b


def psnr(a, b, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB (``data_range`` 2 for [-1, 1] frames, 1 for [0, 1], 255 for uint8)."""
    a, b = _pair(a, b)
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    return weights / weights.sum()


def ssim(a, b, data_range: float = 2.0, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity of ``[..., H, W]`` images (formula and constants in the module docstring)."""
    a, b = _pair(a, b)
    if a.dim() < 2 or min(a.shape[-2:]) < window:
        raise LightqError(f"SSIM needs images of at least {window}x{window} pixels, got shape {tuple(a.shape)}: "
                          "compare larger frames or pass a smaller window")
    g = _gaussian_window(window, sigma)
    kernel_rows, kernel_cols = g.view(1, 1, window, 1), g.view(1, 1, 1, window)

    def local_mean(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, kernel_cols), kernel_rows)

    x, y = a.reshape(-1, 1, *a.shape[-2:]), b.reshape(-1, 1, *b.shape[-2:])
    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov_xy = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def cosine(a, b) -> float:
    """Cosine similarity of the flattened tensors; ``nan`` when either has zero norm."""
    a, b = _pair(a, b)
    a, b = a.flatten(), b.flatten()
    norms = float(a.norm() * b.norm())
    return math.nan if norms == 0 else float(a @ b) / norms
