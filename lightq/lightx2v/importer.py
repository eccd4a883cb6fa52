"""A LightX2V JSON config as lightq settings with LightX2V's meaning: ``import_config(path, model_cls) -> Imported``.

Model class (LightX2V's ``--model_cls``; a ``model_cls`` key in the JSON wins, as ``config.update`` does there):
``wan2.1``, ``wan2.1_distill`` (Wan2.1 models), ``wan2.2`` (TI2V-5B), ``wan2.2_moe`` and ``wan2.2_moe_distill``
(A14B, two experts: ``wan22``) run, each on its lightq model family (``keys.CLASS_FAMILIES``; ``config.validate``
refuses a ``model=`` of another); any other class is refused. Given none, it is guessed from the keys (noted): a
Wan2.2 MoE key or a list-valued ``sample_guide_scale`` -> ``wan2.2_moe[_distill]``, 48 latent channels -> ``wan2.2``,
else ``wan2.1``; ``_distill`` when the JSON has a ``denoising_step_list``.

Mapped, per component ``c`` in dit / t5 / clip:

    c_quantized: true + c_quant_scheme: s  ->  c_quant=<s> (lightq's mode of the same name; ``Default`` is none;
                                              for T5 / CLIP the bare fp8 / int8 are LightX2V's fp8-sgl / int8-vllm;
                                              the DiT's fp8-pertensor is fp8-pertensor-torch: torch._scaled_mm
                                              with the checkpoint's per-tensor scales and static input_scale)
    c_quantized false or absent            ->  c_quant=none (LightX2V's default; a scheme alone is unused, noted)
    c_quantized_ckpt / c_original_ckpt     ->  c_quant.ckpt (the one LightX2V reads: quantized when c_quantized);
                                              a relative path is a local file, read from the working directory
                                              as LightX2V does (made absolute here: never a Hub download)
    self_attn_1_type                       ->  attn_quant (sage_attn2 -> int8fp8-sage2-auto, bf16 kernels -> none)
    cpu_offload + offload_granularity      ->  offload=block|phase|model (LightX2V's default granularity: block)
    lazy_load                              ->  offload.lazy_load
    enable_cfg (LightX2V's default: false) ->  sampler.guide_scale = sample_guide_scale if true, else 1 (no CFG)
    *_distill + denoising_step_list        ->  sampler=distill, sampler.denoising_steps, shift (LightX2V's
                                              deterministic WanStepDistillScheduler); wan2.1 / wan2.2 / wan2.2_moe
                                              ignore the list, as LightX2V's WanScheduler does (unipc, infer_steps)
    Wan2.2 MoE keys (boundary, ...)        ->  ``lightq.lightx2v.wan22`` (the experts' switch, scales, checkpoints)
    infer_steps / sample_shift             ->  sampler.steps / sampler.shift
    target_video_length                    ->  model.frames
    target_height / target_width           ->  model.height / model.width, with model.i2v_size=max_area: for I2V
                                              LightX2V keeps the image's aspect ratio within that area (wan2.2:
                                              its best_output_size, not in lightq: noted, the picture is cropped)
    target_video_length not 4k+1           ->  model.frames = the frames its (n - 1) // 4 + 1 latents decode to
    fps, seed                              ->  model.fps, seed
    lora_configs [{path, strength, name}]  ->  lora (the DiT's LoRAs in order; a path as the checkpoints' paths;
                                              LightX2V's default strength 1); on wan2.2_moe* classes ``name``
                                              high_noise_model / low_noise_model -> expert high / low (required)
    lora_dynamic_apply (default false)     ->  lora_mode=unmerged if true (LightX2V applies the LoRA at run time),
                                              else merged (into the weights at load)

Everything else is judged by ``lightq.lightx2v.keys`` (missing features, kernel choices, constants, placement,
unused keys); an unknown key or value is one LightX2VError naming the key and the file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import keys as K
from . import wan22
from .values import LightX2VError, local_path


COMPONENTS = ("dit", "t5", "clip")
SCHEME_ALIASES = {"dit": {"Default": "none", "fp8-pertensor": "fp8-pertensor-torch"},
                  "t5": {"Default": "none", "fp8": "fp8-sgl", "int8": "int8-vllm"},
                  "clip": {"Default": "none", "fp8": "fp8-sgl", "int8": "int8-vllm"}}
# how lightq's mode of a scheme differs from LightX2V's kernel (recorded as a note when the scheme is mapped)
SCHEME_NOTES = {"fp8-pertensor": (
    "LightX2V's fp8-pertensor is torch._scaled_mm with one scale per tensor and each linear's calibrated "
    "input_scale from the checkpoint, as dit_quant=fp8-pertensor-torch; LightX2V sets use_fast_accum (fp8 tensor-core "
    "accumulation without fp32 promotion) where lightq promotes, and divides x by a [] input_scale in the "
    "activation dtype where lightq divides in fp32 (a code can differ at a rounding tie). A linear whose "
    "checkpoint has no input_scale runs dynamic per tensor in lightq (LightX2V has no such path; result.json "
    "says how many)")}
GRANULARITIES = ("block", "phase", "model")
SELF_ATTENTION = {"sage_attn2": "int8fp8-sage2-auto"}  # the rest of KERNELS["self_attn_1_type"]: bf16 (none)
RUN_KEYS = ("infer_steps", "sample_shift", "sample_guide_scale", "enable_cfg", "denoising_step_list",
            "target_video_length", "target_height", "target_width", "fps", "seed")
OFFLOAD_KEYS = ("cpu_offload", "offload_granularity", "lazy_load")
CLASS_KEYS = ("model_cls", "task")
LORA_KEYS = ("lora_configs", "lora_dynamic_apply")
LORA_ENTRY_KEYS = ("path", "strength", "name")
LORA_EXPERT_NAMES = {"high_noise_model": "high", "low_noise_model": "low"}  # lora_configs[].name on Wan2.2 MoE
TASKS = ("t2v", "i2v")
TEMPORAL_STRIDE = 4  # vae_stride[0] of every Wan VAE: frames per latent frame after the first


@dataclass
class Imported:
    """lightq settings of one LightX2V config: group ``choices`` (group -> option), ``values`` (dotted key ->
    value), and the record result.json keeps (model class, kernel choices, notes on meaning)."""

    path: Path
    model_cls: str
    choices: dict[str, str] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    kernels: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict:
        return {"config": str(self.path), "model_cls": self.model_cls, "kernels": dict(self.kernels),
                "notes": list(self.notes)}

    def overrides(self) -> list[str]:
        """The same settings written as command-line overrides (for people: docs, messages)."""
        return [f"{g}={o}" for g, o in self.choices.items()] + \
            [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in self.values.items()]


def read_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise LightX2VError(f"from_lightx2v={path}: no such file: give the path of a LightX2V JSON config") from None
    except (OSError, ValueError) as exc:
        raise LightX2VError(f"from_lightx2v={path}: not a readable JSON config ({exc})") from None
    if not isinstance(cfg, dict):
        raise LightX2VError(f"from_lightx2v={path}: a LightX2V config is a JSON object, got {type(cfg).__name__}")
    return cfg


def import_config(json_path: str | Path, model_cls: str | None = None) -> Imported:
    """The lightq settings of LightX2V config ``json_path`` run as LightX2V's ``model_cls`` (see module doc)."""
    path = Path(json_path)
    cfg = read_json(path)
    out = Imported(path, _model_class(cfg, model_cls, path))
    if model_cls is None and "model_cls" not in cfg:
        out.notes.append(f"model class {out.model_cls}: LightX2V takes it on its command line (--model_cls); "
                         f"none given, so {out.model_cls}, guessed from its keys (from_lightx2v.model_cls=... "
                         "names it)")
    _refuse_missing(cfg, path, out.model_cls)
    used: set[str] = set()
    wan22.experts(cfg, used, out)
    wan22.image_encoder(cfg, used, out)
    for comp in COMPONENTS:
        _quant(cfg, comp, used, out)
    _attention_and_kernels(cfg, used, out)
    _offload(cfg, used, out)
    _parallel(cfg, used, out)
    _lora(cfg, used, out)
    _run(cfg, used, out)
    _judged(cfg, used, out)
    unknown = [k for k in cfg if k not in used]
    if unknown:
        raise LightX2VError(f"{path}: {_plural(unknown, 'key')} {', '.join(unknown)}: not in the LightX2V "
                            f"{out.model_cls} keys lightq knows (another model class's config?); refused rather than "
                            "ignored")
    return out


