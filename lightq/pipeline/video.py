"""Video output (H.264 mp4, PNG frames) and reading mp4s back (quality metrics: ``lightq.pipeline.quality``).

Frames are ``[F, 3, H, W]`` float tensors in [-1, 1]; a pixel value ``x`` becomes ``round((x + 1) * 127.5)``.
``write_mp4`` pipes RGB frames into imageio-ffmpeg's bundled ffmpeg binary, encoding H.264 / yuv420p (plays in
browsers and QuickTime; odd heights or widths are padded to even by repeating the last row / column), and
writes atomically: ffmpeg writes a hidden temp file beside the target, renamed over it only once ffmpeg has
exited cleanly, so an interrupted or failed write leaves the previous file (or none) at ``path``.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .. import staging
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


def write_mp4(frames: torch.Tensor, path: str | os.PathLike, fps: float = 16, crf: int = 18) -> Path:
    """Encode ``frames [F, 3, H, W]`` in [-1, 1] as H.264 (yuv420p, CRF ``crf``) at ``fps``; returns ``path``."""
    import imageio_ffmpeg

    _check_frames(frames)
    if not (isinstance(fps, (int, float, Fraction)) and fps > 0):
        raise LightqError(f"fps must be a positive number, got {fps!r}: set model.fps to e.g. 16")
    path = Path(path)
    height, width = (s + s % 2 for s in frames.shape[2:])

    def encode(tmp: Path) -> None:
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
            except BaseException:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                proc.stdin.close()
                raise

    return staging.write_atomic(path, encode)


def write_frames(frames: torch.Tensor, folder: str | os.PathLike) -> list[Path]:
    """Write ``frames [F, 3, H, W]`` in [-1, 1] as ``folder/frame_00000.png`` ...; each file written atomically."""
    from PIL import Image

    _check_frames(frames)
    folder = Path(folder)
    written = []
    for index, pixels in enumerate(_uint8_frames(frames, pad_to_even=False)):
        target = folder / f"frame_{index:05d}.png"
        written.append(staging.write_atomic(target, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG")))
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
