"""Lazy loading: DiT blocks read from a block-split checkpoint on disk by a background thread, a few blocks ahead.

``load_lazy`` has the signature of ``load_component``. It loads only the non-block tensors (from
``non_block.safetensors``) and puts a ``LazyBlock`` stand-in at each ``blocks.{i}``. While the component is active
under ``offload=block|phase``, a ``BlockReader`` thread reads blocks 0, 1, ..., N-1, 0, 1, ... in the order the
forward runs them: each block is built and filled by ``load_component`` from the keys ``blocks.{i}.*`` alone (so
the numerics are those of a full load: pre-quantized weights are validated and used as stored, float weights are
quantized by ``quantize_weight``, skip patterns apply with the full key names), then packed into pinned host
buffers per streamed unit. The reader stays at most ``ahead`` blocks in front (a bounded queue), so host memory
holds about ``ahead + buffers + 1`` blocks, never the model.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections import defaultdict
from typing import Callable

import torch
from torch import nn

from ..checkpoints.sources import NON_BLOCK_FILE, TensorSource
from ..checkpoints.loader import load_component
from ..errors import LightqError
from ..models.family import WAN21
from ..quant.linear import selected
from .binding import Pack, layout_bytes
from .units import unit_specs, units_per_block

BLOCK_KEY = WAN21.block_key()


class _Holder(nn.Module):
    """Block ``index`` under the name ``blocks.{index}``, so keys and skip patterns read as in the full model."""

    def __init__(self, index: int, block: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleDict({str(index): block})


class LazyBlock(nn.Module):
    """Stands in for ``blocks.{index}``: runs the block that the active streaming session has read from disk."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index
        self.session: LazyUnits | None = None

    def forward(self, *args, **kwargs):
        if self.session is None:
            raise LightqError("this model's blocks load lazily from disk: run it inside the pipeline's offload "
                              "(offload=block or phase with offload.lazy_load=true)")
        return self.session.module(self.index)(*args, **kwargs)


class LazyBlocks:
    """Reads block ``i`` of a block-split checkpoint as a fresh CPU module (``read(i)``)."""

    def __init__(self, source: TensorSource, template: nn.Module, proxies: list[LazyBlock], load_kwargs: dict):
        self.source, self.template, self.proxies, self.load_kwargs = source, template, proxies, load_kwargs
        self.count = len(proxies)
        keys = defaultdict(list)
        for key in source:
            m = BLOCK_KEY.match(key)
            if m:
                keys[int(m.group(1))].append(key)
        if sorted(keys) != list(range(self.count)):
            raise LightqError(f"{source.name}: the block split holds blocks {_ranges(sorted(keys))} but the model has "
                              f"{self.count} (0..{self.count - 1}); it is the checkpoint of another model size")
        self.keys = dict(keys)

    def quantized_layers(self) -> int:
        """How many of the blocks' linears are quantized when read (counted from the template, nothing loaded)."""
        method = self.load_kwargs["method"]
        if method is None or not method.quantizes:
            return 0
        include = self.load_kwargs["include"]
        names = [n for n, m in self.template.named_modules() if isinstance(m, nn.Linear)]
        return sum(selected(f"blocks.{i}.{n}", include, method.skip) for i in range(self.count) for n in names)

    def read(self, i: int) -> nn.Module:
        holder = load_component(lambda: _Holder(i, copy.deepcopy(self.template)),
                                self.source.subset(self.keys[i]), device="cpu", progress=False,
                                **self.load_kwargs)
        return holder.blocks[str(i)].requires_grad_(False)

    def open(self, granularity: str, pin: bool, ahead: int, on_arrival: Callable) -> "LazyUnits":
        session = LazyUnits(self, granularity, pin, ahead, on_arrival)
        for p in self.proxies:
            p.session = session
        return session

    def close(self, session: "LazyUnits") -> None:
        for p in self.proxies:
            p.session = None
        session.close()


