"""``python -m lightq.bench attention``: Wan2.1 self-attention alone, every ``attn_quant`` mode against bf16 SDPA.

At each token count (default 32,760 = 14B 480p and 75,600 = 720p, 81 frames; 40 heads, head dim 128, batch 1,
bf16) on inputs with Wan-like statistics (``lightq.attention.inputs``), measured in one run:

    ms          median of ``--iters`` CUDA-event-timed calls (``timing.time_ms``), the mode's whole call (its
                quantization passes included)
    vs cuDNN    torch SDPA restricted to the cuDNN backend (the fastest bf16 attention measured on the H100,
                docs/results/attention_kernels-h100-*), ms / mode ms; ``vs flash`` likewise for the flash backend
    TFLOP/s     4 L^2 D H / time (the two matmuls)
    cosine, rel L2   of the output against float64 attention, on ``--check-rows`` query rows spread over the
                sequence (all heads, all keys), for every row including the bf16 baselines

Modes: ``attn_quant`` mode names (``conf/attn_quant``), default every installed non-``torch`` one that can run
here (the torch reference loops over key blocks in eager torch: add ``int8-sage-torch`` etc. to time it).
A mode that cannot run here gets its reason as the row's note.
"""

from __future__ import annotations

import dataclasses
import json
import math

import torch
from omegaconf import OmegaConf

from ..attention.backends import implementation_for
from ..attention.inputs import wan_like_qkv
from ..attention.numerics import errors
from ..errors import LightqError
from ..hardware import detect
from ..paths import conf_dir
from ..plan import plan_attention
from . import timing

TOKENS = {"480p": 32760, "720p": 75600}


@dataclasses.dataclass
class AttentionRow:
    tokens: int
    mode: str
    backend: str = ""
    ms: float | None = None
    tflops: float | None = None
    vs_cudnn: float | None = None
    vs_flash: float | None = None
    cosine: float | None = None
    rel_l2: float | None = None
    note: str = ""


def mode_files() -> dict:
    """name -> the attn_quant mode config (conf/attn_quant/*.yaml)."""
    return {p.stem: OmegaConf.load(p) for p in sorted((conf_dir() / "attn_quant").glob("*.yaml"))}


def sdpa_with(backend):
    """bf16 SDPA restricted to one torch backend, in the seam's layout."""
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                   v.transpose(1, 2))
        return out.transpose(1, 2).flatten(2)
    return run


def exact_rows(q, k, v, rows: torch.Tensor) -> torch.Tensor:
    """float64 attention of the query ``rows`` (all heads, all keys), ``[B, len(rows), H * D]``, one head at a time."""
    b, _, h, d = q.shape
    out = []
    for head in range(h):
        qd = q[:, rows, head].double()
        w = torch.softmax(qd @ k[:, :, head].double().transpose(-1, -2) / math.sqrt(d), dim=-1)
        out.append(w @ v[:, :, head].double())
    return torch.stack(out, dim=2).flatten(2)


def measure(tokens: int, heads: int, modes: list[str], iters: int, check_rows: int) -> list[AttentionRow]:
    from torch.nn.attention import SDPBackend

    q, k, v = wan_like_qkv(1, tokens, heads, 128, torch.bfloat16, device="cuda", seed=0)
    rows_idx = torch.linspace(0, tokens - 1, check_rows, device="cuda").round().long()
    exact = exact_rows(q, k, v, rows_idx)
    flops = 4.0 * tokens * tokens * 128 * heads
    hw, files = detect(), mode_files()
    candidates = [("sdpa cuDNN bf16", sdpa_with(SDPBackend.CUDNN_ATTENTION), "torch", ""),
                  ("sdpa flash bf16", sdpa_with(SDPBackend.FLASH_ATTENTION), "torch", "")]
    for name in modes:
        if name not in files or files[name].scheme == "none":
            raise LightqError(f"unknown attention mode '{name}': choose from "
                              f"{', '.join(n for n in files if n != 'none')}")
        plan = plan_attention(files[name], hw)
        impl = implementation_for(plan.scheme, plan.backend) if plan.ok else None
        candidates.append((name, impl, plan.backend or "", "" if plan.ok else plan.reason))
    rows = []
    for name, fn, backend, why in candidates:
        row = AttentionRow(tokens, name, backend, note=why)
        rows.append(row)
        if fn is None:
            continue
        try:
            with torch.no_grad():
                out = fn(q, k, v)
                row.ms = timing.time_ms(lambda: fn(q, k, v), iters)
            row.tflops = flops / row.ms / 1e9
            err = errors(out[:, rows_idx], exact)
            row.cosine, row.rel_l2 = err["cosine"], err["rel_l2"]
            del out
        except Exception as exc:  # one failing mode must not lose the table
            row.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        torch.cuda.empty_cache()
    cudnn, flash = rows[0].ms, rows[1].ms
    for row in rows:
        if row.ms:
            row.vs_cudnn = cudnn / row.ms if cudnn else None
            row.vs_flash = flash / row.ms if flash else None
    return rows


