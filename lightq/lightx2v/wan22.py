"""The Wan2.2 keys of a LightX2V config, with the meaning LightX2V's Wan2.2 runners give them (its commit f8aee98b:
``models/runners/wan/wan_runner.py`` ``Wan22MoeRunner`` / ``MultiModelStruct``, ``wan_distill_runner.py``
``Wan22MoeDistillRunner`` / ``MultiDistillModelStruct``, ``schedulers/wan/step_distill/scheduler.py``).

Two experts (classes ``wan2.2_moe`` and ``wan2.2_moe_distill``; lightq's Wan2.2 A14B models):

    boundary (wan2.2_moe; required)         ->  model.boundary: the high-noise expert runs while t >= boundary * 1000
    boundary_step_index (distill; required) ->  sampler.boundary_step: it runs steps 0 .. k-1 (``step_index < k``),
                                                0 <= k < len(denoising_step_list) (LightX2V indexes sigmas[k])
    sample_guide_scale [high, low]          ->  sampler.guide_scale / guide_scale_low (wan2.2_moe: index 0 at the
                                                high-noise steps, 1 at the others, at every step, so a number is
                                                refused); wan2.2_moe_distill never switches it: one number
    high_noise_quantized_ckpt               ->  dit_quant.ckpt when dit_quantized, else unused
    high_noise_original_ckpt                ->  dit_quant.ckpt when no high_noise_quantized_ckpt is read (also when
                                                dit_quantized: LightX2V loads it as the quantized expert)
    low_noise_quantized_ckpt                ->  dit_low_quant.ckpt when dit_quantized, else unused
    low_noise_original_ckpt                 ->  dit_low_quant.ckpt only when dit_quantized is false (LightX2V's
                                                rule; else the low-noise expert comes from the model folder)
    dit_quantized_ckpt / dit_original_ckpt  ->  refused: LightX2V's WanModel reads them for both experts

``use_image_encoder: false`` (every Wan2.2 class) is the models' own design: A14B I2V and TI2V have no CLIP branch;
``true`` is refused. A Wan2.2 MoE key under a one-DiT class is refused (the class would ignore it).
"""

from __future__ import annotations

import json
from typing import Any

from . import keys as K
from .values import LightX2VError, local_path

MOE_FEATURE = "Wan2.2 MoE keys under a one-DiT model class"
DIT_CKPTS = ("dit_quantized_ckpt", "dit_original_ckpt")


def _error(message: str, feature: str | None = None):
    return LightX2VError(message, feature)


def experts(cfg: dict, used: set[str], out) -> None:
    """Map the two-expert keys (module doc) onto ``out``; refuse them under a class with one DiT."""
    present = [k for k in K.MOE_KEYS if cfg.get(k) is not None]
    if out.model_cls not in K.MOE_CLASSES:
        if present:
            k = present[0]
            raise _error(f"{out.path}: {k}={json.dumps(cfg[k])[:40]}: a key of LightX2V's Wan2.2 MoE classes "
                         f"({', '.join(K.MOE_CLASSES)}); model class {out.model_cls} has one DiT and would ignore it: "
                         "name the class with from_lightx2v.model_cls=...", MOE_FEATURE)
        used.update(k for k in K.MOE_KEYS if k in cfg)  # null: LightX2V's "not given"
        return
    used.update(k for k in K.MOE_KEYS if k in cfg)
    for key in DIT_CKPTS:
        if cfg.get(key):
            raise _error(f"{out.path}: {key}: LightX2V's WanModel reads it for both experts of {out.model_cls} (one "
                         "file loaded into two models): give high_noise_* / low_noise_* checkpoints instead",
                         f"{key} on two experts")
    _checkpoints(cfg, out)
    if out.model_cls == "wan2.2_moe":
        _boundary(cfg, out)
    else:
        _boundary_step(cfg, out)


def _checkpoints(cfg: dict, out) -> None:
    quantized = cfg.get("dit_quantized", False) is True
    hq, ho = cfg.get("high_noise_quantized_ckpt"), cfg.get("high_noise_original_ckpt")
    lq, lo = cfg.get("low_noise_quantized_ckpt"), cfg.get("low_noise_original_ckpt")
    if quantized and hq:
        out.values["dit_quant.ckpt"] = local_path(hq, "high_noise_quantized_ckpt", out)
        if ho:
            out.notes.append("high_noise_original_ckpt is unused: LightX2V reads high_noise_quantized_ckpt when "
                             "dit_quantized is true")
    elif ho:
        out.values["dit_quant.ckpt"] = local_path(ho, "high_noise_original_ckpt", out)
        if quantized:
            out.notes.append("high_noise_original_ckpt is the quantized high-noise expert's file: LightX2V reads it "
                             "when no high_noise_quantized_ckpt is given (a high-precision file is quantized at load)")
    if hq and not quantized:
        out.notes.append("high_noise_quantized_ckpt is unused: dit_quantized is not true")
    if quantized and lq:
        out.values["dit_low_quant.ckpt"] = local_path(lq, "low_noise_quantized_ckpt", out)
    elif not quantized and lo:
        out.values["dit_low_quant.ckpt"] = local_path(lo, "low_noise_original_ckpt", out)
    if lq and not quantized:
        out.notes.append("low_noise_quantized_ckpt is unused: dit_quantized is not true")
    if lo and (quantized or lq):
        where = "low_noise_quantized_ckpt is read instead" if lq and quantized else \
            "the low-noise expert comes from the model folder's low_noise_model/"
        out.notes.append(f"low_noise_original_ckpt is unused: LightX2V reads it only when dit_quantized is false; "
                         f"{where}")


