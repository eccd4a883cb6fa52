"""Video output (H.264 mp4, PNG frames) and reading mp4s back (quality metrics: ``lightq.pipeline.quality``).

Frames are ``[F, 3, H, W]`` float tensors in [-1, 1] on any device; a pixel value ``x`` becomes
``round((x + 1) * 127.5)``, computed on the frames' device (``uint8_frames``: only the uint8 pixels cross to the
host). ``write_mp4`` pipes RGB frames into imageio-ffmpeg's bundled ffmpeg binary, encoding H.264 / yuv420p (plays
in browsers and QuickTime; odd heights or widths are padded to even by repeating the last row / column), and
writes atomically: ffmpeg writes a hidden temp file beside the target, renamed over it only once ffmpeg has
exited cleanly, so an interrupted or failed write leaves the previous file (or none) at ``path``. ``Mp4Writer`` is
the same write with the encode in a background thread, fed frames as they come (a VAE decode's chunks: the bytes
ffmpeg gets, and so the file, are the same however the frames are split), for a caller with other work to do
meanwhile.
"""

from __future__ import annotations

import os
import queue
import subprocess
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .. import staging
from ..errors import LightqError

FRAMES_PER_CHUNK = 16  # converted to uint8 at a time: bounds the float temporaries on the frames' device


# ---------------------------------------------------------------------------------------------- writing


def _check_shape(frames: torch.Tensor) -> None:
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[1] != 3 or frames.shape[0] < 1:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise LightqError(
            f"video frames must be a tensor [frames, 3, height, width] with at least one frame, got {shape}: "
            "drop the batch dimension and put RGB channels second"
        )


NOT_FINITE = "video frames contain NaN or Inf: the decode diverged; nothing was written"


def _check_frames(frames: torch.Tensor) -> None:
    _check_shape(frames)
    if not torch.isfinite(frames).all():
        raise LightqError(NOT_FINITE)


def _device_pixels(frames: torch.Tensor, pad_to_even: bool) -> torch.Tensor:
    """``frames [n, 3, H, W]`` as uint8 RGB ``[n, H', W', 3]`` on their device (``pad_to_even``: see
    ``uint8_frames``); the caller bounds ``n`` (the float temporaries are ``n`` frames)."""
    height, width = frames.shape[2:]
    chunk = frames.detach().float().clamp(-1, 1)  # a new tensor: the rest in place
    chunk = chunk.add_(1).mul_(127.5).round_().to(torch.uint8)
    if pad_to_even and height % 2:
        chunk = torch.cat([chunk, chunk[:, :, -1:]], dim=2)
    if pad_to_even and width % 2:
        chunk = torch.cat([chunk, chunk[:, :, :, -1:]], dim=3)
    return chunk.permute(0, 2, 3, 1)


def uint8_frames(frames: torch.Tensor, pad_to_even: bool = False) -> np.ndarray:
    """``frames [F, 3, H, W]`` in [-1, 1] (checked) as host uint8 RGB ``[F, H, W, 3]``, converted on their device
    ``FRAMES_PER_CHUNK`` frames at a time; ``pad_to_even`` repeats the last row / column of an odd size."""
    _check_frames(frames)
    count, _, height, width = frames.shape
    pixels = np.empty((count, height + height % 2 * pad_to_even, width + width % 2 * pad_to_even, 3), np.uint8)
    for lo in range(0, count, FRAMES_PER_CHUNK):
        torch.from_numpy(pixels[lo:lo + FRAMES_PER_CHUNK]).copy_(
            _device_pixels(frames[lo:lo + FRAMES_PER_CHUNK], pad_to_even))
    return pixels


def _check_fps(fps) -> None:
    if not (isinstance(fps, (int, float, Fraction)) and fps > 0):
        raise LightqError(f"fps must be a positive number, got {fps!r}: set model.fps to e.g. 16")


def mp4_command(width: int, height: int, fps: float, crf: int) -> list[str]:
    """The ffmpeg command that encodes rgb24 frames from stdin as H.264 yuv420p; the output file goes last."""
    import imageio_ffmpeg

    return [
        imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-nostdin", "-loglevel", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
        "-r", str(Fraction(fps).limit_denominator()), "-i", "-",
        "-an", "-c:v", "libx264", "-crf", str(crf), "-pix_fmt", "yuv420p", "-movflags", "+faststart", "-f", "mp4",
    ]


_END = None  # the end of a writer's input, in its queue