def default_modes() -> list[str]:
    """Every installed non-reference mode (not ``*-torch``, not ``*-auto``), by name."""
    return [n for n, m in mode_files().items() if m.scheme != "none" and m.backend not in ("torch", "auto")]


def markdown(rows: list[AttentionRow], info: dict, heads: int) -> str:
    out = [f"Device: {timing.describe(info)}. Self-attention, batch 1, {heads} heads, d=128, bf16 in/out, Wan-like "
           "inputs (lightq.attention.inputs). Ratios: cuDNN (flash) bf16 SDPA ms / mode ms, same run. Error against "
           "float64 attention on sampled query rows.", "",
           "| tokens | mode | backend | ms | TFLOP/s | vs cuDNN bf16 | vs flash bf16 | cosine | rel L2 | note |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    num = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
    for r in rows:
        out.append(f"| {r.tokens} | {r.mode} | {r.backend} | {timing.fmt_ms(r.ms)} | {num(r.tflops, '.0f')} | "
                   f"{num(r.vs_cudnn, '.2f')} | {num(r.vs_flash, '.2f')} | {num(r.cosine, '.6f')} | "
                   f"{num(r.rel_l2, '.2e')} | {r.note} |")
    return "\n".join(out)


def targets(rows: list[AttentionRow]) -> str:
    """Issue 14: the best 8-bit mode >= 1.6x cuDNN bf16 at each token count, output cosine >= 0.999."""
    out = ["", "Target (issue 14): best 8-bit mode >= 1.6x cuDNN bf16 attention, cosine >= 0.999 vs float64"]
    for tokens in sorted({r.tokens for r in rows}):
        quant = [r for r in rows if r.tokens == tokens and not r.mode.startswith("sdpa") and r.ms]
        good = [r for r in quant if r.cosine is not None and r.cosine >= 0.999]
        if not good:
            out.append(f"- {tokens} tokens: no 8-bit mode ran with cosine >= 0.999")
            continue
        best = max(good, key=lambda r: r.vs_cudnn or 0)
        met = "met" if (best.vs_cudnn or 0) >= 1.6 else "NOT met"
        out.append(f"- {tokens} tokens: {best.mode} {best.vs_cudnn:.2f}x cuDNN, cosine {best.cosine:.6f}, "
                   f"rel L2 {best.rel_l2:.2e}: {met}")
    return "\n".join(out)


def run(tokens: list[str], heads: int, modes: list[str] | None, iters: int, check_rows: int,
        json_path: str | None) -> list[AttentionRow]:
    if not torch.cuda.is_available():
        raise LightqError("python -m lightq.bench needs a CUDA GPU; none is visible here")
    counts = []
    for t in tokens:
        if t in TOKENS:
            counts.append(TOKENS[t])
        elif t.isdigit() and int(t) > 0:
            counts.append(int(t))
        else:
            raise LightqError(f"--tokens '{t}': give a positive count or one of {', '.join(TOKENS)}")
    info, rows = timing.device_info(), []
    for n in counts:
        rows += measure(n, heads, modes if modes is not None else default_modes(), iters, check_rows)
        print(f"  measured {n} tokens", flush=True)
    print(markdown(rows, info, heads))
    print(targets(rows))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"device": info, "heads": heads, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    return rows