def _plural(items: list, word: str) -> str:
    return word if len(items) == 1 else f"{word}s"


def _model_class(cfg: dict, given: str | None, path: Path) -> str:
    cls, where = (cfg["model_cls"], "the JSON's model_cls") if "model_cls" in cfg else \
        (given, "from_lightx2v.model_cls") if given else (None, "")
    if cls is None:
        cls = _guessed_class(cfg)
    elif cls not in K.CLASSES:
        raise LightX2VError(f"{path}: model class {cls!r} ({where}) is not in lightq: it runs LightX2V's "
                            f"{', '.join(K.CLASSES)} configs", f"model class {cls}")
    task = cfg.get("task")
    if task is not None and task not in TASKS:
        raise LightX2VError(f"{path}: task={task!r}: lightq runs LightX2V's Wan {' and '.join(TASKS)} tasks",
                            f"task {task}")
    return cls


def _guessed_class(cfg: dict) -> str:
    """LightX2V's class of a config given none (module doc)."""
    distill = "denoising_step_list" in cfg
    if any(cfg.get(k) is not None for k in K.MOE_KEYS) or isinstance(cfg.get("sample_guide_scale"), list):
        return "wan2.2_moe_distill" if distill else "wan2.2_moe"
    if cfg.get("num_channels_latents") == K.TI2V_CONSTANTS["num_channels_latents"]:
        return "wan2.2"
    return "wan2.1_distill" if distill else "wan2.1"