def _to_host(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """``pixels`` in host memory, and on CUDA the event after which they are there (copied without waiting)."""
    if pixels.device.type != "cuda":
        return pixels.cpu().contiguous(), None
    host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(pixels.contiguous(), non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


class Mp4Writer:
    """``write_mp4`` with the encode in a background thread, fed as the frames come. ``feed(frames)``, any number
    of times, ``[n, 3, H, W]`` in [-1, 1] of one size throughout: converts them to uint8 on their device
    (``uint8_frames``'s pixels) and queues them for the thread without waiting for the device; the thread and
    ffmpeg start at the first call. ``close()`` ends the input and checks that every frame fed was finite (one
    wait for the device); ``result()`` closes, waits for the encode and returns the path, or raises the error (a
    ``LightqError`` when the frames were not finite or ffmpeg failed); ``cancel()`` stops ffmpeg and waits. Either way ``path`` holds the
    complete new video or what it held before, never part of one. ``seconds``: the encode's wall time in its
    thread, from the first frame fed to ffmpeg's exit (overlapping whatever the caller did meanwhile), set when it
    ends."""

    def __init__(self, path: str | os.PathLike, fps: float = 16, crf: int = 18):
        _check_fps(fps)
        self.path, self.seconds = Path(path), None
        self._fps, self._crf, self._size, self._finite, self._ended = fps, crf, None, None, False
        self._queue, self._thread = queue.SimpleQueue(), None
        self._stop, self._proc, self._error = threading.Event(), None, None

    def feed(self, frames: torch.Tensor) -> None:
        _check_shape(frames)
        if self._ended:
            raise LightqError(f"frames fed to the write of {self.path} after its end")
        size = tuple(frames.shape[2:])
        if self._size not in (None, size):
            raise LightqError(f"video frames of {size[0]}x{size[1]} after frames of {self._size[0]}x{self._size[1]}: "
                              "every frame of a video has one size")
        if self._thread is not None and not self._thread.is_alive():
            return  # the encode has ended: result() reports why
        finite = torch.isfinite(frames).all()  # on the device: checked once, by result()
        self._finite = finite if self._finite is None else self._finite & finite
        for lo in range(0, frames.shape[0], FRAMES_PER_CHUNK):
            self._queue.put(_to_host(_device_pixels(frames[lo:lo + FRAMES_PER_CHUNK], pad_to_even=True)))
        if self._thread is None:
            height, width = (n + n % 2 for n in size)
            self._size, self._cmd = size, mp4_command(width, height, self._fps, self._crf)
            self._thread = threading.Thread(target=self._run, name="lightq-mp4", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        start = time.perf_counter()
        try:
            staging.write_atomic(self.path, self._encode)
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc
        finally:
            self.seconds = round(time.perf_counter() - start, 4)

    def _encode(self, tmp: Path) -> None:
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(self._cmd + [str(tmp)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=log, bufsize=0)
            self._proc = proc
            try:
                try:
                    while (item := self._queue.get()) is not _END:
                        pixels, ready = item
                        if ready is not None:
                            ready.synchronize()
                        view = memoryview(pixels.numpy()).cast("B")
                        while view:  # an unbuffered pipe may take part of a frame per write
                            if self._stop.is_set():
                                raise LightqError(f"the write of {self.path} was cancelled")
                            view = view[proc.stdin.write(view):]
                    proc.stdin.close()  # end of input: ffmpeg finishes the file and exits
                except BrokenPipeError:
                    pass  # ffmpeg exited early (or was stopped); its return code and log say why
                code = proc.wait()
                if self._stop.is_set():
                    raise LightqError(f"the write of {self.path} was cancelled")
                if code != 0:
                    log.seek(0)
                    message = log.read().decode(errors="replace").strip().splitlines()
                    last = message[-1] if message else "no message"
                    raise LightqError(f"ffmpeg could not write {self.path} (exit {code}: {last}): "
                                      "check that the folder is writable and the disk is not full")
            except BaseException:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                proc.stdin.close()
                raise

    def close(self) -> None:
        """End the input (``result()`` does it if not done): raises, having cancelled, if a frame was not finite."""
        if self._ended:
            return
        self._ended = True
        try:
            if self._thread is None:
                raise LightqError(f"no frames were given for {self.path}: nothing was written")
            if not bool(self._finite):
                raise LightqError(NOT_FINITE)
        except LightqError:
            self.cancel()
            raise
        self._queue.put(_END)

    def result(self) -> Path:
        self.close()
        if self._thread is None:  # cancelled before any frame came
            raise LightqError(f"the write of {self.path} was cancelled")
        try:
            self._thread.join()
        except BaseException:  # interrupted while waiting: stop ffmpeg before handing the interrupt on
            self.cancel()
            raise
        if self._error is not None:
            raise self._error
        return self.path

    def cancel(self) -> None:
        self._stop.set()
        self._ended = True
        if self._thread is None:
            return
        self._queue.put(_END)  # wakes a thread waiting for frames
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
        self._thread.join()


def write_mp4(frames: torch.Tensor, path: str | os.PathLike, fps: float = 16, crf: int = 18) -> Path:
    """Encode ``frames [F, 3, H, W]`` in [-1, 1] as H.264 (yuv420p, CRF ``crf``) at ``fps``; returns ``path``."""
    writer = Mp4Writer(path, fps, crf)
    writer.feed(frames)
    return writer.result()


def write_frames(frames: torch.Tensor, folder: str | os.PathLike) -> list[Path]:
    """Write ``frames [F, 3, H, W]`` in [-1, 1] as ``folder/frame_00000.png`` ...; each file written atomically."""
    from PIL import Image

    folder = Path(folder)
    written = []
    for index, pixels in enumerate(uint8_frames(frames)):
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
