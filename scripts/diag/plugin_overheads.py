"""Where a quantized linear's time goes in the kernel plugins, next to the bare library calls (GPU, about 1 min).

    PYTHONPATH=/tmp/site python scripts/diag/plugin_overheads.py [--m 32760] [--n 5120] [--k 5120]

For fp8-vllm, int8-vllm, fp8-sgl, int8-sgl and fp8-b128-deepgemm, each row times (median of 20 CUDA-event-timed
calls) one piece: the library's activation quantizer and GEMM called by hand, then the plugin's ``gemm_only`` and
``apply`` on a contiguous ``[1, M, K]`` input, on a row-strided ``[1, M, K]`` view (a slice of a wider tensor),
and at the cross-attention size M = 512. "plugin - bare" is what the plugin adds per call. The last section
checks the other suspect for a slow DiT block: importing vLLM turns cuDNN attention off for the whole process
(``vllm.platforms.cuda``); it times scaled_dot_product_attention at the Wan2.1-14B self-attention shape with cuDNN
allowed and with it switched off, and prints the switches a bare ``import vllm._custom_ops`` leaves in a fresh
process against those left here after loading every plugin through lightq.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch
import torch.nn.functional as F

from lightq.backends.registry import specs
from lightq.bench.timing import time_ms
from lightq.hardware import detect
from lightq.quant import schemes as S

CROSS_M = 512
BARE_VLLM_IMPORT = ("import torch, vllm._custom_ops; b = torch.backends.cuda; "
                    "print(b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled(), "
                    "b.cudnn_sdp_enabled())")


class Table:
    """Rows of (section, what, ms, note), printed as they come and as one table at the end."""

    def __init__(self):
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, section: str, what: str, ms: float | None, note: str = "") -> float | None:
        cell = "-" if ms is None else f"{ms:.3f}"
        self.rows.append((section, what, cell, note))
        print(f"  {section:<18} {what:<48} {cell:>8}  {note}", flush=True)
        return ms

    def markdown(self) -> str:
        lines = ["| mode | what | ms | note |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in self.rows]
        return "\n".join(lines)


def load(name: str, scheme: str):
    """The plugin's backend, or the reason it cannot run here."""
    spec = specs().get(name)
    if spec is None:
        return None, f"backend '{name}' is not installed"
    ok, why = spec.can_implement(scheme, detect())
    if not ok:
        return None, why
    try:
        return spec.load(), ""
    except Exception as exc:  # reported, the other sections still run
        return None, f"{type(exc).__name__}: {exc}"


