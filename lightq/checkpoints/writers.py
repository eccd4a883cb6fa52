"""Writing checkpoint files atomically (reading them: ``lightq.checkpoints.sources``).

``SafetensorsWriter`` streams a safetensors file tensor by tensor (the header is written first from the
declared shapes and dtypes, so peak memory is one tensor), into a temporary file in the destination folder that
is fsynced and renamed over the final name only when every tensor has been written. ``save_safetensors_atomic``
does the same for a dict held in memory.

``commit`` renames a finished temporary file or folder over its destination; ``mmap_safetensors`` maps a written
file back without reading it, to hand it to ``torch.save`` (the converter's ``.pth`` output).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from .. import staging
from ..errors import CheckpointError
from .sources import ST_DTYPES, ST_NAMES


class SafetensorsWriter:
    """Stream one safetensors file: declare every tensor's shape and dtype up front, then ``write`` them in order.

    Use as a context manager; the temporary file becomes ``path`` only when the block exits cleanly with every
    declared tensor written (fsync, then rename). On any error the temporary file is removed.
    """

    def __init__(self, path: str | os.PathLike, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, overwrite: bool = False):
        self.path = Path(path)
        refuse_overwrite(self.path, overwrite)
        self._layout = layout
        self._next = 0
        header: dict[str, object] = {}
        if metadata:
            bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
            if bad:
                raise CheckpointError(f"safetensors metadata must be str -> str; offending key: {bad[0]}")
            header["__metadata__"] = dict(metadata)
        offset = 0
        for key, dtype, shape in layout:
            if dtype not in ST_NAMES:
                raise CheckpointError(f"tensor '{key}': dtype {dtype} cannot be stored in safetensors")
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[key] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        if len(header) - ("__metadata__" in header) != len(layout):
            raise CheckpointError(f"{self.path}: duplicate tensor names in the output layout")
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._prefix = struct.pack("<Q", len(blob)) + blob
        self._file = None
        self._tmp: Path | None = None

    def __enter__(self) -> "SafetensorsWriter":
        self._tmp = staging.temp_file(self.path)
        self._file = open(self._tmp, "wb")
        self._file.write(self._prefix)
        return self

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._layout):
            raise CheckpointError(f"{self.path}: tensor '{key}' was not declared in the output layout")
        want_key, want_dtype, want_shape = self._layout[self._next]
        if key != want_key or tensor.dtype != want_dtype or tuple(tensor.shape) != tuple(want_shape):
            raise CheckpointError(f"{self.path}: expected '{want_key}' {want_dtype} {tuple(want_shape)} next, got "
                                  f"'{key}' {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self._next != len(self._layout):
                missing = self._layout[self._next][0]
                raise CheckpointError(f"{self.path}: '{missing}' and {len(self._layout) - self._next - 1} more "
                                      "declared tensors were never written")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            if exc_type is None:
                staging.publish_mode(self._tmp)
                commit(self._tmp, self.path)
        finally:
            if not self._file.closed:
                self._file.close()
            if self._tmp.exists():
                self._tmp.unlink()


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write ``tensors`` to ``path`` as safetensors: temp file in the same folder, fsync, rename."""
    layout = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    with SafetensorsWriter(path, layout, metadata, overwrite) as w:
        for k, t in tensors.items():
            w.write(k, t)
    return Path(path)


def refuse_overwrite(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; pass overwrite=true to replace it")


def commit(tmp: Path, final: Path) -> None:
    """Rename a finished temp file or folder over ``final`` (replacing a folder needs a swap) and fsync the parent."""
    if final.is_dir() and tmp.is_dir():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    elif final.is_dir():
        raise CheckpointError(f"{final} is a folder; the output is a single file, choose another name")
    else:
        os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a zero-copy view of a private (copy-on-write) memory map.

    Used to hand a streamed file to ``torch.save`` without holding its tensors in anonymous memory.
    """
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    (hlen,) = struct.unpack("<Q", mm[:8])
    header = json.loads(mm[8:8 + hlen])
    header.pop("__metadata__", None)
    base = 8 + hlen
    out = {}
    for key, info in header.items():
        start, end = info["data_offsets"]
        dtype = ST_DTYPES[info["dtype"]]
        if end == start:
            out[key] = torch.empty(info["shape"], dtype=dtype)
            continue
        raw = torch.frombuffer(mm, dtype=torch.uint8, count=end - start, offset=base + start)
        out[key] = raw.view(dtype).reshape(info["shape"])
    return out
