"""CPU checks of the ``triton`` backend: its spec and registration, the benchmark CLI, and — through Triton's CPU
interpreter (``TRITON_INTERPRET=1``, set here before the kernels are imported) — the kernels themselves on tiny
shapes against lightq's torch reference.

The interpreter (Triton 3.6, and 3.7.1, the test extra's pin) casts fp32 -> bf16 by truncation and fp32 -> fp8
with two known faults (a rounding carry into the exponent is lost; ties round away from even). The kernels round
to bf16 in integer arithmetic under the interpreter, so bf16 / int8 results are checked bit for bit; fp8 codes are
checked to differ from the reference only in those two ways. tests/gpu/test_triton_gpu.py checks the compiled kernels bit for bit on the GPU.
"""

import importlib.util
import os

import pytest
import torch

from lightq.backends.registry import choose, specs
from lightq.errors import LightqError, QuantizationError
from lightq.hardware import PROFILES
from lightq.quant import schemes as S
from lightq.quant.method import QuantMethod

HAVE_TRITON = importlib.util.find_spec("triton") is not None
if HAVE_TRITON and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

needs_interpreter = pytest.mark.skipif(
    not HAVE_TRITON or torch.cuda.is_available(),
    reason="needs triton (pip install triton) and no CUDA: on a GPU tests/gpu/test_triton_gpu.py covers the kernels")


@pytest.fixture(scope="module")
def kernels():
    """The kernel modules, provided they were imported in interpreter mode (else the CPU cannot run them)."""
    from triton.runtime.interpreter import InterpretedFunction

    from lightq.fused import wan_block
    from lightq.kernels import act_quant, fused_norm_quant, int8_gemm

    if not isinstance(act_quant._act_quant_kernel, InterpretedFunction):
        pytest.skip("lightq.kernels was imported before TRITON_INTERPRET=1 was set in this process")
    return act_quant, fused_norm_quant, int8_gemm, wan_block


# --- spec, registry, modes (no triton needed) ---------------------------------------------------------------------

def test_spec_is_registered_and_declares_its_schemes():
    spec = specs()["triton"]
    assert spec.schemes == {"fp8": 8.9, "int8": 8.0}
    assert spec.impl == "lightq.backends.triton_backend:TritonBackend"


def test_spec_module_imports_neither_torch_nor_triton():
    import subprocess
    import sys

    code = "import sys, lightq.backends.triton_spec; print('torch' in sys.modules, 'triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_capability_rules():
    spec = specs()["triton"]
    ok, why = spec.can_implement("fp8", PROFILES["cpu"])
    assert not ok and "CUDA" in why
    assert spec.can_implement("int8", PROFILES["sm80"]) == (HAVE_TRITON, "ok" if HAVE_TRITON else
                                                            spec.is_available(PROFILES["sm80"])[1])
    if HAVE_TRITON:
        ok, why = spec.can_implement("fp8", PROFILES["sm80"])
        assert not ok and "8.9" in why
        assert spec.can_implement("fp8", PROFILES["sm90"]) == (True, "ok")
        assert not spec.can_implement("fp8", PROFILES["sm90"], (5120, 5000))[0]  # K not a multiple of 16
    assert not spec.can_implement("fp8-b128", PROFILES["sm90"])[0]


def test_requesting_triton_on_cpu_names_the_reason():
    spec, why = choose("int8", "triton", PROFILES["cpu"])
    assert spec is None and "triton" in why


def test_modes_exist_for_every_component():
    from omegaconf import OmegaConf

    from lightq import config
    from lightq.paths import conf_dir

    for group in config.QUANT_GROUPS:
        assert {"fp8-triton", "int8-triton"} <= set(config.quant_modes(group))
    for scheme in ("fp8", "int8"):  # the DiT's modes state their options (fused blocks) in a YAML file
        mode = OmegaConf.load(conf_dir() / "dit_quant" / f"{scheme}-triton.yaml")
        assert (mode.scheme, mode.backend, mode.options.fuse) == (scheme, "triton", True)


