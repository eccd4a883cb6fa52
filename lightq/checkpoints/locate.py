"""Finding a component's checkpoint in a model folder by name, as LightX2V does.

``find_component_file(folder, component, scheme)``:

- ``t5``:   ``models_t5_umt5-xxl-enc-{fp8,int8}.pth`` for a quantized scheme, ``models_t5_umt5-xxl-enc-bf16.pth``
            for ``None`` (bf16);
- ``clip``: ``models_clip_open-clip-xlm-roberta-large-vit-huge-14-{fp8,int8}.pth``, the bf16 original
            ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``;
- ``vae``:  ``Wan2.1_VAE.pth`` (Wan2.2 TI2V: ``Wan2.2_VAE.pth``);
- ``dit``:  the folder's DiT checkpoints — the official ``diffusion_pytorch_model*.safetensors`` (with its index:
            the folder itself is returned), a block split, and every other ``*.safetensors`` in the folder — are
            classified by the scheme they hold (header metadata, else the dtype and scale shape of the first
            quantizable linear, read from the header only); exactly one must hold the requested scheme (else
            exactly one a mode of that scheme reads exactly: a per-tensor fp8 file under an fp8 mode).

A diffusers model folder (``model_index.json``, or ``transformer/`` holding safetensors) is read by component
subfolder (``diffusers.SUBFOLDERS``), each found by content as the DiT is (its files are seen under the official
names, ``checkpoints.diffusers``).

LightX2V's subfolders: a model folder's ``distill_int8/``, ``distill_fp8/``, ``distill_models/``, ``int8/``, ``fp8/``
and ``original/`` are looked in before the folder itself, in that order (LightX2V's ``find_torch_model_path``);
for a named file the first hit wins, for the DiT the first of these places holding a checkpoint of the scheme.
Files that are no checkpoint of the component (a VAE or a LoRA ``.safetensors`` beside the DiT) are passed over
and named in the messages. ``find_component(...)`` also says why that file (``Found.why``, kept in result.json).
The folder's ``config.json`` (or ``original/config.json``), LightX2V's record of the DiT's size, is
``folder_config``.

A component with a ``subfolder`` in its family record (Wan2.2 A14B's experts: ``high_noise_model/``,
``low_noise_model/``) is looked for there, as the official release and LightX2V place them.
For the encoders, a lightq-converted file ``<component>-<scheme>.safetensors`` is accepted too.
Nothing found is a ``NotInFolder`` (a CheckpointError: a caller may fall back to the bf16 file and quantize at
load); several DiT candidates for one scheme is a plain CheckpointError (ambiguous: never a fallback). Both list
what the folder holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from ..errors import CheckpointError
from ..models.family import WAN21, ModelFamily
from . import formats
from .conventions import open_source
from .diffusers import SUBFOLDERS
from .sources import BLOCK_FILE, NON_BLOCK_FILE


LIGHTX2V_SUBFOLDERS = ("distill_int8", "distill_fp8", "distill_models", "int8", "fp8", "original")


class NotInFolder(CheckpointError):
    """The folder holds no file of the component in the requested scheme."""


class NotAComponentFile(CheckpointError):
    """A checkpoint that holds none of the component's linears (another component's file, a LoRA)."""


@dataclass(frozen=True)
class Found:
    path: Path  # the file, or the folder of a chunked / block-split checkpoint
    why: str  # how it was found: the name or the content, and where


def find_component_file(folder: str | Path, component: str, scheme: str | None, fam: ModelFamily = WAN21) -> Path:
    """The file (or, for a chunked / block-split DiT, the folder) holding ``component`` of family ``fam`` in
    ``scheme``."""
    return find_component(folder, component, scheme, fam).path


def places(folder: Path) -> list[Path]:
    """Where LightX2V looks in a model folder, in its order: its subfolders that exist, then the folder."""
    return [folder / s for s in LIGHTX2V_SUBFOLDERS if (folder / s).is_dir()] + [folder]


def folder_config(folder: str | Path) -> tuple[Path, dict] | None:
    """The model folder's ``config.json`` (else ``original/config.json``), as LightX2V reads it, or None."""
    for path in (Path(folder) / "config.json", Path(folder) / "original" / "config.json"):
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{path}: not a readable JSON file ({exc}): fix or remove it") from None
            if not isinstance(data, dict):
                raise CheckpointError(f"{path}: a model config is a JSON object, got {type(data).__name__}")
            return path, data
    return None


