"""``python -m lightq.bench.convert``: time and peak host memory of ``python -m lightq.convert`` on a full-size DiT.

1. Writes a random bf16 checkpoint of the requested architecture (default Wan2.1 14B, 28 GB) in the official
   chunked layout (``diffusion_pytorch_model-0000i-of-0000n.safetensors`` + index), streamed tensor by tensor
   (timed separately: it is set-up, not conversion).
2. Runs the converter on it in a child process (``python -m lightq.convert component=dit scheme=... layout=...``)
   and samples the child's memory from ``/proc/<pid>/status`` every 20 ms: the peak of ``RssAnon`` (memory the
   converter itself holds) and of ``RssFile`` (memory-mapped checkpoint pages, reclaimable page cache that the
   kernel counts in RSS while the file is read; ``ru_maxrss`` would add the two and report the model size).

The peak is what streaming promises: about one tensor (the largest DiT tensor, ``ffn.0``, is 13824 x 5120: 141 MB in
bf16, 283 MB in fp32), not the model. Prints a table and, with ``--json``, writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


def write_random_dit(arch_name: str, folder: Path, shard_gb: float = 5.0, seed: int = 0) -> tuple[int, float]:
    """A random bf16 DiT in the official chunked layout; returns (bytes, seconds). One tensor in memory at a time."""
    from ..checkpoints.writers import SafetensorsWriter
    from ..models.wan_dit import DIT_ARCHS, WanDiT

    with torch.device("meta"):
        model = WanDiT(DIT_ARCHS[arch_name])
    layout = [(k, torch.bfloat16, tuple(v.shape)) for k, v in model.state_dict().items()]
    shards, current, size = [], [], 0
    for entry in layout:
        n = torch.Size(entry[2]).numel() * 2
        if current and size + n > shard_gb * 2**30:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += n
    shards.append(current)
    folder.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random numbers are the slow part on a CPU
    gen = torch.Generator(device).manual_seed(seed)
    weight_map, total, t0 = {}, 0, time.perf_counter()
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with SafetensorsWriter(folder / name, shard, metadata={"format": "pt"}) as writer:
            for key, dtype, shape in shard:
                t = torch.randn(shape, generator=gen, dtype=torch.float32, device=device).mul_(0.02).to(dtype).cpu()
                writer.write(key, t)
                weight_map[key] = name
                total += t.numel() * 2
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total, time.perf_counter() - t0


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run_convert(source: Path, output: Path, scheme: str, layout: str) -> tuple[float, int, int, int]:
    """(seconds, peak anonymous RSS bytes, peak file-backed RSS bytes, return code) of one converter process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lightq.convert", "component=dit", f"scheme={scheme}",
                             f"source={source}", f"output={output}", f"layout={layout}", "progress=false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    anon = file = 0
    while proc.poll() is None:
        anon = max(anon, _status_kib(proc.pid, "RssAnon"))
        file = max(file, _status_kib(proc.pid, "RssFile"))
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        print(proc.stderr.read()[-2000:], file=sys.stderr)
    return seconds, anon * 1024, file * 1024, proc.returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lightq.bench.convert", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="14b", help="DiT architecture (lightq.models.wan_dit.DIT_ARCHS key)")
    ap.add_argument("--scheme", default="fp8")
    ap.add_argument("--layouts", default="single", help="comma-separated: single,chunked,blocks,lightx2v")
    ap.add_argument("--workdir", default="/tmp/lightq-convert-bench", help="where the 28 GB source is written")
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the files (default: delete them at the end)")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    source = work / f"random-{args.arch}-bf16"
    rows = []
    try:
        nbytes, t_write = write_random_dit(args.arch, source)
        print(f"source: random bf16 {args.arch} DiT, {nbytes / 2**30:.2f} GiB, written in {t_write:.1f} s "
              f"({nbytes / 2**30 / t_write:.2f} GiB/s)", flush=True)
        for layout in args.layouts.split(","):
            folder = work / f"out-{layout}"
            out = folder / "dit.safetensors" if layout in ("single", "lightx2v") else folder
            seconds, anon, file_backed, rc = run_convert(source, out, args.scheme, layout)
            out_bytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0
            rows.append({"arch": args.arch, "scheme": args.scheme, "layout": layout, "rc": rc, "seconds": round(seconds, 2),
                         "source_gib": round(nbytes / 2**30, 2), "output_gib": round(out_bytes / 2**30, 2),
                         "read_gib_per_s": round(nbytes / 2**30 / seconds, 2),
                         "peak_anon_gib": round(anon / 2**30, 3), "peak_file_mapped_gib": round(file_backed / 2**30, 3)})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| arch | scheme | layout | source GiB | output GiB | seconds | source GiB/s | peak anon GiB | peak mapped GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['scheme']} | {r['layout']} | {r['source_gib']} | {r['output_gib']} | {r['seconds']} | "
              f"{r['read_gib_per_s']} | {r['peak_anon_gib']} | {r['peak_file_mapped_gib']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"source_write_s": round(t_write, 2), "rows": rows}, indent=2))
    return 0 if rows and all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