def test_bench_cli_without_gpu_exits_2_with_one_line(capsys):
    from lightq.bench.__main__ import main

    assert main(["linear", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "CUDA" in err


def test_bench_mode_discovery():
    from lightq.bench.linear import discover_modes

    names = [m for m, _, _ in discover_modes()]
    assert "fp8-torch" in names and "int8-triton" in names and "fp8-triton" in names
    assert "fp8-b128-torch" not in names  # an emulation: only when asked for
    assert [m for m, _, _ in discover_modes(["fp8-b128-torch"])] == ["fp8-b128-torch"]
    with pytest.raises(LightqError, match="fp8-nope"):
        discover_modes(["fp8-nope"])


def test_bench_option_variants_of_a_mode():
    from lightq.bench.linear import discover_modes

    got = discover_modes(["none", "fp8-triton", "fp8-triton+fast_accum"])
    assert [m for m, _, _ in got] == ["fp8-triton", "fp8-triton+fast_accum"]
    assert got[1][1] == "fp8" and got[1][2].name == "triton"
    with pytest.raises(LightqError, match="fp8-nope"):
        discover_modes(["fp8-nope+fast_accum"])


def test_official_style_block_computes_the_same_block():
    """The step benchmark's official-style reference (float64 complex RoPE, bf16 RMSNorm weight product) is the
    same block as lightq's bf16 one up to those roundings."""
    from lightq.bench.step import OfficialStyleBlock, rel_err
    from lightq.models.rope import rope_tables
    from lightq.models.wan_dit import DiTArch, WanDiT

    torch.manual_seed(0)
    arch = DiTArch(dim=128, ffn_dim=256, num_heads=2, num_layers=1, text_dim=128)
    model = WanDiT(arch).to(torch.bfloat16).requires_grad_(False)
    for name, p in model.named_parameters():
        if name.endswith("modulation") or name.endswith("bias"):
            p.data = (torch.randn(p.shape) * 0.1).to(p.dtype)
        elif "norm" in name and name.endswith("weight"):
            p.data = (1 + torch.randn(p.shape) * 0.3).to(p.dtype)
    block, grid = model.blocks[0], (2, 2, 4)
    args = (torch.randn(1, 16, 128), torch.randn(1, 6, 128) * 0.1, rope_tables(grid, 64, torch.device("cpu")),
            torch.randn(1, 8, 128).to(torch.bfloat16), None, torch.bfloat16)
    ref = block(*args) - args[0]
    official = OfficialStyleBlock(block, grid)(*args) - args[0]
    assert 0 < rel_err(official, ref) < 2e-2


def test_bench_shapes_cover_the_wan_models():
    from lightq.bench.linear import QUICK, SHAPES

    dit14 = {(m, n, k) for _, m, n, k in SHAPES["dit14b"]}
    assert (32760, 5120, 5120) in dit14 and (75600, 5120, 13824) in dit14
    assert {(m, n, k) for _, m, n, k in SHAPES["clip"]} >= {(257, 1280, 1280), (257, 1280, 5120)}
    for family, labels in QUICK.items():
        assert set(labels) <= {label for label, *_ in SHAPES[family]}


def test_step_tokens_are_480p():
    from lightq.bench.step import LATENT_480P

    f, h, w = LATENT_480P
    assert f * (h // 2) * (w // 2) == 32760


# --- kernels under the interpreter ---------------------------------------------------------------------------------

def fp8_codes_match_up_to_interpreter_casts(q, ref_q, v):
    """Codes equal, or differ only where the interpreter's fp32 -> fp8 cast errs (module docstring)."""
    k, r = q.float(), ref_q.float()
    bad = k != r
    lost_carry = (k * 2 == r) & (r.abs().log2() == r.abs().log2().round())
    tie = (v - k).abs() == (v - r).abs()
    assert bool((~bad | lost_carry | tie).all()), "fp8 codes differ beyond the interpreter's cast faults"
    assert bad.float().mean() < 0.1


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_act_quant_matches_quantize_activation(kernels, dtype):
    act_quant = kernels[0]
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 300, generator=gen) * 4).to(dtype)
    x[2] = 0  # an all-zero token: scale 1, codes 0
    q, s = act_quant.quantize_per_token(x, "int8")
    rq, rs = S.quantize_activation(x, "int8")
    assert torch.equal(s, rs) and torch.equal(q, rq) and s[2].item() == 1.0
    q, s = act_quant.quantize_per_token(x, "fp8")
    rq, rs = S.quantize_activation(x, "fp8")
    assert torch.equal(s, rs) and q.dtype == torch.float8_e4m3fn
    fp8_codes_match_up_to_interpreter_casts(q, rq, x.float() / rs)


@needs_interpreter
@pytest.mark.parametrize("rows,chunk", [(4, 64), (2, 128), (8, 32)])
def test_act_quant_tiling_is_exact_for_every_row_and_chunk_split(kernels, rows, chunk):
    """Several rows per program (M not a multiple of ROWS) and a K that is no multiple of the chunk."""
    act_quant = kernels[0]
    m, k = 7, 300
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(8)) * 3).to(torch.bfloat16)
    rq, rs = S.quantize_activation(x, "int8")
    q, s = torch.empty_like(rq), torch.empty_like(rs)
    act_quant._act_quant_kernel[(triton_cdiv(m, rows),)](x, q, s, m, k, x.stride(0), q.stride(0), IS_FP8=False,
                                                         GELU=False, INTERPRETED=True, SOFT=True, ROWS=rows,
                                                         CHUNK=chunk)
    assert torch.equal(q, rq) and torch.equal(s, rs)


