"""Reading checkpoint files, one tensor at a time (writing them: ``lightq.checkpoints.writers``).

``open_files(path)`` gives a ``TensorSource``, a lazy read-only mapping ``key -> tensor`` over one
checkpoint, whatever its file layout:

- one ``.safetensors`` file;
- a folder with a ``*.safetensors.index.json`` (``weight_map``: key -> chunk file), as the official Wan2.1 DiT;
- a folder split by block (``block_{i}.safetensors`` + ``non_block.safetensors``), as LightX2V's lazy-load layout;
- a folder with exactly one ``.safetensors`` file;
- a ``.pth`` / ``.pt`` file (``torch.load(weights_only=True, mmap=True)``: a flat dict of tensors).

Safetensors are memory-mapped through ``safe_open``: ``source[key]`` reads one tensor, ``shape`` / ``dtype`` read
only the header. A corrupt or truncated file raises ``CheckpointError`` naming the file and the problem.

``source.subset(keys)`` is a view of some keys of a source (one offloaded block's tensors), behind the same interface;
``RenamedSource`` shows a source under other key names (``lightq.checkpoints.conventions``: the published key
conventions seen through lightq's names); ``conventions.open_source`` is what loaders open.
``file_sha256`` / ``sources_sha256`` identify the files a source reads.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

# safetensors dtype names <-> torch dtypes
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
ST_NAMES: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}

BLOCK_FILE = "block_{}.safetensors"
NON_BLOCK_FILE = "non_block.safetensors"


class TensorSource(Mapping):
    """Lazy read-only ``key -> tensor`` over one checkpoint (one or several files).

    ``source[key]`` loads one tensor on the CPU; ``shape(key)`` / ``dtype(key)`` do not load it where the format
    allows. ``metadata`` is the header metadata (``str -> str``); ``files`` the files read; ``name`` names the
    checkpoint in error messages.
    """

    name: str
    files: tuple[Path, ...]
    metadata: dict[str, str]

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def file_of(self, key: str) -> Path:
        """The file holding ``key`` (for error messages)."""
        return self.files[0]

    def subset(self, keys) -> "SubsetSource":
        """The tensors ``keys`` of this source only (same name, files and metadata)."""
        return SubsetSource(self, keys)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} tensors)"


class SafetensorsSource(TensorSource):
    """One or more memory-mapped safetensors files; each key lives in exactly one file."""

    def __init__(self, files: list[Path], name: str, weight_map: dict[str, str] | None = None):
        self.name, self.files = name, tuple(files)
        self._handles = {f.name: _safe_open(f) for f in files}
        self._file_of: dict[str, str] = {}
        for fname, handle in self._handles.items():
            for key in handle.keys():
                if key in self._file_of:
                    raise CheckpointError(f"{name}: tensor '{key}' appears in both {self._file_of[key]} and "
                                          f"{fname}; remove the duplicate file")
                self._file_of[key] = fname
        if weight_map is not None:
            _check_weight_map(name, weight_map, self._file_of)
        self.metadata = _merged_metadata(name, {f: h.metadata() or {} for f, h in self._handles.items()})

    def __getitem__(self, key: str) -> torch.Tensor:
        fname = self._file_of[key]
        try:
            return self._handles[fname].get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{fname}: cannot read tensor '{key}' ({exc}); the file is corrupt, "
                                  "download or convert it again") from exc

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def __contains__(self, key) -> bool:
        return key in self._file_of

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        name = self._handles[self._file_of[key]].get_slice(key).get_dtype()
        if name not in ST_DTYPES:
            raise CheckpointError(f"{self._file_of[key]}: tensor '{key}' has dtype {name}, which lightq cannot load")
        return ST_DTYPES[name]

    def file_of(self, key: str) -> Path:
        fname = self._file_of[key]
        return next(f for f in self.files if f.name == fname)


class DictSource(TensorSource):
    """Tensors already in memory (tests, random weights), behind the same interface."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str = "<memory>",
                 metadata: dict[str, str] | None = None):
        self.name, self.files, self.metadata = name, (), dict(metadata or {})
        self._tensors = dict(tensors)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, key) -> bool:
        return key in self._tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype


class PthSource(DictSource):
    """A ``torch.save``d flat dict of tensors, loaded with ``weights_only=True`` and memory-mapped when possible."""

    def __init__(self, path: Path):
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                # legacy (non-zip) torch.save format cannot be memory-mapped: read it whole
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot load as a weights-only torch file ({type(exc).__name__}: "
                                  f"{_first_line(exc)}); the file is corrupt or not a plain tensor dict") from exc
        if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in obj.items()):
            raise CheckpointError(f"{path}: expected a flat dict of name -> tensor, got {type(obj).__name__}"
                                  " with other contents; save the state_dict itself")
        super().__init__(obj, name=str(path))
        self.files = (path,)


