"""``load_component``: the one loader every component uses, from any checkpoint layout (or random weights).

Contract. ``build()`` constructs the module; it is called under the meta device, so nothing is allocated. Every
parameter is then materialised from the source, one tensor at a time (cast to ``dtype`` when it is a float
tensor, moved to ``device``), and the selected linears — those matching ``include`` and no ``skip`` pattern,
when ``scheme`` is set — become ``QLinear``s:

- from the file's quantized weight + scale when the file is pre-quantized (``formats.read_quantized`` validates
  scheme, shapes, dtypes, NaN/Inf), or
- quantized at load time from the float weight with exactly ``quantize_weight`` on the tensor as stored, which is
  what ``lightq.convert`` does: load-time and converted weights are bit-identical.

A quantized tensor in the file at a linear the mode keeps in high precision (``skip``) is dequantized into
``dtype``. Key problems (missing, unexpected and not covered by ``ignore_prefixes``, mis-shaped) are collected
before anything is loaded and raised as one CheckpointError listing up to five keys.
``source="random"`` draws every tensor from a per-key seeded generator on ``device`` (matrices N(0, 1/fan_in),
1-D ``weight`` ones, biases zeros), then follows the same path as a float checkpoint.
Peak memory beyond the result: one source tensor and its fp32 copy while quantizing.
"""

from __future__ import annotations

import sys
import zlib
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import CheckpointError
from ..quant.linear import QLinear, selected
from ..quant.schemes import dequantize_weight, quantize_weight
from . import formats as F
from .io import TensorSource

RANDOM = "random"


def load_component(build: Callable[[], nn.Module], source: TensorSource | str, *, include: Iterable[str] = (),
                   skip: Iterable[str] = (), scheme: str | None = None, backend=None,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                   ignore_prefixes: Iterable[str] = (), progress: bool = True, component: str | None = None,
                   seed: int = 0) -> nn.Module:
    """Build ``build()`` on the meta device and fill it from ``source`` (see the module docstring)."""
    device = torch.device(device)
    with torch.device("meta"):
        model = build()
    include, skip, ignore = tuple(include), tuple(skip), tuple(ignore_prefixes)
    quantized = ([name for name, m in model.named_modules() if isinstance(m, nn.Linear)
                  and selected(name, include, skip)] if scheme else [])
    if scheme and backend is None:
        from ..backends.registry import specs
        backend = specs()["torch"].load()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if isinstance(source, str):
        if source != RANDOM:
            raise CheckpointError(f"unknown weights source '{source}': pass a checkpoint or 'random'")
        fetch = _random_fetch(device, seed)
        pre_quantized = False
    else:
        F.check_file_scheme(source, scheme, component)
        pre_quantized = F.layout_of(source) != "float"
        if pre_quantized and scheme is None:
            some = next(k for k in source if k.endswith((F.SCALE, F.COMFY_SCALE)) or k == F.COMFY_MARKER)
            raise CheckpointError(f"{source.name} is pre-quantized (e.g. '{some}') but the mode is 'none': pick the "
                                  "matching quantized mode, or load the bf16 checkpoint")
        _check_keys(model, source, expected, ignore)
        fetch = lambda key, shape: source[key]  # noqa: E731

    linears = {name: model.get_submodule(name) for name in quantized}
    done: set[str] = set()
    bar = _bar(len(expected), progress, getattr(source, "name", RANDOM))
    try:
        for name, lin in linears.items():
            n_k = tuple(lin.weight.shape)
            if pre_quantized:  # a float weight here is an error: the file was converted without this layer
                qw = F.read_quantized(source, name, scheme, n_k, device)
            else:
                w = fetch(name + ".weight", n_k).to(device)
                qw = quantize_weight(w, scheme, name=f"{name}.weight")
                del w
            bias = None
            if lin.bias is not None:
                bias = _cast(fetch(name + ".bias", tuple(lin.bias.shape)), dtype).to(device)
            _set_submodule(model, name, QLinear(qw, bias, backend))
            done.update((name + ".weight", name + ".bias"))
            bar.update(2 if lin.bias is not None else 1)
        for key, shape in expected.items():
            if key in done:
                continue
            owner, _, leaf = key.rpartition(".")
            if not isinstance(source, str) and leaf == "weight" and F.is_quantized(source, owner):
                qw = F.read_quantized(source, owner, F.file_scheme(source, owner), shape, device)
                t = dequantize_weight(qw, dtype)
            else:
                t = _cast(fetch(key, shape), dtype).to(device)
            _assign(model, key, t)
            bar.update(1)
    finally:
        bar.close()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{', '.join(leftover[:5])} were never loaded (buffers are not checkpoint tensors: "
                              "the module must create them itself)")
    return model.eval()


def _check_keys(model: nn.Module, source: TensorSource, expected: dict[str, tuple], ignore: tuple[str, ...]) -> None:
    consumed = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            consumed.update(F.aux_keys(source, name))
    if F.COMFY_MARKER in source:
        consumed.add(F.COMFY_MARKER)
    missing = [k for k in expected if k not in source]
    unexpected = [k for k in source if k not in expected and k not in consumed
                  and not any(k.startswith(p) for p in ignore)]
    misshaped = []
    for key, shape in expected.items():
        if key not in source:
            continue
        owner = key.rpartition(".")[0]
        if key.endswith(".weight") and F.is_quantized(source, owner):
            continue  # quantized layouts are checked by formats.read_quantized
        if tuple(source.shape(key)) != shape:
            misshaped.append(f"{key} (file {tuple(source.shape(key))}, model {shape})")
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            problems.append(f"{label}: {', '.join(keys[:5])}{more}")
    if problems:
        raise CheckpointError(f"{source.name} does not match the model: {'; '.join(problems)} — is it the "
                              "checkpoint of this component and size?")


def _random_fetch(device: torch.device, seed: int) -> Callable[[str, tuple], torch.Tensor]:
    def fetch(key: str, shape: tuple) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        leaf = key.rpartition(".")[2]
        if leaf == "bias":
            return torch.zeros(shape, device=device)
        if len(shape) == 1 and leaf == "weight":
            return torch.ones(shape, device=device)
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        std = 1.0 / max(fan_in, 1) ** 0.5 if len(shape) >= 2 else 0.02
        return torch.randn(shape, generator=gen, device=device) * std
    return fetch


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def _assign(model: nn.Module, key: str, t: torch.Tensor) -> None:
    owner, _, leaf = key.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = t
    else:
        raise CheckpointError(f"'{key}' is neither a parameter nor a buffer of the model")


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _bar(total: int, progress: bool, name: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"loading {name}", unit="tensor", leave=False,
                disable=not progress or not sys.stderr.isatty())