def triton_cdiv(a, b):
    return -(-a // b)


@needs_interpreter
def test_act_quant_takes_row_strided_views_and_refuses_bad_layouts(kernels):
    act_quant = kernels[0]
    x = torch.randn(4, 96).to(torch.bfloat16)
    q, s = act_quant.quantize_per_token(x[:, 32:], "int8")
    rq, rs = S.quantize_activation(x[:, 32:], "int8")
    assert torch.equal(q, rq) and torch.equal(s, rs)
    with pytest.raises(ValueError, match="row-major"):
        act_quant.quantize_per_token(x.t(), "int8")


@needs_interpreter
def test_gelu_fused_quant_matches_gelu_then_quantize(kernels):
    act_quant = kernels[0]
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(2)) * 3
    x[1] = -x[1].abs()  # GELU all in (-0.171, 0]: amax from the negative side
    x[2] *= 0.05        # GELU(max x) < 0.25: the exact amax pass
    x = x.to(torch.bfloat16)
    q, s = act_quant.quantize_per_token(x, "int8", gelu=True)
    rq, rs = S.quantize_activation(torch.nn.functional.gelu(x, approximate="tanh"), "int8")
    assert torch.equal(s, rs)
    assert (q.int() - rq.int()).abs().max() <= 1 and (q != rq).float().mean() < 0.01


@needs_interpreter
def test_add_gated_is_the_gated_residual_update(kernels):
    gen = torch.Generator().manual_seed(6)
    b, seq_len, k = 2, 3, 300
    x = torch.randn(b * seq_len, k, generator=gen)
    res = torch.randn(b * seq_len, k, generator=gen).to(torch.bfloat16)
    mod = torch.randn(b, 6, k, generator=gen)
    out = torch.ops.lightq.add_gated(x, res, mod, 5, seq_len)
    prod = (res.float().view(b, seq_len, k) * mod[:, 5:6]).reshape(x.shape)
    assert ((out - (x + prod)).abs() <= 2 ** -23 * (x.abs() + prod.abs())).all()
    with pytest.raises(ValueError, match="fp32"):
        torch.ops.lightq.add_gated(x.double(), res, mod, 5, seq_len)


def _layer_norm_reference(x, mod, seq_len, shift, scale, weight=None, bias=None):
    b = mod.shape[0]
    h = torch.nn.functional.layer_norm(x, (x.shape[1],), weight, bias, eps=1e-6).view(b, seq_len, -1)
    if scale >= 0:
        h = h * (1 + mod[:, scale:scale + 1])
    if shift >= 0:
        h = h + mod[:, shift:shift + 1]
    return h.reshape(x.shape).to(torch.bfloat16)


def _close_codes(q, rq, s, rs):
    assert ((s - rs).abs() <= rs * 2 ** -8).all()
    assert (q.int() - rq.int()).abs().max() <= 1 and (q != rq).float().mean() < 0.01


@needs_interpreter
def test_norm_modulate_quant_matches_the_unfused_path(kernels):
    gen = torch.Generator().manual_seed(3)
    b, seq_len, k = 2, 5, 96
    x = torch.randn(b * seq_len, k, generator=gen) * 2
    mod = torch.randn(b, 6, k, generator=gen) * 0.3
    q, s = torch.ops.lightq.norm_quant(x, seq_len, None, None, mod, 0, 1, 1e-6, False, torch.bfloat16)
    rq, rs = S.quantize_activation(_layer_norm_reference(x, mod, seq_len, 0, 1), "int8")
    _close_codes(q, rq, s, rs)


