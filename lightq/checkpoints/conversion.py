"""Streaming checkpoint conversion: a float checkpoint in, a quantized checkpoint out, one tensor at a time.

For every ``<p>.weight`` that is 2-D and whose prefix ``<p>`` matches the component's quantizable patterns
(``lightq.models.family``) and no ``skip`` pattern, the output holds ``quantize_weight(W, scheme)`` — computed
in fp32 from the tensor as stored, exactly as the loader does at load time — as ``<p>.weight`` +
``<p>.weight_scale``; every other tensor is copied unchanged (``layout=lightx2v`` casts them to fp32 as
LightX2V's converter does, unless ``float_dtype`` says otherwise).

Layouts: ``single`` (one .safetensors), ``chunked`` (shards + ``*.safetensors.index.json``), ``blocks``
(``block_{i}.safetensors`` + ``non_block.safetensors`` + index, LightX2V's lazy-load split), ``lightx2v``
(LightX2V's own files: DiT one .safetensors, T5 / CLIP ``.pth`` under LightX2V's names, CLIP without the text
tower; fp8 / int8 only), ``comfyui`` (ComfyUI's current format, schemes fp8 and fp8-pertensor alike: fp8 weights
with the fp8-pertensor scale, an fp32 ``weight_scale`` ``[]`` and a ``comfy_quant`` ``{"format": "float8_e4m3fn"}``
tensor per layer), ``diffusers`` (one .safetensors under diffusers' / transformers' names, for a
``-Diffusers`` folder's component subfolder: ``checkpoints.diffusers``; the same tensors as ``single``).

``lora`` (a merged ``checkpoints.lora.LoraStack``) is merged into each tensor it targets before that tensor is
quantized or copied (``lightq.quant.lora.merge``, the loader's arithmetic), and recorded as ``lightq.lora``.

No layout gets an ``input_scale``: a static activation scale is a calibration (the largest |x| each linear sees
over representative prompts, LightX2V's CalibMax), which needs the whole pipeline run on real prompts, not a
weight conversion. Without it, ComfyUI and lightq quantize a per-tensor layer's activations dynamically (max |x| /
448 of each call), and ``layout=lightx2v scheme=fp8-pertensor`` is refused: LightX2V's fp8-pertensor kernel
divides by an ``input_scale`` it requires.

Memory: the output header is planned from the source header, then tensors are read, quantized and written one
at a time (peak: one source tensor, its fp32 copy and its quantized form). Output goes to a temporary file or
folder next to the destination and is renamed into place only when complete; provenance (source sha256, scheme,
component, skip patterns, lightq version) is recorded in the safetensors header metadata.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from .. import __version__, staging
from ..errors import CheckpointError
from ..models.family import QUANTIZABLE, WAN21
from ..progress import Progress
from ..quant import schemes
from ..quant.linear import check_skip, selected
from . import formats
from .conventions import COMFY_CONF, FP8_E4M3
from .diffusers import written_as
from .sources import TensorSource, sources_sha256
from .writers import SafetensorsWriter, commit, mmap_safetensors, refuse_overwrite

if TYPE_CHECKING:
    from .lora import LoraStack

LAYOUTS = ("single", "chunked", "blocks", "lightx2v", "comfyui", "diffusers")
LIGHTX2V_CLIP_DROPPED = "textual."
BLOCK_RE = WAN21.block_key()
FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Entry:
    """One output tensor: its key, dtype and shape, and how to make it."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]


