"""``python -m lightq.bench.offload``: peak GPU memory and DiT step time per offload mode, measured in one run.

    python -m lightq.bench.offload --model wan2.1-t2v-14b --mode fp8-torch --steps 1 --height 480 --width 832 --frames 81

The DiT is built once with random weights directly on the GPU (``random_dit``: meta build, ``to_empty``, in-place
init), its linears quantized there by the mode's scheme (``swap_linears``, exactly ``quantize_weight``). Then,
in this order, each configuration runs one warm-up step and ``--steps`` timed steps (a step = one DiT forward,
batch 1, no CFG; CUDA synchronised around each step only):

    none         the model resident on the GPU
    model        the model in one pinned host buffer, copied to the GPU once (``start_s``), then the steps
    block        blocks streamed through ``--buffers`` GPU slots, prefetched on a side stream
    phase        the same per attention / cross-attention / FFN phase
    block+lazy   blocks read by a background thread from a block-split safetensors checkpoint on local disk,
                 written first from the same weights (``write_s``, timed separately; torch-backend modes only)

Each row prints as soon as it is measured; at the end a markdown table, the issue's targets (block offload under
12 GiB peak, step time within 1.15x of none) and one JSON line (also written to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

CONFIGS = ("none", "model", "block", "phase", "block+lazy")
GIB = 1 << 30


@dataclass
class Row:
    config: str
    peak_gib: float
    step_s: float
    warmup_s: float
    start_s: float
    extra: dict = field(default_factory=dict)


def _conf(group: str, name: str):
    """Option ``name`` of config group ``group`` as the run would compose it (on the schema; generated modes too)."""
    from omegaconf import OmegaConf

    from .. import config
    from ..errors import LightqError
    from ..paths import conf_dir

    schema = config.QuantConfig if group in config.QUANT_GROUPS else config.ModelConfig
    path = conf_dir() / group / f"{name}.yaml"
    if path.is_file():
        return OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path))
    if group in config.QUANT_GROUPS and name in config.backend_modes():
        return OmegaConf.structured(config.backend_modes()[name])
    raise LightqError(f"--{group.split('_')[-1]} {name}: no such option of {group}")


def build(arch, scheme: str | None, backend, device: torch.device):
    """The random DiT on ``device``, its block linears quantized in place (one float weight alive at a time)."""
    from ..models.family import QUANTIZABLE
    from ..models.wan_dit import random_dit
    from ..quant.linear import swap_linears

    model = random_dit(arch, device, torch.bfloat16, seed=0)
    if scheme is not None:
        swap_linears(model, QUANTIZABLE["dit"], (), backend, scheme)
    return model


def inputs(model_cfg, arch, frames: int, height: int, width: int, device: torch.device):
    from ..models.family import family

    g = torch.Generator(device=device).manual_seed(0)
    shape = family(model_cfg.family).geometry(model_cfg).latent_shape(frames, height, width)
    x = torch.randn(1, *shape, generator=g, device=device)
    context = torch.randn(1, 512, arch.text_dim, generator=g, device=device)
    if not arch.is_i2v:
        return x, torch.tensor([900.0], device=device), context
    clip_fea = torch.randn(1, 257, arch.clip_dim, generator=g, device=device) if arch.has_clip else None
    y = torch.randn(1, arch.in_dim - shape[0], *shape[1:], generator=g, device=device)
    return x, torch.tensor([900.0], device=device), context, clip_fea, y


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, model, args, steps: int, placement=None, extra: dict | None = None) -> Row:
    dev = args[0].device
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    if placement is not None:
        placement.start()
    _sync(dev)
    start_s = time.perf_counter() - t0
    times = []
    with torch.inference_mode():
        for _ in range(1 + steps):
            t = time.perf_counter()
            out = model(*args)
            _sync(dev)
            times.append(time.perf_counter() - t)
    out = out.cpu()
    peak = torch.cuda.max_memory_allocated(dev) / GIB if dev.type == "cuda" else 0.0
    if placement is not None:
        placement.stop()
    _sync(dev)
    row = Row(name, round(peak, 3), round(statistics.median(times[1:]), 4), round(times[0], 4),
              round(start_s, 4), extra or {})
    return row, out


def _free_pinned_cache() -> None:
    """Give cached pinned host blocks of the previous configuration back (they are not reused across sizes)."""
    empty = getattr(torch._C, "_host_emptyCache", None)
    if torch.cuda.is_available() and empty is not None:
        empty()


def write_block_split(model, folder: Path, scheme: str | None) -> Path:
    """The model's weights as ``block_<i>.safetensors`` + ``non_block.safetensors`` in lightq's layout (quantized
    linears as ``<p>.weight`` + ``<p>.weight_scale``), streamed one file at a time by the converter's writer."""
    from ..checkpoints.formats import GRANULARITY, SCALE
    from ..checkpoints.sources import NON_BLOCK_FILE
    from ..checkpoints.writers import SafetensorsWriter
    from ..offload.lazy import BLOCK_KEY
    from ..quant.linear import QLinear

    renamed = {}
    for prefix, module in model.named_modules():
        if isinstance(module, QLinear):
            renamed.update({f"{prefix}.data": f"{prefix}.weight", f"{prefix}.scale": prefix + SCALE})
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {NON_BLOCK_FILE: []}
    for key, t in model.state_dict().items():
        m = BLOCK_KEY.match(key)
        groups.setdefault(f"block_{m.group(1)}.safetensors" if m else NON_BLOCK_FILE, []).append(
            (renamed.get(key, key), t))
    meta = {"lightq.component": "dit", "lightq.layout": "blocks", "lightq.source": "random"}
    if scheme is not None:
        meta.update({"lightq.scheme": scheme, "lightq.granularity": GRANULARITY[scheme]})
    folder.mkdir(parents=True, exist_ok=True)
    for fname, tensors in groups.items():
        with SafetensorsWriter(folder / fname, [(k, t.dtype, tuple(t.shape)) for k, t in tensors], meta) as w:
            for k, t in tensors:
                w.write(k, t)
    return folder


