"""Video output (H.264 mp4, PNG frames), reading mp4s back, and the metrics that compare a run with its baseline.

Frames are ``[F, 3, H, W]`` float tensors in [-1, 1]; a pixel value ``x`` becomes ``round((x + 1) * 127.5)``.
``write_mp4`` pipes RGB frames into imageio-ffmpeg's bundled ffmpeg binary, encoding H.264 / yuv420p (plays in
browsers and QuickTime; odd heights or widths are padded to even by repeating the last row / column), and
writes atomically: ffmpeg writes a hidden temp file beside the target, renamed over it only once ffmpeg has
exited cleanly, so an interrupted or failed write leaves the previous file (or none) at ``path``.

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
import os
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LightqError


# ---------------------------------------------------------------------------------------------- writing


def _check_frames(frames: torch.Tensor) -> None:
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[1] != 3 or frames.shape[0] < 1:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise LightqError(
            f"video frames must be a tensor [frames, 3, height, width] with at least one frame, got {shape}: "
            "drop the batch dimension and put RGB channels second"
        )
    if not torch.isfinite(frames).all():
        raise LightqError("video frames contain NaN or Inf: the decode diverged; nothing was written")


def _uint8_frames(frames: torch.Tensor, pad_to_even: bool) -> Iterator[np.ndarray]:
    """One ``[H, W, 3]`` uint8 array per frame, edge-padded to even sizes if asked."""
    height, width = frames.shape[2:]
    pad = (0, width % 2, 0, height % 2) if pad_to_even else (0, 0, 0, 0)
    for frame in frames:
        pixels = ((frame.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if any(pad):
            pixels = F.pad(pixels[None].float(), pad, mode="replicate")[0].to(torch.uint8)
        yield np.ascontiguousarray(pixels.permute(1, 2, 0).numpy())


def _temp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are ordinary readable files
    return Path(tmp)


def write_mp4(frames: torch.Tensor, path: str | os.PathLike, fps: float = 16, crf: int = 18) -> Path:
    """Encode ``frames [F, 3, H, W]`` in [-1, 1] as H.264 (yuv420p, CRF ``crf``) at ``fps``; returns ``path``."""
    import imageio_ffmpeg

    _check_frames(frames)
    if not (isinstance(fps, (int, float, Fraction)) and fps > 0):
        raise LightqError(f"fps must be a positive number, got {fps!r}: set model.fps to e.g. 16")
    path = Path(path)
    height, width = (s + s % 2 for s in frames.shape[2:])
    tmp = _temp_beside(path)
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-nostdin", "-loglevel", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
        "-r", str(Fraction(fps).limit_denominator()), "-i", "-",
        "-an", "-c:v", "libx264", "-crf", str(crf), "-pix_fmt", "yuv420p", "-movflags", "+faststart",
        "-f", "mp4", str(tmp),
    ]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log, bufsize=0)
        try:
            try:
                for pixels in _uint8_frames(frames, pad_to_even=True):
                    proc.stdin.write(pixels.tobytes())
                proc.stdin.close()  # end of input: ffmpeg finishes the file and exits
            except BrokenPipeError:
                pass  # ffmpeg exited early; its return code and log say why
            code = proc.wait()
            if code != 0:
                log.seek(0)
                message = log.read().decode(errors="replace").strip().splitlines()
                raise LightqError(
                    f"ffmpeg could not write {path} (exit {code}: {message[-1] if message else 'no message'}): "
                    "check that the folder is writable and the disk is not full"
                )
            os.replace(tmp, path)
        except BaseException:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdin.close()
            tmp.unlink(missing_ok=True)
            raise
    return path


def write_frames(frames: torch.Tensor, folder: str | os.PathLike) -> list[Path]:
    """Write ``frames [F, 3, H, W]`` in [-1, 1] as ``folder/frame_00000.png`` ...; each file written atomically."""
    from PIL import Image

    _check_frames(frames)
    folder = Path(folder)
    written = []
    for index, pixels in enumerate(_uint8_frames(frames, pad_to_even=False)):
        target = folder / f"frame_{index:05d}.png"
        tmp = _temp_beside(target)
        try:
            Image.fromarray(pixels).save(tmp, format="PNG")
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        written.append(target)
    return written


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """All frames of a video file as uint8 RGB ``[F, H, W, 3]``."""
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise LightqError(f"no video file at {path}: check the path")
    reader = imageio_ffmpeg.read_frames(str(path))
    width, height = next(reader)["size"]
    frames = [np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3) for data in reader]
    return np.stack(frames) if frames else np.zeros((0, height, width, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- metrics


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