def convert(source: TensorSource, *, component: str, scheme: str, output: str | os.PathLike, layout: str = "single",
            skip: tuple[str, ...] | list[str] = (), overwrite: bool = False, float_dtype: str | None = None,
            shard_bytes: int = 4 << 30, progress: bool = True, lora: "LoraStack | None" = None) -> Path:
    """Convert ``source`` and write it to ``output`` in ``layout``; returns the path written (file or folder)."""
    if component not in QUANTIZABLE:
        raise CheckpointError(f"component '{component}': choose one of {', '.join(QUANTIZABLE)}")
    if scheme not in schemes.SCHEMES:
        raise CheckpointError(f"scheme '{scheme}': choose one of {', '.join(schemes.SCHEMES)}")
    if layout not in LAYOUTS:
        raise CheckpointError(f"layout '{layout}': choose one of {', '.join(LAYOUTS)}")
    if layout == "lightx2v" and scheme == schemes.PER_TENSOR:
        raise CheckpointError("layout=lightx2v scheme=fp8-pertensor: LightX2V's fp8-pertensor needs a calibrated "
                              "input_scale per linear, which a conversion cannot compute (no calibration run): use "
                              "layout=single (lightq runs it with dynamic per-tensor activations) or layout=comfyui")
    if layout == "lightx2v" and scheme not in ("fp8", "int8"):
        raise CheckpointError(f"layout=lightx2v holds fp8 or int8 per-channel weights only, not {scheme}: use "
                              "layout=single (lightq's own format) for it")
    if layout == "comfyui" and scheme not in ("fp8", schemes.PER_TENSOR):
        raise CheckpointError(f"layout=comfyui is scaled fp8 only (scheme fp8 or fp8-pertensor), not {scheme}")
    if layout == "diffusers" and component == "clip" and scheme not in ("fp8", "int8"):
        raise CheckpointError(f"layout=diffusers splits CLIP's fused q/k/v by rows, which {scheme}'s scales are not "
                              "laid out in: use fp8 or int8, or layout=single")
    if formats.layout_of(source) != "float":
        raise CheckpointError(f"{source.name} is already quantized ({formats.layout_of(source)} layout); convert from "
                              "the "
                              "bf16 / fp32 original")
    if float_dtype is not None and float_dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"float_dtype '{float_dtype}': choose one of {', '.join(FLOAT_DTYPES)} or null")
    out = _output_path(Path(output), component, scheme, layout)
    check_destination(out, source, overwrite)
    staging.remove_stale(out.parent)
    cast = FLOAT_DTYPES[float_dtype] if float_dtype else (torch.float32 if layout == "lightx2v" else None)
    if lora is not None and not lora.merged_mode:
        raise CheckpointError("lightq.convert merges LoRAs into the weights: lora_mode=unmerged has no meaning here")
    entries = _plan(source, component, scheme, tuple(skip), layout, cast, lora)
    meta = _provenance(source, component, scheme, tuple(skip), layout)
    if lora is not None:
        meta["lightq.lora"] = json.dumps([{"file": Path(f.path).name, "strength": f.strength} for f in lora.files])
    bar = Progress(len(entries), f"converting -> {out.name}", "tensors", progress)
    try:
        if layout in ("single", "comfyui", "diffusers") or (layout == "lightx2v" and component == "dit"):
            _write_file(out, entries, meta, overwrite, bar)
        elif layout == "lightx2v":
            _write_pth(out, entries, overwrite, bar)
        else:
            _write_folder(out, entries, meta, layout, WAN21.components[component].stem, shard_bytes, overwrite, bar)
    finally:
        bar.close()
    return out


def check_destination(out: Path, source: TensorSource | None, overwrite: bool) -> None:
    """Refuse to write ``out`` where that would destroy what the user owns: an existing path without
    ``overwrite``, the checkpoint being converted (or a folder holding it), or a folder that is not an earlier
    lightq conversion (``overwrite`` replaces the whole folder, so it must hold nothing else)."""
    refuse_overwrite(out, overwrite)
    target = out.resolve()
    for f in (source.files if source is not None else ()):
        f = Path(f).resolve()
        if f == target or target in f.parents:
            raise CheckpointError(f"output={out} would replace the checkpoint being converted ({f}): write the "
                                  "conversion to another path")
    if out.is_dir() and not out.is_symlink():
        foreign = _foreign_entry(out)
        if foreign is not None:
            raise CheckpointError(f"output={out} is a folder holding '{foreign}', which no lightq conversion wrote; "
                                  "overwrite=true replaces only an earlier conversion's folder: choose a new or "
                                  "empty folder")


def _foreign_entry(folder: Path) -> str | None:
    """The first entry of ``folder`` that a lightq conversion folder would not hold (None: safe to replace).

    A conversion folder holds exactly one ``*.safetensors.index.json`` whose metadata has ``lightq.component``,
    and the files its weight map names.
    """
    entries = sorted(folder.iterdir())
    if not entries:
        return None
    indexes = [e for e in entries if e.name.endswith(".safetensors.index.json")]
    if len(indexes) != 1:
        return (indexes[1] if indexes else entries[0]).name
    try:
        index = json.loads(indexes[0].read_text())
        known = set(index["weight_map"].values()) if "lightq.component" in index["metadata"] else set()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        known = set()
    if not known:
        return indexes[0].name
    for e in entries:
        if e != indexes[0] and (e.name not in known or not e.is_file()):
            return e.name
    return None


