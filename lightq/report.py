"""Sweep tables: ``results.jsonl``, ``results.csv``, ``results.md`` and ``results.svg`` from the jobs' result.json.

``build(sweep_dir)`` scans every ``result.json`` below ``sweep_dir`` and rewrites the four files (each atomically;
the tables list the bf16 baseline jobs first; the picture is ``lightq.sweep_plot``),
so the tables are whole after every job, whichever jobs failed. Jobs that finish at once in other processes
(the joblib and SLURM launchers) rebuild under an exclusive lock on ``<sweep_dir>/.results.lock``: each rebuild's
scan and writes happen together, so the last rebuild sees every result written before it and no rebuild
overwrites a newer table with an older scan. ``python -m lightq.report <dir>`` does the same
by hand. Speedup is the bf16 job's denoising time over this job's, when the sweep holds a bf16 job that matches
this one in everything but the quantization modes (``baseline_key``; else the job's own comparison with its cached
baseline). A result.json that cannot be read is a ``failed`` row naming the file, never a missing one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

from . import staging, sweep_plot
from .results import RESULT_FILE

LOCK_FILE = ".results.lock"
COLUMNS = [
    "job", "status", "reason", "model",
    "dit_mode", "dit_backend", "dit_low_mode", "dit_low_backend", "t5_mode", "t5_backend", "clip_mode", "clip_backend", "attn_mode", "attn_backend",
    "load_s", "encode_s", "denoise_step_s", "decode_s", "total_s",
    "peak_host_gib", "peak_gpu_gib", "dit_weight_mib", "dit_low_weight_mib", "t5_weight_mib", "clip_weight_mib",
    "psnr_db", "ssim", "latent_cosine", "speedup",
]


def _write_text_atomic(path: Path, text: str) -> None:
    staging.write_atomic(path, lambda tmp: tmp.write_text(text))


def collect(sweep_dir: Path) -> list[tuple[str, dict]]:
    """(job folder relative to the sweep, result) for every job, in folder order.

    result.json is only ever replaced whole (written beside it, then renamed), so one that cannot be read or is
    not a job record is damaged: it becomes a ``failed`` row saying so, never a job missing from the table.
    """
    rows = []
    for f in sorted(Path(sweep_dir).rglob(RESULT_FILE)):
        job = str(f.parent.relative_to(sweep_dir)) or "."
        try:
            res = json.loads(f.read_text())
            problem = None if isinstance(res, dict) and isinstance(res.get("status"), str) else "not a job record"
        except (OSError, ValueError) as exc:
            problem = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if problem:
            res = {"status": "failed", "reason": f"{job}/{RESULT_FILE} is unreadable ({problem}): run the job "
                                                 "again (resume=true re-runs it)"}
        rows.append((job, res))
    return rows


def _gib(n) -> float | None:
    return round(n / 2**30, 3) if n else None


def _mib(n) -> float | None:
    return round(n / 2**20, 3) if n else None


def _is_baseline(res: dict) -> bool:
    comps = res.get("components") or {}
    return bool(comps) and all(c.get("scheme", "none") == "none" for c in comps.values())


QUANT_GROUPS = ("dit_quant", "dit_low_quant", "t5_quant", "clip_quant", "attn_quant")  # what a row may differ from its baseline in
UNRECORDED = ("resume", "tracking", "sweep", "hydra")  # overrides that change how a job is run, not what it computes


def baseline_key(res: dict) -> str:
    """What a job's bf16 baseline must share with it: every config-group choice and command-line override
    except the quantization modes (``QUANT_GROUPS``, their options and checkpoints) and bookkeeping
    (``UNRECORDED``). Two jobs with the same key ran the same model, sampler, seed, prompt, sizes and offload."""
    choices = dict(res.get("choices") or {})
    overrides = choices.pop("overrides", None) or []
    groups = {k: v for k, v in choices.items() if k.split(".")[0].split("/")[0] not in QUANT_GROUPS + UNRECORDED}
    kept = []
    for o in overrides:
        key = str(o).lstrip("+~").split("=", 1)[0]
        if key.split(".")[0].split("/")[0] not in QUANT_GROUPS + UNRECORDED:
            kept.append(str(o))
    return json.dumps([sorted(groups.items()), sorted(kept)])


def row(job: str, res: dict, base_denoise: dict[str, float]) -> dict:
    comps, t = res.get("components") or {}, res.get("timings_s") or {}
    mem, q = res.get("memory") or {}, res.get("quality") or {}
    model = (res.get("choices") or {}).get("model", "")
    r = {"job": job, "status": res.get("status"), "reason": res.get("reason", ""), "model": model}
    for c in ("dit", "dit_low", "t5", "clip"):
        comp = comps.get(c) or {}
        r[f"{c}_mode"], r[f"{c}_backend"] = comp.get("mode", ""), comp.get("backend") or ""
        r[f"{c}_weight_mib"] = _mib(comp.get("weight_bytes"))
    attn = comps.get("attn") or {}
    r["attn_mode"], r["attn_backend"] = attn.get("mode", ""), attn.get("backend") or ""
    r.update(load_s=t.get("load"), encode_s=round(t.get("encode_text", 0) + t.get("encode_image", 0), 4) if t else None,
             denoise_step_s=t.get("denoise_per_step"), decode_s=t.get("decode"), total_s=t.get("total"),
             peak_host_gib=_gib(mem.get("peak_host_bytes")), peak_gpu_gib=_gib(mem.get("peak_gpu_bytes")))
    if _is_baseline(res) and res.get("status") == "ok":
        r.update(psnr_db="baseline", ssim="baseline", latent_cosine="baseline", speedup=1.0)
    else:
        r.update(psnr_db=q.get("psnr_db"), ssim=q.get("ssim"), latent_cosine=q.get("latent_cosine"))
        base = base_denoise.get(baseline_key(res))
        if base and t.get("denoise"):
            r["speedup"] = round(base / t["denoise"], 3)
        else:
            r["speedup"] = q.get("speedup_denoise")
    return r


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def build(sweep_dir: Path) -> list[dict]:
    """Rebuild results.jsonl / .csv / .md / .svg in ``sweep_dir`` under the sweep's lock; returns the rows."""
    sweep_dir = Path(sweep_dir)
    with staging.file_lock(sweep_dir / LOCK_FILE):
        return _build_locked(sweep_dir)