@needs_interpreter
def test_residual_gate_affine_norm_quant(kernels):
    gen = torch.Generator().manual_seed(4)
    b, seq_len, k = 2, 4, 64
    x = torch.randn(b * seq_len, k, generator=gen)
    res = torch.randn(b * seq_len, k, generator=gen).to(torch.bfloat16)
    mod = torch.randn(b, 6, k, generator=gen) * 0.3
    w, bias = torch.randn(k, generator=gen), torch.randn(k, generator=gen)
    x_new, q, s = torch.ops.lightq.add_norm_quant(x, res, seq_len, w, bias, mod, -1, -1, 2, 1e-6, False,
                                                  torch.bfloat16)
    prod = (res.float().view(b, seq_len, k) * mod[:, 2:3]).reshape(x.shape)
    ref_x = x + prod
    assert ((x_new - ref_x).abs() <= 2 ** -23 * (x.abs() + prod.abs())).all()
    rq, rs = S.quantize_activation(_layer_norm_reference(ref_x, mod, seq_len, -1, -1, w, bias), "int8")
    _close_codes(q, rq, s, rs)


@needs_interpreter
@pytest.mark.parametrize("with_rope", [True, False])
def test_rms_rope_matches_rmsnorm_then_rope(kernels, with_rope):
    from lightq.models.rope import apply_rope, rope_tables
    from lightq.models.wan_dit import RMSNorm

    gen = torch.Generator().manual_seed(5)
    b, heads, head_dim, grid = 2, 3, 24, (1, 2, 3)
    seq_len, dim = 6, 3 * 24
    qkv = torch.randn(b * seq_len, 3 * dim, generator=gen).to(torch.bfloat16)
    t = qkv[:, dim:2 * dim]  # a strided slice, as the fused q/k/v output hands it over
    norm = RMSNorm(dim, 1e-6)
    norm.weight.data = torch.randn(dim, generator=gen)
    cos, sin = rope_tables(grid, head_dim, torch.device("cpu"))
    out = torch.ops.lightq.rms_rope(t, norm.weight, cos if with_rope else None, sin if with_rope else None,
                                    seq_len, head_dim, 1e-6)
    ref = norm(t)
    if with_rope:
        ref = apply_rope(ref.view(b, seq_len, heads, head_dim), cos, sin).to(torch.bfloat16).reshape(t.shape)
    ulp = ref.float().abs().clamp_min(2 ** -126) * 2 ** -7
    assert ((out.float() - ref.float()).abs() <= ulp).all() and (out != ref).float().mean() < 0.01


@needs_interpreter
def test_qkv_rms_rope_is_rms_rope_of_each_third_and_a_copy_of_v(kernels):
    from lightq.models.rope import rope_tables

    gen = torch.Generator().manual_seed(9)
    seq_len, dim, head_dim = 6, 48, 24
    qkv = torch.randn(2 * seq_len, 3 * dim, generator=gen).to(torch.bfloat16)
    wq, wk = torch.randn(dim, generator=gen), torch.randn(dim, generator=gen)
    cos, sin = rope_tables((1, 2, 3), head_dim, torch.device("cpu"))
    out = torch.ops.lightq.qkv_rms_rope(qkv, wq, wk, cos, sin, seq_len, head_dim, 1e-6)
    assert out.shape == (3, 2 * seq_len, dim) and out.is_contiguous()
    assert torch.equal(out[0], torch.ops.lightq.rms_rope(qkv[:, :dim], wq, cos, sin, seq_len, head_dim, 1e-6))
    assert torch.equal(out[1], torch.ops.lightq.rms_rope(qkv[:, dim:2 * dim], wk, cos, sin, seq_len, head_dim, 1e-6))
    assert torch.equal(out[2], qkv[:, 2 * dim:])
    with pytest.raises(ValueError, match="3 dim"):
        torch.ops.lightq.qkv_rms_rope(qkv[:, :3 * dim - 2], wq, wk, cos, sin, seq_len, head_dim, 1e-6)