def _output_path(output: Path, component: str, scheme: str, layout: str) -> Path:
    lightx2v = WAN21.components[component].lightx2v
    if layout == "lightx2v" and lightx2v:
        return output if output.suffix == ".pth" else output / lightx2v.format(scheme)
    if layout in ("single", "comfyui", "lightx2v", "diffusers"):
        if output.suffix != ".safetensors":
            raise CheckpointError(f"output '{output}': layout={layout} writes one file, name it *.safetensors")
        return output
    if output.suffix:
        raise CheckpointError(f"output '{output}': layout={layout} writes a folder, give a folder name")
    return output


def _plan(source: TensorSource, component: str, scheme: str, skip: tuple[str, ...], layout: str,
          cast: torch.dtype | None, lora: "LoraStack | None" = None) -> list[Entry]:
    include = QUANTIZABLE[component]
    check_skip([k.rpartition(".")[0] for k in source if k.endswith(".weight") and len(source.shape(k)) == 2],
               include, skip, f"{source.name}")
    entries: list[Entry] = []
    for key in source:
        if layout == "lightx2v" and component == "clip" and key.startswith(LIGHTX2V_CLIP_DROPPED):
            continue
        prefix, _, leaf = key.rpartition(".")
        shape, dtype = tuple(source.shape(key)), source.dtype(key)
        if leaf == "weight" and len(shape) == 2 and selected(prefix, include, skip):
            if not dtype.is_floating_point:
                raise CheckpointError(f"{source.file_of(key)}: '{key}' is {dtype}, expected a float weight")
            schemes.check_quantizable(scheme, shape, key)
            entries.extend(_quantized_entries(source, key, prefix, scheme, shape, layout, lora))
        else:
            out_dtype = cast if (cast is not None and dtype.is_floating_point) else dtype
            entries.append(Entry(key, out_dtype, shape, _copy(source, key, out_dtype, lora)))
    return [piece for e in entries for piece in _diffusers_pieces(e, component)] if layout == "diffusers" else entries


def _diffusers_pieces(e: Entry, component: str) -> list[Entry]:
    """``e`` under diffusers' names (``diffusers.written_as``); the pieces of one tensor share one computation."""
    pieces = written_as(component, e.key, e.shape)
    held: dict[str, torch.Tensor] = {}

    def piece(transform, last: bool):
        def make() -> torch.Tensor:
            if "t" not in held:
                held["t"] = e.make()
            t = held.pop("t") if last else held["t"]
            return transform(t) if transform is not None else t
        return make
    return [Entry(name, e.dtype, shape, piece(fn, i == len(pieces) - 1)) for i, (name, shape, fn) in enumerate(pieces)]


def _quantized_entries(source: TensorSource, key: str, prefix: str, scheme: str, shape: tuple[int, int],
                       layout: str, lora: "LoraStack | None" = None) -> list[Entry]:
    memo: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        if key not in memo:  # the weight entry computes, the scale entry right after it takes the result
            w = source[key]
            if lora is not None and lora.touches(key):
                w = lora.merged(key, w)
            qw = schemes.quantize_weight(w, schemes.PER_TENSOR if layout == "comfyui" else scheme, key)
            memo[key] = (qw.data, qw.scale)
        return memo[key]

    def data() -> torch.Tensor:
        return compute()[0]

    def scale() -> torch.Tensor:
        return memo.pop(key)[1] if key in memo else compute()[1]

    data_shape, data_dtype, scale_shape = schemes.expected_layout(scheme, *shape)
    if layout == "comfyui":
        conf = comfy_conf()
        return [Entry(key, schemes.FP8_DTYPE, shape, data), Entry(prefix + formats.SCALE, torch.float32, (), scale),
                Entry(prefix + COMFY_CONF, torch.uint8, tuple(conf.shape), lambda: conf)]
    return [Entry(key, data_dtype, tuple(data_shape), data),
            Entry(prefix + formats.SCALE, torch.float32, tuple(scale_shape), scale)]


