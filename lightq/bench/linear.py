"""``python -m lightq.bench linear``: every available mode at the Wan2.1 linear shapes, against torch bf16.

For each shape ``M x N x K`` (tokens x out x in) and each mode ``<scheme>-<backend>`` that an installed backend can
run here, measured side by side in one run (CUDA events, warm-up, median of ``iters``):

    bf16     torch ``F.linear(x, W, b)`` in bf16 (the baseline of every ratio: ratio = bf16 ms / mode ms)
    gemm     ``backend.gemm_only(x_q, s_x, packed, b, bf16)`` on an already quantized activation (if it has one)
    linear   ``backend.apply(x, packed, scheme, b)``: activation quantization + GEMM + bias
    quant    ``backend.quantize_activation(x)`` alone, with its bandwidth as a share of the measured copy bandwidth

Emulated paths that exist only as references (``fp8-b128-torch``) run only when named in ``--modes``. A mode
named with ``+option`` suffixes (``fp8-triton+fast_accum``) runs its backend with those boolean options set true
(``Backend.with_options``), so option variants are measured side by side with the default.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..backends.registry import specs
from ..errors import LightqError
from ..hardware import detect
from ..quant import schemes
from . import timing

# (M, N, K) per model: DiT q/k/v/o (dim x dim), ffn.0 (ffn x dim), ffn.2 (dim x ffn) at 480p / 720p tokens.
TOKENS = {"480p": 32760, "720p": 75600}
SHAPES: dict[str, list[tuple[str, int, int, int]]] = {
    "dit1.3b": [(f"{res} {layer}", m, n, k) for res, m in TOKENS.items()
                for layer, n, k in (("qkvo", 1536, 1536), ("ffn.0", 8960, 1536), ("ffn.2", 1536, 8960))],
    "dit14b": [(f"{res} {layer}", m, n, k) for res, m in TOKENS.items()
               for layer, n, k in (("qkvo", 5120, 5120), ("ffn.0", 13824, 5120), ("ffn.2", 5120, 13824))],
    "t5": [("attn", 512, 4096, 4096), ("ffn in", 512, 10240, 4096), ("ffn out", 512, 4096, 10240)],
    "clip": [("proj", 257, 1280, 1280), ("qkv", 257, 3840, 1280), ("mlp in", 257, 5120, 1280),
             ("mlp out", 257, 1280, 5120)],
}
QUICK = {"dit14b": ["480p qkvo", "480p ffn.0"], "dit1.3b": ["480p qkvo"], "t5": ["attn"], "clip": ["qkv"]}
REFERENCE_ONLY = {"fp8-b128-torch"}


@dataclass
class Row:
    family: str
    shape: str
    m: int
    n: int
    k: int
    mode: str
    bf16_ms: float | None = None
    gemm_ms: float | None = None
    linear_ms: float | None = None
    quant_ms: float | None = None
    quant_bw_pct: float | None = None
    note: str = ""


def discover_modes(wanted: list[str] | None = None) -> list[tuple[str, str, object]]:
    """(mode, scheme, spec) for every scheme of every installed backend, in registry order; ``wanted`` filters and
    may add ``+option`` variants of a mode (kept in the order given)."""
    available = []
    for spec in specs().values():
        for scheme in spec.schemes:
            available.append((f"{scheme}-{spec.name}", scheme, spec))
    if wanted is None:
        return [m for m in available if m[0] not in REFERENCE_ONLY]
    wanted = [w for w in wanted if w != "none"]  # bf16, the baseline, is always measured
    by_name = {mode: (scheme, spec) for mode, scheme, spec in available}
    unknown = sorted(w for w in wanted if w.split("+")[0] not in by_name)
    if unknown:
        raise LightqError(f"unknown or not installed modes: {', '.join(unknown)}; "
                          "run python -m lightq.backends to list them")
    plain = [m for m in available if m[0] in wanted]
    variants = [(w, *by_name[w.split("+")[0]]) for w in wanted if "+" in w]
    return plain + variants


class Backends:
    """Loads each backend once; a backend that cannot load here is remembered with its reason. ``get(spec,
    mode)`` applies the mode's ``+option`` suffixes (module docstring)."""

    def __init__(self):
        self._loaded: dict[str, object] = {}

    def get(self, spec, mode: str = "") -> tuple[object | None, str]:
        if spec.name not in self._loaded:
            try:
                self._loaded[spec.name] = spec.load()
            except LightqError as exc:
                self._loaded[spec.name] = str(exc)
        got = self._loaded[spec.name]
        if isinstance(got, str):
            return None, got
        options = mode.split("+")[1:]
        if not options:
            return got, ""
        try:
            return got.with_options({name: True for name in options}), ""
        except LightqError as exc:
            return None, str(exc)


def _quantizer(backend, scheme):
    if backend.split_gemm:
        return lambda x: backend.quantize_activation(x, scheme)
    return lambda x: schemes.quantize_activation(x, scheme)


