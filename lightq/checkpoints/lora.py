"""LoRA files in the layouts people publish, checked against a component, and the run's stack of them.

``load_loras(entries, mode, shapes, linears)`` reads every ``{path, strength}`` entry (a file or a Hub
``owner/repo/file``; safetensors or a torch file of tensors) and maps each key onto the component's own tensor
names (the official Wan2.1 keys), whatever the naming:

``official``   ``blocks.0.self_attn.q.lora_down.weight`` / ``lora_up.weight`` / ``alpha``, or ``lora_A`` / ``lora_B``
               (LightX2V, and ComfyUI / kijai files under a ``diffusion_model.`` prefix)
``diffusers``  ``transformer.blocks.0.attn1.to_q.lora_A.weight`` (PEFT: ``lora_B.bias`` is a bias delta; a
               ``base_model.model.`` prefix and ``.default`` adapter names are taken too): ``attn1`` = self_attn,
               ``attn2`` = cross_attn, ``to_q/to_k/to_v/to_out.0`` = q/k/v/o, ``add_k_proj/add_v_proj`` =
               k_img/v_img, ``ffn.net.0.proj`` / ``ffn.net.2`` = ffn.0 / ffn.2, ``condition_embedder.
               {time_embedder,text_embedder}.linear_{1,2}`` = {time,text}_embedding.{0,2}, ``condition_embedder.
               time_proj`` = time_projection.1, ``condition_embedder.image_embedder.ff.net.{0.proj,2}`` =
               img_emb.proj.{1,3}, ``proj_out`` = head.head
``kohya``      ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` (musubi-tuner, ComfyUI): the underscored path is
               looked up among the component's own names with dots written as underscores
``diff``       full deltas next to any of these: ``<p>.diff`` changes ``<p>.weight`` (or parameter ``<p>`` itself,
               e.g. ``modulation``), ``<p>.diff_b`` changes ``<p>.bias``

The scale of a low-rank pair is ``alpha / rank`` when the file has ``alpha``, else 1; full deltas are scaled by the
strength only. A key that names a tensor the component lacks, a pair whose ranks or sizes disagree with each other
or with the layer, a NaN / Inf value, a layout lightq does not apply (DoRA, LoHa, LoKr, a text-encoder LoRA) or a
key it does not recognise is refused with one line naming the key and the file, before any weight is loaded.

``LoraStack`` holds the terms of every target and the run's mode: ``merged`` (``lightq.quant.lora.merge`` into the
high-precision weight before quantization; a pre-quantized weight is dequantized, merged and requantized, and
counted) or ``unmerged`` (quantized and high-precision linears get a ``LowRankPath``; full deltas, which a side
path cannot hold cheaply, are merged into their high-precision tensor and re-merged from a kept copy by
``set_strengths``; a full delta of a quantized weight is refused in this mode). ``record()`` is result.json's
``components.<c>.lora``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import LORA_EXPERTS, LORA_MODES, lora_entries
from ..errors import CheckpointError, LightqError
from ..quant.lora import LowRank, LowRankPath, Term, attach, merge
from ..quant.schemes import all_finite

LORA_COMPONENTS = ("dit", "dit_low")  # the DiT (of a two-expert model: each expert); text-encoder keys are refused
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "unet.")
KOHYA_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoders.")
ROLES = (  # key suffix -> role; longest first, so ".diff_b" is not read as ".diff"
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_B.bias", "bias"), (".lora_B.default.bias", "bias"),
    (".alpha", "alpha"), (".diff_b", "bias"), (".diff", "diff"),
)
UNSUPPORTED = {".dora_scale": "DoRA", "hada_": "LoHa", "lokr_": "LoKr", ".lora_mid.": "LoCon with a mid factor"}
DIFFUSERS = tuple((re.compile(a), b) for a, b in (
    (r"^blocks\.(\d+)\.attn1\.to_out\.0$", r"blocks.\1.self_attn.o"),
    (r"^blocks\.(\d+)\.attn1\.to_([qkv])$", r"blocks.\1.self_attn.\2"),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0$", r"blocks.\1.cross_attn.o"),
    (r"^blocks\.(\d+)\.attn2\.to_([qkv])$", r"blocks.\1.cross_attn.\2"),
    (r"^blocks\.(\d+)\.attn2\.add_([kv])_proj$", r"blocks.\1.cross_attn.\2_img"),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj$", r"blocks.\1.ffn.0"),
    (r"^blocks\.(\d+)\.ffn\.net\.2$", r"blocks.\1.ffn.2"),
    (r"^condition_embedder\.time_embedder\.linear_1$", "time_embedding.0"),
    (r"^condition_embedder\.time_embedder\.linear_2$", "time_embedding.2"),
    (r"^condition_embedder\.text_embedder\.linear_1$", "text_embedding.0"),
    (r"^condition_embedder\.text_embedder\.linear_2$", "text_embedding.2"),
    (r"^condition_embedder\.time_proj$", "time_projection.1"),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj$", "img_emb.proj.1"),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2$", "img_emb.proj.3"),
    (r"^proj_out$", "head.head"),
))


@dataclass
class LoraFile:
    """One entry of the run's ``lora`` list, read and checked: its terms by target tensor key."""

    index: int  # in the run's lora list (messages)
    path: str
    strength: float
    position: int = 0  # in this component's stack (Term.lora, strengths)
    namings: set[str] = field(default_factory=set)
    terms: dict[str, Term] = field(default_factory=dict)

    def record(self) -> dict:
        ranks = sorted({t.delta.rank for t in self.terms.values() if isinstance(t.delta, LowRank)})
        layers = {k.rpartition(".")[0] for k, t in self.terms.items() if isinstance(t.delta, LowRank)}
        return {"index": self.index, "path": self.path, "strength": self.strength,
                "naming": "+".join(sorted(self.namings)),
                "layers": len(layers), "full_deltas": sum(not isinstance(t.delta, LowRank) for t in self.terms.values()),
                "ranks": ranks}