def comfy_conf() -> torch.Tensor:
    """ComfyUI's per-layer description of a float8_e4m3fn layer: the uint8 bytes of its JSON object."""
    return torch.tensor(list(json.dumps({"format": FP8_E4M3}).encode()), dtype=torch.uint8)


def _copy(source: TensorSource, key: str, dtype: torch.dtype, lora: "LoraStack | None" = None
          ) -> Callable[[], torch.Tensor]:
    if lora is not None and lora.touches(key):
        return lambda: lora.merged(key, source[key]).to(dtype)
    return lambda: source[key].to(dtype)


def _provenance(source: TensorSource, component: str, scheme: str, skip: tuple[str, ...], layout: str
                ) -> dict[str, str]:
    meta = {
        "lightq.component": component,
        "lightq.source": Path(source.name).name,
        "lightq.source_sha256": sources_sha256(source.files) if source.files else "",
        "lightq.version": __version__,
        "lightq.skip": json.dumps(list(skip)),
        "lightq.layout": layout,
    }
    if layout != "comfyui":  # ComfyUI's per-layer comfy_quant tensors say what each layer holds
        meta["lightq.scheme"] = scheme
        meta["lightq.granularity"] = formats.GRANULARITY[scheme]
    return meta


def _stream(path: Path, entries: list[Entry], meta: dict[str, str] | None, overwrite: bool, bar) -> None:
    layout = [(e.key, e.dtype, e.shape) for e in entries]
    with SafetensorsWriter(path, layout, meta, overwrite=overwrite) as w:
        for e in entries:
            w.write(e.key, e.make())
            bar.update(1)


def _write_file(out: Path, entries: list[Entry], meta: dict[str, str], overwrite: bool, bar) -> None:
    _stream(out, entries, meta, overwrite, bar)


def _write_pth(out: Path, entries: list[Entry], overwrite: bool, bar) -> None:
    """Stream into a temporary safetensors file, then ``torch.save`` its memory-mapped tensors and rename."""
    tmp_dir = staging.temp_dir(out)
    try:
        staged = tmp_dir / "staged.safetensors"
        _stream(staged, entries, None, False, bar)
        tmp_pth = tmp_dir / out.name
        with open(tmp_pth, "wb") as f:
            torch.save(mmap_safetensors(staged), f)
            f.flush()
            os.fsync(f.fileno())
        staging.publish_mode(tmp_pth)
        refuse_overwrite(out, overwrite)
        commit(tmp_pth, out)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _write_folder(out: Path, entries: list[Entry], meta: dict[str, str], layout: str, stem: str, shard_bytes: int,
                  overwrite: bool, bar) -> None:
    groups = _blocks(entries) if layout == "blocks" else _shards(entries, stem, shard_bytes)
    tmp = staging.temp_dir(out)
    try:
        weight_map, total = {}, 0
        for fname, group in groups.items():
            _stream(tmp / fname, group, meta, False, bar)
            weight_map.update({e.key: fname for e in group})
            total += (tmp / fname).stat().st_size
        index = {"metadata": {"total_size": total, **meta}, "weight_map": weight_map}
        (tmp / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        staging.publish_mode(tmp)
        check_destination(out, None, overwrite)
        commit(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _blocks(entries: list[Entry]) -> dict[str, list[Entry]]:
    groups: dict[str, list[Entry]] = {"non_block.safetensors": []}
    for e in entries:
        m = BLOCK_RE.search(e.key)
        groups.setdefault(f"block_{m.group(1)}.safetensors" if m else "non_block.safetensors", []).append(e)
    return groups


def _shards(entries: list[Entry], stem: str, shard_bytes: int) -> dict[str, list[Entry]]:
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        nbytes = _nbytes(e)
        if shards[-1] and size + nbytes > shard_bytes and not e.key.endswith((formats.SCALE, COMFY_CONF)):
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    n = len(shards)
    return {f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors": s for i, s in enumerate(shards)}


def _nbytes(e: Entry) -> int:
    n = torch.empty((), dtype=e.dtype).element_size()
    for d in e.shape:
        n *= d
    return n