@needs_interpreter
def test_backend_options_are_checked_and_copied(kernels):
    from lightq.backends.triton_backend import TritonBackend

    base = TritonBackend(specs()["triton"])
    fast = base.with_options({"fast_accum": True})
    assert fast.options == {"fast_accum": True, "fuse_bias": True} and base.options["fast_accum"] is False
    with pytest.raises(LightqError, match="no option fast"):
        base.with_options({"fast": True})
    with pytest.raises(LightqError, match="true / false"):
        base.with_options({"fuse_bias": "yes"})


@needs_interpreter
@pytest.mark.parametrize("m,n,k", [(5, 48, 64), (33, 40, 96)])
def test_int8_gemm_is_exact_with_fused_scales_and_bias(kernels, m, n, k):
    gen = torch.Generator().manual_seed(m)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    sa, sw = torch.rand(m, 1, generator=gen) + 0.1, torch.rand(n, 1, generator=gen) + 0.1
    bias = torch.randn(n, generator=gen)
    acc = (a.double() @ w.double().t()).float()
    y = torch.ops.lightq.int8_scaled_mm(a, w, torch.ones(m, 1), torch.ones(n, 1), None, torch.float32)
    assert torch.equal(y, acc)  # the integer sum, exactly
    y = torch.ops.lightq.int8_scaled_mm(a, w, sa, sw, bias, torch.float32)
    ref = acc * sa * sw.t() + bias
    assert torch.allclose(y, ref, rtol=2 ** -21, atol=0)


@needs_interpreter
def test_backend_apply_matches_the_torch_backend(kernels):
    from lightq.backends.torch_backend import TorchBackend
    from lightq.backends.triton_backend import TritonBackend

    triton_be, torch_be = TritonBackend(specs()["triton"]), TorchBackend(specs()["torch"])
    gen = torch.Generator().manual_seed(6)
    qw = S.quantize_weight(torch.randn(48, 64, generator=gen), "int8")
    bias = torch.randn(48, generator=gen).to(torch.bfloat16)
    x = torch.randn(2, 3, 64, generator=gen).to(torch.bfloat16)
    y = triton_be.apply(x, triton_be.pack(qw), "int8", bias)
    ref = torch_be.apply(x, torch_be.pack(qw), "int8", bias)
    assert y.shape == (2, 3, 48) and y.dtype == torch.bfloat16
    assert torch.equal(y, ref)
    with pytest.raises(QuantizationError, match="bf16 or fp16"):
        triton_be.apply(x.float(), triton_be.pack(qw), "int8", bias)
    with pytest.raises(QuantizationError, match="features"):
        triton_be.apply(x[..., :32], triton_be.pack(qw), "int8", bias)
    with pytest.raises(QuantizationError, match="fp8-b128"):
        triton_be.pack(S.quantize_weight(torch.randn(48, 128), "fp8-b128"))


@needs_interpreter
def test_fused_block_matches_the_unfused_block(kernels, monkeypatch):
    from lightq.backends.triton_backend import TritonBackend
    from lightq.checkpoints.loader import load_component
    from lightq.models.family import QUANTIZABLE
    from lightq.models.rope import rope_tables
    from lightq.models.wan_dit import Block, DiTArch, WanDiT

    fused_block = kernels[3]
    arch = DiTArch(dim=128, ffn_dim=256, num_heads=2, num_layers=1, text_dim=128)
    backend = TritonBackend(specs()["triton"])
    model = load_component(lambda: WanDiT(arch), "random", include=QUANTIZABLE["dit"],
                           method=QuantMethod("int8", backend), dtype=torch.bfloat16, progress=False)
    gen = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():  # non-trivial norms, modulation and biases
        if name.endswith("modulation") or name.endswith("bias"):
            p.data = (torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype)
    block = model.blocks[0]
    b, grid = 1, (2, 2, 4)
    seq_len = 16
    args = (torch.randn(b, seq_len, 128, generator=gen), torch.randn(b, 6, 128, generator=gen) * 0.1,
            rope_tables(grid, 64, torch.device("cpu")), torch.randn(b, 8, 128, generator=gen).to(torch.bfloat16),
            None, torch.bfloat16)
    unfused = block(*args)
    q_data = block.self_attn.q.data.clone()
    assert fused_block.fuse_dit_blocks(model) == 1 and isinstance(block, fused_block.FusedBlock)
    assert torch.equal(block.self_attn.q.data, q_data)  # now a view of the concatenated q/k/v weight
    assert block.self_attn.q.data.data_ptr() == block.self_attn.qkv_data.data_ptr()
    monkeypatch.setattr(Block, "forward", lambda *a: pytest.fail("the fused block fell back to Block.forward"))
    fused = block(*args)
    x = args[0]
    err = ((fused - unfused).norm() / (unfused - x).norm()).item()
    assert err < 1e-3, f"fused block update differs from the unfused one by {err:.2e} (relative L2)"