class BlockReader:
    """A daemon thread producing ``(i, produce(i))`` for i = start, start+1, ... (cyclic), at most ``ahead`` queued.

    An exception in ``produce`` is queued and raised by ``get`` in the consumer's thread.
    """

    def __init__(self, produce: Callable[[int], object], count: int, ahead: int):
        self.produce, self.count, self.ahead = produce, count, max(1, ahead)
        self.thread: threading.Thread | None = None

    def start(self, first: int) -> None:
        self.close()
        self.queue: queue.Queue = queue.Queue(maxsize=self.ahead)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(first, self.queue, self.stop), daemon=True,
                                       name="lightq-block-reader")
        self.thread.start()

    def _run(self, i: int, q: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item = (i, self.produce(i), None)
            except BaseException as exc:  # handed to the consumer, which raises it
                item = (i, None, exc)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            i = (i + 1) % self.count

    def get(self) -> tuple[int, object]:
        i, value, exc = self.queue.get()
        if exc is not None:
            raise exc
        return i, value

    def close(self) -> None:
        if self.thread is None:
            return
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self.thread.join()
        self.thread = None


class LazyUnits:
    """The streamer's unit source for a lazily loaded model: units are read (and packed) by the reader thread."""

    def __init__(self, lazy: LazyBlocks, granularity: str, pin: bool, ahead: int, on_arrival: Callable):
        self.lazy, self.granularity, self.pin, self.on_arrival = lazy, granularity, pin, on_arrival
        self.per_block = units_per_block(lazy.template, granularity)
        self.count = lazy.count * self.per_block
        self.window: dict[int, Pack] = {}  # units read for this pass and not yet released
        self.modules: dict[int, nn.Module] = {}
        self.reader = BlockReader(self._produce, lazy.count, ahead)
        self.reader.start(0)

    def _produce(self, b: int):
        """Reader thread: read block b and pack each of its units into (pinned) host buffers. These live for one
        pass, so they come from PyTorch's caching pinned allocator, which reuses them pass after pass (and keeps
        them until a copy from them is done), instead of page-locking fresh memory for every block read."""
        module = self.lazy.read(b)
        specs = unit_specs(module, self.granularity)
        return module, specs, [Pack(s.refs, self.pin, torch.empty(max(layout_bytes(s.refs), 1), dtype=torch.uint8,
                                                                  pin_memory=self.pin)) for s in specs]

    def _arrive(self, b: int) -> None:
        i, value = self.reader.get()
        if i != b:  # out of order (a forward stopped half-way): read from b on
            self.reader.start(b)
            i, value = self.reader.get()
        module, specs, packs = value
        self.modules[b] = module
        k0 = b * self.per_block
        for j, pack in enumerate(packs):
            self.window[k0 + j] = pack
        self.on_arrival(specs, k0)

    def module(self, b: int) -> nn.Module:
        if b not in self.modules:
            self._arrive(b)
        return self.modules[b]

    def pack(self, k: int) -> Pack:
        if k not in self.window:
            self._arrive(k // self.per_block)
        return self.window[k]

    def released(self, k: int) -> None:
        self.window.pop(k, None)
        if k % self.per_block == self.per_block - 1:
            self.modules.pop(k // self.per_block, None)

    def reset(self, k: int) -> None:
        """Next is unit k: keep its block if it is read already, drop the rest, read on from the block after."""
        b = k // self.per_block
        keep = b in self.modules and k in self.window
        self.window = {kk: p for kk, p in self.window.items() if keep and kk // self.per_block == b}
        self.modules = {b: self.modules[b]} if keep else {}
        self.reader.start((b + 1) % self.lazy.count if keep else b)

    def close(self) -> None:
        self.reader.close()
        self.window.clear()
        self.modules.clear()


def is_block_split(source) -> bool:
    return not isinstance(source, str) and any(f.name == NON_BLOCK_FILE for f in getattr(source, "files", ()))


def load_lazy(build: Callable[[], nn.Module], source, *, include=(), method=None, device="cpu", dtype=torch.bfloat16,
              ignore_prefixes=(), progress=True, component=None, seed=0, lora=None) -> nn.Module:
    """Like ``load_component``, but only the non-block tensors are loaded; blocks stream from disk when run."""
    if not is_block_split(source):
        name = getattr(source, "name", "weights=random" if source == "random" else str(source))
        raise LightqError(f"offload.lazy_load=true reads {component or 'the'} blocks from a block-split checkpoint "
                          f"(block_<i>.safetensors + non_block.safetensors), and {name} is not one: make one with "
                          f"`python -m lightq.convert component={component or 'dit'} scheme={_scheme(method)} "
                          "source=<model folder or file> output=<folder> layout=blocks` and pass it as "
                          f"{component or 'dit'}_quant.ckpt=<folder>")
    with torch.device("meta"):
        blocks = build().blocks
    template = blocks[0]
    proxies = [LazyBlock(i) for i in range(len(blocks))]

    def skeleton() -> nn.Module:
        model = build()
        model.blocks = nn.ModuleList(proxies)
        return model

    model = load_component(skeleton, source, include=include, method=method, device=device, dtype=dtype,
                           ignore_prefixes=(*ignore_prefixes, "blocks."), progress=progress, component=component,
                           seed=seed, lora=lora)
    model.lazy_blocks = LazyBlocks(source, template, proxies,
                                   dict(include=include, method=method, dtype=dtype, component=component, lora=lora))
    return model


def _scheme(method) -> str:
    return method.scheme if method is not None and method.quantizes else "<scheme>"


def _ranges(indices: list[int]) -> str:
    return f"{indices[0]}..{indices[-1]}" if indices else "none"
