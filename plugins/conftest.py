"""Shared helpers for the plugins' GPU parity tests (``plugins/lightq-*/tests/test_gpu_parity_*.py``).

The helpers reach the tests through the ``parity`` fixture (test files cannot import this module by name). Tolerances come from the formats (u = unit roundoff, 2**-8 for bf16 and
2**-11 for fp16):

* quantizers: a plugin's activation quantizer must give the reference's scales to fp32 rounding (relative 2**-20)
  and codes within one unit in the last place of the format (fp8 e4m3: 2**(e-3) for a value in [2**e, 2**(e+1)),
  2**-9 below 2**-6; int8: 1), because a kernel may divide by the scale or multiply by its reciprocal.
* GEMM given identical quantized inputs: exact reference in float64; the kernel may differ by its output
  rounding(s) (u per rounding, times |y|), the bias rounding, and its accumulation error, which we bound by
  ``acc_eps * sum_k |x_q w_q| s_x s_w`` with acc_eps 2**-22 for int8 (exact int32 sums, fp32 epilogue) and
  2**-9 for fp8 (tensor-core fp8 MMAs keep ~14 significant bits before promotion to fp32). The relative Frobenius
  error must also stay under ``fro_tol`` (2**-7 fp8, 2**-8 int8, 2**-6 Marlin), far below what a layout or
  scale mistake produces.
* full ``apply`` against the ``*-torch`` backend: both quantize the same activations, so their difference must be
  small next to the activation quantization error itself, plus what each side's own output roundings add:
  ||y_p - y_t|| <= rho ||y_t - y_f|| + (u_p + u_t) ||y_t||, y_f the same linear without activation quantization
  (fp32), u_p / u_t the summed unit roundoffs of the roundings the plugin / the reference apply to their results.
  The reference's are not always one rounding into the activation dtype: its fp8 path (``torch._scaled_mm``)
  returns bf16 and adds the bias in bf16, so for fp16 activations u_t = 2 * 2**-8 (with bias), 32 times fp16's
  u. With a bias large next to x @ W^T (M = 1 of the test activations: one token of magnitude 0.01) those two bf16
  roundings are most of ||y_t - y_f|| and of ||y_p - y_t||, whatever the plugin does (``reference_roundings``).
  rho = 0.25 where the plugin follows lightq's quantization rule (only isolated 1-ulp rounding differences), 2
  where its rule differs (torchao: two independent grids differ by about sqrt(2) quantization errors; Marlin: 3u
  weight rounding against the reference's u).
* a plugin that reads strided rows must give bit-identical results on a row-strided view and on its contiguous
  copy (``check_strided_input``); a plugin built on vLLM must leave torch's attention backend switches as they
  were after loading (``check_load_keeps_sdpa_switches``).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from lightq.backends.spec import BackendSpec
from lightq.backends.torch_backend import SPEC as TORCH_SPEC
from lightq.backends.torch_backend import scaled_mm_ok
from lightq.quant import schemes as S

# Wan2.1 projection shapes (N, K): 1.3B (dim 1536, ffn 8960), 14B (5120, 13824), and 4096 / 10240.
WAN_NK = [(1536, 1536), (8960, 1536), (1536, 8960), (5120, 5120), (13824, 5120), (5120, 13824),
          (4096, 4096), (10240, 4096), (4096, 10240)]
SMALL_M = (1, 257, 512)
LARGE_M = 32760  # 81 frames at 480p; kept to two shapes so the suite runs in minutes
LARGE_NK = [(5120, 5120), (13824, 5120)]
CASES = [(m, n, k) for m in SMALL_M for n, k in WAN_NK] + [(LARGE_M, n, k) for n, k in LARGE_NK]
DTYPES = (torch.bfloat16, torch.float16)
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}
# half the subnormal spacing of the output format: the absolute rounding error of a result near zero
SUBNORMAL_HALF = {torch.bfloat16: 2.0 ** -134, torch.float16: 2.0 ** -25, torch.float32: 2.0 ** -150}
ACC_EPS = {"fp8": 2.0 ** -9, "fp8-b128": 2.0 ** -9, "int8": 2.0 ** -22, S.PER_TENSOR: 2.0 ** -9}
FRO_TOL = {"fp8": 2.0 ** -7, "fp8-b128": 2.0 ** -7, "int8": 2.0 ** -8, "int4-g128": 2.0 ** -6, S.PER_TENSOR: 2.0 ** -7}
STATIC_RANGE = 0.5  # a static input_scale calibrated on half this input's range: the largest activations saturate

def reference_roundings(scheme: str, dtype: torch.dtype, with_bias: bool, n: int, k: int,
                        device: torch.device) -> tuple[torch.dtype, ...]:
    """The roundings the ``torch`` backend applies to its result (``lightq.backends.torch_backend`` doc): on the
    ``_scaled_mm`` fp8 path a bf16 GEMM output and a bf16 bias add (the final cast of a bf16 value to fp16 is exact
    in fp16's normal range); everywhere else one rounding of the fp32 result into ``dtype``."""
    if scheme == "fp8" and scaled_mm_ok(device, n, k):
        return (torch.bfloat16, torch.bfloat16) if with_bias else (torch.bfloat16,)
    return (dtype,)


def case_id(case) -> str:
    m, n, k = case
    return f"M{m}-N{n}-K{k}"


@dataclass
class Parity:
    """Helpers for one test session on the GPU."""

    device: torch.device

    # --- backends --------------------------------------------------------------------------------------------

    def load(self, spec: BackendSpec, scheme: str):
        """The plugin's backend, or a skip naming why it cannot run here (library missing, GPU too old / new)."""
        from lightq.hardware import detect

        ok, why = spec.can_implement(scheme, detect())
        if not ok:
            pytest.skip(f"{spec.name} cannot run {scheme} here: {why}")
        return spec.load()

    @property
    def reference(self):
        return TORCH_SPEC.load()

    # --- inputs ----------------------------------------------------------------------------------------------

    def weight(self, scheme: str, n: int, k: int, seed: int = 0, input_scale: torch.Tensor | None = None
               ) -> tuple[S.QuantizedWeight, torch.Tensor]:
        """A quantized weight with a spread of row magnitudes (and one all-zero row), and a bias; ``input_scale``:
        an fp8-pertensor layer's static activation scale."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        w = torch.randn(n, k, generator=g, device=self.device) * k ** -0.5
        w *= torch.logspace(-1, 1, n, device=self.device)[torch.randperm(n, generator=g, device=self.device)][:, None]
        w[n // 2] = 0.0
        bias = torch.randn(n, generator=g, device=self.device)
        return S.quantize_weight(w, scheme, input_scale=input_scale), bias

    def activation(self, m: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
        """``[M, K]`` activations with per-token magnitudes over four decades, a few outlier channels, and (for
        M > 1) one all-zero token, which must come out as exactly the bias."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        x = torch.randn(m, k, generator=g, device=self.device)
        x *= torch.logspace(-2, 2, m, device=self.device)[:, None]
        x[:, torch.randint(0, k, (4,), generator=g, device=self.device)] *= 20.0
        if m > 1:
            x[m // 3] = 0.0
        return x.to(dtype)

    # --- exact references ------------------------------------------------------------------------------------

    @staticmethod
    def dequant_activation(xq: torch.Tensor, sx: torch.Tensor, scheme: str) -> torch.Tensor:
        if sx.numel() == 1:  # fp8-pertensor: one scale
            return xq.double() * sx.double().reshape(())
        sx = sx.double().reshape(xq.shape[0], -1)
        if scheme == "fp8-b128":
            return xq.double() * sx.repeat_interleave(S.GROUP, 1)[:, : xq.shape[1]]
        return xq.double() * sx

    @staticmethod
    def exact_gemm(xd: torch.Tensor, qw: S.QuantizedWeight, bias: torch.Tensor | None):
        """(float64 ``xd @ W^T + bias``, float64 ``|xd| @ |W|^T``) with W the dequantized weight."""
        wd = S.dequantize_weight(qw).double()
        y = xd @ wd.t()
        if bias is not None:
            y = y + bias.double()
        return y, xd.abs() @ wd.abs().t()

    # --- checks ----------------------------------------------------------------------------------------------

    @staticmethod
    def assert_codes_close(q_plugin: torch.Tensor, q_ref: torch.Tensor, scheme: str) -> None:
        """Quantized codes agree within one unit in the last place of the format."""
        a, b = q_plugin.float(), q_ref.float()
        if scheme == "int8":
            ulp = torch.ones_like(a)
        else:  # e4m3: 3 mantissa bits, smallest normal 2**-6, subnormal spacing 2**-9
            mag = torch.maximum(a.abs(), b.abs()).clamp_min(2.0 ** -6)
            ulp = torch.exp2(torch.floor(torch.log2(mag)) - 3)
        bad = (a - b).abs() > ulp
        assert not bad.any(), (f"{int(bad.sum())} codes differ by more than one ulp, e.g. plugin "
                               f"{a[bad][:5].tolist()} vs reference {b[bad][:5].tolist()}")

    @staticmethod
    def assert_scales_close(s_plugin: torch.Tensor, s_ref: torch.Tensor, nonzero: torch.Tensor) -> None:
        """Scales of non-zero rows / groups agree to fp32 rounding (relative 2**-20)."""
        a, b = s_plugin.float().reshape(s_ref.shape)[nonzero], s_ref.float()[nonzero]
        rel = ((a - b).abs() / b).max().item() if b.numel() else 0.0
        assert rel <= 2.0 ** -20, f"activation scales differ from the reference by {rel:.3g} (relative)"

    @staticmethod
    def assert_within(y: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor, what: str) -> None:
        assert torch.isfinite(y).all(), f"{what}: non-finite outputs"
        err = (y.double() - ref).abs()
        bad = err > tol
        assert not bad.any(), (f"{what}: {int(bad.sum())} of {y.numel()} outputs outside the bound; worst excess "
                               f"{(err - tol).max().item():.3g} (|ref| there {ref.abs()[bad].max().item():.3g})")

    def assert_gemm_exact(self, y, xq, sx, qw, bias, scheme, roundings) -> None:
        """``y`` (the plugin's GEMM on ``xq, sx``) against the float64 product of the same quantized inputs."""
        ref, absref = self.exact_gemm(self.dequant_activation(xq, sx, scheme), qw, bias)
        u = sum(UNIT_ROUNDOFF[d] for d in roundings)
        b = 0.0 if bias is None else bias.double().abs()
        tiny = sum(SUBNORMAL_HALF[d] for d in roundings)  # results near zero round on the subnormal grid
        tol = u * (ref.abs() + b) + ACC_EPS[scheme] * absref + tiny
        self.assert_within(y, ref, tol, f"{scheme} GEMM vs float64")
        self.assert_relative_fro(y, ref, FRO_TOL[scheme], f"{scheme} GEMM vs float64")

    @staticmethod
    def assert_relative_fro(y: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
        rel = ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        assert rel <= tol, f"{what}: relative Frobenius error {rel:.3g} > {tol:.3g}"

    @staticmethod
    def assert_apply_close(y_p, y_t, y_f, rho: float, rounding_u: float, what: str) -> None:
        """||y_p - y_t|| <= rho ||y_t - y_f|| + rounding_u ||y_t||, ``rounding_u`` = u_p + u_t (module doc)."""
        assert y_p.shape == y_t.shape and y_p.dtype == y_t.dtype, f"{what}: {y_p.shape}/{y_p.dtype} vs {y_t.shape}"
        assert torch.isfinite(y_p).all(), f"{what}: non-finite outputs"
        d = (y_p.double() - y_t.double()).norm().item()
        quant_err = (y_t.double() - y_f.double()).norm().item()
        bound = rho * quant_err + rounding_u * y_t.double().norm().item()
        assert d <= bound, f"{what}: ||plugin - torch|| = {d:.4g} > {bound:.4g} (quantization error {quant_err:.4g})"

    def check_apply(self, backend, scheme, m, n, k, dtype, with_bias, rho, roundings=None, static=False) -> None:
        """``backend.apply`` on ``[1, M, K]`` against the torch backend, and zero tokens -> exactly the bias.
        ``roundings``: the dtypes the plugin rounds its result into (default: once into ``dtype``); ``static``
        (fp8-pertensor): the layer carries a calibrated ``input_scale`` (``STATIC_RANGE`` of the input's)."""
        x = self.activation(m, k, dtype)[None]
        t = x.float().abs().max() * STATIC_RANGE / S.FP8_MAX if static else None
        qw, bias = self.weight(scheme, n, k, input_scale=t)
        bias = bias if with_bias else None
        ref = self.reference
        y_p = backend.apply(x, backend.pack(qw), scheme, bias)
        y_t = ref.apply(x, ref.pack(qw), scheme, bias)
        wd = S.dequantize_weight(qw)
        y_f = x.float() @ wd.t() + (0.0 if bias is None else bias.float())
        plugin_u = sum(UNIT_ROUNDOFF[d] for d in (roundings or (dtype,)))
        reference_u = sum(UNIT_ROUNDOFF[d] for d in reference_roundings(scheme, dtype, with_bias, n, k, x.device))
        self.assert_apply_close(y_p, y_t, y_f, rho, plugin_u + reference_u, f"{backend.name} {scheme} apply")
        if m > 1:
            zero_row = y_p[0, m // 3].float()
            expect = torch.zeros_like(zero_row) if bias is None else bias.to(dtype).float()
            assert torch.allclose(zero_row, expect, rtol=2 * UNIT_ROUNDOFF[dtype], atol=0), \
                "an all-zero token must give exactly the bias"

    def check_quantizer(self, backend, scheme, m, k, dtype, reference=None) -> None:
        """``backend.quantize_activation`` against ``reference`` (lightq's rule by default) on ``[M, K]``."""
        x = self.activation(m, k, dtype)
        xq, sx = backend.quantize_activation(x, scheme)
        rq, rs = (reference or S.quantize_activation)(x, scheme)
        if scheme == S.PER_TENSOR:  # one dynamic scale for the whole input
            self.assert_scales_close(sx.reshape(()), rs, torch.tensor(True, device=x.device))
            self.assert_codes_close(xq, rq, scheme)
            return
        groups = rs.reshape(m, -1).shape[1]
        nonzero = x.float().abs().reshape(m, groups, -1).amax(-1) > 0
        self.assert_scales_close(sx, rs.reshape(m, groups), nonzero)
        # an all-zero row / group has no defined code (some kernels emit 448 with scale 0): it must dequantize to 0
        keep = nonzero.repeat_interleave(k // groups, 1) if groups > 1 else nonzero.expand(m, k)
        self.assert_codes_close(xq[keep], rq[keep], scheme)
        zero_part = (xq.float() * sx.float().reshape(m, groups).repeat_interleave(k // groups, 1))[~keep]
        assert torch.all(zero_part.abs() <= 2.0 ** -20), "an all-zero token must dequantize to zero"

    def check_gemm(self, backend, scheme, m, n, k, dtype, with_bias, roundings) -> None:
        """``backend.gemm_only`` on the backend's own quantized activation, against float64 (module doc).
        ``roundings``: the dtypes the kernel path rounds its result into, in order."""
        qw, bias = self.weight(scheme, n, k)
        bias = bias if with_bias else None
        x = self.activation(m, k, dtype)
        xq, sx = backend.quantize_activation(x, scheme)
        y = backend.gemm_only(xq, sx, backend.pack(qw), bias, dtype)
        assert y.shape == (m, n) and y.dtype == dtype, f"gemm_only gave {tuple(y.shape)} {y.dtype}"
        self.assert_gemm_exact(y, xq, sx, qw, bias, scheme, roundings)

    def check_weight_only_gemm(self, backend, scheme, m, n, k, dtype, with_bias, weight_roundings=3) -> None:
        """A weight-only ``apply`` against float64 ``x @ W^T + b`` with the exact weight (x used as given):
        |y - ref| <= r u (|x| @ |W|^T) + u (|ref| + |bias|) + 2**-20 (|x| @ |W|^T), r the weight's roundings."""
        qw, bias = self.weight(scheme, n, k)
        bias = bias if with_bias else None
        x = self.activation(m, k, dtype)
        y = backend.apply(x, backend.pack(qw), scheme, bias)
        assert y.shape == (m, n) and y.dtype == dtype, f"apply gave {tuple(y.shape)} {y.dtype}"
        ref, absref = self.exact_gemm(x.double(), qw, bias)
        u = UNIT_ROUNDOFF[dtype]
        b = 0.0 if bias is None else bias.double().abs()
        tol = (weight_roundings * u + 2.0 ** -20) * absref + u * (ref.abs() + b) + SUBNORMAL_HALF[dtype]
        self.assert_within(y, ref, tol, f"{backend.name} {scheme} vs float64")
        self.assert_relative_fro(y, ref, FRO_TOL[scheme], f"{backend.name} {scheme} vs float64")

    def check_strided_input(self, backend, scheme: str, dtype: torch.dtype, n: int = 1536, k: int = 1536) -> None:
        """``apply`` on a ``[2, 257, K]`` view whose rows are K + 64 apart (a slice of a wider tensor, as a fused QKV
        output or a cross-attention slice gives) equals ``apply`` on its contiguous copy, bit for bit."""
        qw, bias = self.weight(scheme, n, k)
        packed = backend.pack(qw)
        wide = self.activation(2 * 257, k + 64, dtype).reshape(2, 257, k + 64)
        view = wide[..., 32: 32 + k]
        assert not view.is_contiguous()
        y_view = backend.apply(view, packed, scheme, bias)
        y_copy = backend.apply(view.contiguous(), packed, scheme, bias)
        assert y_view.shape == (2, 257, n), f"apply gave {tuple(y_view.shape)} for a [2, 257, {k}] input"
        assert torch.equal(y_view, y_copy), (f"{backend.name} {scheme}: a strided input gives another result than "
                                             f"its contiguous copy (max diff {(y_view - y_copy).abs().max().item():.3g})")

    @staticmethod
    def check_load_keeps_sdpa_switches(spec: BackendSpec, then: str = "") -> None:
        """Loading the backend (in a fresh process, so that its libraries are really imported), and running the
        statement ``then`` on it (bound to ``backend``), leaves torch's scaled_dot_product_attention backend
        switches as they were: vLLM's import turns cuDNN attention off."""
        code = ("import torch; from lightq.models.attention import sdpa_switches; before = sdpa_switches(); "
                f"from {spec.impl.partition('.')[0]} import SPEC; backend = SPEC.load(); {then or 'pass'}; "
                "after = sdpa_switches(); print(before, after); "
                "assert before == after, 'loading changed the SDPA switches'")
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"{spec.name}: {run.stdout[-500:]} {run.stderr[-2000:]}"

    # --- the tiny DiT ----------------------------------------------------------------------------------------

    def check_dit(self, backend, scheme: str, rho: float) -> None:
        """``model=tiny``'s DiT with the plugin's mode against the same DiT with ``<scheme>-torch``."""
        try:
            from lightq.models.family import QUANTIZABLE
            from lightq.models.wan_dit import DIT_ARCHS, random_dit
            from lightq.quant.linear import swap_linears
        except ImportError as exc:
            pytest.skip(f"the DiT is not importable yet ({exc})")
        arch = DIT_ARCHS["tiny"]
        base = random_dit(arch, device=self.device, dtype=torch.bfloat16, seed=0)
        models = {}
        for name, be in (("plugin", backend), ("torch", self.reference)):
            models[name] = copy.deepcopy(base)
            swapped = swap_linears(models[name], QUANTIZABLE["dit"], (), be, scheme)
            assert swapped, "no linear was quantized"
        g = torch.Generator(device=self.device).manual_seed(3)
        x = torch.randn(1, arch.in_dim, 2, 16, 16, generator=g, device=self.device)
        t = torch.tensor([500.0], device=self.device)
        context = torch.randn(1, 24, arch.text_dim, generator=g, device=self.device)
        with torch.no_grad():
            out = {name: model(x, t, context) for name, model in models.items()}
            out_bf16 = base(x, t, context)
        d = (out["plugin"] - out["torch"]).norm().item()
        quant_err = (out["torch"] - out_bf16).norm().item()
        bound = rho * quant_err + 2.0 ** -7 * out["torch"].norm().item()
        assert torch.isfinite(out["plugin"]).all(), "non-finite DiT output"
        assert d <= bound, (f"tiny DiT {scheme}-{backend.name} vs {scheme}-torch: ||diff|| = {d:.4g} > {bound:.4g} "
                            f"(quantization error {quant_err:.4g})")


def pytest_generate_tests(metafunc):
    """Parametrize the shared fixture names; a test module may narrow them with ``CASES``, ``QUANT_CASES``, ``DTYPES``."""
    module = metafunc.module
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", getattr(module, "CASES", CASES), ids=case_id)
    if "qcase" in metafunc.fixturenames:
        quant_cases = getattr(module, "QUANT_CASES", [(m, k) for m in (*SMALL_M, LARGE_M) for k in (1536, 5120, 13824)])
        metafunc.parametrize("qcase", quant_cases, ids=lambda c: f"M{c[0]}-K{c[1]}")
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", getattr(module, "DTYPES", DTYPES), ids=lambda d: str(d).removeprefix("torch."))
    if "with_bias" in metafunc.fixturenames:
        metafunc.parametrize("with_bias", (True, False), ids=("bias", "nobias"))


@pytest.fixture(scope="session")
def parity() -> Parity:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: run on the GPU machine after installing the kit")
    return Parity(torch.device("cuda", torch.cuda.current_device()))
