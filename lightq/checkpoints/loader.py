"""``load_component``: the one loader every component uses, from any checkpoint layout (or random weights).

Contract. ``build()`` constructs the module; it is called under the meta device, so nothing is allocated. Every
parameter is then materialised from the source, one tensor at a time (cast to ``dtype`` when it is a float
tensor, moved to ``device``), and the selected linears — those matching ``include`` and none of the method's
``skip`` patterns, when ``method`` quantizes — become the method's ``QLinear``s (``QuantMethod.linear``).
``include`` left out (None) selects every linear a pre-quantized file holds quantized; with a float (or random)
source and a quantizing method it must be given (a CheckpointError says so): nothing is silently left in high
precision.

- from the file's quantized weight + scale when the file is pre-quantized (``formats.read_quantized`` validates
  scheme, shapes, dtypes, NaN/Inf), or
- quantized at load time from the float weight with exactly ``quantize_weight`` on the tensor as stored, which is
  what ``lightq.convert`` does: load-time and converted weights are bit-identical.

A quantized tensor in the file at a linear the mode keeps in high precision (``skip``) is dequantized into
``dtype`` (this is also how a weight-only file, ComfyUI's ``full_precision_matrix_mult``, runs under mode
``none``). The module's ``checkpoint_numerics`` (``formats.numerics``) says which numerics ran. ``lora`` (a
``checkpoints.lora.LoraStack``) changes the tensors it targets as they are read: merged into the float weight
before ``quantize_weight`` (a pre-quantized weight is dequantized, merged and requantized) and into high-precision
tensors before the cast to ``dtype``; or, unmerged, a side path on each targeted linear. Key problems
(missing, unexpected and not covered by ``ignore_prefixes``, mis-shaped) are collected
before anything is loaded and raised as one CheckpointError listing up to five keys.
``source="random"`` makes every tensor from ``(seed, key)`` alone with ``random_tensor`` (matrices uniform with the
variance of N(0, 1/fan_in), 1-D ``weight`` ones, biases zeros): the same bits on every device, computed on the GPU
when there is one, then follows the same path as a float checkpoint.
``on_block(model, i)``, when given, is called for every block ``i`` of ``model.blocks`` in order, as soon as that
block is complete (its tensors loaded, its linears quantized, their unmerged LoRA paths attached): the blocks are
filled one after another (each block's linears, then its other tensors), the tensors outside the blocks last. The
callback may change the block (fuse it) or move its tensors elsewhere (``lightq.offload`` packs it into host
memory, freeing it on ``device``), so a component larger than ``device``'s memory loads through it one block at a
time. Without it, every linear is loaded first, then the other tensors. Every tensor is made from its key alone,
so the order changes no value.
Peak memory beyond the result: one source tensor and its fp32 copy while quantizing.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import torch
from torch import nn

from ..errors import CheckpointError
from ..models.family import WAN21
from ..progress import Progress
from ..quant.linear import selected, set_submodule
from ..quant.method import QuantMethod
from ..quant.schemes import all_finite, dequantize_weight, quantize_weight
from . import formats
from .sources import TensorSource

if TYPE_CHECKING:
    from .lora import LoraStack

RANDOM = "random"
BLOCK_KEY = WAN21.block_key()


def load_component(build: Callable[[], nn.Module], source: TensorSource | str, *,
                   include: Iterable[str] | None = None,
                   method: QuantMethod | None = None, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.bfloat16, ignore_prefixes: Iterable[str] = (), progress: bool = True,
                   component: str | None = None, seed: int = 0, lora: "LoraStack | None" = None,
                   on_block: Callable[[nn.Module, int], None] | None = None) -> nn.Module:
    """Build ``build()`` on the meta device and fill it from ``source`` (see the module docstring)."""
    device = torch.device(device)
    with torch.device("meta"):
        model = build()
    scheme = method.scheme if method is not None and method.quantizes else None
    ignore = tuple(ignore_prefixes)
    skip = method.skip if method is not None else ()
    linear_names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if scheme and include is None:
        if isinstance(source, str) or formats.layout_of(source) == "float":
            raise CheckpointError(f"load_component: scheme {scheme} on the float weights of "
                                  f"{getattr(source, 'name', source)} needs include= (the linears to quantize, e.g. "
                                  "the model family's Component.quantizable)")
        include = [name for name in linear_names if formats.is_quantized(source, name)]
    quantized = [name for name in linear_names if selected(name, tuple(include), skip)] if scheme else []
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # quantize where it is fastest: on the GPU when there is one, even for a component kept in host memory
    # (offload); the scheme's arithmetic gives the same codes and scales on either device
    quantize_on = torch.device("cuda") if device.type == "cpu" and torch.cuda.is_available() else device
    if isinstance(source, str):
        if source != RANDOM:
            raise CheckpointError(f"unknown weights source '{source}': pass a checkpoint or 'random'")
        fetch = _random_fetch(seed)
        pre_quantized = False
    else:
        formats.check_file_scheme(source, scheme, component)
        pre_quantized = formats.layout_of(source) != "float"
        if pre_quantized and scheme is None and not formats.weight_only_file(source):
            some = next((k for k in source if k.endswith(formats.SCALE)), None) or next(
                k for k in source if k.endswith(".weight") and formats.is_quantized(source, k[:-len(".weight")]))
            raise CheckpointError(f"{source.name} is pre-quantized (e.g. '{some}') but the mode is 'none': pick the "
                                  "matching quantized mode, or load the bf16 checkpoint")
        _check_keys(model, source, expected, ignore)
        fetch = lambda key, shape: source[key]  # noqa: E731

    if lora is not None:
        lora.note_source(pre_quantized)
    linears = {name: model.get_submodule(name) for name in quantized}
    static = 0  # layers run with the file's calibrated input_scale (fp8-pertensor)

    def load_linear(name: str, lin: nn.Linear) -> None:
        nonlocal static
        n_k, key = tuple(lin.weight.shape), name + ".weight"
        merge = lora is not None and lora.merged_mode and lora.touches(key)
        if pre_quantized:  # a float weight here is an error: the file was converted without this layer
            qw = formats.read_quantized(source, name, scheme, n_k, device)
            formats.check_activations(source, name, scheme, component)
            if merge:  # dequantize, merge, requantize (the LoRA record says so); input_scale kept
                w = lora.merged(key, dequantize_weight(qw.to(quantize_on)))
                qw = quantize_weight(w, scheme, name=key, input_scale=qw.input_scale).to(device)
            static += qw.input_scale is not None
        else:
            w = fetch(key, n_k).to(quantize_on)
            qw = quantize_weight(lora.merged(key, w) if merge else w, scheme, name=key).to(device)
            del w
        bias = None
        if lin.bias is not None:
            bias = _high_precision(fetch(name + ".bias", tuple(lin.bias.shape)), name + ".bias", source, dtype,
                                   device, quantize_on, lora)
        qlinear = method.linear(name, qw, bias)
        if lora is not None:
            lora.attach_side_path(qlinear, name, dtype, device)
        set_submodule(model, name, qlinear)

    def load_tensor(key: str, shape: tuple) -> None:
        owner, _, leaf = key.rpartition(".")
        if not isinstance(source, str) and leaf == "weight" and formats.is_quantized(source, owner):
            qw = formats.read_quantized(source, owner, formats.file_scheme(source, owner), shape, device)
            t = _high_precision(dequantize_weight(qw), key, source, dtype, device, quantize_on, lora)
        else:
            t = _high_precision(fetch(key, shape), key, source, dtype, device, quantize_on, lora)
        _assign(model, key, t)

    source_file = Path(str(getattr(source, "name", RANDOM))).name
    bar = Progress(len(expected), f"loading {component + ' from ' if component else ''}{source_file}", "tensors",
                   progress, leave=False)
    try:
        done = {f"{name}.{leaf}" for name in linears for leaf in ("weight", "bias")}
        keys = [k for k in expected if k not in done]
        for block, names, group_keys in _groups(model, linear_names, keys, on_block is not None):
            for name in names:
                if name in linears:
                    load_linear(name, linears[name])
                    bar.update(2 if linears[name].bias is not None else 1)
            for key in group_keys:
                load_tensor(key, expected[key])
                bar.update(1)
            if lora is not None:  # unmerged: the high-precision linears' side paths
                for name in names:
                    if type(m := model.get_submodule(name)) is nn.Linear:
                        lora.attach_side_path(m, name, dtype, device)
            if block is not None:
                on_block(model, block)
    finally:
        bar.close()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{', '.join(leftover[:5])} were never loaded (buffers are not checkpoint tensors: "
                              "the module must create them itself)")
    model.checkpoint_numerics = formats.numerics(source, scheme, dtype, (static, len(linears)))
    return model.eval()


def _groups(model: nn.Module, linear_names: list[str], keys: list[str],
            by_block: bool) -> list[tuple[int | None, list[str], list[str]]]:
    """(block index or None, linear names, other tensor keys) in loading order: all of them as one group, or,
    ``by_block``, one group per block of ``model.blocks`` (``blocks.<i>.``), in order, then the rest."""
    if not by_block:
        return [(None, linear_names, keys)]
    count = len(getattr(model, "blocks", ()))
    groups: list[tuple[int | None, list[str], list[str]]] = [(i, [], []) for i in range(count)] + [(None, [], [])]
    for at, names in ((1, linear_names), (2, keys)):
        for name in names:
            m = BLOCK_KEY.match(name + ".")
            groups[int(m.group(1)) if m else count][at].append(name)
    return groups


def _check_keys(model: nn.Module, source: TensorSource, expected: dict[str, tuple], ignore: tuple[str, ...]) -> None:
    consumed = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            consumed.update(formats.aux_keys(source, name))
    missing = [k for k in expected if k not in source]
    unexpected = [k for k in source if k not in expected and k not in consumed
                  and not any(k.startswith(p) for p in ignore)]
    misshaped = []
    for key, shape in expected.items():
        if key not in source:
            continue
        owner = key.rpartition(".")[0]
        if key.endswith(".weight") and formats.is_quantized(source, owner):
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


def _random_fetch(seed: int) -> Callable[[str, tuple], torch.Tensor]:
    """Fetch for ``source="random"``: fp32 tensors made where it is fastest (the GPU if any); callers move them."""
    maker = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    def fetch(key: str, shape: tuple) -> torch.Tensor:
        leaf = key.rpartition(".")[2]
        if leaf == "bias":
            return torch.zeros(shape, device=maker)
        if len(shape) == 1 and leaf == "weight":
            return torch.ones(shape, device=maker)
        fan_in = math.prod(shape[1:]) if len(shape) >= 2 else 1
        std = 1.0 / max(fan_in, 1) ** 0.5 if len(shape) >= 2 else 0.02
        stream = (seed * 1_000_003 + zlib.crc32(key.encode())) & 0xFFFFFFFF
        return random_tensor(shape, stream, std, maker)
    return fetch


_HASH_MUL = (0x5BD1E995, 0x27D4EB2F)  # odd, below 2**31: a product with a 32-bit value stays inside int64
_CHUNK = 1 << 24  # elements per pass: bounds the int64 temporaries to a few hundred MiB


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds) of int64 tensors holding values in [0, 2**32)."""
    for mul in _HASH_MUL:
        h = ((h ^ (h >> 16)) * mul) & 0xFFFFFFFF
    return h ^ (h >> 15)