def load_loras(entries, mode: str, shapes: dict[str, tuple[int, ...]], linears: set[str],
               quantized: set[str] = frozenset(), component: str = "dit") -> "LoraStack | None":
    """Read and check every ``lora`` entry against a component's tensor ``shapes`` (key -> shape), its linear
    module names and, for ``unmerged``, the names of the linears that are quantized. ``None`` without entries."""
    pairs = _entries_of(entries, component)
    if not pairs:
        return None
    if mode not in LORA_MODES:
        raise LightqError(f"lora_mode='{mode}': choose merged (added to the weight before quantization) or unmerged "
                          "(a low-rank side path next to the quantized GEMM)")
    from .hub import resolve
    from .sources import open_files

    names = _names(shapes)
    files = []
    for position, (i, ref, strength) in enumerate(pairs):
        source = open_files(resolve(ref))  # as stored: the LoRA namings are read here, not renamed
        files.append(_read(source, LoraFile(i, ref, strength, position), shapes, linears, names, component))
    stack = LoraStack(files, mode, quantized)
    if mode == "unmerged":
        for key, terms in stack.terms.items():
            owner = key.rpartition(".")[0]
            full = [t for t in terms if not isinstance(t.delta, LowRank)]
            if owner in quantized and key.endswith(".weight") and full:
                f = files[full[0].lora]
                raise CheckpointError(f"lora[{f.index}] {f.path}: a full-weight delta of '{key}', a quantized layer, "
                                      "cannot run as a low-rank side path: use lora_mode=merged")
    return stack


def side_path_ranks(entries, shapes: dict[str, tuple[int, ...]], component: str = "dit") -> dict[str, int]:
    """Linear name -> total rank of its unmerged side path, from the LoRA files' headers alone (no tensor read, no
    check: the offload budget, before loading; ``load_loras`` checks the files)."""
    from .hub import resolve
    from .sources import open_files

    names, ranks = _names(shapes), {}
    for _, ref, _ in _entries_of(entries, component):
        source = open_files(resolve(ref))
        for key in source:
            _, module, role = _split(key, names)
            if role == "down" and len(source.shape(key)) == 2:
                ranks[module] = ranks.get(module, 0) + source.shape(key)[0]
    return ranks