@needs_interpreter
def test_blocks_on_other_backends_are_not_fused(kernels):
    from lightq.checkpoints.loader import load_component
    from lightq.models.family import QUANTIZABLE
    from lightq.models.wan_dit import DiTArch, WanDiT

    fused_block = kernels[3]
    arch = DiTArch(dim=64, ffn_dim=128, num_heads=1, num_layers=1, text_dim=64)
    model = load_component(lambda: WanDiT(arch), "random", include=QUANTIZABLE["dit"],
                           method=QuantMethod.portable("int8"), dtype=torch.bfloat16, progress=False)
    ok, why = fused_block.fusable(model.blocks[0])
    assert not ok and "fused_blocks" in why
    assert fused_block.fuse_dit_blocks(model) == 0
    with pytest.raises(ValueError, match="cannot fuse"):
        fused_block.FusedBlock.convert(model.blocks[0])


def _side_path(n: int, k: int, r: int, strength: float, gen):
    """A LoRA side path ``[r, k]`` / ``[n, r]`` (bf16 factors, alpha / r = 0.5) at ``strength``."""
    from lightq.quant.lora import LowRankPath

    down = (torch.randn(r, k, generator=gen) * 0.2).bfloat16()
    up = (torch.randn(n, r, generator=gen) * 0.2).bfloat16()
    alpha = torch.full((r,), 0.5)
    return LowRankPath(down, up, [0] * r, alpha, alpha * strength)


@needs_interpreter
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantized_down_projection_within_its_derived_bound(kernels, scheme):
    """A QLinear on the triton backend with a quantized down-projection (docs/LORA.md, "unmerged"):

        y = bf16(y_base + h B^T),  h = bf16(s_x s_A scale (x_q . A_q))  =  bf16(scale dq(x) dq(A)^T)

    against the side path with the exact A, y_true = y_base + (scale dq(x) A^T) B^T, per element

        |y - y_true| <= 2u |y| + (u |h| + |scale| |dq(x)| |e(A)|^T + 2 K 2**-24 |scale| |dq(x)| |dq(A)|^T) |B|^T
                        + 2 r 2**-24 |h| |B|^T

    u = 2**-8 (bf16: the rounding of h, and of the output, allowed twice for an addmm that rounds its product
    before adding); e(A) = dq(A_q) - A; the 2**-24 terms the fp32 accumulations over K and r. The same bound with
    the format's worst case for e(A) (fp8: max(|A| 2**-4, s_A 2**-10); int8: s_A / 2) holds for any A. Strength 0
    gives the base output bit for bit; set_strengths equals a path built at the new strength, bit for bit."""
    from lightq.backends.triton_backend import TritonBackend
    from lightq.quant.linear import QLinear

    gen = torch.Generator().manual_seed(11)
    n, k, r = 48, 96, 8
    backend = TritonBackend(specs()["triton"])
    qw = S.quantize_weight(torch.randn(n, k, generator=gen) / k ** 0.5, scheme)
    base = QLinear(qw, None, backend)
    lin = QLinear(qw, None, backend)
    lin.lora = _side_path(n, k, r, 0.8, gen)
    down, up = lin.lora.down.double(), lin.lora.up.double()
    lin.lora.quantize_down(scheme)
    assert lin.lora.down_codes.shape == (16, k) and not lin.lora.down_codes[r:].float().any()
    assert not lin.lora.down_gemm_scale[r:].any(), "padding rows must add nothing"
    ref_q = S.quantize_weight(down.float(), scheme)
    assert torch.equal(lin.lora.down_codes[:r].view(torch.int8), ref_q.data.view(torch.int8))
    x = torch.randn(2, 17, k, generator=gen).bfloat16()
    y_base, y = base(x), lin(x)
    assert y.shape == (2, 17, n) and y.dtype == torch.bfloat16
    xq, sx = backend.quantize_activation(x.reshape(-1, k), scheme)
    xd = (xq.float() * sx).double()
    a_hat = S.dequantize_weight(ref_q).double()
    scale = 0.8 * 0.5
    h = scale * xd @ a_hat.t()
    y_true = y_base.reshape(-1, n).double() + (scale * xd @ down.t()) @ up.t()
    u, yd, b = 2 ** -8, y.reshape(-1, n).double(), up.abs()
    fp32 = 2 * k * 2 ** -24 * scale * xd.abs() @ a_hat.abs().t()

    def bound(e_a):
        return (2 * u * yd.abs() + (u * h.abs() + scale * xd.abs() @ e_a.t() + fp32) @ b.t()
                + 2 * r * 2 ** -24 * h.abs() @ b.t())

    err = (yd - y_true).abs()
    e_a = (a_hat - down).abs()
    s_a = ref_q.scale.double()
    worst = torch.maximum(down.abs() * 2 ** -4, s_a * 2 ** -10) if scheme == "fp8" else s_a.expand_as(down) / 2
    assert bool((e_a <= worst * (1 + 2 ** -20)).all()), "the format bound of e(A)"
    assert bool((err <= bound(e_a)).all()), f"worst excess {(err - bound(e_a)).max().item():.3e}"
    assert bool((err <= bound(worst)).all())
    missing = (y_base.reshape(-1, n).double() - y_true).abs() > bound(e_a)  # y without its side path
    assert missing.double().mean() > 0.5, "the bound is too loose to tell a missing side path"
    lin.lora.set_strengths([0.0])
    assert torch.equal(lin(x), y_base), "strength 0 must be the base GEMM bit for bit"
    lin.lora.set_strengths([0.3])
    fresh = QLinear(qw, None, backend)
    fresh.lora = _side_path(n, k, r, 0.3, torch.Generator().manual_seed(0))
    fresh.lora.up.copy_(lin.lora.up)
    fresh.lora.down.copy_(down.bfloat16())
    fresh.lora.quantize_down(scheme)
    assert torch.equal(lin(x), fresh(x)), "set_strengths must equal a path built at that strength"


