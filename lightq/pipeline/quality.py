"""Quality of a run against its bf16 baseline: PSNR and SSIM of the decoded frames, cosine of the final latents."""

from __future__ import annotations

import torch


def compare(video: torch.Tensor, ref_video: torch.Tensor, latents: torch.Tensor, ref_latents: torch.Tensor) -> dict:
    """``video``/``ref_video`` ``[F, 3, H, W]`` in [-1, 1]; metrics on frames mapped to [0, 1] (data range 1)."""
    from .video import cosine, psnr, ssim

    if video.shape != ref_video.shape or latents.shape != ref_latents.shape:
        return {"error": f"baseline shape {tuple(ref_video.shape)} differs from {tuple(video.shape)}"}
    a, b = (video.float() + 1) / 2, (ref_video.float() + 1) / 2
    return {
        "psnr_db": round(float(psnr(a, b, data_range=1.0)), 4),
        "ssim": round(float(ssim(a, b, data_range=1.0)), 6),
        "latent_cosine": round(float(cosine(latents, ref_latents)), 6),
    }