def _entries_of(entries, component: str) -> list[tuple[int, str, float]]:
    """(index in the run's list, path, strength) of the entries that apply to ``component``: all of them on a
    one-DiT model (no ``expert``); on a two-expert model those whose ``expert`` (``LORA_EXPERTS``) names it."""
    pairs = lora_entries(entries)
    out = []
    for i, ((ref, strength), e) in enumerate(zip(pairs, entries or ())):
        expert = e.get("expert")
        if component in (LORA_EXPERTS[expert] if expert is not None else ("dit",)):
            out.append((i, ref, strength))
    return out


def _names(shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """The component's module and tensor names with dots written as underscores (kohya's keys) -> the name."""
    out = {}
    for key in shapes:
        owner = key.rpartition(".")[0]
        for name in (key, owner):
            if name:
                out.setdefault(name.replace(".", "_"), name)
    return out


def _split(key: str, names: dict[str, str]) -> tuple[str, str, str]:
    """(naming, module path in the component's names, role) of a LoRA key; ``names`` resolves kohya's underscored
    paths (``_names``)."""
    body, naming = key, "official"
    for p in PREFIXES:
        if body.startswith(p):
            body = body[len(p):]
            break
    if body.startswith(KOHYA_PREFIX):
        body, naming = body[len(KOHYA_PREFIX):], "kohya"
    for suffix, role in ROLES:
        if body.endswith(suffix):
            module = body[:-len(suffix)]
            for pattern, official in DIFFUSERS:
                if pattern.match(module):
                    return "diffusers", pattern.sub(official, module), role
            if naming == "kohya":
                module = names.get(module, module.replace("_", "."))
            return naming, module, role
    return naming, body, ""


def _read(source, lora: LoraFile, shapes: dict, linears: set[str], names: dict[str, str], component: str) -> LoraFile:
    where = f"lora[{lora.index}] {lora.path}"
    groups: dict[str, dict[str, str]] = {}
    for key in source:
        if key.startswith(TEXT_ENCODER_PREFIXES):
            raise CheckpointError(f"{where}: '{key}' targets a text encoder; lightq applies LoRAs to the {component} "
                                  "only: use a LoRA file without text-encoder keys")
        for mark, kind in UNSUPPORTED.items():
            if mark in key:
                raise CheckpointError(f"{where}: '{key}' is a {kind} weight, which lightq does not apply: use a plain "
                                      "LoRA (lora_down / lora_up) or a full delta (.diff)")
        naming, module, role = _split(key, names)
        if not role:
            raise CheckpointError(f"{where}: key '{key}' is not a LoRA tensor lightq recognises (lora_down / lora_up / "
                                  "lora_A / lora_B / alpha / diff / diff_b): is this a LoRA file?")
        lora.namings.add("diff" if key.endswith((".diff", ".diff_b")) else naming)
        if role in groups.setdefault(module, {}):
            raise CheckpointError(f"{where}: '{key}' and '{groups[module][role]}' both give the {role} of '{module}': "
                                  "the file holds two namings of one layer; keep one")
        groups[module][role] = key
    for module, roles in groups.items():
        _check_group(source, lora, where, module, roles, shapes, linears)
    return lora


def _tensor(source, where: str, key: str) -> torch.Tensor:
    t = source[key]
    if not t.is_floating_point():
        raise CheckpointError(f"{where}: '{key}' is {t.dtype}, a LoRA tensor must be floating point")
    if not all_finite(t):
        raise CheckpointError(f"{where}: '{key}' holds {int((~torch.isfinite(t)).sum())} NaN/Inf value(s): the file "
                              "is damaged, download or export it again")
    return t


def _check_group(source, lora: LoraFile, where: str, module: str, roles: dict[str, str], shapes: dict,
                 linears: set[str]) -> None:
    """The terms of one module of one LoRA file, checked against the component's shapes."""
    down, up, alpha = roles.get("down"), roles.get("up"), roles.get("alpha")
    if (down is None) != (up is None) or (alpha is not None and down is None):
        have = down or up or alpha
        raise CheckpointError(f"{where}: '{have}' has no matching {'lora_up' if up is None else 'lora_down'} for "
                              f"'{module}': the file is incomplete")
    if down is not None:
        target = module + ".weight"
        if target not in shapes:
            raise CheckpointError(f"{where}: '{down}' targets layer '{module}', which the model does not have: is it a "
                                  "LoRA for another model (size, T2V / I2V)?")
        if module not in linears or len(shapes[target]) != 2:
            raise CheckpointError(f"{where}: '{down}' targets '{module}' {tuple(shapes[target])}, which is not a "
                                  "linear layer: lightq applies low-rank pairs to linears only")
        a, b = _tensor(source, where, down), _tensor(source, where, up)
        n, k = shapes[target]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
            raise CheckpointError(f"{where}: rank mismatch at '{module}': '{down}' is {tuple(a.shape)} and '{up}' is "
                                  f"{tuple(b.shape)}, expected [r, {k}] and [{n}, r]")
        if a.shape[1] != k or b.shape[0] != n:
            raise CheckpointError(f"{where}: '{down}' {tuple(a.shape)} / '{up}' {tuple(b.shape)} do not fit layer "
                                  f"'{module}' [{n}, {k}] (expected [r, {k}] and [{n}, r]): a LoRA for another model")
        rank = a.shape[0]
        scale = 1.0
        if alpha is not None:
            al = _tensor(source, where, alpha)
            if al.numel() != 1:
                raise CheckpointError(f"{where}: '{alpha}' must be one number, got shape {tuple(al.shape)}")
            scale = float(al.reshape(())) / rank
        lora.terms[target] = Term(lora.position, LowRank(a, b, scale))
    for role, leaf in (("diff", "weight"), ("bias", "bias")):
        key = roles.get(role)
        if key is None:
            continue
        target = f"{module}.{leaf}"
        if target not in shapes and role == "diff" and module in shapes:
            target = module  # a parameter named by itself (modulation)
        if target not in shapes:
            raise CheckpointError(f"{where}: '{key}' targets '{target}', which the model does not have: is it a LoRA "
                                  "for another model (size, T2V / I2V)?")
        d = _tensor(source, where, key)
        if tuple(d.shape) != tuple(shapes[target]):
            raise CheckpointError(f"{where}: '{key}' has shape {tuple(d.shape)} but '{target}' is "
                                  f"{tuple(shapes[target])}: a LoRA for another model")
        if target in lora.terms:
            raise CheckpointError(f"{where}: '{key}' gives a full delta of '{target}', which another key of the file "
                                  "also changes: keep one of them")
        lora.terms[target] = Term(lora.position, d)


class LoraStack:
    """The run's LoRAs for one component (module docstring): ``terms`` by target key, ``strengths`` per LoRA."""

    def __init__(self, files: list[LoraFile], mode: str, quantized: set[str] = frozenset()):
        self.files, self.mode, self.quantized = files, mode, set(quantized)
        self.strengths = [f.strength for f in files]
        self.terms: dict[str, list[Term]] = {}
        for f in files:
            for key, term in f.terms.items():
                self.terms.setdefault(key, []).append(term)
        self.requantized = 0
        self.quantized_down = True  # False keeps the bf16 down-projection everywhere (the benchmark compares both)
        self._kept: dict[str, torch.Tensor] = {}  # unmerged full deltas: the tensor as stored, to re-merge

    @property
    def merged_mode(self) -> bool:
        return self.mode == "merged"

    def note_source(self, pre_quantized: bool) -> None:
        """The loader says whether the weights file is pre-quantized: merged, its targeted quantized layers are then
        dequantized, merged and requantized (counted for ``record``)."""
        targets = {k.rpartition(".")[0] for k in self.terms if k.endswith(".weight")}
        self.requantized = len(targets & self.quantized) if pre_quantized and self.merged_mode else 0

    def touches(self, key: str) -> bool:
        return key in self.terms

    def low_rank(self, key: str) -> list[Term]:
        return [t for t in self.terms.get(key, ()) if isinstance(t.delta, LowRank)]

    def merged(self, key: str, t: torch.Tensor, full_only: bool = False) -> torch.Tensor:
        """``t`` with this stack's terms of ``key`` merged (fp32; ``full_only``: the full deltas alone)."""
        terms = [x for x in self.terms.get(key, ()) if not (full_only and isinstance(x.delta, LowRank))]
        return merge(t, terms, self.strengths)

    def prepare(self, key: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """High-precision tensor ``key`` as the run uses it, in ``dtype``: merged; or, unmerged, with its full deltas
        merged and the tensor as stored kept for ``set_strengths`` (its low-rank terms become a side path,
        ``attach_side_path``)."""
        if self.merged_mode:
            return _cast(self.merged(key, t), dtype, t)
        if len(self.low_rank(key)) == len(self.terms[key]):
            return _cast(t, dtype, t)
        self._kept[key] = t.detach().to("cpu", copy=True)
        return _cast(self.merged(key, t, full_only=True), dtype, t)

    def attach_side_path(self, linear: nn.Module, name: str, dtype: torch.dtype, device) -> None:
        """Unmerged: give ``linear`` the side path of its low-rank terms (nothing when it has none). On a QLinear
        whose backend splits activation quantization from its GEMM (``split_gemm``) and whose scheme is fp8 / int8,
        the down-projection is quantized (``LowRankPath.quantize_down``) unless ``quantized_down`` is False."""
        terms = self.low_rank(name + ".weight")
        if terms and not self.merged_mode:
            path = LowRankPath.of(terms, self.strengths, dtype, device)
            if self.quantized_down and codes_fit(linear):
                path.quantize_down(linear.scheme)
            attach(linear, path)

    def set_strengths(self, model: nn.Module, strengths: list[float]) -> None:
        """Unmerged: one new strength per LoRA, applied in place (side paths rescaled, full deltas re-merged from
        their kept base); blocks read lazily from disk later take them as they are read."""
        if self.merged_mode:
            raise LightqError("lora_mode=merged bakes the strengths into the weights: reload, or run unmerged")
        if len(strengths) != len(self.files):
            raise LightqError(f"set_strengths: {len(strengths)} strengths for {len(self.files)} LoRAs")
        self.strengths = [float(s) for s in strengths]
        for m in model.modules():
            if isinstance(m, LowRankPath):
                m.set_strengths(self.strengths)
        for key, base in self._kept.items():
            owner, _, leaf = key.rpartition(".")
            try:
                current = getattr(model.get_submodule(owner), leaf)
            except AttributeError:  # a block read lazily from disk: it takes the strengths when it is read
                continue
            current.data.copy_(self.merged(key, base, full_only=True).to(current.device, current.dtype))

    def record(self) -> dict:
        layers = {k.rpartition(".")[0] for k in self.terms}
        out = {"mode": self.mode, "loras": [f.record() for f in self.files], "layers": len(layers)}
        if self.requantized:
            out["requantized_layers"] = self.requantized
            out["note"] = (f"the checkpoint is pre-quantized: {self.requantized} layers were dequantized, merged and "
                           "requantized (a LoRA merged into the bf16 weights is the exact path)")
        return out


def codes_fit(linear: nn.Module) -> bool:
    """The rule for a quantized down-projection: ``linear`` is a QLinear of a per-token x per-channel scheme on a
    backend with a separate GEMM (``split_gemm``), whose activation codes the side path then shares."""
    from ..quant.linear import QLinear
    from ..quant.lora import CODE_SCHEMES

    return isinstance(linear, QLinear) and linear.backend.split_gemm and linear.scheme in CODE_SCHEMES


def _cast(merged: torch.Tensor, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    return merged.to(dtype if like.is_floating_point() else like.dtype)


def model_names(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(tensor key -> shape, linear module names) of a model (built on the meta device: nothing is read)."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return shapes, {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def file_identity(path: str) -> list:
    """What a LoRA file is, for cache keys: its resolved path, size and modification time."""
    from .hub import resolve

    p = Path(resolve(path))
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]