@needs_interpreter
def test_fused_block_with_quantized_down_projections_matches_the_unfused_block(kernels):
    """Side paths with quantized down-projections on every fused linear (q/k/v joined into one path): the fused
    block equals the unfused block running the same paths through QLinear.forward (same codes, same GEMMs; the
    fused kernels' reduction order only), and its LoRA contribution is real."""
    from lightq.backends.triton_backend import TritonBackend
    from lightq.checkpoints.loader import load_component
    from lightq.fused.wan_block import FUSED_LINEARS
    from lightq.models.family import QUANTIZABLE
    from lightq.models.rope import rope_tables
    from lightq.models.wan_dit import DiTArch, WanDiT

    fused_block = kernels[3]
    arch = DiTArch(dim=128, ffn_dim=256, num_heads=2, num_layers=1, text_dim=128)
    model = load_component(lambda: WanDiT(arch), "random", include=QUANTIZABLE["dit"],
                           method=QuantMethod("int8", TritonBackend(specs()["triton"])), dtype=torch.bfloat16,
                           progress=False)
    gen = torch.Generator().manual_seed(3)
    block = model.blocks[0]
    args = (torch.randn(1, 16, 128, generator=gen), torch.randn(1, 6, 128, generator=gen) * 0.1,
            rope_tables((2, 2, 4), 64, torch.device("cpu")), torch.randn(1, 8, 128, generator=gen).bfloat16(),
            None, torch.bfloat16)
    plain = block(*args)
    for name in FUSED_LINEARS:
        lin = block.get_submodule(name)
        lin.lora = _side_path(lin.out_features, lin.in_features, 4, 1.0, gen)
        lin.lora.quantize_down("int8")
    unfused = block(*args)
    assert fused_block.fuse_dit_blocks(model) == 1
    joint = block.self_attn.qkv_lora
    assert joint.codes_scheme == "int8" and joint.rank == 12 and joint.down_codes.shape[0] == 16
    fused = block(*args)
    x = args[0]
    assert ((unfused - plain).norm() / (plain - x).norm()).item() > 0.05, "the LoRAs barely change the block"
    err = ((fused - unfused).norm() / (unfused - x).norm()).item()
    assert err < 1e-3, f"fused block with LoRA differs from the unfused one by {err:.2e} (relative L2)"


