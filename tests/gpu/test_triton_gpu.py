"""The ``triton`` backend and the fused DiT block on the GPU, against lightq's torch reference.

Run on the GPU machine: ``python -m pytest tests/gpu/test_triton_gpu.py -q -n 0``. Skipped without CUDA / triton.

- activation quantization (and GELU + quantization): bit-identical codes and scales to ``quantize_activation``
  at Wan shapes, bf16 and fp16 (GELU: the kernel's sigmoid form vs torch's tanh form may differ by fp32 ulps,
  which moves the bf16
  value only at rounding ties: at most one code step on a tiny fraction);
- ``apply`` vs the torch backend: the same quantized activation, the same integer (int8) / ``_scaled_mm`` (fp8)
  product; without a bias at most one ulp of the output apart; with one, fp8 differs in where the bias is added
  (fp32 epilogue vs the bf16-rounded product), bounded by ``_fp8_bias_rounding_bound``;
- the quantizers' division (reciprocal + FMA) vs IEEE division over every bf16 value; every tuning config of the
  quantizer bit-identical; the gated residual update vs eager;
- norm + modulation + quant, residual + affine norm + quant, RMSNorm + RoPE vs the unfused ops: the mean / variance
  reduction order differs, so the bf16 value feeding the quantizer may differ by one bf16 ulp on a few elements;
  codes then differ by at most one step on under 0.1% of elements (int8; fp8 at most one fp8 step);
- the fused block vs the unfused fp8 block of the same random weights: its error vs bf16 is no larger (within
  5%) than the unfused block's; ``torch.compile`` and CUDA-graph replay of a fused block give its eager output.
"""

from __future__ import annotations


import pytest
import torch

from lightq.backends.registry import specs
from lightq.quant import schemes as S

from .conftest import CAP, SCHEMES, TRITON

pytestmark = TRITON
WAN_M = [1, 257, 32760]
WAN_K = [1536, 5120, 13824]


@pytest.fixture(scope="module")
def backend():
    return specs()["triton"].load()  # runs the load-time self-test


@pytest.fixture(scope="module")
def fused_ops():
    """Registers the fused-block ops (torch.ops.lightq.norm_quant, ...): importing their module does that, and the
    backend alone imports only act_quant and int8_gemm."""
    from lightq.kernels import fused_norm_quant

    return fused_norm_quant