def _refuse_missing(cfg: dict, path: Path, model_cls: str) -> None:
    """One line for the first missing feature the config turns on (and how many others it turns on)."""
    hits = []
    for missing in K.MISSING:
        if model_cls not in missing.classes:
            continue
        for key in cfg:
            if missing.owns(key) and missing.active(cfg[key]) and missing.feature not in (h[0].feature for h in hits):
                hits.append((missing, key))
    if not hits:
        return
    missing, key = hits[0]
    others = f" (it also uses: {', '.join(h[0].feature for h in hits[1:])})" if len(hits) > 1 else ""
    value = json.dumps(cfg[key])
    value = value if len(value) <= 40 else value[:37] + "..."
    raise LightX2VError(f"{path}: {key}={value} asks for {missing.feature}: {missing.why}"
                        f"{f' yet ({missing.issue})' if missing.issue else ''}; lightq cannot run this config with "
                        f"LightX2V's meaning{others}", missing.feature)


def _owned_by_missing(key: str) -> bool:
    return any(m.owns(key) for m in K.MISSING)


def _quant(cfg: dict, comp: str, used: set[str], out: Imported) -> None:
    q, s, c, orig = f"{comp}_quantized", f"{comp}_quant_scheme", f"{comp}_quantized_ckpt", f"{comp}_original_ckpt"
    used.update(k for k in (q, s, c, orig) if k in cfg)
    on = cfg.get(q, False)
    if not isinstance(on, bool):
        raise LightX2VError(f"{out.path}: {q}={on!r}: give true or false")
    if not on:
        if q in cfg or s in cfg:
            out.choices[f"{comp}_quant"] = "none"
        if s in cfg or c in cfg:
            out.notes.append(f"{s if s in cfg else c} is unused: {q} is not true (LightX2V's default: false)")
        if cfg.get(orig):
            out.values[f"{comp}_quant.ckpt"] = local_path(cfg[orig], orig, out)
        return
    scheme = cfg.get(s)
    if not isinstance(scheme, str):
        raise LightX2VError(f"{out.path}: {q} is true but {s} is missing: name the scheme (e.g. fp8-sgl)")
    mode = SCHEME_ALIASES[comp].get(scheme, scheme)
    have = _modes(comp)
    if mode not in have:
        raise LightX2VError(f"{out.path}: {s}={scheme!r}: quantization scheme {scheme} is not in lightq (python -m "
                            "lightq.backends lists its modes)", f"quantization scheme {scheme}")
    if mode != scheme:
        out.notes.append(f"{s}={scheme}: LightX2V's {scheme} {comp} linear is its {mode}: {comp}_quant={mode}")
    if scheme in SCHEME_NOTES:
        out.notes.append(f"{s}={scheme}: {SCHEME_NOTES[scheme]}")
    out.choices[f"{comp}_quant"] = mode
    if cfg.get(c):
        out.values[f"{comp}_quant.ckpt"] = local_path(cfg[c], c, out)
    if cfg.get(orig):
        out.notes.append(f"{orig} is unused: LightX2V reads the quantized checkpoint when {q} is true")


