"""``from_lightx2v=config.json``: LightX2V's JSON config keys as lightq Hydra overrides.

Quantization, per component ``c`` in dit / t5 / clip (LightX2V's names):

    c_quantized: true, c_quant_scheme: "fp8-sgl"  ->  c_quant=fp8-sgl
    c_quantized: false                            ->  c_quant=none
    c_quantized_ckpt: "/path"                     ->  c_quant.ckpt=/path

LightX2V's scheme names are lightq's mode names (``lightq.config.quant_modes``): its ``fp8-triton`` /
``int8-triton`` are lightq's triton modes of the same numerics (for the DiT, with its fused blocks), ``Default``
is ``none``.
Attention: ``self_attn_1_type``: ``sage_attn2`` (SageAttention2: int8 Q.K, fp8 P.V on Ada / Hopper) ->
``attn_quant=int8fp8-sage2-auto``; ``flash_attn2`` / ``flash_attn3`` / ``torch_sdpa`` -> ``attn_quant=none`` (bf16).
``cross_attn_1_type`` / ``cross_attn_2_type`` take the same values; lightq's cross-attention (512 text / 257 image
keys) always runs in bf16, so they only have to be one of them.
Offload: ``cpu_offload: true`` + ``offload_granularity: block|phase|model`` (LightX2V's default: block) ->
``offload=<granularity>``; ``lazy_load: true`` -> ``offload.lazy_load=true`` (needs cpu_offload).
Run options: ``infer_steps`` -> ``sampler.steps``, ``sample_shift`` -> ``sampler.shift``, ``sample_guide_scale`` ->
``sampler.guide_scale``, ``enable_cfg: false`` -> ``sampler.guide_scale=1.0``, ``denoising_step_list`` ->
``sampler=distill`` + ``sampler.denoising_steps``, ``target_video_length`` / ``target_height`` / ``target_width``
-> ``model.frames`` / ``model.height`` / ``model.width``, ``seed`` -> ``seed``.
Any other key is one CheckpointError naming it: nothing in the file is silently ignored.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..config import COMPONENTS
from ..errors import CheckpointError

SCHEME_ALIASES = {"Default": "none"}
GRANULARITIES = ("block", "phase", "model")
ATTENTION_TYPES = {"sage_attn2": "int8fp8-sage2-auto", "flash_attn2": "none", "flash_attn3": "none", "torch_sdpa": "none"}
RUN_OPTIONS = {
    "infer_steps": "sampler.steps", "sample_shift": "sampler.shift", "sample_guide_scale": "sampler.guide_scale",
    "target_video_length": "model.frames", "target_height": "model.height", "target_width": "model.width",
    "seed": "seed",
}
_PLAIN = re.compile(r"^[A-Za-z0-9_./+:@~-]+$")


def overrides_from_lightx2v(json_path: str | Path) -> list[str]:
    """Hydra overrides equivalent to LightX2V config ``json_path`` (see the module docstring for the mapping)."""
    path = Path(json_path)
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"LightX2V config not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON config ({exc})") from exc
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: a LightX2V config is a JSON object, got {type(cfg).__name__}")
    used: set[str] = set()
    out: list[str] = []
    for comp in COMPONENTS:
        out += _quant(cfg, comp, used, path)
    out += _attention(cfg, used, path)
    out += _offload(cfg, used, path)
    out += _run_options(cfg, used, path)
    unknown = [k for k in cfg if k not in used]
    if unknown:
        raise CheckpointError(f"{path}: LightX2V key(s) lightq does not support: {', '.join(unknown)}; remove them "
                              "from the JSON (or set the equivalent lightq option on the command line)")
    return out


def _quant(cfg: dict, comp: str, used: set[str], path: Path) -> list[str]:
    q, s, c = f"{comp}_quantized", f"{comp}_quant_scheme", f"{comp}_quantized_ckpt"
    used.update(k for k in (q, s, c) if k in cfg)
    if q not in cfg and s not in cfg and c not in cfg:
        return []
    on = cfg.get(q, s in cfg)
    if not isinstance(on, bool):
        raise CheckpointError(f"{path}: '{q}' must be true or false, got {on!r}")
    if not on:
        return [f"{comp}_quant=none"]
    scheme = cfg.get(s)
    if not isinstance(scheme, str):
        raise CheckpointError(f"{path}: '{q}' is true but '{s}' is missing; name the scheme (e.g. fp8-sgl)")
    mode = SCHEME_ALIASES.get(scheme, scheme)
    have = _modes(comp)
    if mode not in have:
        raise CheckpointError(f"{path}: {s}='{scheme}' is not a lightq {comp} mode (have: {', '.join(sorted(have))})")
    out = [f"{comp}_quant={mode}"]
    if cfg.get(c):
        out.append(f"{comp}_quant.ckpt={_value(cfg[c])}")
    return out


def _attention(cfg: dict, used: set[str], path: Path) -> list[str]:
    out = []
    for key in ("self_attn_1_type", "cross_attn_1_type", "cross_attn_2_type"):
        if key not in cfg:
            continue
        used.add(key)
        kind = cfg[key]
        if kind not in ATTENTION_TYPES:
            raise CheckpointError(f"{path}: {key}={kind!r}: lightq takes {', '.join(ATTENTION_TYPES)} (sage_attn2: "
                                  "attn_quant=int8fp8-sage2-auto; the others: bf16 attention)")
        if key == "self_attn_1_type":
            out.append(f"attn_quant={ATTENTION_TYPES[kind]}")
    return out


def _offload(cfg: dict, used: set[str], path: Path) -> list[str]:
    keys = ("cpu_offload", "offload_granularity", "lazy_load")
    used.update(k for k in keys if k in cfg)
    on, gran, lazy = cfg.get("cpu_offload", False), cfg.get("offload_granularity"), cfg.get("lazy_load", False)
    if not on:
        if lazy:
            raise CheckpointError(f"{path}: lazy_load needs cpu_offload: true")
        return ["offload=none"] if "cpu_offload" in cfg else []
    gran = gran or "block"
    if gran not in GRANULARITIES:
        raise CheckpointError(f"{path}: offload_granularity='{gran}': lightq offloads by {', '.join(GRANULARITIES)}")
    out = [f"offload={gran}"]
    if lazy:
        out.append("offload.lazy_load=true")
    return out


def _run_options(cfg: dict, used: set[str], path: Path) -> list[str]:
    out = []
    for key, target in RUN_OPTIONS.items():
        if key in cfg:
            used.add(key)
            out.append(f"{target}={_value(cfg[key])}")
    if "denoising_step_list" in cfg:
        used.add("denoising_step_list")
        steps = cfg["denoising_step_list"]
        if not isinstance(steps, list) or not all(isinstance(v, int) for v in steps):
            raise CheckpointError(f"{path}: denoising_step_list must be a list of integers, got {steps!r}")
        out += ["sampler=distill", f"sampler.denoising_steps=[{','.join(map(str, steps))}]"]
    if "enable_cfg" in cfg:
        used.add("enable_cfg")
        if cfg["enable_cfg"] is False:
            out.append("sampler.guide_scale=1.0")
    return out


def _modes(comp: str) -> set[str]:
    from ..config import quant_modes  # the registry's specs: read only when a LightX2V config is given

    return set(quant_modes(f"{comp}_quant"))


def _value(v) -> str:
    """A JSON scalar as a Hydra override value (strings quoted unless plainly safe, ``${`` escaped)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if not isinstance(v, str):
        raise CheckpointError(f"expected a string or number, got {v!r}")
    if _PLAIN.match(v):
        return v
    return _quoted(v)


def _quoted(v: str) -> str:
    """``v`` as a Hydra quoted string that OmegaConf reads back as exactly ``v``.

    OmegaConf: ``${`` starts an interpolation unless escaped as ``\\${`` (backslashes before it then escape each
    other). Hydra's quoted strings: backslashes are literal except before a quote or at the end, where they
    escape each other.
    """
    v = re.sub(r"(\\*)\$\{", lambda m: m[1] * 2 + "\\${", v)
    v = re.sub(r"(\\*)'", lambda m: m[1] * 2 + "\\'", v)
    v = re.sub(r"(\\+)$", lambda m: m[1] * 2, v)
    return f"'{v}'"
