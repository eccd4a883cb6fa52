"""Where the ``write`` and ``quality`` stages of a job spend their time, before and after the fast paths, at full
frame size: ``python scripts/diag/quality_write_costs.py [--device cuda] [--frames 81] [--content smooth|noise]
[--presets fast,veryfast]`` (832x480 unless ``--height`` / ``--width``).

"before" replays what the stages did until this change: the decoded video on the host, each frame converted to
uint8 on the CPU and piped to ffmpeg, the baseline cache read whole with ``torch.load`` and checked on the CPU, and
``compare`` copying every pass of both videos to the device as float64 (converted on the host) for a ``conv2d``
SSIM (``tests/quality_reference.py``). "after" times the shipped functions: ``baseline.load`` (memory-mapped, one
copy to the device), ``quality.compare`` on the device-resident video (banded-matrix SSIM), ``video.uint8_frames``
on the device and ``video.Mp4Writer`` fed the whole video at once (a job feeds it during the decode:
``scripts/diag/stream_write_costs.py``). Both paths run on the same synthetic frames; the script checks that the
reported numbers (rounded as result.json has them) and the mp4 bytes are the same, and prints one line per part.
With ``--frames`` below 81 the last column scales each part to 81 frames (everything here is linear in frames).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from lightq.pipeline import baseline, quality, video  # noqa: E402
from lightq.pipeline.components import save_atomic  # noqa: E402
from quality_reference import ssim_conv2d  # noqa: E402


class Clock:
    def __init__(self, device: torch.device, scale: float):
        self.device, self.scale, self.rows = device, scale, []

    def __call__(self, label: str, fn, scale: float | None = None):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        self.rows.append((label, ms))
        scale = self.scale if scale is None else scale
        print(f"{label:58s} {ms:10.1f} ms {ms * scale:10.1f} ms at 81 frames", flush=True)
        return out


def synthetic(frames: int, height: int, width: int, content: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth moving pattern (or uniform noise, what random weights decode to and the costliest to encode) and a
    slightly different one, both float32 in [-1, 1]."""
    if content == "noise":
        a = torch.rand(frames, 3, height, width, generator=torch.Generator().manual_seed(3)) * 2 - 1
        return a, (a + 0.02 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    t = torch.arange(frames, dtype=torch.float32)[:, None, None, None]
    c = torch.arange(3, dtype=torch.float32)[None, :, None, None]
    y = torch.linspace(0, 6, height)[None, None, :, None]
    x = torch.linspace(0, 9, width)[None, None, None, :]
    a = torch.sin(x + 0.3 * t + c) * torch.cos(y - 0.2 * t) * 0.9
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(0)) * 0.02
    return a.contiguous(), (a + noise).clamp(-1, 1)