def _build_locked(sweep_dir: Path) -> list[dict]:
    jobs = collect(sweep_dir)
    base_denoise = {}
    for _, res in jobs:
        if _is_baseline(res) and res.get("status") == "ok":
            base_denoise[baseline_key(res)] = (res.get("timings_s") or {}).get("denoise")
    # baseline jobs first (the rows every other row is compared with), then the rest in folder order
    jobs.sort(key=lambda jr: not (_is_baseline(jr[1]) and jr[1].get("status") == "ok"))
    rows = [row(job, res, base_denoise) for job, res in jobs]
    _write_text_atomic(sweep_dir / "results.jsonl", "".join(json.dumps({"job": j, **r}, default=str) + "\n"
                                                            for j, r in jobs))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    _write_text_atomic(sweep_dir / "results.csv", buf.getvalue())
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    _write_text_atomic(sweep_dir / "results.md", "\n".join(md) + "\n")
    plot_rows = [{**r, "overrides": (res.get("choices") or {}).get("overrides") or [],
                  "baseline": _is_baseline(res) and res.get("status") == "ok"} for r, (_, res) in zip(rows, jobs)]
    _write_text_atomic(sweep_dir / "results.svg", sweep_plot.render(plot_rows))
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m lightq.report <sweep folder>", file=sys.stderr)
        return 2
    rows = build(Path(argv[0]))
    print((Path(argv[0]) / "results.md").read_text(), end="")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