def randn(*shape, seed=0, dtype=torch.float32, scale=1.0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(dtype)


def as_int(q):
    return q.view(torch.int8) if q.dtype == torch.int8 else q.float()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("m", WAN_M)
@pytest.mark.parametrize("k", WAN_K)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_act_quant_is_bit_identical(backend, scheme, m, k, dtype):
    x = randn(m, k, seed=m + k, dtype=dtype, scale=3.0)
    if m > 1:
        x[m // 2] = 0
    q, s = backend.quantize_activation(x, scheme)
    rq, rs = S.quantize_activation(x, scheme)
    assert torch.equal(s, rs)
    assert torch.equal(q.view(torch.int8), rq.view(torch.int8))


def _divide_kernel():
    import triton
    import triton.language as tl

    from lightq.kernels.act_quant import divide

    @triton.jit
    def kernel(a_ptr, s_ptr, out_ptr, N, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        a = tl.load(a_ptr + row.to(tl.int64) * N + cols, mask=mask, other=0.0)
        s = tl.load(s_ptr + row + cols * 0)
        inv = tl.div_rn(tl.full((BLOCK,), 1.0, tl.float32), s)
        tl.store(out_ptr + row.to(tl.int64) * N + cols, divide(a, s, inv, False), mask=mask)
    return kernel


def test_divide_is_ieee_division(backend):
    """The quantizers' reciprocal + FMA division equals IEEE ``a / s`` (torch's CUDA division) bit for bit, for
    every bf16 ``a`` and for random fp32 ``a`` with ``|a| <= amax``, against scales ``s = amax / qmax`` (qmax 448
    and 127) for every bf16 mantissa of ``amax`` over exponents 2**-80 .. 2**60, wherever the FMA residual and the
    quotient are normal (|a| >= 2**-100, |a / s| >= 2**-125); elsewhere both quotients are below 2**-11, so the
    code is 0 either way."""
    kernel = _divide_kernel()
    bits = torch.arange(-32768, 32768, dtype=torch.int32, device="cuda").to(torch.int16)
    every_bf16 = bits.view(torch.bfloat16).float()
    every_bf16 = every_bf16[every_bf16.isfinite()]
    mantissas = 1.0 + torch.arange(128, device="cuda", dtype=torch.float32) / 128
    exponents = torch.tensor([-80, -30, -8, -1, 0, 1, 5, 12, 60], device="cuda", dtype=torch.float32)
    amax = (mantissas[None, :] * torch.exp2(exponents)[:, None]).flatten()
    gen = torch.Generator(device="cuda").manual_seed(0)
    for qmax in (448.0, 127.0):
        s = amax / torch.full_like(amax, qmax)
        for a in (every_bf16[None, :].expand(len(s), -1).contiguous(),
                  (torch.rand(len(s), 1 << 16, device="cuda", generator=gen) * 2 - 1) * amax[:, None]):
            out = torch.empty_like(a)
            kernel[(len(s), triton_cdiv(a.shape[1], 1024))](a, s, out, a.shape[1], BLOCK=1024)
            ref = a / s[:, None]
            row = a.abs() <= amax[:, None]  # a quantizer row holds |x| <= amax
            exact = row & (a.abs() >= 2.0 ** -100) & (ref.abs() >= 2.0 ** -125)
            same = (out.view(torch.int32) == ref.view(torch.int32)) | ~exact
            assert same.all(), (a[~same][:5], s[(~same).nonzero()[:5, 0]], out[~same][:5], ref[~same][:5])
            tiny = row & ~exact  # elsewhere both quotients are far below the smallest code (fp8: 2**-9)
            assert (out[tiny].abs() < 2.0 ** -11).all() and (ref[tiny].abs() < 2.0 ** -11).all()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_act_quant_config_is_bit_identical(backend, scheme):
    """Autotuning picks one config per K: run each of them directly (M not a multiple of any ROWS)."""
    from lightq.kernels import act_quant as aq
    from lightq.kernels import rows_grid

    m, k = 257, 5120
    x = randn(m, k, seed=5, dtype=torch.bfloat16, scale=3.0)
    x[7] = 0
    rq, rs = S.quantize_activation(x, scheme)
    for config in aq._ACT_CONFIGS:
        q, s = torch.empty_like(rq), torch.empty_like(rs)
        aq._act_quant_kernel[rows_grid(m)(config.kwargs)](x, q, s, m, k, x.stride(0), q.stride(0),
                                                          IS_FP8=scheme == "fp8", GELU=False, INTERPRETED=False,
                                                          SOFT=False, num_warps=config.num_warps, **config.kwargs)
        assert torch.equal(s, rs), config
        assert torch.equal(q.view(torch.int8), rq.view(torch.int8)), config


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("m,k", [(257, 8960), (32760, 13824)])
def test_gelu_quant_matches_gelu_then_quantize(backend, scheme, m, k):
    x = randn(m, k, seed=3, dtype=torch.bfloat16, scale=2.0)
    x[1] = -x[1].abs()  # GELU all in (-0.171, 0]: amax from the negative side
    x[2] *= 0.05        # GELU(max x) < 0.25: the kernel's exact amax pass
    q, s = torch.ops.lightq.act_quant(x, scheme == "fp8", True)
    rq, rs = S.quantize_activation(torch.nn.functional.gelu(x, approximate="tanh"), scheme)
    assert ((s - rs).abs() <= rs * 2 ** -8).all()
    diff = (q != rq) if scheme == "int8" else (q.float() != rq.float())
    assert diff.float().mean() < 1e-3
    if scheme == "int8":
        assert (q.int() - rq.int()).abs().max() <= 1


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("m", WAN_M)
@pytest.mark.parametrize("n,k", [(5120, 5120), (13824, 5120), (1536, 8960)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_apply_matches_the_torch_backend(backend, scheme, m, n, k, dtype, with_bias):
    torch_be = specs()["torch"].load()
    qw = S.quantize_weight(randn(n, k, seed=n, scale=k ** -0.5), scheme)
    bias = randn(n, seed=1, dtype=dtype, scale=0.1) if with_bias else None
    x = randn(m, k, seed=m, dtype=dtype)
    y = backend.apply(x, backend.pack(qw), scheme, bias)
    ref = torch_be.apply(x, torch_be.pack(qw), scheme, bias)
    assert y.shape == ref.shape and y.dtype == dtype
    y, ref = y.float(), ref.float()
    if bias is None or scheme == "int8":
        # one ulp of the output apart (of bf16 whenever _scaled_mm's bf16 output is involved), plus the fp32 ulp of
        # an FMA-contracted epilogue under cancellation
        ulp = 2.0 ** -7 if dtype == torch.bfloat16 or scheme == "fp8" else 2.0 ** -10
        tol = ulp * ref.abs() + 1e-6 * ref.abs().max()
    else:
        tol = _fp8_bias_rounding_bound(y, ref, torch_be.apply(x, torch_be.pack(qw), scheme, None).float(), bias)
    assert ((y - ref).abs() <= tol).all()


@pytest.mark.skipif(CAP < (8, 9), reason="fp8 needs sm89+")
def test_fp8_gemm_options(backend):
    """``fuse_bias=False`` rounds like the torch backend (one bf16 ulp apart at most); ``fast_accum=True`` stays
    close to the float product of the same codes (its accumulator error is far below fp8 quantization error)."""
    torch_be = specs()["torch"].load()
    m, n, k = 4096, 5120, 5120
    qw = S.quantize_weight(randn(n, k, seed=n, scale=k ** -0.5), "fp8")
    bias = randn(n, seed=1, dtype=torch.bfloat16, scale=0.1)
    x = randn(m, k, seed=m, dtype=torch.bfloat16)
    unfused = backend.with_options({"fuse_bias": False})
    y = unfused.apply(x, unfused.pack(qw), "fp8", bias).float()
    ref = torch_be.apply(x, torch_be.pack(qw), "fp8", bias).float()
    assert ((y - ref).abs() <= 2 ** -7 * ref.abs() + 1e-6 * ref.abs().max()).all()
    fast = backend.with_options({"fast_accum": True})
    xq, sx = backend.quantize_activation(x, "fp8")
    exact = (xq.double() @ qw.data.double().t()) * sx.double() * qw.scale.double().t()
    y_fast = fast.gemm_only(xq, sx, fast.pack(qw), None, torch.bfloat16).double()
    assert ((y_fast - exact).norm() / exact.norm()).item() < 1e-2


def _fp8_bias_rounding_bound(y, ref, a_rounded, bias):
    """How far the two fp8 paths may be apart when a bias is added, from the roundings alone.

    Both compute the same fp32 product ``a``. The triton backend adds the bias in ``_scaled_mm``'s fp32 epilogue
    and rounds once: ``y = rn(a + b)``. The torch backend rounds ``a`` to bf16 first, then adds the bias rounded to
    bf16 and rounds again: ``ref = rn(rn_bf16(a) + rn_bf16(b))`` (for fp16 outputs the last rounding is bf16 then
    fp16). With u = 2**-8 (bf16 unit roundoff, larger than fp16's) every rounding moves a value ``v`` by at most
    ``u |v|``, so ``|y - ref| <= u (|a + b| + |a| + |b| + |a' + b'|) + u |ref|`` (the last term: the fp16 re-rounding),
    and each exact quantity is bounded by the observed rounded one times ``1 / (1 - u)`` (twice where it was rounded
    twice). The bias cancelling a
    large product makes this much larger than one ulp of the result: that, not a kernel error, is what a
    one-ulp-of-the-output tolerance failed on.
    """
    u = 2.0 ** -8
    grow = 1 / (1 - u)
    b = bias.float().abs()
    return u * grow ** 2 * (y.abs() + a_rounded.abs() + b + 2 * ref.abs()) + 1e-6 * ref.abs().max()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_int8_gemm_only_is_exact_in_fp32(backend, scheme):
    if scheme != "int8":
        pytest.skip("integer accumulation only")
    a = torch.randint(-127, 128, (4099, 5120), dtype=torch.int8, device="cuda")
    w = torch.randint(-127, 128, (1536, 5120), dtype=torch.int8, device="cuda")
    ones_a, ones_w = torch.ones(4099, 1, device="cuda"), torch.ones(1536, 1, device="cuda")
    y = torch.ops.lightq.int8_scaled_mm(a, w, ones_a, ones_w, None, torch.float32)
    ref = torch._int_mm(a, w.t()).float()
    assert torch.equal(y, ref)


def _mod_reference(x, mod, seq_len, shift, scale, weight=None, bias=None):
    h = torch.nn.functional.layer_norm(x, (x.shape[1],), weight, bias, eps=1e-6).view(mod.shape[0], seq_len, -1)
    if scale >= 0:
        h = h * (1 + mod[:, scale:scale + 1])
    if shift >= 0:
        h = h + mod[:, shift:shift + 1]
    return h.reshape(x.shape).to(torch.bfloat16)


def _assert_codes_close(q, rq, s, rs, scheme):
    assert ((s - rs).abs() <= rs * 2 ** -8).all()
    if scheme == "int8":
        assert (q.int() - rq.int()).abs().max() <= 1
        assert (q != rq).float().mean() < 1e-3
    else:
        deq, ref = q.float(), rq.float()
        assert ((deq - ref).abs() <= ref.abs() * 2 ** -3 + 2 ** -9).all()  # one fp8 step
        assert (deq != ref).float().mean() < 1e-3


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dim", [1536, 5120])
def test_norm_modulate_quant_matches_unfused(fused_ops, scheme, dim):
    b, seq_len = 2, 4096
    x = randn(b * seq_len, dim, seed=dim, scale=2.0)
    mod = randn(b, 6, dim, seed=1, scale=0.3)
    q, s = torch.ops.lightq.norm_quant(x, seq_len, None, None, mod, 0, 1, 1e-6, scheme == "fp8", torch.bfloat16)
    rq, rs = S.quantize_activation(_mod_reference(x, mod, seq_len, 0, 1), scheme)
    _assert_codes_close(q, rq, s, rs, scheme)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_residual_affine_norm_quant_matches_unfused(fused_ops, scheme):
    b, seq_len, dim = 1, 8192, 5120
    x = randn(b * seq_len, dim, seed=2)
    res = randn(b * seq_len, dim, seed=3, dtype=torch.bfloat16)
    mod = randn(b, 6, dim, seed=4, scale=0.3)
    w, bias = randn(dim, seed=5, dtype=torch.bfloat16), randn(dim, seed=6, dtype=torch.bfloat16)
    x_new, q, s = torch.ops.lightq.add_norm_quant(x, res, seq_len, w, bias, mod, -1, -1, 2, 1e-6, scheme == "fp8",
                                                  torch.bfloat16)
    prod = (res.float().view(b, seq_len, dim) * mod[:, 2:3]).reshape(x.shape)
    ref_x = x + prod
    assert ((x_new - ref_x).abs() <= 2 ** -23 * (x.abs() + prod.abs())).all()  # FMA: one rounding fewer
    rq, rs = S.quantize_activation(_mod_reference(ref_x, mod, seq_len, -1, -1, w.float(), bias.float()), scheme)
    _assert_codes_close(q, rq, s, rs, scheme)


def test_add_gated_matches_the_eager_update(fused_ops):
    b, seq_len, dim = 2, 4096, 5120
    x = randn(b * seq_len, dim, seed=7)
    y = randn(b * seq_len, dim, seed=8, dtype=torch.bfloat16)
    mod = randn(b, 6, dim, seed=9, scale=0.3)
    out = torch.ops.lightq.add_gated(x, y, mod, 5, seq_len)
    prod = (y.float().view(b, seq_len, dim) * mod[:, 5:6]).reshape(x.shape)
    # an FMA may round once where eager rounds twice: apart by at most one rounding of the product / sum
    assert ((out - (x + prod)).abs() <= 2 ** -23 * (x.abs() + prod.abs())).all()


@pytest.mark.parametrize("dim,heads", [(1536, 12), (5120, 40)])
def test_rms_rope_matches_unfused(fused_ops, dim, heads):
    """RMSNorm alone: the kernel's fp32 sum of squares differs from torch's only in order, so a value differs by at
    most one bf16 ulp (where the fp32 values straddle a rounding boundary). With RoPE that one-ulp difference of
    an input pair ``(e, o)`` is rotated: the output moves by up to ``2**-7 (|e| |cos| + |o| |sin|) <= 2**-7 |(e, o)|``
    before its own rounding, which exceeds one ulp of the output wherever the rotation cancels (output much
    smaller than the pair): the bound is the pair's norm, not the output's magnitude."""
    from lightq.models.rope import apply_rope, rope_tables
    from lightq.models.wan_dit import RMSNorm

    grid, head_dim = (21, 30, 52), dim // heads
    seq_len = 21 * 30 * 52
    qkv = randn(seq_len, 3 * dim, seed=7, dtype=torch.bfloat16)
    t = qkv[:, :dim]
    norm = RMSNorm(dim, 1e-6).cuda().requires_grad_(False)
    norm.weight.data = randn(dim, seed=8) * 0.2 + 1
    cos, sin = rope_tables(grid, head_dim, torch.device("cuda"))
    normed = norm(t)
    plain = torch.ops.lightq.rms_rope(t, norm.weight, None, None, seq_len, head_dim, 1e-6)
    assert ((plain.float() - normed.float()).abs() <= normed.float().abs() * 2 ** -7).all()
    assert (plain != normed).float().mean() < 1e-3

    out = torch.ops.lightq.rms_rope(t, norm.weight, cos, sin, seq_len, head_dim, 1e-6)
    ref = apply_rope(normed.view(1, seq_len, heads, head_dim), cos, sin).to(torch.bfloat16).reshape(t.shape)
    pair_norm = normed.float().unflatten(-1, (-1, 2)).norm(dim=-1).repeat_interleave(2, dim=-1)
    tol = 2 ** -7 * (1 + 2 ** -6) * (pair_norm + ref.float().abs())
    assert ((out.float() - ref.float()).abs() <= tol).all()
    assert (out != ref).float().mean() < 1e-3


def test_qkv_rms_rope_gives_contiguous_q_k_v(fused_ops):
    """The fused-block op: q and k bit-identical to ``rms_rope`` of their thirds, v an exact copy, all contiguous."""
    from lightq.models.rope import rope_tables

    dim, heads, grid = 1536, 12, (4, 30, 52)
    seq_len = 4 * 30 * 52
    qkv = randn(2 * seq_len, 3 * dim, seed=9, dtype=torch.bfloat16)
    wq, wk = randn(dim, seed=10) * 0.2 + 1, randn(dim, seed=11) * 0.2 + 1
    cos, sin = rope_tables(grid, dim // heads, torch.device("cuda"))
    out = torch.ops.lightq.qkv_rms_rope(qkv, wq, wk, cos, sin, seq_len, dim // heads, 1e-6)
    assert out.shape == (3, 2 * seq_len, dim) and out.is_contiguous()
    assert torch.equal(out[0], torch.ops.lightq.rms_rope(qkv[:, :dim], wq, cos, sin, seq_len, dim // heads, 1e-6))
    assert torch.equal(out[1], torch.ops.lightq.rms_rope(qkv[:, dim:2 * dim], wk, cos, sin, seq_len, dim // heads,
                                                         1e-6))
    assert torch.equal(out[2], qkv[:, 2 * dim:])


def _dit(scheme, backend_name, dim=1536, heads=12, layers=1):
    from lightq.checkpoints.loader import load_component
    from lightq.models.family import QUANTIZABLE
    from lightq.models.wan_dit import DiTArch, WanDiT
    from lightq.quant.method import QuantMethod

    arch = DiTArch(dim=dim, ffn_dim=4 * dim, num_heads=heads, num_layers=layers)
    method = QuantMethod(scheme, specs()[backend_name].load()) if scheme else None
    model = load_component(lambda: WanDiT(arch), "random", include=QUANTIZABLE["dit"], method=method,
                           device="cuda", dtype=torch.bfloat16, progress=False)
    gen = torch.Generator(device="cuda").manual_seed(11)
    for name, p in model.named_parameters():  # non-trivial modulation and biases (the loader's are zero)
        if name.endswith("modulation") or name.endswith("bias"):
            p.data = (torch.randn(p.shape, device="cuda", generator=gen) * 0.05).to(p.dtype)
    return model, arch


def _block_args(arch, seq_grid=(4, 30, 52)):
    from lightq.models.rope import rope_tables

    seq_len = seq_grid[0] * seq_grid[1] * seq_grid[2]
    return (randn(1, seq_len, arch.dim, seed=20), randn(1, 6, arch.dim, seed=21, scale=0.1),
            rope_tables(seq_grid, arch.head_dim, torch.device("cuda")),
            randn(1, 512, arch.dim, seed=22, dtype=torch.bfloat16), None, torch.bfloat16)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fused_block_has_no_error_regression(scheme):
    from lightq.fused.wan_block import FusedBlock, fuse_dit_blocks

    ref_model, arch = _dit(None, "torch")
    unfused_model, _ = _dit(scheme, "torch")
    fused_model, _ = _dit(scheme, "triton")
    assert fuse_dit_blocks(fused_model) == 1 and isinstance(fused_model.blocks[0], FusedBlock)
    args = _block_args(arch)
    x = args[0]
    with torch.no_grad():
        ref = ref_model.blocks[0](*args) - x
        unfused = unfused_model.blocks[0](*args) - x
        fused = fused_model.blocks[0](*args) - x
    err = lambda a: ((a - ref).norm() / ref.norm()).item()  # noqa: E731
    assert err(fused) <= 1.05 * err(unfused) + 1e-4, f"fused {err(fused):.3e} vs unfused {err(unfused):.3e}"
    assert ((fused - unfused).norm() / unfused.norm()).item() < 2 * err(unfused) + 1e-3


@pytest.mark.parametrize("scheme", SCHEMES)
def test_full_dit_forward_with_fused_blocks(scheme):
    from lightq.fused.wan_block import fuse_dit_blocks

    ref_model, arch = _dit(None, "torch", dim=512, heads=4, layers=2)
    model, _ = _dit(scheme, "triton", dim=512, heads=4, layers=2)
    assert fuse_dit_blocks(model) == 2
    latents = randn(1, 16, 5, 16, 16, seed=30)
    context = randn(1, 77, arch.text_dim, seed=31)
    t = torch.tensor([700.0], device="cuda")
    with torch.no_grad():
        y, ref = model(latents, t, context), ref_model(latents, t, context)
    assert torch.isfinite(y).all()
    assert ((y - ref).norm() / ref.norm()).item() < 0.1


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fused_block_under_torch_compile_and_cuda_graphs(scheme):
    from lightq.fused.wan_block import fuse_dit_blocks

    model, arch = _dit(scheme, "triton")
    fuse_dit_blocks(model)
    block = model.blocks[0]
    args = _block_args(arch, (2, 30, 52))
    with torch.no_grad():
        eager = block(*args)
        compiled = torch.compile(block)(*args)
        assert ((compiled - eager).norm() / eager.norm()).item() < 1e-3
        block(*args)  # warm-up: autotuning happens outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = block(*args)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)


def test_load_self_test_reports_instead_of_crashing(backend):
    assert backend.name == "triton" and backend.version()


def test_first_pack_of_a_scheme_self_tests_only_that_scheme_once(monkeypatch):
    """The load-time self-test runs when a job first packs a weight of a scheme, at that layer's width, once; a
    kernel that disagrees with the reference makes that pack fail with BackendUnavailable naming the scheme."""
    from lightq.backends.triton_backend import SPEC, TritonBackend
    from lightq.errors import BackendUnavailable

    fresh = TritonBackend(SPEC)
    calls = []
    real = fresh._self_test
    monkeypatch.setattr(fresh, "_self_test", lambda scheme, k: (calls.append((scheme, k)), real(scheme, k))[1])
    w = torch.randn(64, 320, device="cuda")
    for _ in range(2):
        fresh.pack(S.quantize_weight(w, "fp8"))
    assert calls == [("fp8", 320)], "one self-test, of the packed scheme only, at the layer's width"

    broken = TritonBackend(SPEC)
    good = broken._act_quant
    monkeypatch.setattr(broken, "_act_quant", lambda x, fp8, gelu: (good(x, fp8, gelu)[0], good(x, fp8, gelu)[1] * 2))
    with pytest.raises(BackendUnavailable, match="int8 kernels fail"):
        broken.pack(S.quantize_weight(w, "int8"))