class SubsetSource(TensorSource):
    """The keys ``keys`` of ``source``, behind the same interface (same name, files and metadata)."""

    def __init__(self, source: TensorSource, keys: list[str]):
        self._source, self._keys = source, list(keys)
        self._set = frozenset(self._keys)
        self.name, self.files, self.metadata = source.name, source.files, source.metadata
        self.convention = getattr(source, "convention", "")

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._set:
            raise KeyError(key)
        return self._source[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._set

    def shape(self, key: str) -> tuple[int, ...]:
        return self._source.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._source.dtype(key)

    def file_of(self, key: str) -> Path:
        return self._source.file_of(key)


@dataclass(frozen=True)
class Derived:
    """A visible tensor made from stored ones: ``cat`` (rows of ``parts`` concatenated), ``view`` (the one part
    reshaped) or ``t`` (the one 2-D part transposed); ``shape`` is the result's."""

    parts: tuple[str, ...]
    shape: tuple[int, ...]
    op: str

    def make(self, source: "TensorSource") -> torch.Tensor:
        if self.op == "cat":
            return torch.cat([source[k] for k in self.parts], dim=0)
        t = source[self.parts[0]]
        return t.reshape(self.shape) if self.op == "view" else t.t().contiguous()


class RenamedSource(TensorSource):
    """``source`` under other key names: ``names`` maps each visible key to the key stored in ``source`` or to a
    ``Derived`` tensor (keys not in ``names`` are hidden); ``metadata`` replaces the header metadata (default: the
    source's); ``convention`` names the key convention seen through (``official_names`` in result.json)."""

    def __init__(self, source: TensorSource, names: dict[str, "str | Derived"], metadata: dict[str, str] | None = None,
                 convention: str = ""):
        self._source, self._names = source, dict(names)
        self.name, self.files = source.name, source.files
        self.metadata = dict(source.metadata if metadata is None else metadata)
        self.convention = convention or getattr(source, "convention", "")

    def __getitem__(self, key: str) -> torch.Tensor:
        stored = self._names[key]
        return stored.make(self._source) if isinstance(stored, Derived) else self._source[stored]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, key) -> bool:
        return key in self._names

    def shape(self, key: str) -> tuple[int, ...]:
        stored = self._names[key]
        return stored.shape if isinstance(stored, Derived) else self._source.shape(stored)

    def dtype(self, key: str) -> torch.dtype:
        stored = self._names[key]
        return self._source.dtype(stored.parts[0] if isinstance(stored, Derived) else stored)

    def file_of(self, key: str) -> Path:
        stored = self._names[key]
        return self._source.file_of(stored.parts[0] if isinstance(stored, Derived) else stored)


def open_files(path: str | os.PathLike) -> TensorSource:
    """Open a checkpoint file or folder (see the module docstring for the layouts recognised), keys as stored;
    ``conventions.open_source`` is this seen through the published key conventions."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file():
        if path.suffix == ".safetensors":
            return SafetensorsSource([path], str(path))
        if path.suffix in (".pth", ".pt", ".bin"):
            return PthSource(path)
        if path.name.endswith(".safetensors.index.json"):
            return _indexed(path)
        raise CheckpointError(f"{path}: unknown checkpoint format '{path.suffix}'; expected .safetensors, "
                              ".safetensors.index.json, .pth or .pt")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _indexed(indexes[0])
    if len(indexes) > 1:
        raise CheckpointError(f"{path}: several index files ({', '.join(p.name for p in indexes)}); "
                              "pass the one to load")
    if (path / NON_BLOCK_FILE).exists():
        return SafetensorsSource(_block_files(path), str(path))
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return SafetensorsSource(files, str(files[0]))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors file, index or block split found in this folder")
    raise CheckpointError(f"{path}: {len(files)} .safetensors files and no index ({', '.join(f.name for f in files[:5])}"
                          f"{', ...' if len(files) > 5 else ''}); pass the file to load")


def _indexed(index: Path) -> SafetensorsSource:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except Exception as exc:
        raise CheckpointError(f"{index}: not a valid safetensors index ({exc}); it needs a 'weight_map' object "
                              "of tensor name -> file") from exc
    files = []
    for fname in sorted(set(weight_map.values())):
        f = index.parent / fname
        if not f.is_file():
            raise CheckpointError(f"{index}: chunk file {fname} is missing from {index.parent}")
        files.append(f)
    return SafetensorsSource(files, str(index.parent), weight_map)


def _block_files(folder: Path) -> list[Path]:
    """``non_block.safetensors`` and ``block_0..N-1.safetensors``; a gap in the numbering is an error."""
    found = {}
    for f in folder.glob("block_*.safetensors"):
        stem = f.name[len("block_"):-len(".safetensors")]
        if stem.isdigit():
            found[int(stem)] = f
    missing = sorted(set(range(max(found, default=-1) + 1)) - set(found))
    if missing:
        raise CheckpointError(f"{folder}: block split is incomplete, missing "
                              f"{', '.join(BLOCK_FILE.format(i) for i in missing[:5])}")
    return [folder / NON_BLOCK_FILE] + [found[i] for i in sorted(found)]


def _safe_open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)}); the file is "
                              "truncated or corrupt, download or convert it again") from exc


def _check_weight_map(name: str, weight_map: dict[str, str], file_of: dict[str, str]) -> None:
    for key, fname in weight_map.items():
        if file_of.get(key) != fname:
            where = f"is in {file_of[key]}" if key in file_of else "is in no chunk"
            raise CheckpointError(f"{name}: the index puts '{key}' in {fname} but it {where}; the index does "
                                  "not match the chunk files")


def _merged_metadata(name: str, per_file: dict[str, dict[str, str]]) -> dict[str, str]:
    """Union of the files' header metadata; a ``lightq.*`` key with different values in two files is an error."""
    merged: dict[str, str] = {}
    for fname, meta in per_file.items():
        for k, v in meta.items():
            if k.startswith("lightq.") and k in merged and merged[k] != v:
                raise CheckpointError(f"{name}: files disagree on {k} ('{merged[k]}' vs '{v}' in {fname}); "
                                      "they come from different conversions")
            merged.setdefault(k, v)
    return merged


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """sha256 of a file, streamed in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sources_sha256(files: tuple[Path, ...] | list[Path]) -> str:
    """One hash for a checkpoint: the file's sha256, or for several files sha256 over ``name:sha256`` lines."""
    if len(files) == 1:
        return file_sha256(files[0])
    lines = "".join(f"{Path(f).name}:{file_sha256(f)}\n" for f in sorted(files, key=lambda p: Path(p).name))
    return hashlib.sha256(lines.encode()).hexdigest()
