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
            quantizable linear, read from the header only); exactly one must hold the requested scheme.

A diffusers model folder (``model_index.json``, or ``transformer/`` holding safetensors) is read by component
subfolder (``diffusers.SUBFOLDERS``), each found by content as the DiT is (its files are seen under the official
names, ``checkpoints.diffusers``).

A component with a ``subfolder`` in its family record (Wan2.2 A14B's experts: ``high_noise_model/``,
``low_noise_model/``) is looked for there, as the official release and LightX2V place them.
For the encoders, a lightq-converted file ``<component>-<scheme>.safetensors`` is accepted too.
Nothing found is a ``NotInFolder`` (a CheckpointError: a caller may fall back to the bf16 file and quantize at
load); several DiT candidates for one scheme is a plain CheckpointError (ambiguous: never a fallback). Both list
what the folder holds.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path

from ..errors import CheckpointError
from ..models.family import WAN21, ModelFamily
from . import formats
from .conventions import open_source
from .diffusers import SUBFOLDERS
from .sources import BLOCK_FILE, NON_BLOCK_FILE


class NotInFolder(CheckpointError):
    """The folder holds no file of the component in the requested scheme."""


def find_component_file(folder: str | Path, component: str, scheme: str | None, fam: ModelFamily = WAN21) -> Path:
    """The file (or, for a chunked / block-split DiT, the folder) holding ``component`` of family ``fam`` in
    ``scheme``."""
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
        return _find_by_content(sub, component, scheme, fam)
    if record.subfolder:
        folder = folder / record.subfolder
        if not folder.is_dir():
            raise CheckpointError(f"{folder.parent}: no {record.subfolder}/ folder for {component} ({fam.name} keeps "
                                  f"each expert in its own folder, as released)")
    if not record.official:  # found by content: the DiT's chunked, block-split or single files
        return _find_by_content(folder, component, scheme, fam)
    if scheme is None:
        return _named(folder, [record.official], component, scheme)
    names = ([record.lightx2v.format(scheme)] if record.lightx2v else []) + [f"{component}-{scheme}.safetensors"]
    return _named(folder, names, component, scheme)


def _named(folder: Path, names: list[str], component: str, scheme: str | None) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    have = sorted(p.name for p in folder.iterdir() if p.suffix in (".pth", ".safetensors"))
    raise NotInFolder(f"{folder}: no {component} checkpoint for {scheme or 'bf16'} (looked for "
                          f"{' or '.join(names)}; the folder has {', '.join(have) or 'no checkpoints'}); pass its "
                          "path as the mode's ckpt")


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
    raise CheckpointError(f"{path}: holds no {component} linear ({patterns[0]}.weight ...): not a Wan {component} "
                          "checkpoint")


def _find_by_content(folder: Path, component: str, scheme: str | None, fam: ModelFamily) -> Path:
    candidates = dit_candidates(folder)
    classified = [(p, scheme_of(p, component, fam)) for p in candidates]
    matching = [p for p, s in classified if s == scheme]
    if len(matching) == 1:
        return matching[0]
    label = "DiT" if component == "dit" else component
    listing = ", ".join(f"{p.name or p} ({s or 'bf16'})" for p, s in classified) or "none"
    if not matching:
        raise NotInFolder(f"{folder}: no {label} checkpoint holds {scheme or 'bf16'} weights (found: {listing}); "
                          "convert one with python -m lightq.convert or pass the mode's ckpt")
    raise CheckpointError(f"{folder}: {len(matching)} {label} checkpoints hold {scheme or 'bf16'} weights "
                          f"({', '.join(p.name for p in matching)}); pass the one to use as the mode's ckpt")
