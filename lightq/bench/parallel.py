"""``python -m lightq.bench parallel``: one video's job on one process (one GPU) and on ``N`` (``torchrun``, one GPU
each) per layout, side by side.

Every job is the user's command, in a fresh process group: ``python -m lightq <overrides> parallel=none`` first,
then per ``--layouts`` entry ``<parallel option>:<N>`` (plus any overrides of its own, e.g.
``"cfg-ulysses:8 parallel.vae=rank0"``) ``torchrun --standalone --nproc-per-node N -m lightq <overrides>
parallel=<option>`` (``lightq.bench.pipeline.run_job``). Per job the table gives the wall time of the launch (what
the user waits for), the stages of rank 0's ``result.json``, the speedups against the one-process job (wall,
denoise, one denoising step after the first, decode) and the denoise efficiency (speedup / N), every rank's peak
GPU memory, who decoded (``parallel.vae``), and the job's outputs against the one-process job's: the largest
absolute difference and cosine of the final latents (``latents.pt``), and the PSNR of the decoded videos
(``video.mp4``, 8-bit frames). Each job's own comparison with a bf16 baseline is off (``quality.compare=false``)
unless the overrides set it.

``--cache warm`` (the default) runs every job once untimed first (compiled kernels, the page cache of the
weights); ``keep`` times the first run. The scaling targets and measured results: docs/PARALLEL.md.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path

from ..errors import LightqError
from ..paths import conf_dir
from .pipeline import GIB, Job, _fmt, run_job

DEFAULT_LAYOUTS = ["ulysses:4", "ulysses:8", "cfg-ulysses:8"]
SINGLE = "1 process"


def parse_layouts(specs: list[str], common: list[str]) -> list[Job]:
    """The one-process job, then one job per ``<parallel option>:<N> [overrides]`` entry; a LightqError names an
    entry (or a common override) that cannot be run and the fix."""
    for o in common:
        if o.split("=", 1)[0].lstrip("+~").startswith(("parallel", "hydra.run.dir")):
            raise LightqError(f"'{o}': the bench sets parallel= per job and hydra.run.dir per job folder; give "
                              "layouts with --layouts and leave them out of the common overrides")
    options = sorted(p.stem for p in (conf_dir() / "parallel").glob("*.yaml") if p.stem != "none")
    jobs = [Job(SINGLE, ["parallel=none"])]
    if not specs:
        raise LightqError("--layouts is empty: give entries like ulysses:4;cfg-ulysses:8")
    for spec in specs:
        head, *extra = shlex.split(spec)
        name, _, procs = head.partition(":")
        if name not in options:
            raise LightqError(f"--layouts entry '{spec}': '{name}' is not a parallel layout; choose one of "
                              f"{', '.join(options)}, as <layout>:<processes>")
        if not procs.isdigit() or int(procs) < 2:
            raise LightqError(f"--layouts entry '{spec}': give the process count (2 or more) after the colon, "
                              f"e.g. {name}:4")
        bad = next((o for o in extra if "=" not in o), None)
        if bad is not None:
            raise LightqError(f"--layouts entry '{spec}': '{bad}' is no override (key=value)")
        label = " ".join([f"{name} x{procs}", *extra])
        jobs.append(Job(label, [f"parallel={name}", *extra], procs=int(procs)))
    return jobs


def check_gpus(jobs: list[Job]) -> None:
    """On a CUDA machine, a LightqError when a job needs more GPUs than the machine shows (nothing is launched)."""
    import torch

    if not torch.cuda.is_available():
        return  # CPU processes over gloo: any count runs
    shown = torch.cuda.device_count()
    big = max(jobs, key=lambda j: j.procs)
    if big.procs > shown:
        raise LightqError(f"'{big.label}' needs {big.procs} GPUs but this machine shows {shown}: give --layouts "
                          f"with at most {shown} processes (e.g. ulysses:{shown})")


def _outputs(job: Job):
    """(latents, uint8 frames [F, H, W, 3]) of a finished job, or None when it wrote none."""
    import torch

    from ..pipeline.video import read_mp4

    try:
        return torch.load(job.out / "latents.pt"), read_mp4(job.out / "video.mp4")
    except (OSError, LightqError, RuntimeError):
        return None


def _psnr_8bit(a, b) -> float | None:
    """PSNR in dB of two uint8 videos (peak 255), frame by frame in int64; None for different shapes."""
    import numpy as np

    if a.shape != b.shape:
        return None
    sq = sum(int(((x.astype(np.int16) - y.astype(np.int16)).astype(np.int64) ** 2).sum()) for x, y in zip(a, b))
    return math.inf if sq == 0 else 10.0 * math.log10(255.0**2 * a.size / sq)


def _ratio(base: float | None, value: float | None) -> float | None:
    return round(base / value, 3) if base and value else None


def _row(job: Job, base: Job, base_out, out) -> dict:
    r, b = job.result, base.result
    t, bt = r.get("timings_s", {}), b.get("timings_s", {}) if b.get("status") == "ok" else {}
    par = r.get("parallel", {})
    ranks = par.get("ranks") or [{"peak_gpu_bytes": r.get("memory", {}).get("peak_gpu_bytes", 0)}]
    row = {
        "job": job.label, "procs": job.procs, "cache": job.cache, "status": r.get("status", "failed"),
        "reason": r.get("reason", ""), "layout": par.get("layout", "single process"), "vae": par.get("vae", "-"),
        "wall_s": round(job.wall_s, 2), "stages_s": {k: t[k] for k in ("load", "encode_text", "encode_image",
                                                                         "denoise", "decode", "write") if k in t},
        "denoise_per_step_s": t.get("denoise_per_step"), "denoise_warmup_s": t.get("denoise_warmup"),
        "speedup_wall": _ratio(base.wall_s if bt else None, job.wall_s),
        "speedup_denoise": _ratio(bt.get("denoise"), t.get("denoise")),
        "speedup_step": _ratio(bt.get("denoise_per_step"), t.get("denoise_per_step")),
        "speedup_decode": _ratio(bt.get("decode"), t.get("decode")),
        "peak_gpu_gib_per_rank": [round(x.get("peak_gpu_bytes", 0) / GIB, 2) for x in ranks],
        "latent_max_abs_diff": None, "latent_cosine": None, "video_psnr_db": None,
    }
    row["efficiency_denoise"] = round(row["speedup_denoise"] / job.procs, 3) if row["speedup_denoise"] else None
    if base_out is not None and out is not None:
        from ..pipeline.quality import cosine

        (la, va), (lb, vb) = out, base_out
        if la.shape == lb.shape:
            row["latent_max_abs_diff"] = float((la.float() - lb.float()).abs().max())
            row["latent_cosine"] = cosine(la, lb)
        row["video_psnr_db"] = _psnr_8bit(va, vb)
    return row


def outputs_of(job: Job):
    """``_outputs`` of ``job`` if it finished, else None."""
    return _outputs(job) if job.result.get("status") == "ok" else None


def rows_of(jobs: list[Job], outs: list) -> list[dict]:
    """Table rows: every job against the first one-process job of the same cache state (``outs``: each job's
    ``outputs_of``)."""
    rows = []
    for job, out in zip(jobs, outs):
        base = next((i for i, j in enumerate(jobs) if j.label == SINGLE and j.cache == job.cache), None)
        rows.append(_row(job, jobs[base], outs[base], out) if base is not None else _row(job, job, None, None))
    return rows


COLUMNS = ("job", "procs", "wall s", "load s", "denoise s", "decode s", "step s", "x wall", "x denoise", "x step",
           "x decode", "eff.", "vae", "peak GPU GiB per rank", "latent max |d|", "latent cos", "video PSNR dB")


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    ratio = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['job']} | {r['procs']} | {r['status']}: {r['reason'][:150]} |"
                         + " |" * (len(COLUMNS) - 3))
            continue
        s = r["stages_s"]
        psnr = r["video_psnr_db"]
        cells = [r["job"], str(r["procs"]), _fmt(r["wall_s"]), _fmt(s.get("load")), _fmt(s.get("denoise"), 2),
                 _fmt(s.get("decode"), 2), _fmt(r["denoise_per_step_s"], 3), ratio(r["speedup_wall"]),
                 ratio(r["speedup_denoise"]), ratio(r["speedup_step"]), ratio(r["speedup_decode"]),
                 _fmt(r["efficiency_denoise"], 2), r["vae"], " / ".join(f"{g:.1f}" for g in r["peak_gpu_gib_per_rank"]),
                 "-" if r["latent_max_abs_diff"] is None else f"{r['latent_max_abs_diff']:.3g}",
                 "-" if r["latent_cosine"] is None else f"{r['latent_cosine']:.6f}",
                 "-" if psnr is None else ("inf" if psnr == math.inf else f"{psnr:.2f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(layouts: list[str], common: list[str], cache: str, work: Path | None, json_path: str | None,
        repeat: int = 1) -> list[dict]:
    if cache not in ("warm", "keep"):
        raise LightqError(f"--cache {cache}: choose warm (an untimed run of each job first) or keep")
    if repeat < 1:
        raise LightqError(f"--repeat {repeat}: give 1 or more timed runs per job")
    specs = parse_layouts(layouts, common)
    check_gpus(specs)
    if not any(o.split("=", 1)[0] == "quality.compare" for o in common):
        common = ["quality.compare=false", *common]
    work = Path(work or Path.cwd() / "bench-parallel").resolve()
    jobs: list[Job] = []
    outs: list = []
    rows: list[dict] = []
    for spec in specs:
        for _ in range(repeat):
            if cache == "warm":
                run_job(Job(spec.label, spec.overrides, "prime", spec.procs), common, work, len(jobs))
            job = run_job(Job(spec.label, spec.overrides, cache, spec.procs), common, work, len(jobs))
            jobs.append(job)
            outs.append(outputs_of(job))
            r = job.result
            print(f"{job.label}: {r.get('status')} in {job.wall_s:.1f} s"
                  + (f" ({r.get('reason', '')[:200]})" if r.get("status") != "ok" else ""), flush=True)
            if r.get("status") != "ok" and job.stderr_tail:
                print(job.stderr_tail, file=sys.stderr)
            rows = rows_of(jobs, outs)
            header = _header(jobs, common, cache)
            if json_path:  # after every job: a killed run keeps its rows
                Path(json_path).write_text(json.dumps({"header": header, "common": common, "rows": rows},
                                                      indent=2) + "\n")
    print(markdown(rows, _header(jobs, common, cache)))
    return rows


def _header(jobs: list[Job], common: list[str], cache: str) -> str:
    gpu = next((j.result.get("hardware", {}).get("gpu") for j in jobs if j.result.get("hardware")), None)
    return (f"`python -m lightq {' '.join(common)}` on 1 process and per layout under torchrun; device: "
            f"{gpu or 'cpu'} (one per process); python {sys.version.split()[0]}; cache: {cache}")