def find_component(folder: str | Path, component: str, scheme: str | None, fam: ModelFamily = WAN21) -> Found:
    """``find_component_file``'s answer and why (see the module doc)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    record = fam.components.get(component)
    if record is None:
        raise CheckpointError(f"unknown component '{component}': choose {', '.join(fam.components)}")
    if is_diffusers_folder(folder):  # -Diffusers: the component's subfolder, its files found by content
        if not record.diffusers:
            raise NotInFolder(f"{folder} is a diffusers model folder; lightq reads {fam.name}'s {component} in the "
                              "official layout only: pass its file as the mode's ckpt or use the official release")
        sub = folder / record.diffusers
        if not sub.is_dir():
            raise NotInFolder(f"{folder} is a diffusers model folder without {record.diffusers}/ (the "
                              f"{component}); "
                              "is it the model of this task?")
        return _find_by_content([sub], component, scheme, fam)
    if record.subfolder:
        folder = folder / record.subfolder
        if not folder.is_dir():
            raise CheckpointError(f"{folder.parent}: no {record.subfolder}/ folder for {component} ({fam.name} keeps "
                                  f"each expert in its own folder, as released)")
    where = [folder] if record.subfolder else places(folder)
    if not record.official:  # found by content: the DiT's chunked, block-split or single files
        return _find_by_content(where, component, scheme, fam)
    if scheme is None:
        return _named(folder, where, [record.official], component, scheme)
    names = ([record.lightx2v.format(scheme)] if record.lightx2v else []) + [f"{component}-{scheme}.safetensors"]
    return _named(folder, where, names, component, scheme)


def _named(folder: Path, where: list[Path], names: list[str], component: str, scheme: str | None) -> Found:
    for place in where:
        for name in names:
            if (place / name).is_file():
                return Found(place / name, f"named {name}, in {_rel(place, folder)}")
    have = sorted(str(p.relative_to(folder)) for place in where for p in place.iterdir()
                  if p.suffix in (".pth", ".safetensors"))
    raise NotInFolder(f"{folder}: no {component} checkpoint for {scheme or 'bf16'} (looked for "
                      f"{' or '.join(names)} in {', '.join(_rel(p, folder) for p in where)}; the folder has "
                      f"{', '.join(have) or 'no checkpoints'}); pass its path as the mode's ckpt")


def _rel(place: Path, folder: Path) -> str:
    return "the folder" if place == folder else f"{place.relative_to(folder)}/"


def dit_candidates(folder: Path) -> list[Path]:
    """Every checkpoint of one component in ``folder`` (a DiT folder, a diffusers component subfolder): an
    indexed or block-split set (the folder) and standalone files."""
    found: list[Path] = []
    chunk_files: set[str] = set()
    if list(folder.glob("*.safetensors.index.json")) or (folder / NON_BLOCK_FILE).is_file():
        found.append(folder)
        src = open_source(folder)
        chunk_files = {f.name for f in src.files}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name not in chunk_files and not fnmatchcase(f.name, BLOCK_FILE.format("*")):
            found.append(f)
    return found


def is_diffusers_folder(folder: Path) -> bool:
    """A diffusers pipeline folder: ``model_index.json``, or a ``transformer/`` subfolder holding safetensors."""
    return (folder / "model_index.json").is_file() or any((folder / SUBFOLDERS["dit"]).glob("*.safetensors"))


def scheme_of(path: Path, component: str = "dit", fam: ModelFamily = WAN21) -> str | None:
    """The scheme a checkpoint of ``component`` (of family ``fam``) holds (None: high precision), from its header
    only."""
    src = open_source(path)
    if "lightq.scheme" in src.metadata:
        return src.metadata["lightq.scheme"]
    patterns = fam.quantizable.get(component, ())
    for key in src:
        prefix, _, leaf = key.rpartition(".")
        if leaf == "weight" and any(fnmatchcase(prefix, p) for p in patterns):
            kind = formats.file_scheme(src, prefix)
            return None if kind == "float" else kind
    if not patterns:
        return None
    raise NotAComponentFile(f"{path}: holds no {component} linear ({patterns[0]}.weight ...): not a Wan "
                            f"{component} checkpoint")


def _find_by_content(where: list[Path], component: str, scheme: str | None, fam: ModelFamily) -> Found:
    """The one checkpoint of ``scheme`` in the first of ``where`` holding any; files of no ``component`` linear
    (a VAE, a LoRA) are passed over."""
    label = "DiT" if component == "dit" else component
    root = where[-1]
    classified, passed_over = [], []
    for place in where:
        for p in dit_candidates(place):
            try:
                classified.append((place, p, scheme_of(p, component, fam)))
            except NotAComponentFile:
                passed_over.append(p)
    for place in where:
        here = [(p, s) for at, p, s in classified if at == place]
        # a file of the mode's scheme, else one the mode reads exactly (formats.READ_AS: a per-tensor fp8 file
        # under an fp8 mode)
        matching = [p for p, s in here if s == scheme] or \
            [p for p, s in here if s is not None and scheme in formats.READ_AS.get(s, ())]
        if len(matching) == 1:
            found_in = _rel(place, root)
            return Found(matching[0], f"the one {label} checkpoint holding {scheme or 'bf16'} weights in {found_in} "
                                      f"(by its tensors; LightX2V's order: {', '.join(_rel(w, root) for w in where)})")
        if matching:
            raise CheckpointError(f"{place}: {len(matching)} {label} checkpoints hold {scheme or 'bf16'} weights "
                                  f"({', '.join(p.name for p in matching)}); pass the one to use as the mode's ckpt")
    listing = ", ".join(f"{_name(p, root)} ({s or 'bf16'})" for _, p, s in classified) or "none"
    ignored = f"; not {label} checkpoints: {', '.join(_name(p, root) for p in passed_over)}" if passed_over else ""
    raise NotInFolder(f"{root}: no {label} checkpoint holds {scheme or 'bf16'} weights (found: {listing}{ignored}); "
                      "convert one with python -m lightq.convert or pass the mode's ckpt")


def _name(p: Path, root: Path) -> str:
    return str(p.relative_to(root)) if p != root else p.name or str(p)
