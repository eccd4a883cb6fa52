"""The pipeline graph of one job: text encoder -> image encoder (I2V) -> DiT denoising loop -> VAE decode -> writer.
The DiT may be two experts (Wan2.2 A14B: ``dit`` for the high-noise steps, ``dit_low`` after the boundary,
``experts.Experts``), each in its own mode; under offload only the active one is on the device (``offload=model``
copies the low-noise one in during the last high-noise step when the device has room for both).

``run_pipeline(cfg, hw, plans, out, record, timer)`` loads every component with its planned mode, generates the
video, writes ``video.mp4`` and ``latents.pt`` into ``out``, times each stage (``lightq.results.STAGES``), and
compares the result with the bf16 baseline of the same model, seed, prompt and sampler (``quality``), filling
``record`` with the fields of result.json. The mp4 is encoded in a background thread fed by the decode, chunk by
chunk, and running on while ``quality`` runs (``video.Mp4Writer``; how the stages count it: ``lightq.results``).

Stages and what flows between them (B = 1; CFG runs the DiT once more with the negative prompt):

    prompt --tokenizer--> ids [1, L] --T5--> context [1, L, text_dim]
    image  --CLIP--> clip_fea [1, 257, clip_dim];  image --VAE.encode--> y [1, 20, f, h, w]   (I2V only)
    noise [1, 16, f, h, w] --sampler(DiT(x, t, context, clip_fea, y))--> latents --VAE.decode--> video [1, 3, F, H, W]

Wan2.2 A14B I2V has no CLIP (``y`` only); Wan2.2 TI2V (48 latent channels) has neither: its image's latents replace
the first latent frame (``sampler.sample``'s ``keep``) and those tokens get timestep 0.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import LightqError
from ..hardware import Hardware
from ..models.attention import use_self_attention
from ..models.family import family
from ..plan import ComponentPlan
from ..results import StageTimer
from . import components as C
from .experts import Experts

log = logging.getLogger("lightq")

# A cached baseline was timed by another process, at another time: the ratio of two such runs on a shared machine
# says more about the machine's load than about the modes (docs/BENCHMARKS.md times both in one run).
SPEED_NOT_COMPARED = ("not compared: the cached bf16 baseline was timed in another process (a ratio of separate runs "
                      "on a shared machine is noise); python -m lightq.bench compares speed within one run")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Generated:
    latents: torch.Tensor  # [16, f, h, w] fp32, on the CPU
    video: torch.Tensor | None  # [F, 3, H, W] in [-1, 1], fp32, on the device it was decoded on
    timings: dict
    components: dict
    parallel: dict | None = None  # result.json's "parallel" for a multi-process run (video None off rank 0)
    expert_prefetch: dict | None = None  # result.json's memory.expert_prefetch (``Experts.record``)
    kernels: dict | None = None  # result.json's kernels (``kernels.precompile.Background.record``)


NOT_FINITE_LATENTS = ("the denoised latents hold NaN/Inf values, so nothing was written: every loaded tensor was "
                      "finite, the run's numerics diverged; compare with dit_quant=none")


def generate(cfg, hw: Hardware, plans: dict[str, ComponentPlan], timer: StageTimer | None = None,
             on_frames: Callable[[torch.Tensor], None] | None = None) -> Generated:
    """Load, encode, denoise, decode, each a stage of ``timer``. Everything but the outputs is freed on return.
    ``on_frames`` gets the video's frames ``[n, 3, H, W]`` as the decode makes them (where the video is returned),
    the values of ``Generated.video``'s; non-finite latents raise before the decode."""
    from .sampler import needs_uncond, sample, sampler_config

    timer = timer if timer is not None else StageTimer()
    run = _parallel_runtime(cfg, hw)  # before anything touches a GPU: each rank takes its own
    device = torch.device("cuda" if hw.is_cuda else "cpu")
    dtype = DTYPES[cfg.model.dtype]
    if device.type == "cuda":
        timer.sync = lambda: torch.cuda.synchronize(device)
    offload = C.Offload(cfg.offload, device, cfg)
    comps = {}
    with timer("kernel_warmup"):  # this job's kernels start compiling in the background, while it loads
        compiling = C.kernel_precompile(cfg, hw, plans)
    with compiling or nullcontext():
        with timer("load"):
            folder = C.model_folder(cfg)
            tokenizer = C.load_tokenizer_for(cfg.model, folder)
            methods = C.quant_methods(cfg, plans)
            # each component is placed by ``offload`` as it loads (packed into host memory unless offload=none)
            t5 = C.load_t5(cfg, methods["t5"], folder, device, dtype, True, offload)
            clip = C.load_clip(cfg, methods["clip"], folder, device, dtype, True, offload) if "clip" in plans \
                else None
            experts = {name: C.load_dit(cfg, methods[name], folder, device, dtype, True, component=name,
                                        offload=offload)
                       for name in family(cfg.model.family).experts or ("dit",)}
            vae = C.load_vae(cfg, folder, device, offload)
            self_attention = C.load_self_attention(plans.get("attn"))
        for name, module in (("t5", t5), ("clip", clip), *experts.items(), ("vae", vae)):
            if module is not None:
                comps[name] = C.describe(module, methods.get(name))
                p = plans.get(name)
                log.info("loaded %s: %s (%s), %d quantized linears, %.1f MiB", name, p.mode if p else "fp32",
                         p.reason if p else "VAE is never quantized", comps[name]["quantized_layers"],
                         comps[name]["weight_bytes"] / 2**20)

        if "attn" in plans:
            log.info("DiT self-attention: %s (%s)", plans["attn"].mode, plans["attn"].reason)
        scfg = sampler_config(cfg)
        m = cfg.model
        geometry = family(m.family).geometry(m)
        height, width = C.video_size(cfg)
        with timer("encode_text"), offload.active(t5):
            ids, mask = tokenizer([cfg.prompt, cfg.negative_prompt or ""])
            context = t5(ids.to(device), mask.to(device))
            cond, uncond = context[:1], context[1:]
        offload.release(t5)
        arch = experts["dit"].arch
        extra, keep = {}, None
        if m.task == "i2v":
            with timer("encode_image"):
                image = C.input_image(cfg, height, width).to(device)
                if clip is not None:
                    with offload.active(clip):
                        extra["clip_fea"] = clip(image[None].to(dtype))
                    offload.release(clip)
                with offload.active(vae):
                    if arch.is_i2v:
                        extra["y"] = C.i2v_condition(vae, image, m.frames, geometry)
                    else:
                        keep = C.first_frame_latents(vae, image)
                offload.release(vae)
        if compiling is not None:
            with timer("kernel_warmup"):  # what is still compiling, before the first step needs it
                compiling.wait()
    shape = geometry.latent_shape(m.frames, height, width)
    noise = C.initial_noise(cfg.seed, shape).to(device)
    grid = tuple(n // p for n, p in zip(shape[1:], geometry.patch))
    active = Experts(list(experts.values()), scfg, offload, cfg.offload.prefetch)

    def velocity(x, t, context):
        model = active.at(float(t[0]))
        if keep is not None:
            t = C.token_timesteps(t, keep.shape[2], grid)
        return model(x.to(dtype), t, context, **extra).float()

    steps = StepTimes(timer.sync)
    installed = use_self_attention(self_attention) if self_attention is not None else nullcontext()
    with timer("denoise"), installed, (run.denoising() if run else nullcontext()):
        steps.begin()
        latents = sample(velocity, noise, scfg, cond, uncond if needs_uncond(scfg) else None, True,
                         on_step=steps.lap, keep=keep, guidance=run.guidance() if run else None)
    active.close()
    if not bool(torch.isfinite(latents).all()):  # every rank holds the same latents: all raise, none waits
        raise LightqError(NOT_FINITE_LATENTS)
    rows = run.decode_rows(latents.shape[-2]) if run else None  # every rank decodes its rows, or rank 0 all
    video = None
    if rows is not None or not run or run.layout.is_writer:
        sink = None if on_frames is None else lambda part: on_frames(part[0].transpose(0, 1))  # [n, 3, H, W]
        with timer("decode"), offload.active(vae):
            video = vae.decode(latents.float(), progress=not run or run.layout.is_writer, rows=rows, on_frames=sink)
            video = None if video is None else video[0].transpose(0, 1).float().clamp(-1, 1)  # [F, 3, H, W]
    parallel = _parallel_record(run, hw, rows) if run else None  # after the decode: its peak memory counts
    if video is None:  # a rank other than 0: rank 0 writes the outputs
        return Generated(latents[0].float().cpu(), None, dict(timer.times), comps, parallel)
    timings = {**{k: timer.times[k] for k in ("load", "encode_text", "encode_image", "kernel_warmup", "denoise",
                                              "decode")
                  if k in timer.times}, **steps.summary()}
    log.info("stage times (s): %s", timings)
    return Generated(latents[0].float().cpu(), video, timings, comps, parallel, active.record(),
                     compiling.record() if compiling is not None else None)


def _parallel_runtime(cfg, hw: Hardware):
    """This rank's ``lightq.parallel.runtime.Runtime`` for a run launched on several processes, else None."""
    if cfg.parallel.mode == "none" and cfg.parallel.cfg == 1:
        return None  # one process (also the single-process bf16 baseline of a parallel run)
    from ..parallel.runtime import start

    layout = C.parallel_layout(cfg)
    return start(layout, hw.is_cuda) if layout.world > 1 else None


def _parallel_record(run, hw: Hardware, rows) -> dict:
    """result.json's ``parallel``: the layout, who decoded (``vae``: split, with each rank's latent rows, or rank0),
    and every rank's device and peak GPU memory (a collective: every rank calls it)."""
    lay = run.layout
    mine = {"rank": lay.rank, "device": torch.cuda.current_device() if hw.is_cuda else "cpu",
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if hw.is_cuda else 0}
    vae = {"vae": lay.vae, **({"vae_rows": rows.sizes} if rows is not None else {})}
    return {"world_size": lay.world, "layout": lay.describe(), "cfg": lay.cfg, "sequence": lay.sp,
            "attention": lay.attention, **vae, "ranks": run.gather(mine)}


class StepTimes:
    """Wall time of each denoising step (``lap`` after each, synchronised), and the first step's warm-up: its
    excess over the median of the later steps (compilation, autotuning, first-call allocations)."""

    def __init__(self, sync):
        self.sync, self.laps, self.last = sync, [], 0.0

    def begin(self) -> None:
        self.sync()
        self.last = time.perf_counter()

    def lap(self, i: int) -> None:
        self.sync()
        now = time.perf_counter()
        self.laps.append(now - self.last)
        self.last = now

    def summary(self) -> dict:
        if not self.laps:
            return {}
        rest = sorted(self.laps[1:])
        typical = rest[len(rest) // 2] if rest else self.laps[0]
        return {"denoise_steps": [round(t, 4) for t in self.laps],
                "denoise_per_step": round(typical, 4),
                "denoise_warmup": round(max(self.laps[0] - typical, 0.0), 4)}


def _baseline_key(cfg, hw: Hardware) -> str:
    from .baseline import key

    return key(cfg, hw.device)


def _is_baseline(plans) -> bool:
    return all(p.scheme == "none" for p in plans.values())


def _baseline(cfg, hw, plans, gen: Generated, timer: StageTimer) -> tuple[dict | None, str]:
    """The bf16 run to compare with (``pipeline.baseline``), its tensors on the job's device: cached by key (timed as
    ``quality``); computed now when the policy allows (timed as ``baseline_run``)."""
    from ..paths import cache_dir
    from ..plan import plan_run
    from .baseline import bf16_config, load

    with timer("quality"):
        path = cache_dir() / "baselines" / f"{_baseline_key(cfg, hw)}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        if _is_baseline(plans):
            C.save_atomic({"latents": gen.latents, "video": gen.video.cpu(), "timings": gen.timings}, path)
            return None, "this run is the bf16 baseline"
        data, damaged = load(path, gen.video.device)
    if data is not None:
        return data, f"cached bf16 baseline {path.name}"
    note = f"{damaged}; " if damaged else ""
    policy = cfg.quality.baseline
    if policy == "never" or (policy == "auto" and cfg.model.weights != "synthetic"):
        return None, note + "no bf16 baseline cached for this model/seed/prompt (run it, or set quality.baseline=always)"
    with timer("baseline_run"):
        base_cfg = bf16_config(cfg)
        base = generate(base_cfg, hw, plan_run(base_cfg, hw), StageTimer())
        data = {"latents": base.latents, "video": base.video, "timings": base.timings}
        C.save_atomic({**data, "video": base.video.cpu()}, path)
    return {**data, "timed_here": True}, note + "bf16 baseline computed in this job"


def run_pipeline(cfg, hw: Hardware, plans: dict[str, ComponentPlan], out: Path, record: dict,
                 timer: StageTimer) -> None:
    """Generate, write the outputs, compare with the baseline (each a stage of ``timer``); fills ``record``
    (result.json fields) as it goes, so a failure while writing keeps what was measured."""
    from .video import Mp4Writer, write_frames

    device = torch.device("cuda" if hw.is_cuda else "cpu")
    if hw.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    mp4 = Mp4Writer(out / "video.mp4", fps=cfg.model.fps)  # fed by the decode: encodes while the job goes on
    try:
        gen = generate(cfg, hw, plans, timer, on_frames=mp4.feed)
    except BaseException:  # no whole video: stop the encode (nothing half-written is left)
        mp4.cancel()
        raise
    record["memory"] = {**record.get("memory", {}),
                        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if hw.is_cuda else 0}
    if gen.parallel:
        record["parallel"] = gen.parallel
    if gen.video is None:  # a rank other than 0 of a parallel run: rank 0 writes the outputs and the record
        return
    if gen.expert_prefetch is not None:
        record["memory"]["expert_prefetch"] = gen.expert_prefetch
    if gen.kernels is not None:
        record["kernels"] = gen.kernels
    record["components"] = {name: {**(plans[name].as_dict() if name in plans else {}), **desc}
                            for name, desc in gen.components.items()}
    if "attn" in plans:
        record["components"]["attn"] = plans["attn"].as_dict()
    record["timings_s"] = gen.timings
    record["frames"], _, record["height"], record["width"] = (int(n) for n in gen.video.shape)
    outputs = record.setdefault("outputs", {})
    try:
        with timer("write"):  # its foreground part: the latents, the end of the video's input, the PNG frames
            C.save_atomic(gen.latents, out / "latents.pt")
            outputs["latents"] = "latents.pt"
            mp4.close()  # every frame is in: the decode fed them (a non-finite one raises here)
            if cfg.save_frames:
                write_frames(gen.video, out / "frames")
                outputs["frames"] = "frames/"
        record["quality"] = _quality(cfg, hw, plans, gen, timer, device)
        with timer("write"):  # the rest of it: the wait for the encode
            mp4.result()
        outputs["video"] = "video.mp4"
    except Exception:  # the video is still the user's: let its encode finish, then report the first error
        with timer("write"), suppress(Exception):
            mp4.result()
            outputs["video"] = "video.mp4"
        raise
    except BaseException:  # interrupted: stop the encode (nothing half-written is left) and go
        mp4.cancel()
        raise
    finally:
        if mp4.seconds is not None:
            record["timings_s"]["write_background"] = mp4.seconds


def _quality(cfg, hw: Hardware, plans, gen: Generated, timer: StageTimer, device: torch.device) -> dict:
    """result.json's ``quality``: the comparison with the bf16 baseline (or why there is none)."""
    from .quality import compare

    if not cfg.quality.compare:
        return {"baseline": "not compared (quality.compare=false)"}
    base, why = _baseline(cfg, hw, plans, gen, timer)
    quality = {"baseline": why}
    if base is not None:
        with timer("quality"):
            quality.update(compare(gen.video, base["video"], gen.latents, base["latents"], device))
        if base.get("timed_here"):  # both timed in this process, one after the other
            quality["speedup_denoise"] = round(base["timings"]["denoise"] / gen.timings["denoise"], 4)
        else:
            quality["speed"] = SPEED_NOT_COMPARED
    return quality