def old_uint8_frames(frames: torch.Tensor):
    for frame in frames:
        pixels = ((frame.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        yield np.ascontiguousarray(pixels.permute(1, 2, 0).numpy())


def old_encode(frames_host: torch.Tensor, path: Path) -> None:
    """The old write: each frame converted on the host, fed to the same ffmpeg command as ``Mp4Writer``'s."""
    _, _, height, width = frames_host.shape
    proc = subprocess.Popen(video.mp4_command(width, height, 16, 18) + [str(path)], stdin=subprocess.PIPE, bufsize=0)
    for pixels in old_uint8_frames(frames_host):
        proc.stdin.write(pixels.tobytes())
    proc.stdin.close()
    assert proc.wait() == 0


def ffmpeg_only(pixels: np.ndarray, path: Path, preset: str | None = None) -> None:
    _, height, width, _ = pixels.shape
    cmd = video.mp4_command(width, height, 16, 18) + (["-preset", preset] if preset else []) + [str(path)]
    subprocess.run(cmd, input=pixels.tobytes(), check=True)


def old_compare(vid: torch.Tensor, ref: torch.Tensor, lat, ref_lat, device, clock: Clock) -> dict:
    """The old ``compare``, its parts timed and summed over the passes."""
    parts = {"host f32->f64 + copy to device": 0.0, "mse": 0.0, "ssim (conv2d)": 0.0}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    frames, sq_sum, ssim_sum = vid.shape[0], 0.0, 0.0
    for lo in range(0, frames, quality.FRAMES_PER_PASS):
        t0 = time.perf_counter()
        a = (vid[lo:lo + quality.FRAMES_PER_PASS].to(device, torch.float64) + 1) / 2
        b = (ref[lo:lo + quality.FRAMES_PER_PASS].to(device, torch.float64) + 1) / 2
        sync()
        t1 = time.perf_counter()
        n = a.shape[0]
        sq_sum += float(((a - b) ** 2).mean()) * n
        t2 = time.perf_counter()
        ssim_sum += ssim_conv2d(a, b, data_range=1.0) * n
        t3 = time.perf_counter()
        for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
            parts[key] += dt * 1e3
    for key, ms in parts.items():
        clock.rows.append((f"  old compare: {key}", ms))
        print(f"{'  old compare: ' + key:58s} {ms:10.1f} ms {ms * clock.scale:10.1f} ms at 81 frames")
    cos = clock("  old compare: latent cosine", lambda: quality.cosine(lat.to(device), ref_lat.to(device)))
    return {"psnr_db": round(10 * math.log10(frames / sq_sum), 4), "ssim": round(ssim_sum / frames, 6),
            "latent_cosine": round(cos, 6)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--frames", type=int, default=None, help="default: 81 on cuda, 8 on cpu")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--content", choices=("smooth", "noise"), default="smooth")
    ap.add_argument("--presets", default="", help="x264 presets to time as well, e.g. fast,veryfast (lightq: medium)")
    args = ap.parse_args()
    device = torch.device(args.device)
    frames = args.frames or (81 if device.type == "cuda" else 8)
    clock = Clock(device, 81 / frames)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, {frames} {args.content} frames of "
          f"{args.height}x{args.width}")
    vid, ref = synthetic(frames, args.height, args.width, args.content)
    lat = torch.randn(16, 21, 60, 104, generator=torch.Generator().manual_seed(1))
    ref_lat = lat + 0.01 * torch.randn(lat.shape, generator=torch.Generator().manual_seed(2))
    if device.type == "cuda":
        torch.zeros(1, device=device) @ torch.zeros(1, device=device)  # context and cuBLAS, outside the timings
        torch.zeros(2, 2, device=device, dtype=torch.float64) @ torch.zeros(2, 2, device=device, dtype=torch.float64)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "baseline.pt"
        clock("bf16 job, quality: save the baseline (host tensors)",
              lambda: save_atomic({"latents": ref_lat, "video": ref, "timings": {"denoise": 1.0}}, cache))
        print(f"  cache file {cache.stat().st_size / 2**20:.1f} MiB")

        print("-- before")
        data = clock("  read the baseline: torch.load", lambda: torch.load(cache, weights_only=True))
        clock("  check it finite on the host", lambda: bool(torch.isfinite(data["video"]).all()))
        old = old_compare(vid, data["video"], lat, data["latents"], device, clock)
        clock("  write: latents torch.save", lambda: torch.save(lat, tmp / "latents.pt"))
        clock("  write: per-frame uint8 on the host (no encode)", lambda: list(old_uint8_frames(vid)))
        clock("  write: per-frame uint8 + ffmpeg pipe + encode", lambda: old_encode(vid, tmp / "old.mp4"))

        print("-- after")
        vid_dev = vid.to(device)  # the decode's output, left where it was made
        torch.cuda.synchronize() if device.type == "cuda" else None
        got, _ = clock("  baseline.load (mmap, copy to device, check there)", lambda: baseline.load(cache, device))
        new = clock("  quality.compare (device-resident, banded SSIM)",
                    lambda: quality.compare(vid_dev, got["video"], lat, got["latents"], device))
        a = (vid_dev[:quality.FRAMES_PER_PASS].double() + 1) / 2
        b = (got["video"][:quality.FRAMES_PER_PASS].double() + 1) / 2
        clock(f"    of which SSIM: one pass ({quality.FRAMES_PER_PASS} frames)",
              lambda: quality.ssim(a, b, data_range=1.0), scale=81 / quality.FRAMES_PER_PASS)
        pixels = clock("  write: video.uint8_frames on the device, to host", lambda: video.uint8_frames(vid_dev, True))
        clock("  write: ffmpeg pipe + encode of ready pixels", lambda: ffmpeg_only(pixels, tmp / "raw.mp4"))
        for preset in filter(None, args.presets.split(",")):
            clock(f"  write: ffmpeg encode with -preset {preset}",
                  lambda: ffmpeg_only(pixels, tmp / f"{preset}.mp4", preset))
            print(f"    {preset}: {(tmp / f'{preset}.mp4').stat().st_size / 2**20:.2f} MiB "
                  f"(medium: {(tmp / 'raw.mp4').stat().st_size / 2**20:.2f} MiB)")
        writer = video.Mp4Writer(tmp / "new.mp4")
        clock("  write: Mp4Writer.feed, the whole video (foreground part)", lambda: writer.feed(vid_dev))
        clock("  write: Mp4Writer result (the wait, nothing overlapped)", writer.result)
        print(f"  Mp4Writer.seconds (background encode) {writer.seconds * 1e3:.1f} ms")
        same_mp4 = (tmp / "new.mp4").read_bytes() == (tmp / "old.mp4").read_bytes()

    print(f"old: {old}\nnew: {new}")
    ok = new == old
    print(f"reported numbers identical: {ok}; mp4 bytes identical: {same_mp4}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