def random_tensor(shape: tuple, stream: int, std: float, device: torch.device) -> torch.Tensor:
    """fp32 values uniform on ``std * sqrt(3) * [-1, 1)`` (variance ``std**2``), a pure function of
    ``(shape, stream, std)``: element ``i`` is ``(2 u_i - 1) * a`` with ``u_i = hash(i, stream) / 2**24``, where
    ``hash`` is integer arithmetic and ``2 u - 1`` and the product are single correctly rounded fp32 operations, so
    CPU and GPU give identical bits (torch's generators give device-dependent streams)."""
    n = math.prod(shape)
    if n >= 1 << 32:
        raise ValueError(f"random_tensor: {n} elements; at most 2**32 - 1 are indexed by the 32-bit hash")
    a = std * 3.0 ** 0.5
    out = torch.empty(n, dtype=torch.float32, device=device)
    key = _mix32(torch.tensor(stream, dtype=torch.int64, device=device))
    for lo in range(0, n, _CHUNK):
        idx = torch.arange(lo, min(n, lo + _CHUNK), dtype=torch.int64, device=device)
        bits = _mix32(idx ^ key)
        u = (bits >> 8).to(torch.float32) * 2.0 ** -24  # exact: 24-bit integers times a power of two
        out[lo:lo + idx.numel()] = (u * 2.0 - 1.0) * a
    return out.view(shape)


def _finite(t: torch.Tensor, key: str, source) -> torch.Tensor:
    """``t`` if every value is finite; a float tensor holding NaN or Inf (as stored, or after the cast to the run's
    dtype) is a CheckpointError now, not a diverged video after the whole run."""
    if t.is_floating_point() and not all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        where = source.file_of(key) if not isinstance(source, str) else "weights=random"
        raise CheckpointError(f"{where}: tensor '{key}' holds {bad} NaN/Inf value(s) of {t.numel()} as {t.dtype}: the "
                              "file is damaged (download or convert it again), or its values overflow "
                              f"{t.dtype} (use model.dtype=bf16)")
    return t


def _high_precision(t: torch.Tensor, key: str, source, dtype: torch.dtype, device: torch.device,
                    work: torch.device, lora: "LoraStack | None") -> torch.Tensor:
    """A tensor kept in high precision, in ``dtype`` on ``device`` and checked finite: the LoRA stack's terms of
    ``key`` merged first (computed on ``work``, the quantizing device) when it has any."""
    if lora is not None and lora.touches(key):
        t = lora.prepare(key, t.to(work), dtype)
    return _finite(_cast(t, dtype), key, source).to(device)  # checked where it is (random weights: the GPU)


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