def _attention_and_kernels(cfg: dict, used: set[str], out: Imported) -> None:
    for key, table in K.KERNELS.items():
        if key not in cfg:
            continue
        used.add(key)
        value = cfg[key]
        label = str(value)
        if label not in table:
            raise LightX2VError(f"{out.path}: {key}={value!r}: lightq knows the numerics of "
                                f"{', '.join(table)} only", f"kernel {key}={value}")
        out.kernels[key] = value
        if table[label]:
            out.notes.append(f"{key}={value}: {table[label]}")
        if key == "self_attn_1_type":
            out.choices["attn_quant"] = SELF_ATTENTION.get(label, "none")


def _offload(cfg: dict, used: set[str], out: Imported) -> None:
    used.update(k for k in OFFLOAD_KEYS if k in cfg)
    on, gran, lazy = cfg.get("cpu_offload", False), cfg.get("offload_granularity"), cfg.get("lazy_load", False)
    if not on:
        if lazy:
            raise LightX2VError(f"{out.path}: lazy_load: true needs cpu_offload: true (lightq streams lazily loaded "
                                "blocks through the offload buffers)")
        if "cpu_offload" in cfg:
            out.choices["offload"] = "none"
        if gran is not None:
            out.notes.append(f"offload_granularity={gran} is unused: cpu_offload is not true")
        return
    gran = gran or "block"
    if gran not in GRANULARITIES:
        raise LightX2VError(f"{out.path}: offload_granularity={gran!r}: lightq offloads by "
                            f"{', '.join(GRANULARITIES)}", f"offload granularity {gran}")
    out.choices["offload"] = gran
    if lazy:
        out.values["offload.lazy_load"] = True


