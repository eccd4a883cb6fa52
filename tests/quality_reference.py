"""The SSIM of ``lightq.pipeline.quality``'s docstring written the direct way, as the oracle its fast form is checked
against: the local statistics as two 1-D float64 ``conv2d`` passes of the normalised Gaussian window (the
implementation lightq shipped before the banded-matrix form)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ssim_conv2d(a: torch.Tensor, b: torch.Tensor, data_range: float, window: int = 11,
                sigma: float = 1.5) -> float:
    """Mean SSIM of ``[..., H, W]`` images, Wang et al. 2004 eq. (13), 'valid' positions, float64."""
    a, b = a.to(torch.float64), b.to(a.device, torch.float64)
    offsets = torch.arange(window, dtype=torch.float64, device=a.device) - (window - 1) / 2
    g = torch.exp(-(offsets**2) / (2 * sigma**2))
    g = g / g.sum()

    def local_mean(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, g.view(1, 1, 1, window)), g.view(1, 1, window, 1))

    x, y = a.reshape(-1, 1, *a.shape[-2:]), b.reshape(-1, 1, *b.shape[-2:])
    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov_xy = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())
