"""Quality of a run against its bf16 baseline: PSNR and SSIM of the decoded frames, cosine of the final latents.

Metrics (float64, python floats out):
    psnr(a, b)   = 10 log10(R^2 / mean((a - b)^2)), R the data range; ``inf`` for identical inputs.
    ssim(a, b)   = mean over all positions of every 2-D image ``[..., H, W]`` of the SSIM map of
                   Wang, Bovik, Sheikh & Simoncelli, "Image quality assessment: from error visibility to
                   structural similarity", IEEE TIP 13(4), 2004, eq. (13):
                   ((2 mu_a mu_b + C1)(2 s_ab + C2)) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2)),
                   local statistics under an 11x11 Gaussian window (sigma 1.5) at every 'valid' position,
                   C1 = (0.01 R)^2, C2 = (0.03 R)^2. On ``[F, 3, H, W]`` it is the average over frames and channels.
    cosine(a, b) = <a, b> / (|a| |b|) of the flattened tensors; ``nan`` if either is all zeros.

Each metric computes on the device its inputs are on. The Gaussian window is separable, so the local statistics
are two 1-D 'valid' correlations, computed as products with banded matrices (``_band``: row ``i`` holds the
window at columns ``i .. i + window - 1``), float64 matrix products that are fast on a GPU's tensor cores and on a
CPU's BLAS, for the five maps at once; they equal the 2-D convolution up to the order of the eleven-term sums.
``compare`` moves both videos to the job's device once and streams them through the metrics a few frames at a
time, so its float64 temporaries are bounded by ``FRAMES_PER_PASS`` frames whatever the video length (float64 SSIM
of a whole 81-frame 480p video holds ~10 GiB of them).
"""

from __future__ import annotations

import math

import torch

from ..errors import LightqError

FRAMES_PER_PASS = 4


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.as_tensor(a).detach().to(torch.float64)
    b = torch.as_tensor(b).detach().to(a.device, torch.float64)
    if a.shape != b.shape:
        raise LightqError(f"cannot compare tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}: "
                          "compare outputs of the same resolution, frame count and seed")
    return a, b


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


def _psnr_of(mse: float, data_range: float) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def psnr(a, b, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB (``data_range`` 2 for [-1, 1] frames, 1 for [0, 1], 255 for uint8)."""
    return _psnr_of(_mse(*_pair(a, b)), data_range)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    return weights / weights.sum()


def _band(n: int, g: torch.Tensor) -> torch.Tensor:
    """``[n - len(g) + 1, n]``: ``_band(n, g) @ x`` is the 'valid' correlation of ``x``'s ``n`` rows with ``g``."""
    rows = n - g.numel() + 1
    columns = torch.arange(rows, device=g.device)[:, None] + torch.arange(g.numel(), device=g.device)
    return torch.zeros(rows, n, dtype=g.dtype, device=g.device).scatter_(1, columns, g.expand(rows, -1))


def ssim(a, b, data_range: float = 2.0, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity of ``[..., H, W]`` images (formula and constants in the module docstring)."""
    a, b = _pair(a, b)
    if a.dim() < 2 or min(a.shape[-2:]) < window:
        raise LightqError(f"SSIM needs images of at least {window}x{window} pixels, got shape {tuple(a.shape)}: "
                          "compare larger frames or pass a smaller window")
    g = _gaussian_window(window, sigma, a.device)
    rows, columns = _band(a.shape[-2], g), _band(a.shape[-1], g).T
    x, y = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    # local means of x, y, x^2, y^2, xy: the window's weighted sums, along the columns, then along the rows
    mu_x, mu_y, mean_xx, mean_yy, mean_xy = rows @ (torch.stack([x, y, x * x, y * y, x * y]) @ columns)
    var_x = mean_xx - mu_x**2
    var_y = mean_yy - mu_y**2
    cov_xy = mean_xy - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def cosine(a, b) -> float:
    """Cosine similarity of the flattened tensors; ``nan`` when either has zero norm."""
    a, b = _pair(a, b)
    a, b = a.flatten(), b.flatten()
    norms = float(a.norm() * b.norm())
    return math.nan if norms == 0 else float(a @ b) / norms


def compare(video: torch.Tensor, ref_video: torch.Tensor, latents: torch.Tensor, ref_latents: torch.Tensor,
            device: torch.device | str = "cpu") -> dict:
    """``video``/``ref_video`` ``[F, 3, H, W]`` in [-1, 1], on any device; metrics on frames mapped to [0, 1] (data
    range 1), computed on ``device`` ``FRAMES_PER_PASS`` frames at a time. Every frame has the same number of SSIM
    positions, so the frame-weighted mean of the per-pass means is the whole video's mean."""
    if video.shape != ref_video.shape or latents.shape != ref_latents.shape:
        return {"error": f"baseline shape {tuple(ref_video.shape)} differs from {tuple(video.shape)}"}
    video, ref_video = video.to(device), ref_video.to(device)  # whole, in their own dtype: one copy each at most
    frames, sq_sum, ssim_sum = video.shape[0], 0.0, 0.0
    for lo in range(0, frames, FRAMES_PER_PASS):
        a = (video[lo:lo + FRAMES_PER_PASS].to(torch.float64) + 1) / 2
        b = (ref_video[lo:lo + FRAMES_PER_PASS].to(torch.float64) + 1) / 2
        n = a.shape[0]
        sq_sum += _mse(a, b) * n
        ssim_sum += ssim(a, b, data_range=1.0) * n
    return {
        "psnr_db": round(_psnr_of(sq_sum / frames, 1.0), 4),
        "ssim": round(ssim_sum / frames, 6),
        "latent_cosine": round(cosine(latents.to(device), ref_latents.to(device)), 6),
    }
