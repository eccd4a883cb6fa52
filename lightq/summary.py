"""The console summary of a finished single run: what ran, how long each stage took, memory, quality, the video.

``summary(result, out, model)`` turns the job's result.json fields (``lightq.results``) and its model config into a
few aligned lines. Every number comes from ``result``; a field the job did not record is left out, never guessed.
Quality is shown against the bf16 baseline the job compared with (and says which); a speed ratio only where both
runs were timed in this process (``quality.speedup_denoise``), else the job's reason why not. For the embedded
tiny model (synthetic weights) it says the video is noise and how to run real weights.
"""

from __future__ import annotations

from pathlib import Path

STAGES = ("setup", "load", "encode_text", "encode_image", "denoise", "decode", "write", "baseline_run", "quality",
          "unaccounted")
REAL_WEIGHTS = ("the tiny model's weights are synthetic, so the video is noise; for real weights: lightq "
                "model=wan2.1-t2v-1.3b (fetches Wan-AI/Wan2.1-T2V-1.3B from the Hub; a local copy: "
                "model.weights=<folder in Wan's layout>)")


def _gib(n) -> str:
    return f"{n / 2**30:.2f} GiB"


def _component(name: str, comp: dict) -> str:
    size = f", {comp['weight_bytes'] / 2**20:.1f} MiB" if comp.get("weight_bytes") is not None else ""
    if name == "vae":
        return f"fp32 (the VAE is never quantized){size}"
    if comp.get("scheme", "none") == "none":
        return f"{comp.get('mode', 'none')}: bf16, not quantized{size}"
    layers = f", {comp['quantized_layers']} quantized linears" if comp.get("quantized_layers") is not None else ""
    return f"{comp.get('mode')}: {comp.get('scheme')} on backend {comp.get('backend')} ({comp.get('reason')}){layers}{size}"


def _times(t: dict) -> str:
    parts = []
    for stage in STAGES:
        if isinstance(t.get(stage), (int, float)):
            extra = ""
            if stage == "denoise" and isinstance(t.get("denoise_per_step"), (int, float)):
                extra = f" (median step {t['denoise_per_step']:.2f})"
            if stage == "write" and isinstance(t.get("write_background"), (int, float)):
                extra = f" (mp4 encode {t['write_background']:.2f} in the background, overlapping decode and quality)"
            parts.append(f"{stage} {t[stage]:.2f}{extra}")
    total = f"{t['total']:.1f} s" if isinstance(t.get("total"), (int, float)) else "?"
    return f"{total} in all; seconds per stage: " + ", ".join(parts)


def _quality(q: dict) -> list[tuple[str, str]]:
    rows = []
    baseline = q.get("baseline", "")
    if "psnr_db" in q:
        rows.append(("quality", f"PSNR {q['psnr_db']:.2f} dB, SSIM {q.get('ssim', float('nan')):.4f}, latent cosine "
                                f"{q.get('latent_cosine', float('nan')):.4f} against bf16 ({baseline})"))
    elif baseline:
        rows.append(("quality", baseline))
    if isinstance(q.get("speedup_denoise"), (int, float)):
        rows.append(("speed", f"denoising {q['speedup_denoise']:.2f}x the bf16 run's, both timed in this job "
                              "(one machine, one after the other: indicative; python -m lightq.bench measures it)"))
    elif q.get("speed"):
        rows.append(("speed", q["speed"]))
    return rows


def summary(result: dict, out: Path, model) -> str:
    """The lines printed after ``lightq: ok -> <out>`` (``model``: the job's ``cfg.model``)."""
    rows: list[tuple[str, str]] = []
    hw = result.get("hardware") or {}
    device = hw.get("gpu") or hw.get("name") or "?"
    width, height = result.get("width", model.width), result.get("height", model.height)  # the video's own
    rows.append(("model", f"{model.name} ({model.task}, {model.frames} frames {width}x{height}, "
                          f"{model.steps} steps, weights {model.weights}) on {device}"))
    for name, comp in (result.get("components") or {}).items():
        rows.append((name, _component(name, comp)))
    rows.append(("time", _times(result.get("timings_s") or {})))
    mem = result.get("memory") or {}
    peaks = [f"host {_gib(mem['peak_host_bytes'])}"] if mem.get("peak_host_bytes") else []
    if mem.get("peak_gpu_bytes"):
        peaks.append(f"GPU {_gib(mem['peak_gpu_bytes'])}")
    if peaks:
        rows.append(("peak memory", ", ".join(peaks)))
    rows += _quality(result.get("quality") or {})
    outputs = result.get("outputs") or {}
    if outputs.get("video"):
        rows.append(("video", f"{Path(out) / outputs['video']} ({result.get('frames', '?')} frames, {model.fps} fps)"))
    rows.append(("record", f"{Path(out) / 'result.json'}"))
    if model.weights == "synthetic":
        rows.append(("note", REAL_WEIGHTS))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