@needs_interpreter
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_fused_block_lora_contribution_matches_the_unfused_block(kernels, scheme, tmp_path, monkeypatch):
    """tests/gpu/test_lora_gpu.py's comparison at a small size, the models built as there (``lightq.bench.lora``:
    a rank-32 LoRA on every block linear, read by the loader, quantized down-projections), fused and unfused. The
    interpreter computes the fused kernels' values as the unfused ops do at this width, so the LoRA contributions
    (block output with the LoRA minus without) agree within 1e-5 relative L2 (bit for bit here; the GPU's rounding
    differences and what attention makes of them: tests/gpu/test_lora_gpu.py) and
    every side path of the fused block, run on the activation its base GEMM read, adds what the unfused block's
    paths add on that input (``lora_sites``). One side path switched off moves the contribution by over 1%:
    a missing, doubled or misfed path cannot hide under the bound. Strength 0 gives the no-LoRA block bit for bit."""
    from lightq.bench import lora as bench
    from lightq.backends.triton_backend import TritonBackend
    from lightq.models.rope import rope_tables
    from lightq.models.wan_dit import DiTArch
    from lora_sites import side_path_sites

    arch = DiTArch(dim=128, ffn_dim=256, num_heads=2, num_layers=1, text_dim=128)
    weights, lora_path = bench.write_model_and_lora(arch, 32, tmp_path, device="cpu")
    backend = TritonBackend(specs()["triton"])
    gen = torch.Generator().manual_seed(0)
    grid = (2, 4, 4)
    args = (torch.randn(1, 32, arch.dim, generator=gen), torch.randn(1, 6, arch.dim, generator=gen) * 0.1,
            rope_tables(grid, arch.head_dim, torch.device("cpu")),
            torch.randn(1, 16, arch.dim, generator=gen).bfloat16(), None, torch.bfloat16)
    blocks, contribution = {}, {}
    with torch.no_grad():
        for name, fuse in (("fused", None), ("unfused", False)):
            method = QuantMethod(scheme, backend, fuse=fuse, component="dit")
            plain = bench.load(arch, weights, method, None, device="cpu")[0].blocks[0]
            lora = bench.load(arch, weights, method, lora_path, "unmerged", device="cpu")[0]
            block = lora.blocks[0]
            assert (type(block).__name__ == "FusedBlock") == (name == "fused")
            base = plain(*args)
            contribution[name] = block(*args) - base
            blocks[name] = (block, base, lora)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert contribution["unfused"].norm() > 0.02 * blocks["unfused"][1].norm(), "the LoRA barely changes the block"
    assert rel(contribution["fused"], contribution["unfused"]) < 1e-5
    sites = side_path_sites(monkeypatch, backend, blocks["fused"][0], blocks["unfused"][0], args)
    assert len(sites) == 8 and max(sites.values()) < 1e-6, sites
    fused, base, model = blocks["fused"]
    with torch.no_grad():
        fused.cross_attn.q.lora.active = False
        assert rel(fused(*args) - base, contribution["unfused"]) > 0.01, "the bound cannot tell a missing path"
        model.lora_stack.set_strengths(model, [0.0])
        assert torch.equal(fused(*args), base), "strength 0 changed the fused block"


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton (pip install triton)")
def test_a_copied_quantized_model_shares_its_backend_and_copies_its_weights():
    """``copy.deepcopy`` of a model on the triton backend (whose kernel ops cannot be copied; offload's lazy
    blocks and references copy models): the backend is shared, the codes are copies."""
    import copy

    from lightq.backends.triton_backend import TritonBackend
    from lightq.checkpoints.loader import load_component
    from lightq.models.family import QUANTIZABLE
    from lightq.models.wan_dit import DiTArch, WanDiT

    arch = DiTArch(dim=64, ffn_dim=128, num_heads=2, num_layers=1, text_dim=64)
    model = load_component(lambda: WanDiT(arch), "random", include=QUANTIZABLE["dit"],
                           method=QuantMethod("int8", TritonBackend(specs()["triton"])), dtype=torch.bfloat16,
                           progress=False)
    twin = copy.deepcopy(model)
    lin, other = model.blocks[0].ffn[0], twin.blocks[0].ffn[0]
    assert other.backend is lin.backend
    assert torch.equal(other.data, lin.data) and other.data.data_ptr() != lin.data.data_ptr()