def measure_shape(family, label, m, n, k, modes, backends, hw, iters, copy_gbps) -> list[Row]:
    gen = torch.Generator(device="cuda").manual_seed(m * 7 + n * 3 + k)
    x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5)
    bias = (torch.randn(n, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    w16 = w.to(torch.bfloat16)
    bf16_ms = timing.time_ms(lambda: F.linear(x, w16, bias), iters)
    rows = [Row(family, label, m, n, k, "none (bf16)", bf16_ms, None, bf16_ms)]
    for mode, scheme, spec in modes:
        row = Row(family, label, m, n, k, mode, bf16_ms)
        rows.append(row)
        ok, why = spec.can_implement(scheme, hw, (n, k))
        backend, load_error = backends.get(spec, mode) if ok else (None, why)
        if backend is None:
            row.note = f"unavailable: {load_error}"
            continue
        try:
            packed = backend.pack(schemes.quantize_weight(w, scheme))
            row.linear_ms = timing.time_ms(lambda: backend.apply(x, packed, scheme, bias), iters)
            if scheme in schemes.WEIGHT_ONLY:
                continue
            quant = _quantizer(backend, scheme)
            row.quant_ms = timing.time_ms(lambda: quant(x), iters)
            xq, sx = quant(x)
            row.quant_bw_pct = 100 * (x.numel() * 2 + xq.numel() * xq.element_size() + sx.numel() * 4) \
                / row.quant_ms / 1e6 / copy_gbps
            if backend.split_gemm:
                row.gemm_ms = timing.time_ms(lambda: backend.gemm_only(xq, sx, packed, bias, torch.bfloat16), iters)
            del packed, xq, sx
        except Exception as exc:  # one failing kernel must not lose the rest of the table
            row.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    del x, w, w16
    torch.cuda.empty_cache()
    return rows


def markdown(rows: list[Row], info: dict, copy_gbps: float) -> str:
    out = [f"Device: {timing.describe(info)}; measured copy bandwidth {copy_gbps:.0f} GB/s "
           f"(H100 SXM HBM3 datasheet {timing.H100_SXM_HBM_TBPS * 1000:.0f} GB/s). Ratios are bf16 ms / mode ms "
           "(above 1 = faster than bf16), measured in this run.", "",
           "| model | shape | M x N x K | mode | GEMM ms | GEMM vs bf16 | linear ms | linear vs bf16 | quant ms "
           "| quant % of copy BW | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bw = f"{r.quant_bw_pct:.0f}%" if r.quant_bw_pct is not None else "-"
        out.append(f"| {r.family} | {r.shape} | {r.m}x{r.n}x{r.k} | {r.mode} | {timing.fmt_ms(r.gemm_ms)} | "
                   f"{timing.ratio(r.bf16_ms, r.gemm_ms)} | {timing.fmt_ms(r.linear_ms)} | "
                   f"{timing.ratio(r.bf16_ms, r.linear_ms)} | {timing.fmt_ms(r.quant_ms)} | {bw} | {r.note} |")
    return "\n".join(out)


def targets(rows: list[Row], copy_gbps: float) -> str:
    """The issue-8 target lines: fp8 linear at 32760x5120x5120 (>= 1.55x bf16), activation quant (>= 80% of HBM)."""
    out = ["", "Targets at 32760x5120x5120 (issue 8): fp8 linear >= 1.55x bf16; activation quant >= 80% of HBM bandwidth"]
    for r in rows:
        if (r.m, r.n, r.k) != (32760, 5120, 5120) or r.linear_ms is None or r.mode.startswith("none"):
            continue
        line = f"- {r.mode}: linear {timing.ratio(r.bf16_ms, r.linear_ms)} bf16"
        if r.quant_ms is not None:
            gbps = r.quant_bw_pct * copy_gbps / 100
            line += (f"; quant {r.quant_ms:.3f} ms = {gbps:.0f} GB/s = {r.quant_bw_pct:.0f}% of measured copy, "
                     f"{gbps / (timing.H100_SXM_HBM_TBPS * 10):.0f}% of {timing.H100_SXM_HBM_TBPS} TB/s")
        out.append(line)
    return "\n".join(out)


def run(families: list[str], modes: list[str] | None, iters: int, quick: bool, json_path: str | None) -> list[Row]:
    if not torch.cuda.is_available():
        raise LightqError("python -m lightq.bench needs a CUDA GPU; none is visible here")
    unknown = set(families) - set(SHAPES)
    if unknown:
        raise LightqError(f"unknown --shapes {', '.join(sorted(unknown))}: choose from {', '.join(SHAPES)}")
    hw, info = detect(), timing.device_info()
    chosen, backends = discover_modes(modes), Backends()
    copy_gbps = timing.copy_bandwidth()
    rows: list[Row] = []
    for family in families:
        for label, m, n, k in SHAPES[family]:
            if quick and label not in QUICK[family]:
                continue
            rows += measure_shape(family, label, m, n, k, chosen, backends, hw, iters, copy_gbps)
            print(f"  measured {family} {label} {m}x{n}x{k}", flush=True)
    print(markdown(rows, info, copy_gbps))
    print(targets(rows, copy_gbps))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"device": info, "copy_gbps": copy_gbps, "iters": iters, "rows": [asdict(r) for r in rows]},
                      f, indent=1)
    return rows