def _parallel(cfg: dict, used: set[str], out: Imported) -> None:
    """``parallel``: ``{seq_p_size, seq_p_attn_type, cfg_p_size, ...}`` -> lightq's ``parallel`` group; the process
    count is kept as ``parallel.world`` so that a launch of another size is refused."""
    if "parallel" not in cfg:
        return
    used.add("parallel")
    par = cfg["parallel"]
    if par in (False, None, {}):
        return
    if not isinstance(par, dict):
        raise LightX2VError(f"{out.path}: parallel={par!r}: LightX2V's parallel is a dict of group sizes "
                            "(seq_p_size, cfg_p_size)")
    sizes = {}
    for key in ("seq_p_size", "cfg_p_size", "tensor_p_size"):
        value = par.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LightX2VError(f"{out.path}: parallel.{key}={value!r}: give a positive integer")
        sizes[key] = value
    if sizes["tensor_p_size"] > 1:
        raise LightX2VError(f"{out.path}: parallel.tensor_p_size={sizes['tensor_p_size']}: tensor parallelism "
                            "(linears split over GPUs): lightq does not have it", "tensor parallelism")
    if sizes["cfg_p_size"] > 2:
        raise LightX2VError(f"{out.path}: parallel.cfg_p_size={sizes['cfg_p_size']}: CFG has two passes, so 1 or 2")
    attn = par.get("seq_p_attn_type", "ulysses")
    if attn not in K.PARALLEL_ATTENTION:
        raise LightX2VError(f"{out.path}: parallel.seq_p_attn_type={attn!r}: lightq knows "
                            f"{', '.join(K.PARALLEL_ATTENTION)}", f"sequence-parallel attention {attn}")
    unknown = [k for k in par if k not in (*sizes, "seq_p_attn_type", *K.PARALLEL_KEYS)]
    if unknown:
        raise LightX2VError(f"{out.path}: parallel.{unknown[0]}: not a LightX2V parallel key lightq knows; refused "
                            "rather than ignored")
    seq, cfg_p = sizes["seq_p_size"], sizes["cfg_p_size"]
    if seq * cfg_p == 1:
        return
    mode, note = K.PARALLEL_ATTENTION[attn]
    if mode == "ring" and out.choices.get("attn_quant", "none") != "none":
        mode, note = "allgather", (f"ring attention with attn_quant={out.choices['attn_quant']}: lightq's ring needs "
                                   "bf16 attention's log-sum-exp, so the keys and values are all-gathered instead "
                                   "(each query row sees all keys at once, more memory per rank)")
    out.values["parallel.mode"] = mode if seq > 1 else "none"
    out.values["parallel.cfg"] = cfg_p
    out.values["parallel.world"] = seq * cfg_p
    out.kernels["parallel"] = dict(par)
    out.notes.append(f"parallel: launch with torchrun --nproc-per-node {seq * cfg_p} -m lightq ... "
                     f"(sequence {seq} x CFG {cfg_p})")
    out.notes.extend(f"parallel.{k}: {v}" for k, v in [("seq_p_attn_type", note)] +
                     [(k, K.PARALLEL_KEYS[k]) for k in par if k in K.PARALLEL_KEYS] if v and par.get(k) not in
                     (False, None))


def _lora(cfg: dict, used: set[str], out: Imported) -> None:
    used.update(k for k in LORA_KEYS if k in cfg)
    entries, dynamic = cfg.get("lora_configs"), cfg.get("lora_dynamic_apply", False)
    if not isinstance(dynamic, bool):
        raise LightX2VError(f"{out.path}: lora_dynamic_apply={dynamic!r}: give true or false")
    if not entries:
        if "lora_dynamic_apply" in cfg:
            out.notes.append("lora_dynamic_apply is unused: lora_configs names no LoRA")
        return
    if not isinstance(entries, list):
        raise LightX2VError(f"{out.path}: lora_configs={json.dumps(entries)[:40]}: give a list of "
                            '{"path": ..., "strength": ...}')
    lora = []
    for i, e in enumerate(entries):
        key = f"lora_configs[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("path"), str):
            raise LightX2VError(f"{out.path}: {key}={json.dumps(e)[:40]}: give {{\"path\": <file>, \"strength\": "
                                "<number>}")
        unknown = sorted(set(e) - set(LORA_ENTRY_KEYS))
        if unknown:
            raise LightX2VError(f"{out.path}: {key} has {_plural(unknown, 'key')} {', '.join(unknown)}: lightq knows "
                                f"{', '.join(LORA_ENTRY_KEYS)}; refused rather than ignored")
        strength = e.get("strength", 1.0)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise LightX2VError(f"{out.path}: {key}.strength={strength!r}: give a number")
        entry = {"path": local_path(e["path"], f"{key}.path", out), "strength": float(strength)}
        if out.model_cls.startswith("wan2.2_moe"):  # LightX2V routes each entry to an expert by its name
            if e.get("name") not in LORA_EXPERT_NAMES:
                raise LightX2VError(f"{out.path}: {key}.name={e.get('name')!r}: a {out.model_cls} LoRA names its "
                                    f"expert: give \"name\": \"high_noise_model\" or \"low_noise_model\"")
            entry["expert"] = LORA_EXPERT_NAMES[e["name"]]
        elif "name" in e:
            out.notes.append(f"{key}.name={e['name']!r} is unused: LightX2V's name picks a Wan2.2 expert; a Wan2.1 "
                             "run has one DiT")
        lora.append(entry)
    out.values["lora"] = lora
    out.values["lora_mode"] = "unmerged" if dynamic else "merged"