def _boundary(cfg: dict, out) -> None:
    b = cfg.get("boundary")
    if b is None:
        raise _error(f"{out.path}: model class wan2.2_moe needs boundary (LightX2V's Wan22MoeRunner reads "
                     "config['boundary'] and has no default): add it, e.g. 0.875 (T2V-A14B) or 0.9 (I2V-A14B)",
                     "wan2.2_moe without boundary")
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < 1:
        raise _error(f"{out.path}: boundary={b!r}: give a number between 0 and 1 (the high-noise expert runs while "
                     "t >= boundary * 1000)")
    out.values["model.boundary"] = float(b)
    if "boundary_step_index" in cfg:
        out.notes.append("boundary_step_index is unused: wan2.2_moe switches experts at the boundary timestep; "
                         "only wan2.2_moe_distill switches by step")


def _boundary_step(cfg: dict, out) -> None:
    k, steps = cfg.get("boundary_step_index"), cfg.get("denoising_step_list")
    if k is None:
        raise _error(f"{out.path}: model class wan2.2_moe_distill needs boundary_step_index (LightX2V's "
                     "Wan22StepDistillScheduler reads it and has no default): add it, e.g. 2",
                     "wan2.2_moe_distill without boundary_step_index")
    n = len(steps) if isinstance(steps, list) else None
    if isinstance(k, bool) or not isinstance(k, int) or k < 0 or (n is not None and k >= n):
        raise _error(f"{out.path}: boundary_step_index={k!r}: give an integer from 0 to "
                     f"{n - 1 if n else 'len(denoising_step_list) - 1'} (LightX2V indexes the step list's sigmas "
                     "with it; the high-noise expert runs the steps before it)")
    out.values["sampler.boundary_step"] = k
    if "boundary" in cfg:
        out.notes.append(f"boundary={cfg['boundary']} is unused: wan2.2_moe_distill switches experts by step "
                         f"(boundary_step_index={k})")


def guidance(cfg: dict, cfg_on: bool, out) -> bool:
    """The CFG scales of a Wan2.2 MoE class (True: set), else False (the one-number rule of the other classes)."""
    raw = cfg.get("sample_guide_scale")
    if out.model_cls == "wan2.2_moe":
        if not (isinstance(raw, list) and len(raw) == 2 and all(_is_number(v) for v in raw)):
            raise _error(f"{out.path}: sample_guide_scale={json.dumps(raw)}: LightX2V's wan2.2_moe picks "
                         "sample_guide_scale[0] at the high-noise steps and [1] at the others (with CFG or without): "
                         "give [high-noise, low-noise]")
        if cfg_on:
            out.values["sampler.guide_scale"], out.values["sampler.guide_scale_low"] = (float(v) for v in raw)
        else:
            _no_cfg(cfg, out, raw)
        return True
    if out.model_cls == "wan2.2_moe_distill" and isinstance(raw, list):
        if cfg_on:
            raise _error(f"{out.path}: sample_guide_scale={json.dumps(raw)} with enable_cfg: LightX2V's "
                         "wan2.2_moe_distill applies sample_guide_scale as one number (its per-expert switch is "
                         "commented out), so a list fails there: give one number")
        _no_cfg(cfg, out, raw)
        return True
    return False


def _no_cfg(cfg: dict, out, raw: Any) -> None:
    out.values["sampler.guide_scale"] = 1.0
    why = "enable_cfg is false" if "enable_cfg" in cfg else "enable_cfg is absent (LightX2V's default: false)"
    unused = raw is not None and any(v != 1 for v in (raw if isinstance(raw, list) else [raw]))
    out.notes.append(f"no CFG: {why}" + (f"; sample_guide_scale={json.dumps(raw)} is unused" if unused else ""))


def image_encoder(cfg: dict, used: set[str], out) -> None:
    """``use_image_encoder`` of a Wan2.2 class (module doc)."""
    if out.model_cls not in K.WAN22_CLASSES or "use_image_encoder" not in cfg:
        return
    used.add("use_image_encoder")
    value = cfg["use_image_encoder"]
    if value is False:
        out.notes.append("use_image_encoder=false: Wan2.2's A14B I2V and TI2V models have no CLIP image encoder "
                         "(lightq's neither)")
    elif value is True:
        raise _error(f"{out.path}: use_image_encoder=true: lightq's Wan2.2 models have no CLIP image encoder (the "
                     "official checkpoints have no CLIP branch): set it to false", "a CLIP image encoder on Wan2.2")
    else:
        raise _error(f"{out.path}: use_image_encoder={value!r}: give true or false")


def _is_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float))