def inputs(m: int, n: int, k: int):
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, m, k, device="cuda", generator=g).to(torch.bfloat16)
    wide = torch.randn(1, m, k + 128, device="cuda", generator=g).to(torch.bfloat16)
    strided = wide[..., 64: 64 + k]  # rows k + 128 elements apart: reshape(-1, k) is a view, not contiguous
    w = torch.randn(n, k, device="cuda", generator=g) * k ** -0.5
    bias = (torch.randn(n, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    return x, strided, w, bias


def plugin_rows(t: Table, section: str, backend, scheme: str, w, x, strided, bias, bare) -> None:
    """The plugin's own halves, then its apply on contiguous, strided and cross-attention-sized inputs next to
    ``bare(x2)``, the same library calls made by hand on ``[M, K]``."""
    packed = backend.pack(S.quantize_weight(w, scheme))
    x2 = x.reshape(-1, x.shape[-1])
    t.add(section, "plugin quantize_activation", time_ms(lambda: backend.quantize_activation(x2, scheme)))
    xq, sx = backend.quantize_activation(x2, scheme)
    t.add(section, "plugin gemm_only (bias)", time_ms(lambda: backend.gemm_only(xq, sx, packed, bias, x.dtype)))
    small = x[:, :CROSS_M]
    for what, inp in (("contiguous [1, M, K]", x), (f"M = {CROSS_M} (cross-attention)", small)):
        flat = inp.reshape(-1, inp.shape[-1])
        bare_ms = t.add(section, f"bare quant + GEMM (+ bias), {what}", time_ms(lambda: bare(flat)))
        apply_ms = t.add(section, f"plugin apply, {what}", time_ms(lambda: backend.apply(inp, packed, scheme, bias)))
        t.add(section, f"  plugin apply - bare, {what}", apply_ms - bare_ms, "what the plugin adds per call (~0)")
    t.add(section, "plugin apply, row-strided [1, M, K] view",
          time_ms(lambda: backend.apply(strided, packed, scheme, bias)), "more than contiguous = a copy of x")


def vllm_section(t: Table, x, strided, w, bias):
    for scheme in ("fp8", "int8"):
        section = f"{scheme}-vllm"
        backend, why = load("vllm", scheme)
        if backend is None:
            t.add(section, "unavailable", None, why)
            continue
        from lightq_vllm.impl import ops

        qw = S.quantize_weight(w, scheme)
        wt, sw = qw.data.t(), qw.scale.float()
        x2 = x.reshape(-1, x.shape[-1])
        if scheme == "fp8":
            def quant(a):
                return ops.scaled_fp8_quant(a, use_per_token_if_dynamic=True)
        else:
            def quant(a):
                return ops.scaled_int8_quant(a)[:2]
        xq, sx = quant(x2)
        t.add(section, "bare quantizer", time_ms(lambda: quant(x2)))
        t.add(section, "bare cutlass_scaled_mm (bias fused)",
              time_ms(lambda: ops.cutlass_scaled_mm(xq, wt, sx, sw, x.dtype, bias)))
        plugin_rows(t, section, backend, scheme, w, x, strided, bias,
                    lambda a, quant=quant: ops.cutlass_scaled_mm(*quant(a), wt, sw, x.dtype, bias))


def sgl_section(t: Table, x, strided, w, bias):
    for scheme in ("fp8", "int8"):
        section = f"{scheme}-sgl"
        backend, why = load("sgl", scheme)
        if backend is None:
            t.add(section, "unavailable", None, why)
            continue
        import sgl_kernel

        qw = S.quantize_weight(w, scheme)
        wt, sw = qw.data.t(), qw.scale.float()
        x2 = x.reshape(-1, x.shape[-1])
        if scheme == "fp8":
            def quant(a):
                q = torch.empty(a.shape, dtype=S.FP8_DTYPE, device=a.device)
                s = torch.empty((a.shape[0], 1), dtype=torch.float32, device=a.device)
                sgl_kernel.sgl_per_token_quant_fp8(a, q, s)
                return q, s
            gemm, quant_name = sgl_kernel.fp8_scaled_mm, "bare sgl_per_token_quant_fp8"
        else:
            def quant(a):
                return backend.quantize_activation(a, "int8")
            gemm, quant_name = sgl_kernel.int8_scaled_mm, f"int8 quantizer in use: {backend.int8_quantizer}"
            t.add(section, "lightq eager reference quantizer (before)",
                  time_ms(lambda: S.quantize_activation(x2, "int8")), "what int8-sgl used to run")
        xq, sx = quant(x2)
        t.add(section, quant_name, time_ms(lambda: quant(x2)))
        t.add(section, "bare scaled_mm (bias fused)", time_ms(lambda: gemm(xq, wt, sx, sw, x.dtype, bias)))
        plugin_rows(t, section, backend, scheme, w, x, strided, bias,
                    lambda a, quant=quant, gemm=gemm: gemm(*quant(a), wt, sw, x.dtype, bias))


def deepgemm_section(t: Table, x, strided, w, bias):
    section = "fp8-b128-deepgemm"
    backend, why = load("deepgemm", "fp8-b128")
    if backend is None:
        t.add(section, "unavailable", None, why)
        return
    from lightq_deepgemm.impl import deep_gemm

    qw = S.quantize_weight(w, "fp8-b128")
    packed = backend.pack(qw)
    x2 = x.reshape(-1, x.shape[-1])
    xq, sx = backend.quantize_activation(x2)
    out = torch.empty((x2.shape[0], w.shape[0]), dtype=torch.bfloat16, device="cuda")

    def gemm():
        deep_gemm.fp8_gemm_nt((xq, sx), (packed["data"], packed["scale"]), out, disable_ue8m0_cast=True)

    gemm()  # JIT compile outside the timing
    t.add(section, "bare per_token_group_fp8_quant (vLLM)", time_ms(lambda: backend.quantize_activation(x2)))
    t.add(section, "bare fp8_gemm_nt (no bias: DeepGEMM has none)", time_ms(gemm))
    t.add(section, "bias, old way: out.float() + bias -> bf16",
          time_ms(lambda: out.float().add_(bias.float()).to(x.dtype)), "three passes over [M, N]")
    t.add(section, "bias, now: out.add_(bias)", time_ms(lambda: out.add_(bias)), "one pass, same rounding")

    def bare(a):
        y = torch.empty((a.shape[0], w.shape[0]), dtype=torch.bfloat16, device="cuda")
        deep_gemm.fp8_gemm_nt(backend.quantize_activation(a), (packed["data"], packed["scale"]), y,
                              disable_ue8m0_cast=True)
        return y.add_(bias)

    plugin_rows(t, section, backend, "fp8-b128", w, x, strided, bias, bare)


def attention_section(t: Table, bare_switches: str):
    section = "attention"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lightq.models.attention import sdpa_switches

    g = torch.Generator("cuda").manual_seed(1)
    q, k, v = (torch.randn(1, 40, 32760, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    t.add(section, "SDPA switches (flash, mem-eff, math, cuDNN) here", None,
          f"{sdpa_switches()} after loading the plugins through lightq")
    t.add(section, "same, after a bare `import vllm._custom_ops`", None,
          bare_switches.strip() or "(vLLM not importable)")
    t.add(section, "SDPA 14B self-attn [1, 40, 32760, 128], default",
          time_ms(lambda: F.scaled_dot_product_attention(q, k, v), iters=5, warmup=1), "backends as switched now")
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v), iters=5, warmup=1)
            t.add(section, f"SDPA 14B self-attn, only {backend.name}", ms, "one of a block's two attentions")
        except RuntimeError as exc:
            t.add(section, f"SDPA 14B self-attn, only {backend.name}", None, f"not usable: {exc}"[:120])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=32760)
    ap.add_argument("--n", type=int, default=5120)
    ap.add_argument("--k", type=int, default=5120)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("plugin_overheads: needs a CUDA GPU")
    # a fresh process shows what importing vLLM alone does to the SDPA switches (runs while the timings do)
    bare = subprocess.Popen([sys.executable, "-c", BARE_VLLM_IMPORT], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    print(f"# plugin overheads on {torch.cuda.get_device_name()}, M x N x K = {args.m} x {args.n} x {args.k}, "
          "bf16 activations, bf16 bias", flush=True)
    t = Table()
    x, strided, w, bias = inputs(args.m, args.n, args.k)
    w16 = w.to(torch.bfloat16)
    t.add("bf16", "F.linear (bias)", time_ms(lambda: F.linear(x, w16, bias)))
    t.add("bf16", "copy of x (what .contiguous() costs)", time_ms(lambda: strided.contiguous()))
    for section in (vllm_section, sgl_section, deepgemm_section):
        section(t, x, strided, w, bias)
        torch.cuda.empty_cache()
    del x, strided, w, w16
    torch.cuda.empty_cache()
    try:
        out, _ = bare.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        bare.kill()
        out = "(bare vLLM import timed out)"
    attention_section(t, out)
    print("\n" + t.markdown())


if __name__ == "__main__":
    main()