def _number(cfg: dict, key: str, out: Imported, kind=(int, float)):
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        wanted = "an integer" if kind is int else "a number"
        extra = (f" (a list, one value per expert, is read by LightX2V's wan2.2_moe only; model class "
                 f"{out.model_cls} takes one)" if isinstance(value, list) and key == "sample_guide_scale" else "")
        raise LightX2VError(f"{out.path}: {key}={value!r}: give {wanted}{extra}")
    return value


def _run(cfg: dict, used: set[str], out: Imported) -> None:
    used.update(k for k in RUN_KEYS if k in cfg)
    steps = cfg.get("denoising_step_list")
    if steps is not None and (not isinstance(steps, list) or not steps
                              or not all(isinstance(v, int) and not isinstance(v, bool) for v in steps)):
        raise LightX2VError(f"{out.path}: denoising_step_list={steps!r}: give a list of integer timesteps")
    if out.model_cls in K.DISTILL_CLASSES:
        if steps is None:
            raise LightX2VError(f"{out.path}: model class {out.model_cls} needs denoising_step_list (LightX2V's "
                                "WanStepDistillScheduler reads it)")
        out.choices["sampler"] = "distill"
        out.values["sampler.denoising_steps"] = list(steps)
        if "infer_steps" in cfg and cfg["infer_steps"] != len(steps):
            out.notes.append(f"infer_steps={cfg['infer_steps']} is unused: {out.model_cls} runs the "
                             f"{len(steps)} steps of denoising_step_list")
    else:
        if steps is not None:
            distill = "wan2.2_moe_distill" if out.model_cls == "wan2.2_moe" else "wan2.1_distill"
            out.notes.append(f"denoising_step_list is unused with model class {out.model_cls} (LightX2V's "
                             f"WanScheduler runs infer_steps); from_lightx2v.model_cls={distill} uses it")
        if "infer_steps" in cfg:
            out.values["sampler.steps"] = _number(cfg, "infer_steps", out, int)
    if "sample_shift" in cfg:
        out.values["sampler.shift"] = _number(cfg, "sample_shift", out)
    _guidance(cfg, out)
    for key, target in (("target_video_length", "model.frames"), ("target_height", "model.height"),
                        ("target_width", "model.width"), ("fps", "model.fps"), ("seed", "seed")):
        if key in cfg:
            out.values[target] = _number(cfg, key, out, int)
    frames = out.values.get("model.frames")
    if isinstance(frames, int) and frames >= 1 and (frames - 1) % TEMPORAL_STRIDE:
        latent = (frames - 1) // TEMPORAL_STRIDE + 1
        out.values["model.frames"] = (latent - 1) * TEMPORAL_STRIDE + 1
        out.notes.append(f"target_video_length={frames}: LightX2V's latent video has ({frames} - 1) // "
                         f"{TEMPORAL_STRIDE} + 1 = {latent} frames, which decode to {out.values['model.frames']}: "
                         f"model.frames={out.values['model.frames']}")
    if ("target_height" in cfg or "target_width" in cfg) and out.model_cls == "wan2.2":
        out.notes.append("target_height x target_width: for image-to-video LightX2V's wan2.2 sizes the video with "
                         "best_output_size (the official TI2V rule), which lightq does not have: lightq crops the "
                         "picture to model.height x model.width (the same size when the picture has that aspect "
                         "ratio)")
    elif "target_height" in cfg or "target_width" in cfg:
        out.values["model.i2v_size"] = "max_area"


