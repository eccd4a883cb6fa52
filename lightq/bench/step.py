"""``python -m lightq.bench step``: one Wan2.1 DiT block and one denoising step at 480p, per mode.

For each model size and mode (``none`` = bf16, then every installed fp8 / int8 per-channel mode), the DiT is built
with random weights through ``load_component`` (the same seeded weights for every mode, quantized at load), with
the ``triton`` backend's blocks fused (``lightq.fused.wan_block``). Measured in one run:

    block     one block forward on [1, 32760, dim] tokens: ms, and relative L2 error of its update vs bf16
    norm+qkv  LayerNorm + modulation + q/k/v projections: the fused kernel + one GEMM (fused blocks) or the
              unfused eager norm + three linears, vs the bf16 eager norm + three F.linear
    step      one full forward (patch embed, time/text embedding, all built blocks, head): ms, peak memory,
              relative L2 error of the output vs bf16

A 14B model is built with ``--layers`` blocks (default 4, not 40: quantizing 40 blocks at load takes minutes);
the step time is then also reported extrapolated to all layers as embed/head + layers x block, and says so.
``--profile`` prints where a block's time goes (torch.profiler, CUDA time per op) for bf16 and each fused mode.
``--attn int8-sage-triton,...`` measures each mode's block and step again with that ``attn_quant`` self-attention
installed (rows ``<mode> + <attn mode>``): the block error is against bf16 as for every row, and the note adds it
against the same mode with bf16 attention (what the attention quantization alone costs).

``official-style bf16`` is a re-implementation of the official Wan2.1 ``WanAttentionBlock``'s numerics on the same
bf16 weights as lightq's bf16 block (``OfficialStyleBlock``): LayerNorms on ``.float()`` casts, fp32 modulation,
activations cast to bf16 at each linear (what the official autocast does), RMSNorm in fp32 cast back and multiplied
by the bf16 weight in bf16, RoPE as a float64 complex multiplication returned in fp32, q / k cast to bf16 for
attention, fp32 residual updates. It is timed in the same run, so "block vs official" is a side-by-side ratio.
Attention is torch's ``scaled_dot_product_attention`` for both (the official code calls flash-attn's varlen
kernel, not installed here): the ratio compares everything around attention, with the same attention kernel.
"""

from __future__ import annotations

import dataclasses
import json

import torch

from ..checkpoints.loader import load_component
from ..errors import LightqError
from ..hardware import detect
from ..models.attention import attention, self_attention, use_self_attention
from ..models.family import QUANTIZABLE
from ..models.rope import axis_dims, rope_tables
from ..models.wan_dit import DIT_ARCHS, WanDiT
from ..quant.method import QuantMethod
from . import timing
from .linear import Backends, discover_modes

LATENT_480P = (21, 60, 104)  # 81 frames at 832x480 -> 21 x 60 x 104 latents -> 32,760 tokens with 1x2x2 patches
DEFAULT_LAYERS = {"14b": 4, "1.3b": 30}
OFFICIAL = "official-style bf16"


@dataclasses.dataclass
class StepRow:
    model: str
    mode: str
    layers: int
    block_ms: float | None = None
    block_err: float | None = None
    norm_qkv_ms: float | None = None
    norm_qkv_bf16_ms: float | None = None
    step_ms: float | None = None
    step_full_ms: float | None = None
    peak_gib: float | None = None
    step_err: float | None = None
    fused_blocks: int = 0
    note: str = ""


