"""What feeding the mp4 encoder during the VAE decode saves, at full frame size:
``python scripts/diag/stream_write_costs.py [--device cuda] [--latents 21] [--vae wan2.1|tiny] [--repeat 2]
[--paced SECONDS] [--x264-params rc-lookahead=10]`` (832x480 unless ``--height`` / ``--width``; random VAE weights
and latents, whose frames are noise-like, the costliest to encode, as a ``weights=random`` job's are).
``--paced S`` replaces the VAE by noise frames handed over at the pace of a decode of ``S`` seconds (the GPU's
decode on a CPU machine: only the encoder then runs on the cores). ``--x264-params`` appends ``-x264-params`` to
lightq's ffmpeg command for both paths (what another encoder setting would overlap; lightq's own is the default).

Two paths per repeat, each from a fresh ``Mp4Writer`` as a job makes them: "whole" decodes the whole video, then
feeds it at once (the path before this change: the encode starts after the decode), "streamed" decodes with
``on_frames`` feeding each latent's frames as they come (``vae.decode_chunks``). Per path it prints the decode's
wall time (for "streamed" including the hand-over and, on a CPU run, the encoder's competition for the cores),
the wait for the encode after the decode (what the ``write`` stage pays when nothing else runs meanwhile, as in
the bf16 job), their sum, and ``Mp4Writer.seconds`` (``write_background``). The script checks that both paths
decode the same video and write the same mp4 bytes (exit 1 otherwise).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO)]

from lightq.models.vae import VAE_ARCHS, WanVAE  # noqa: E402
from lightq.pipeline import video  # noqa: E402


class Paced:
    """Stands in for the VAE: noise frames, each latent's after ``seconds / latents`` of sleep."""

    def __init__(self, seconds: float, temporal_factor: int, height: int, width: int):
        self.seconds, self.k, self.size = seconds, temporal_factor, (height, width)

    def decode(self, latents: torch.Tensor, on_frames=None) -> torch.Tensor:
        t = latents.shape[2]
        g = torch.Generator().manual_seed(3)
        video = torch.rand(1, 3, 1 + self.k * (t - 1), *self.size, generator=g) * 2 - 1
        start = 0
        for i in range(t):
            time.sleep(self.seconds / t)
            n = 1 if i == 0 else self.k
            if on_frames is not None:
                on_frames(video[:, :, start:start + n])
            start += n
        return video


def run(vae, latents: torch.Tensor, path: Path, streamed: bool) -> tuple[dict, torch.Tensor]:
    sync = torch.cuda.synchronize if latents.is_cuda else (lambda: None)
    writer = video.Mp4Writer(path)
    sync()
    start = time.perf_counter()
    sink = (lambda part: writer.feed(part[0].transpose(0, 1))) if streamed else None
    out = vae.decode(latents, on_frames=sink)
    frames = out[0].transpose(0, 1).float().clamp(-1, 1)  # as pipeline.graph.generate returns it
    if not streamed:
        writer.feed(frames)
    sync()
    decoded = time.perf_counter()
    writer.result()
    done = time.perf_counter()
    return {"decode": decoded - start, "wait": done - decoded, "decode+write": done - start,
            "write_background": writer.seconds}, frames


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--latents", type=int, default=None, help="latent frames (1 + 4 (n - 1) frames); default: 21 "
                    "on cuda (81 frames), 3 on cpu")
    ap.add_argument("--vae", choices=sorted(VAE_ARCHS), default="wan2.1")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--repeat", type=int, default=2, help="rounds of both paths; the first one warms up")
    ap.add_argument("--paced", type=float, default=None, help="no VAE: frames at the pace of a decode of this long")
    ap.add_argument("--x264-params", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    t = args.latents or (21 if device.type == "cuda" or args.paced else 3)
    if args.x264_params:
        command = video.mp4_command
        video.mp4_command = lambda *a: command(*a) + ["-x264-params", args.x264_params]
    torch.manual_seed(0)
    arch = VAE_ARCHS[args.vae]
    vae = (Paced(args.paced, arch.temporal_factor, args.height, args.width) if args.paced
           else WanVAE(arch).to(device).eval())
    s = arch.spatial_factor
    latents = torch.randn(1, arch.z_dim, t, args.height // s, args.width // s,
                          generator=torch.Generator().manual_seed(1)).to(device)
    what = f"paced {args.paced} s" if args.paced else f"VAE {args.vae}"
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, {what}, x264-params {args.x264_params}, "
          f"{t} latents -> "
          f"{1 + arch.temporal_factor * (t - 1)} frames of {args.height}x{args.width}")
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for round_ in range(args.repeat):
            times, videos = {}, {}
            for name in ("whole", "streamed"):
                times[name], videos[name] = run(vae, latents, tmp / f"{name}.mp4", name == "streamed")
                row = "  ".join(f"{k} {v:7.3f} s" for k, v in times[name].items())
                print(f"round {round_} {name:9s} {row}", flush=True)
            same &= torch.equal(videos["whole"], videos["streamed"])
            same &= (tmp / "whole.mp4").read_bytes() == (tmp / "streamed.mp4").read_bytes()
            w, st = times["whole"], times["streamed"]
            print(f"round {round_} streamed - whole: decode {st['decode'] - w['decode']:+.3f} s, wait "
                  f"{st['wait'] - w['wait']:+.3f} s, decode+write {st['decode+write'] - w['decode+write']:+.3f} s")
    print(f"decoded videos and mp4 bytes identical: {same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