def _guidance(cfg: dict, out: Imported) -> None:
    cfg_on = cfg.get("enable_cfg", False)
    if not isinstance(cfg_on, bool):
        raise LightX2VError(f"{out.path}: enable_cfg={cfg_on!r}: give true or false")
    if wan22.guidance(cfg, cfg_on, out):
        return
    scale = _number(cfg, "sample_guide_scale", out) if "sample_guide_scale" in cfg else None
    if cfg_on:
        if scale is None:
            raise LightX2VError(f"{out.path}: enable_cfg is true but sample_guide_scale is missing (LightX2V needs "
                                "it): add the guidance scale")
        out.values["sampler.guide_scale"] = scale
        return
    out.values["sampler.guide_scale"] = 1.0
    why = "enable_cfg is false" if "enable_cfg" in cfg else "enable_cfg is absent (LightX2V's default: false)"
    out.notes.append(f"no CFG: {why}" + (f"; sample_guide_scale={scale} is unused" if scale not in (None, 1) else ""))


def _judged(cfg: dict, used: set[str], out: Imported) -> None:
    """Keys of ``lightq.lightx2v.keys``'s tables (other than kernels): constants, placement, unused, features off."""
    constants = K.CLASS_CONSTANTS.get(out.model_cls, K.CONSTANTS)
    for key in K.REQUIRED.get(out.model_cls, ()):
        if key not in cfg:
            raise LightX2VError(f"{out.path}: model class {out.model_cls} needs {key}={json.dumps(constants[key])}: "
                                f"LightX2V's default is Wan2.1's {json.dumps(K.CONSTANTS[key])}, which this model "
                                "does not have", f"constant {key}")
    for key, value in cfg.items():
        if key in used:
            continue
        if key in CLASS_KEYS:
            used.add(key)
        elif key in constants:
            if _same(value, constants[key]):
                used.add(key)
            else:
                raise LightX2VError(f"{out.path}: {key}={json.dumps(value)}: lightq's model of class "
                                    f"{out.model_cls} has {json.dumps(constants[key])} (another model class's "
                                    "config?)", f"constant {key}")
        elif key in K.PLACEMENT:
            used.add(key)
            out.notes.append(f"{key}={json.dumps(value)}: where LightX2V keeps that component (no numerics); "
                             "lightq's offload= places every component")
        elif key in K.UNUSED:
            used.add(key)
            out.notes.append(f"{key} is unused ({K.UNUSED[key]})")
        elif _owned_by_missing(key):  # a missing feature's key, left off
            used.add(key)


def _same(value: Any, constant: Any) -> bool:
    if isinstance(constant, bool) or isinstance(value, bool):
        return value is constant
    if isinstance(constant, list):
        return isinstance(value, (list, tuple)) and list(value) == constant
    return value == constant


def _modes(comp: str) -> set[str]:
    from ..config import quant_modes  # the registry's specs: read only when a LightX2V config is given

    return set(quant_modes(f"{comp}_quant"))


def literal(value: Any) -> Any:
    """``value`` as OmegaConf stores it literally: ``${`` escaped (backslashes before it doubled)."""
    if isinstance(value, str):
        return re.sub(r"(\\*)\$\{", lambda m: m[1] * 2 + "\\${", value)
    if isinstance(value, list):
        return [literal(v) for v in value]
    if isinstance(value, dict):
        return {k: literal(v) for k, v in value.items()}
    return value
