"""``python -m lightq.bench pipeline``: the user's job, ``python -m lightq ...``, once per mode, side by side.

Each job runs in its own fresh process exactly as a user types it (``python -m lightq <overrides>``), the bf16 job
(every mode ``none``) first. Per job the table gives the process's wall time (what the user waits for, Python and
Hydra start-up included), its ratio to the bf16 job's, every stage of ``result.json``'s ``timings_s`` and the
mp4 encode's own time in the background (``write_background``: inside ``decode``, ``write`` and ``quality``, not
added), the warm-up (the first denoising step's excess over the median of the others, plus the ``kernel_warmup``
stage), how many of lightq's Triton kernels were compiled in the background and how many at a launch
(``result.json`` ``kernels``), peak GPU and host memory, and quality against the bf16 job (same weights, seed and
prompt: the bf16 job caches the baseline every later job of the run compares with). The wall time outside the job
splits into ``start-up`` (the process's age when its job began: interpreter, imports, Hydra; ``result.json``
``process.before_job_s``) and ``exit`` (after the job's record is complete: Hydra's bookkeeping, freeing memory,
interpreter shutdown).

Caches. Compiled Triton kernels and autotuning results live in ``TRITON_CACHE_DIR``, lightq's baselines in
``LIGHTQ_CACHE``. The run gets its own folder for both (``--work``); ``--cache cold`` gives every job an empty
Triton cache (what it compiles is then merged into the folder's shared one) (a first run on a fresh machine, as far as a process can make one), ``warm`` runs every job once
untimed first with the same cache, ``both`` reports the cold and then the warm job, ``keep`` uses the folder's
caches as an earlier run left them. The device's OS page cache and driver state are not reset.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LightqError
from ..results import STAGES

GIB = 2**30
QUANT_GROUPS = ("dit_quant", "t5_quant", "clip_quant", "attn_quant", "dit_low_quant")


@dataclass
class Job:
    """One ``python -m lightq`` run: a label and its overrides (on top of the run's common ones); ``procs`` > 1:
    launched by ``torchrun`` with that many processes (a ``parallel=`` job)."""

    label: str
    overrides: list[str]
    cache: str = "warm"  # cold | warm
    procs: int = 1
    out: Path | None = None  # the job's folder, once run
    wall_s: float = 0.0
    exit_code: int = 0
    result: dict = field(default_factory=dict)
    stderr_tail: str = ""


def parse_jobs(specs: list[str]) -> list[Job]:
    """Jobs from ``--jobs`` entries: a bare mode (``fp8-triton``) is ``dit_quant=<mode>``; an entry with ``=`` is a
    space-separated override list (``"dit_quant=fp8-sgl t5_quant=fp8-sgl"``). The bf16 job comes first."""
    jobs = [Job("bf16", [f"{g}=none" for g in QUANT_GROUPS[:3]])]
    for spec in specs:
        overrides = shlex.split(spec) if "=" in spec else [f"dit_quant={spec}"]
        if all(o.split("=", 1)[1] == "none" for o in overrides if o.split("=", 1)[0] in QUANT_GROUPS):
            continue  # the baseline is always there, once
        jobs.append(Job(" ".join(o.replace("_quant=", "=") for o in overrides), overrides))
    return jobs


def _env(work: Path, triton_cache: Path) -> dict:
    env = dict(os.environ)
    env.update(TRITON_CACHE_DIR=str(triton_cache), LIGHTQ_CACHE=str(work / "lightq"), PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def run_job(job: Job, common: list[str], work: Path, index: int) -> Job:
    """Run ``job`` as a user would, in a fresh process; fills wall time, exit code and result.json."""
    out = work / "jobs" / f"{index:02d}-{job.cache}-{job.label.replace(' ', '_').replace('=', '-')}"
    if out.exists():
        shutil.rmtree(out)
    job.out = out
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={job.procs}"] if job.procs > 1 else []
    cmd = [sys.executable, *launcher, "-m", "lightq", *common, *job.overrides, f"hydra.run.dir={out}"]
    shared = work / "triton"
    triton_cache = work / "triton-cold" if job.cache == "cold" else shared
    if job.cache == "cold":
        shutil.rmtree(triton_cache, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(work, triton_cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job.wall_s = time.perf_counter() - t0
    if job.cache == "cold" and triton_cache.is_dir():  # what a cold job compiled warms later jobs of the run
        shutil.copytree(triton_cache, shared, dirs_exist_ok=True)
    job.exit_code = proc.returncode
    job.stderr_tail = proc.stderr[-2000:]
    try:
        job.result = json.loads((out / "result.json").read_text())
    except (OSError, ValueError):
        job.result = {"status": "failed", "reason": f"no result.json (exit {proc.returncode})"}
    return job


def _warmup_s(t: dict) -> float:
    return t.get("kernel_warmup", 0.0) + t.get("denoise_warmup", 0.0)


def _fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _row(job: Job, base: Job | None) -> dict:
    r = job.result
    t, mem, q = r.get("timings_s", {}), r.get("memory", {}), r.get("quality", {})
    total = t.get("total")
    before = (r.get("process") or {}).get("before_job_s")
    stages = {k: t[k] for k in STAGES if k in t}  # not the detail beside them (steps, the background encode)
    bt = base.result.get("timings_s", {}) if base is not None and base.result.get("status") == "ok" else {}
    return {
        "job": job.label, "cache": job.cache, "status": r.get("status", "failed"), "reason": r.get("reason", ""),
        "wall_s": round(job.wall_s, 2),
        "wall_vs_bf16": round(base.wall_s / job.wall_s, 3) if base is not None and bt else None,
        "process_overhead_s": round(job.wall_s - total, 2) if total is not None else None,
        "startup_s": before, "exit_s": round(job.wall_s - total - before, 2) if None not in (total, before) else None,
        "stages_s": stages, "unaccounted_s": t.get("unaccounted"), "total_s": total,
        "write_background_s": t.get("write_background"),
        "denoise_steps_s": t.get("denoise_steps"), "warmup_s": round(_warmup_s(t), 3) if t else None,
        "denoise_vs_bf16": (round(bt["denoise"] / t["denoise"], 3) if bt.get("denoise") and t.get("denoise")
                            else None),
        "peak_gpu_gib": round(mem.get("peak_gpu_bytes", 0) / GIB, 2),
        "peak_host_gib": round(mem.get("peak_host_bytes", 0) / GIB, 2),
        "peak_host_gib_by_stage": {k: round(v / GIB, 2) for k, v in mem.get("peak_host_bytes_by_stage", {}).items()},
        "psnr_db": q.get("psnr_db"), "ssim": q.get("ssim"), "latent_cosine": q.get("latent_cosine"),
        "baseline": q.get("baseline"), "kernels": r.get("kernels"),
        "components": {c: f"{d.get('mode')} ({d.get('backend')})" for c, d in r.get("components", {}).items()
                       if isinstance(d, dict) and d.get("mode")},
    }


def _kernels(k: dict | None) -> str:
    """``compiled in the background / at a launch`` of lightq's Triton kernels (``-`` for a job with none)."""
    if not k:
        return "-"
    return f"{k.get('precompiled')} / {'?' if k.get('compiled_at_launch') is None else k['compiled_at_launch']}"


def rows_of(jobs: list[Job]) -> list[dict]:
    """Table rows; each job is compared with the bf16 job of the same cache state (its first one)."""
    rows = []
    for job in jobs:
        base = next((j for j in jobs if j.label == "bf16" and j.cache == job.cache), None)
        rows.append(_row(job, base))
    return rows


STAGE_COLUMNS = ("setup", "load", "encode_text", "encode_image", "kernel_warmup", "denoise", "decode", "write",
                 "quality")


def markdown(rows: list[dict], header: str) -> str:
    cols = ["job", "cache", "wall s", "vs bf16", "start-up s", *[f"{s} s" for s in STAGE_COLUMNS], "mp4 encode s",
            "exit s", "warm-up s", "kernels bg / at launch",
            "denoise vs bf16", "unacc. %", "peak GPU GiB", "peak host GiB", "PSNR dB", "SSIM", "latent cos"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['job']} | {r['cache']} | {r['status']}: {r['reason'][:150]} |" + " |" * (len(cols) - 3))
            continue
        s = r["stages_s"]
        unacc = 100 * r["unaccounted_s"] / r["total_s"] if r["total_s"] else None
        ratio = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
        cells = [r["job"], r["cache"], _fmt(r["wall_s"]), ratio(r["wall_vs_bf16"]),
                 _fmt(r["startup_s"]),
                 *[_fmt(s.get(k)) if k in s else "-" for k in STAGE_COLUMNS], _fmt(r.get("write_background_s")),
                 _fmt(r["exit_s"]), _fmt(r["warmup_s"], 2), _kernels(r["kernels"]),
                 ratio(r["denoise_vs_bf16"]), _fmt(unacc, 2), _fmt(r["peak_gpu_gib"]), _fmt(r["peak_host_gib"]),
                 "inf" if r["psnr_db"] == float("inf") else _fmt(r["psnr_db"], 2),
                 "-" if r["ssim"] is None else f"{r['ssim']:.4f}",
                 "-" if r["latent_cosine"] is None else f"{r['latent_cosine']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(job_specs: list[str], common: list[str], cache: str, work: Path | None, json_path: str | None,
        repeat: int = 1) -> list[dict]:
    if cache not in ("cold", "warm", "both", "keep"):
        raise LightqError(f"--cache {cache}: choose cold, warm, both or keep")
    work = Path(work or Path.cwd() / "bench-pipeline").resolve()
    if (work / "lightq").exists():
        shutil.rmtree(work / "lightq")  # baselines of an earlier run are not this run's bf16 job
    jobs: list[Job] = []
    states = {"both": ["cold", "warm"], "keep": ["warm"]}.get(cache, [cache])
    for state in states:
        for spec in parse_jobs(job_specs):
            for _ in range(repeat):
                job = Job(spec.label, spec.overrides, state)
                if cache == "warm":  # populate the caches with an untimed run of the same job
                    run_job(Job(job.label, job.overrides, "prime"), common, work, len(jobs))
                jobs.append(run_job(job, common, work, len(jobs)))
                r = jobs[-1].result
                print(f"[{state}] {job.label}: {r.get('status')} in {jobs[-1].wall_s:.1f} s"
                      + (f" ({r.get('reason', '')[:200]})" if r.get("status") != "ok" else ""), flush=True)
                if r.get("status") != "ok" and jobs[-1].stderr_tail:
                    print(jobs[-1].stderr_tail, file=sys.stderr)
                rows, header = _write(jobs, common, cache, json_path)  # after every job: a killed run keeps its rows
    print(markdown(rows, header))
    return rows


def _write(jobs: list[Job], common: list[str], cache: str, json_path: str | None) -> tuple[list[dict], str]:
    rows = rows_of(jobs)
    gpu = next((j.result.get("hardware", {}).get("gpu") for j in jobs if j.result.get("hardware")), None)
    header = (f"`python -m lightq {' '.join(common)}` per job; device: {gpu or 'cpu'}; "
              f"python {sys.version.split()[0]}; cache: {cache}")
    if json_path:
        Path(json_path).write_text(json.dumps({"header": header, "common": common, "rows": rows}, indent=2) + "\n")
    return rows, header