class OfficialStyleBlock(torch.nn.Module):
    """The official Wan2.1 block's operations (module docstring) on a lightq bf16 ``Block``'s parameters (shared,
    not copied). Forward signature of ``Block.forward``; ``grid`` is the (F, H, W) token grid for RoPE."""

    def __init__(self, block, grid: tuple[int, int, int]):
        super().__init__()
        self.block, self.grid = block, grid
        attn = block.self_attn
        self.heads, self.head_dim = attn.num_heads, attn.head_dim
        # complex128 rotations per axis, as the official rope_params builds them (positions x frequencies)
        self.freqs = []
        for size, d in zip(grid, axis_dims(self.head_dim)):
            inv = 1.0 / torch.pow(10000.0, torch.arange(0, d, 2, dtype=torch.float64) / d)
            angles = torch.outer(torch.arange(size, dtype=torch.float64), inv)
            self.freqs.append(torch.polar(torch.ones_like(angles), angles).to(block.modulation.device))

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, L, heads, head_dim] -> fp32, rotated as float64 complex numbers (per sample, as officially)."""
        f, h, w = self.grid
        table = torch.cat([self.freqs[0].view(f, 1, 1, -1).expand(f, h, w, -1),
                           self.freqs[1].view(1, h, 1, -1).expand(f, h, w, -1),
                           self.freqs[2].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(f * h * w, 1, -1)
        out = []
        for sample in x:
            z = torch.view_as_complex(sample.to(torch.float64).reshape(f * h * w, self.heads, -1, 2))
            out.append(torch.view_as_real(z * table).flatten(2))
        return torch.stack(out).float()

    @staticmethod
    def rms(norm, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).type_as(x) * norm.weight.to(x.dtype)

    @staticmethod
    def layer_norm(norm, x: torch.Tensor) -> torch.Tensor:
        w = None if norm.weight is None else norm.weight.float()
        b = None if norm.bias is None else norm.bias.float()
        return torch.nn.functional.layer_norm(x.float(), (norm.dim,), w, b, norm.eps).type_as(x)

    def forward(self, x, e0, rope, text, image, dtype):
        if image is not None:
            raise LightqError("OfficialStyleBlock re-implements the T2V block only (no image cross-attention)")
        blk, (b, seq_len, _), heads = self.block, x.shape, (self.heads, self.head_dim)
        e = (blk.modulation.float() + e0).chunk(6, dim=1)
        attn = blk.self_attn
        h = (self.layer_norm(blk.norm1, x).float() * (1 + e[1]) + e[0]).to(dtype)
        q = self.rms(attn.norm_q, attn.q(h)).view(b, seq_len, *heads)
        k = self.rms(attn.norm_k, attn.k(h)).view(b, seq_len, *heads)
        v = attn.v(h).view(b, seq_len, *heads)
        y = attn.o(self_attention(self.rope(q).to(dtype), self.rope(k).to(dtype), v))
        x = x + y.float() * e[2]
        ca = blk.cross_attn
        h = self.layer_norm(blk.norm3, x).to(dtype)
        q = self.rms(ca.norm_q, ca.q(h)).view(b, seq_len, *heads)
        k = self.rms(ca.norm_k, ca.k(text)).view(b, -1, *heads)
        x = x + ca.o(attention(q, k, ca.v(text).view(b, -1, *heads))).float()
        y = blk.ffn((self.layer_norm(blk.norm2, x).float() * (1 + e[4]) + e[3]).to(dtype))
        return x + y.float() * e[5]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def build(arch, mode, scheme, backend):
    method = QuantMethod(scheme or "none", backend, component="dit")
    model = load_component(lambda: WanDiT(arch), "random", include=QUANTIZABLE["dit"], method=method,
                           device="cuda", dtype=torch.bfloat16, progress=False)
    fused = 0
    if method.fuse:
        from ..fused.wan_block import fuse_dit_blocks

        fused = fuse_dit_blocks(model)
    return model.requires_grad_(False), fused


def inputs(arch, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    f, h, w = LATENT_480P
    latents = torch.randn(1, arch.in_dim, f, h, w, device="cuda", generator=gen)
    context = torch.randn(1, 512, arch.text_dim, device="cuda", generator=gen)
    tokens = torch.randn(1, f * (h // 2) * (w // 2), arch.dim, device="cuda", generator=gen)
    e0 = torch.randn(1, 6, arch.dim, device="cuda", generator=gen) * 0.1
    text = torch.randn(1, 512, arch.dim, device="cuda", generator=gen).to(torch.bfloat16)
    rope = rope_tables((f, h // 2, w // 2), arch.head_dim, torch.device("cuda"))
    return latents, torch.tensor([500.0], device="cuda"), context, (tokens, e0, rope, text)


def norm_qkv_fn(block, tokens, e0, dtype):
    """LayerNorm + modulation + q/k/v as this block computes them (fused or eager)."""
    from ..fused.wan_block import FusedBlock

    if isinstance(block, FusedBlock):
        mod = (block.modulation.float() + e0).contiguous()
        x2 = tokens.reshape(-1, tokens.shape[-1]).contiguous()
        return lambda: block.norm_qkv(x2, mod, tokens.shape[1], dtype)
    shift, scale = (block.modulation.float() + e0).chunk(6, dim=1)[:2]
    attn = block.self_attn

    def eager():
        h = (block.norm1(tokens) * (1 + scale) + shift).to(dtype)
        return attn.q(h), attn.k(h), attn.v(h)
    return eager


def profile_block(block, args, label: str, rows: int = 14) -> str:
    from torch.profiler import ProfilerActivity, profile

    block(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        block(*args)
        torch.cuda.synchronize()
    events = prof.key_averages()
    key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    return f"### where one block's time goes: {label}\n" + events.table(sort_by=key, row_limit=rows)


def attention_impls(names: list[str]) -> list[tuple[str, object, str]]:
    """(attn mode, implementation or None, why not) for each ``attn_quant`` mode name."""
    from .attention import mode_files
    from ..attention.backends import implementation_for
    from ..plan import plan_attention

    files, out = mode_files(), []
    for name in names:
        if name not in files or files[name].scheme == "none":
            raise LightqError(f"--attn {name}: not an attn_quant mode; choose from "
                              f"{', '.join(n for n in files if n != 'none')}")
        plan = plan_attention(files[name], detect())
        out.append((name, implementation_for(plan.scheme, plan.backend) if plan.ok else None, plan.reason))
    return out


def measure_with_attention(row, attn, model, args, latents, t, context, ref, iters) -> StepRow:
    """``row``'s block and step again with the self-attention ``attn`` (from ``attention_impls``) installed: a new
    row. ``ref``: (bf16 block update, bf16 step output, this mode's block update with bf16 attention)."""
    name, impl, why = attn
    out = StepRow(row.model, f"{row.mode} + {name}", row.layers, fused_blocks=row.fused_blocks)
    if impl is None:
        out.note = f"unavailable: {why}"
        return out
    block, tokens = model.blocks[0], args[0]
    ref_block, ref_step, mode_update = ref
    with torch.no_grad(), use_self_attention(impl):
        update = block(*args) - tokens
        out.block_ms = timing.time_ms(lambda: block(*args), iters)
        y = model(latents, t, context)
        out.step_ms = timing.time_ms(lambda: model(latents, t, context), max(3, iters // 4), warmup=1)
    out.peak_gib = row.peak_gib
    out.block_err, out.step_err = rel_err(update, ref_block), rel_err(y, ref_step)
    out.note = f"block err vs {row.mode} with bf16 attention: {rel_err(update, mode_update):.2e}"
    out.step_full_ms = out.step_ms + (DIT_ARCHS[row.model].num_layers - row.layers) * out.block_ms
    return out


def measure_model(name, layers, modes, backends, iters, profile, attns=()):
    arch = dataclasses.replace(DIT_ARCHS[name], num_layers=layers)
    latents, t, context, (tokens, e0, rope, text) = inputs(arch)
    args = (tokens, e0, rope, text, None, torch.bfloat16)
    rows, reports = [], []
    ref_step = ref_block = None
    for mode, scheme, spec in [("none", None, None)] + modes:
        row = StepRow(name, mode, layers)
        rows.append(row)
        backend = None
        if spec is not None:
            ok, why = spec.can_implement(scheme, detect())
            if ok:
                backend, why = backends.get(spec, mode)
            if backend is None:
                row.note = f"unavailable: {why}"
                continue
        try:
            model, row.fused_blocks = build(arch, mode, scheme, backend)
            block = model.blocks[0]
            with torch.no_grad():
                y_block = block(*args)
                row.block_ms = timing.time_ms(lambda: block(*args), iters)
                row.norm_qkv_ms = timing.time_ms(norm_qkv_fn(block, tokens, e0, torch.bfloat16), iters)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                out = model(latents, t, context)
                row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
                row.step_ms = timing.time_ms(lambda: model(latents, t, context), max(3, iters // 4), warmup=1)
                if profile and (spec is None or row.fused_blocks):
                    reports.append(profile_block(block, args, f"{name} {mode}"))
            update = y_block - tokens
            if spec is None:
                ref_step, ref_block = out, update
                rows.append(measure_official(name, layers, block, args, update, iters))
            else:
                row.block_err, row.step_err = rel_err(update, ref_block), rel_err(out, ref_step)
            full = DIT_ARCHS[name].num_layers
            row.step_full_ms = row.step_ms + (full - layers) * row.block_ms
            for attn in attns:
                rows.append(measure_with_attention(row, attn, model, args, latents, t, context,
                                                   (ref_block, ref_step, update), iters))
            del model, block, out, y_block
            torch.cuda.empty_cache()
        except Exception as exc:  # one failing mode must not lose the rest of the table
            row.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            torch.cuda.empty_cache()
    base = rows[0]
    for row in rows:
        row.norm_qkv_bf16_ms = base.norm_qkv_ms
    return rows, reports


def measure_official(name, layers, block, args, ref_update, iters) -> StepRow:
    """The official-style block on the bf16 block's weights: ms, and its update's error vs lightq's bf16 block."""
    f, h, w = LATENT_480P
    row = StepRow(name, OFFICIAL, layers, note="block only; same weights and attention kernel as bf16")
    try:
        official = OfficialStyleBlock(block, (f, h // 2, w // 2))
        with torch.no_grad():
            row.block_err = rel_err(official(*args) - args[0], ref_update)
            row.block_ms = timing.time_ms(lambda: official(*args), iters)
    except Exception as exc:  # the reference must not lose the bf16 row
        row.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return row


def markdown(rows: list[StepRow], info: dict) -> str:
    out = [f"Device: {timing.describe(info)}. 480p (32,760 tokens), batch 1, random weights. Ratios: bf16 ms / "
           "mode ms, same run. 'step (all layers)' = measured step + (model layers - built layers) x block: an "
           "extrapolation wherever fewer layers were built.", "",
           "| model | mode | block ms | block vs bf16 | block err | norm+qkv ms | norm+qkv vs bf16 | layers built | "
           "step ms | step (all layers) ms | step vs bf16 | peak GiB | step err | fused blocks | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {}
    err = lambda e: f"{e:.2e}" if e is not None else "-"  # noqa: E731
    for r in rows:
        if r.mode == "none":
            base[r.model] = r
        b = base.get(r.model)
        if r.mode == OFFICIAL:
            out.append(f"| {r.model} | {r.mode} | {timing.fmt_ms(r.block_ms)} | "
                       f"{timing.ratio(b.block_ms, r.block_ms)} | {err(r.block_err)} | - | - | - | - | - | - | - | - | "
                       f"0 | {r.note} |")
            continue
        out.append(f"| {r.model} | {r.mode} | {timing.fmt_ms(r.block_ms)} | {timing.ratio(b.block_ms, r.block_ms)} | "
                   f"{err(r.block_err)} | {timing.fmt_ms(r.norm_qkv_ms)} | "
                   f"{timing.ratio(r.norm_qkv_bf16_ms, r.norm_qkv_ms)} | {r.layers} | {timing.fmt_ms(r.step_ms)} | "
                   f"{timing.fmt_ms(r.step_full_ms)} | {timing.ratio(b.step_full_ms, r.step_full_ms)} | "
                   f"{r.peak_gib:.1f} | {err(r.step_err)} | {r.fused_blocks} | {r.note} |"
                   if r.peak_gib is not None else
                   f"| {r.model} | {r.mode} | - | - | - | - | - | {r.layers} | - | - | - | - | - | 0 | {r.note} |")
    return "\n".join(out)


def targets(rows: list[StepRow]) -> str:
    """The issue-8 target lines: fused norm+qkv >= 1.7x bf16, block / step >= 1.2x lightq's bf16 path, block >= 1.5x
    the official block in bf16 (here the official-style re-implementation measured in the same run)."""
    out = ["", "Targets (issue 8): norm+mod+qkv >= 1.7x bf16; block and step >= 1.2x lightq bf16, no error regression; "
           "block >= 1.5x the official block in bf16 (official-style re-implementation, same run)"]
    base = {r.model: r for r in rows if r.mode == "none"}
    official = {r.model: r for r in rows if r.mode == OFFICIAL}
    for r in rows:
        b = base.get(r.model)
        if r.mode in ("none", OFFICIAL) or b is None or r.block_ms is None:
            continue
        o = official.get(r.model)
        out.append(f"- {r.model} {r.mode}: norm+qkv {timing.ratio(r.norm_qkv_bf16_ms, r.norm_qkv_ms)}, block "
                   f"{timing.ratio(b.block_ms, r.block_ms)}, step (all layers) "
                   f"{timing.ratio(b.step_full_ms, r.step_full_ms)}, block vs official-style bf16 "
                   f"{timing.ratio(o.block_ms if o else None, r.block_ms)}, block err {r.block_err:.2e}"
                   f"{' (fused)' if r.fused_blocks else ''}")
    return "\n".join(out)


def run(models: list[str], modes: list[str] | None, layers: int | None, iters: int, profile: bool,
        json_path: str | None, attn: list[str] = ()) -> list[StepRow]:
    if not torch.cuda.is_available():
        raise LightqError("python -m lightq.bench needs a CUDA GPU; none is visible here")
    unknown = set(models) - {"14b", "1.3b"}
    if unknown:
        raise LightqError(f"unknown --models {', '.join(sorted(unknown))}: choose from 14b, 1.3b")
    wanted = None if modes is None else [m for m in modes if m != "none"]
    per_channel = [m for m in discover_modes(wanted) if m[1] in ("fp8", "int8")]
    backends, info = Backends(), timing.device_info()
    attns = attention_impls(list(attn))
    rows, reports = [], []
    for name in models:
        n = layers or DEFAULT_LAYERS[name]
        got, text = measure_model(name, n, per_channel, backends, iters, profile, attns)
        rows += got
        reports += text
        print(f"  measured {name}", flush=True)
    for report in reports:
        print(report)
    print(markdown(rows, info))
    print(targets(rows))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"device": info, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    return rows