def markdown(rows: list[Row], info: str, args) -> str:
    base = next((r for r in rows if r.config == "none"), None)
    lines = [f"DiT offload, {args.model} {args.mode}, {args.height}x{args.width}x{args.frames}, "
             f"buffers={args.buffers}; {info}", "",
             "| offload | peak GPU GiB | step s | vs none | warm-up s | start s | notes |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r.step_s / base.step_s:.3f}x" if base else "-"
        notes = ", ".join(f"{k} {v}" for k, v in r.extra.items())
        lines.append(f"| {r.config} | {r.peak_gib:.2f} | {r.step_s:.3f} | {ratio} | {r.warmup_s:.3f} | "
                     f"{r.start_s:.3f} | {notes} |")
    block = next((r for r in rows if r.config == "block"), None)
    if base and block:
        ok = block.peak_gib < 12 and block.step_s <= 1.15 * base.step_s
        lines += ["", f"targets (block: peak < 12 GiB, step <= 1.15x none): peak {block.peak_gib:.2f} GiB, "
                      f"{block.step_s / base.step_s:.3f}x -> {'met' if ok else 'NOT met'}"]
    return "\n".join(lines)


def run(args) -> list[Row]:
    from ..backends.registry import specs
    from ..bench.timing import describe, device_info
    from ..models.family import QUANTIZABLE
    from ..models.wan_dit import DIT_ARCHS, WanDiT
    from ..offload.lazy import load_lazy
    from ..offload.placement import BlockOffload, WholeOffload
    from ..checkpoints.conventions import open_source
    from ..quant.method import QuantMethod

    dev = torch.device(args.device)
    pin = dev.type == "cuda"
    model_cfg = _conf("model", args.model)
    arch = DIT_ARCHS[model_cfg.dit_arch]
    quant = _conf("dit_quant", args.mode)
    scheme = None if quant.scheme == "none" else quant.scheme
    backend = specs()[quant.backend].load() if scheme else None
    configs = [c for c in args.configs if c in CONFIGS]
    rows: list[Row] = []

    reference = None

    def report(measured) -> None:
        nonlocal reference
        row, out = measured
        if reference is None:
            reference = out
        else:
            row.extra["same_output"] = torch.equal(out, reference)
        rows.append(row)
        print(f"[{time.perf_counter() - t_start:7.1f}s] {row.config}: peak {row.peak_gib:.2f} GiB, step "
              f"{row.step_s:.3f} s (warm-up {row.warmup_s:.3f} s, start {row.start_s:.3f} s) {row.extra}",
              flush=True)

    t_start = time.perf_counter()
    model = build(arch, scheme, backend, dev)
    _sync(dev)
    print(f"[{time.perf_counter() - t_start:7.1f}s] built {args.model} DiT ({arch.num_layers} blocks) in "
          f"{args.mode} on the GPU", flush=True)
    x = inputs(model_cfg, arch, args.frames, args.height, args.width, dev)
    if "none" in configs:
        report(measure("none", model, x, args.steps))
    t = time.perf_counter()
    placement = WholeOffload(model, dev, pin)  # from here on the weights live in pinned host memory
    pack_s = round(time.perf_counter() - t, 2)
    if "model" in configs:
        report(measure("model", model, x, args.steps, placement, {"pack_s": pack_s}))
    for gran in ("block", "phase"):
        if gran in configs:
            t = time.perf_counter()
            placement = BlockOffload(model, gran, dev, args.buffers, pin)
            pack_s = round(time.perf_counter() - t, 2)
            _free_pinned_cache()  # the previous placement's host buffer is unreferenced now
            report(measure(gran, model, x, args.steps, placement, {"pack_s": pack_s}))
    if "block+lazy" in configs:
        if backend is not None and backend.name != "torch":
            print(f"block+lazy skipped: writing the split needs a torch-backend mode, not {args.mode}", flush=True)
        else:
            folder = Path(tempfile.mkdtemp(prefix="lightq-offload-bench-", dir=args.dir))
            try:
                t = time.perf_counter()
                write_block_split(model, folder / "dit", scheme)
                write_s = round(time.perf_counter() - t, 2)
                print(f"[{time.perf_counter() - t_start:7.1f}s] wrote the block split in {write_s} s", flush=True)
                del model, placement
                _free_pinned_cache()
                lazy = load_lazy(lambda: WanDiT(arch), open_source(folder / "dit"), include=QUANTIZABLE["dit"],
                                 method=QuantMethod(scheme or "none", backend), device="cpu", dtype=torch.bfloat16,
                                 component="dit", progress=False)
                placement = BlockOffload(lazy, "block", dev, args.buffers, pin, ahead=args.lazy_ahead)
                report(measure("block+lazy", lazy, x, args.steps, placement, {"write_s": write_s}))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    print()
    print(markdown(rows, describe(device_info()), args))
    result = {"device": device_info(), "args": vars(args), "rows": [asdict(r) for r in rows]}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return rows


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lightq.bench.offload", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="wan2.1-t2v-14b", help="a conf/model name (its DiT architecture is used)")
    p.add_argument("--mode", default="fp8-torch", help="a conf/dit_quant mode, e.g. fp8-torch or none")
    p.add_argument("--steps", type=int, default=1, help="timed steps per configuration (after one warm-up)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--buffers", type=int, default=2, help="GPU block slots for block / phase streaming")
    p.add_argument("--lazy-ahead", type=int, default=2, help="blocks the disk reader keeps ready")
    p.add_argument("--configs", type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
                   default=list(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--dir", default=None, help="where to write the block split (default: the temp folder)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--device", default="cuda", help="cuda; cpu only checks that the code runs (no memory numbers)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from ..errors import LightqError

    args = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("lightq.bench.offload: needs a CUDA GPU (peak GPU memory and streaming are what it measures)",
              file=sys.stderr)
        return 2
    try:
        run(args)
    except LightqError as exc:
        print(f"lightq.bench.offload: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
