"""``fp8-pertensor``: files built here in the exact key layouts of LightX2V's ``fp8-pertensor`` scheme (LTX-2's
fp8 files), compressed-tensors / vLLM static fp8, and ComfyUI's current and legacy scaled-fp8 formats, each with a
calibrated static ``input_scale``, load through ``load_component`` and ``python -m lightq`` and compute

    y = fp8(clamp(x / t, +-448)) @ W_q^T * (t * s) + b          (one fp32 division x / t)

checked against a float64 statement of that rule with a derived bound; bad scales exit 2 in one line."""

import json
from fnmatch import fnmatchcase

import pytest
import torch
from safetensors.torch import save_file

from lightq.backends.registry import specs
from lightq.checkpoints.conventions import open_source
from lightq.checkpoints.loader import load_component
from lightq.errors import CheckpointError
from lightq.models import family
from lightq.models.tiny import ensure_tiny
from lightq.quant.linear import QLinear, swap_linears
from lightq.quant.method import QuantMethod
from lightq.quant.schemes import FP8_DTYPE, QuantizedWeight, quantize_activation
from test_checkpoints_load import _run, build_dit  # the tiny I2V DiT and its one deterministic forward

DIT = family.QUANTIZABLE["dit"]
E4M3_MAX = 448.0
U32 = 2.0 ** -24  # fp32 unit roundoff
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: U32}


@pytest.fixture(scope="module")
def state():
    src = open_source(ensure_tiny("tiny-i2v"))
    return {k: src[k] for k in src}


def _linears(state) -> list[str]:
    return [k[:-len(".weight")] for k in state if k.endswith(".weight")
            and any(fnmatchcase(k[:-len(".weight")], p) for p in DIT)]


def calibrate(state) -> dict[str, float]:
    """LightX2V's CalibMax calibration: input_scale = max |x| / 448 over a forward of the bf16 model."""
    model = build_dit()
    model.load_state_dict(state)
    model = model.to(torch.bfloat16).eval()
    seen: dict[str, float] = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda m, args, out, name=name: seen.__setitem__(name, max(seen.get(name, 0.0), args[0].abs().max().item())))
        for name in _linears(state)]
    _run(model)
    for h in hooks:
        h.remove()
    return {name: amax / E4M3_MAX for name, amax in seen.items()}


def per_tensor_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LightX2V's load_fp8_pertensor_sym: s = max |W| / 448 in fp32, W_q = fp8(clamp(W / s))."""
    s = w.float().abs().max() / E4M3_MAX
    return (w.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE), s


def _conf(obj: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)


def pertensor_file(state, scales: dict[str, float], layout: str) -> tuple[dict, dict]:
    """(file tensors, {layer: (data, s, t)}) in ``layout``:

    ``lightx2v``           ``<p>.weight`` fp8, ``<p>.weight_scale`` fp32 ``[]``, ``<p>.input_scale`` fp32 ``[]``
                           (LightX2V's fp8-pertensor MMWeight keys; LTX-2's ``*-fp8.safetensors``, AutoFP8)
    ``compressed-tensors`` the same keys, both scales ``[1]`` (vLLM's PerTensorScaleParameter loads either)
    ``comfyui``            ``model.diffusion_model.`` prefix, ``<p>.comfy_quant`` {"format": "float8_e4m3fn"},
                           ``weight_scale`` / ``input_scale`` fp32 ``[]``
    ``comfyui-legacy``     ``scale_weight`` / ``scale_input`` fp32 ``[]`` and the ``scaled_fp8`` marker
    """
    prefix = "model.diffusion_model." if layout == "comfyui" else ""
    names = {"comfyui-legacy": (".scale_weight", ".scale_input")}.get(layout, (".weight_scale", ".input_scale"))
    shape = (1,) if layout == "compressed-tensors" else ()
    file, layers, linears = {}, {}, set(_linears(state))
    for key, value in state.items():
        layer = key[:-len(".weight")]
        if key.endswith(".weight") and layer in linears:
            q, s = per_tensor_fp8(value)
            t = torch.tensor(scales[layer]) if layer in scales else None
            file[prefix + key], file[prefix + layer + names[0]] = q, s.reshape(shape)
            if t is not None:
                file[prefix + layer + names[1]] = t.reshape(shape)
            if layout == "comfyui":
                file[prefix + layer + ".comfy_quant"] = _conf({"format": "float8_e4m3fn"})
            layers[layer] = (q, s, t)
        else:
            file[prefix + key] = value
    if layout == "comfyui-legacy":
        file["scaled_fp8"] = torch.zeros(0, dtype=FP8_DTYPE)
    return file, layers


def _reference(state, layers: dict):
    """The DiT built by hand: the file's codes and scales as QLinears on the portable backend."""
    model = build_dit()
    model.load_state_dict(state)
    model = model.to(torch.bfloat16)

    def weight_for(name, lin):
        q, s, t = layers[name]
        return QuantizedWeight("fp8-pertensor", q, s.reshape(()), *q.shape, None if t is None else t.reshape(()))

    swap_linears(model, DIT, (), specs()["torch"].load(), "fp8-pertensor", weight_for)
    return model.eval()


@pytest.mark.parametrize("layout", ["lightx2v", "compressed-tensors", "comfyui", "comfyui-legacy"])
def test_static_fp8_files_load_with_their_calibrated_scales(tmp_path, state, layout):
    scales = calibrate(state)
    file, layers = pertensor_file(state, scales, layout)
    save_file(file, tmp_path / "dit.safetensors")
    src = open_source(tmp_path / "dit.safetensors")
    got = load_component(build_dit, src, method=QuantMethod.portable("fp8-pertensor"), component="dit")
    qlinears = {n: m for n, m in got.named_modules() if isinstance(m, QLinear)}
    assert set(qlinears) == set(layers) and len(qlinears) == 2 * 12
    for name, m in qlinears.items():
        q, s, t = layers[name]
        assert m.scale.shape == () and m.scale.item() == s.item() and m.input_scale.item() == t.item()
        assert torch.equal(m.data.view(torch.uint8), q.view(torch.uint8))
        assert "input_scale" in dict(m.named_buffers())  # moved with the layer by .to() and offloading
    assert torch.equal(_run(got), _run(_reference(state, layers)))
    assert got.checkpoint_numerics["activations"] == (
        "fp8, static per tensor (the file's calibrated input_scale: x_q = fp8(clamp(x / input_scale)))")
    assert got.checkpoint_numerics["weights"] == "fp8-pertensor, read from the file"
    assert got.checkpoint_numerics["layout"] == {"lightx2v": "static-fp8", "compressed-tensors": "static-fp8"}.get(
        layout, "comfyui")
    with pytest.raises(CheckpointError, match=r"static activation scale \('blocks\.0\.self_attn\.q\.input_scale'\) "
                                              r"but fp8 quantizes activations dynamically: run it with "
                                              r"dit_quant=fp8-pertensor-auto"):
        load_component(build_dit, src, method=QuantMethod.portable("fp8"), component="dit")


def test_layers_without_input_scale_run_dynamic_per_tensor_and_say_so(tmp_path, state):
    scales = calibrate(state)
    some = {k: v for k, v in scales.items() if k.startswith("blocks.0.")}
    file, layers = pertensor_file(state, some, "lightx2v")
    save_file(file, tmp_path / "dit.safetensors")
    got = load_component(build_dit, open_source(tmp_path / "dit.safetensors"),
                         method=QuantMethod.portable("fp8-pertensor"), component="dit")
    assert torch.equal(_run(got), _run(_reference(state, layers)))
    assert got.checkpoint_numerics["activations"] == (
        "fp8, static per tensor (the file's calibrated input_scale: x_q = fp8(clamp(x / input_scale))) on 12 of 24 "
        "layers; the other 12 (no input_scale in the file): fp8, dynamic per tensor (max |x| / 448 of each call)")
    # a per-tensor file under a per-token fp8 mode: the scalar held per channel, exact (no input_scale there)
    plain, _ = pertensor_file(state, {}, "lightx2v")
    save_file(plain, tmp_path / "plain.safetensors")
    fp8 = load_component(build_dit, open_source(tmp_path / "plain.safetensors"), method=QuantMethod.portable("fp8"))
    assert fp8.checkpoint_numerics["activations"] == "fp8, dynamic per token"


def statement(x: torch.Tensor, q_w: torch.Tensor, s: float, t: float | None, bias: torch.Tensor | None):
    """The rule in float64: t (static, or max |x| / 448), the codes fp8(clamp(fl32(x / t))), y = codes @ W_q^T * t
    * s + b; with the bound on |y - statement| that fp32 accumulation and the output rounding allow (docstring of
    ``check``)."""
    x64 = x.double().reshape(-1, x.shape[-1])
    t = x64.abs().max().item() / E4M3_MAX if t is None else t
    # fl32(x / t): x (bf16 / fp16 / fp32) and t (fp32) are exact in float64; the quotient's float64 rounding cannot
    # land on an fp32 rounding boundary other than the exact one (53 > 2 * 24 + 1 bits), so this is the fp32 division
    quotient = (x64 / torch.tensor(t, dtype=torch.float32).double()).float()
    codes = quotient.clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE).double()
    w64 = q_w.double()
    exact = codes @ w64.t()
    total = codes.abs() @ w64.abs().t()  # sum |x_q w_q| per output, in code units
    b = torch.zeros(w64.shape[0], dtype=torch.float64) if bias is None else bias.double()
    return codes, exact * t * s, exact * t * s + b, total * t * s, t


def check(layer: QLinear, x: torch.Tensor, t_static: float | None):
    """|y - y64| <= u (|y64 - b| + |y64|) + 2 (K + 3) u32 t s sum|x_q w_q| + u32 |b|, where u is the output
    dtype's unit roundoff: the fp8 products are exact in fp32, any order of K fp32 additions errs by at most
    gamma_K = K u32 / (1 - K u32) of sum |terms|, the scale products add three roundings, and the output is rounded
    at most twice (the product, then with the bias; once where the bias is fused)."""
    y = layer(x).double().reshape(-1, layer.out_features)
    s = layer.scale.item()
    codes, no_bias, ref, total, t = statement(x, layer.data, s, t_static, layer.bias)
    got_codes, got_t = quantize_activation(x.reshape(-1, x.shape[-1]), "fp8-pertensor",
                                           None if t_static is None else torch.tensor(t_static))
    assert got_t.item() == torch.tensor(t, dtype=torch.float32).item()
    assert torch.equal(got_codes.double(), codes), "activation codes differ from fp8(clamp(x / t))"
    u, k = UNIT_ROUNDOFF[x.dtype], layer.in_features
    b = 0 if layer.bias is None else layer.bias.double().abs()
    bound = u * (no_bias.abs() + ref.abs()) + 2 * (k + 3) * U32 * total + U32 * b
    err = (y - ref).abs()
    assert (err <= bound).all(), f"worst excess {float((err - bound).max()):.3e}"
    assert bound.max() < 0.02 * ref.abs().max(), "the bound is not vacuous"
    return err, bound


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k, static", [(128, True), (128, False), (40, True)])  # K = 40: the emulated path
def test_per_tensor_linear_against_the_float64_statement(dtype, k, static):
    g = torch.Generator().manual_seed(3)
    n = 48
    w = torch.randn(n, k, generator=g) * 0.05
    x = (torch.randn(2, 7, k, generator=g) * 3).to(dtype)
    q, s = per_tensor_fp8(w)
    # a calibration that saw 80% of this input's range: the largest activations saturate at +-448
    t = x.float().abs().max().item() * 0.8 / E4M3_MAX if static else None
    qw = QuantizedWeight("fp8-pertensor", q, s, n, k, None if t is None else torch.tensor(t))
    bias = torch.randn(n, generator=g).to(dtype)
    layer = QLinear(qw, bias, specs()["torch"].load())
    err, bound = check(layer, x, t)
    assert layer(x).dtype == dtype and layer(x).shape == (2, 7, n)
    if static:
        assert (x.float().abs() / torch.tensor(t) > E4M3_MAX).any(), "the test saturates some activations"


def test_per_tensor_linear_zero_input_dynamic_is_exact_zero():
    q, s = per_tensor_fp8(torch.randn(32, 64))
    layer = QLinear(QuantizedWeight("fp8-pertensor", q, s, 32, 64), None, specs()["torch"].load())
    assert torch.equal(layer(torch.zeros(3, 64, dtype=torch.bfloat16)), torch.zeros(3, 32, dtype=torch.bfloat16))


def _one_layer_file(tmp_path, state, change: dict) -> str:
    file, _ = pertensor_file(state, calibrate(state), "lightx2v")
    for key, value in change.items():
        if value is None:
            del file[key]
        else:
            file[key] = value
    save_file(file, tmp_path / "bad.safetensors")
    return str(tmp_path / "bad.safetensors")


Q = "blocks.0.self_attn.q"


@pytest.mark.parametrize("change, message", [
    ({Q + ".input_scale": torch.tensor(float("nan"))}, f"scale '{Q}.input_scale' holds NaN/Inf values"),
    ({Q + ".input_scale": torch.tensor(float("inf"))}, f"scale '{Q}.input_scale' holds NaN/Inf values"),
    ({Q + ".input_scale": torch.tensor(0.0)}, f"scale '{Q}.input_scale' holds zero or negative values"),
    ({Q + ".input_scale": torch.tensor(-0.5)}, f"scale '{Q}.input_scale' holds zero or negative values"),
    ({Q + ".input_scale": torch.full((128,), 0.1)}, f"'{Q}.input_scale' must be one float32 value (shape [] or [1]"),
    ({Q + ".input_scale": torch.tensor(0.1, dtype=torch.float16)}, f"'{Q}.input_scale' must be one float32 value"),
    ({Q + ".weight_scale": None}, f"its scale '{Q}.weight_scale' is missing"),
    ({Q + ".weight_scale": torch.full((128, 1), 0.01)}, f"'{Q}.weight' is stored as fp8 but the mode expects "
                                                        "fp8-pertensor: pick an fp8 mode"),
])
def test_bad_scales_are_refused_in_one_line(tmp_path, state, change, message):
    src = open_source(_one_layer_file(tmp_path, state, change))
    with pytest.raises(CheckpointError) as err:
        load_component(build_dit, src, method=QuantMethod.portable("fp8-pertensor"), component="dit")
    assert message in str(err.value) and "bad.safetensors" in str(err.value) and "\n" not in str(err.value)


def test_bad_input_scale_exits_2_with_one_line(run_lightq, tmp_path, state):
    path = _one_layer_file(tmp_path, state, {Q + ".input_scale": torch.tensor(float("nan"))})
    proc = run_lightq("model=tiny-i2v", "dit_quant=fp8-pertensor-torch", f"dit_quant.ckpt={path}", "model.frames=5",
                      "quality.baseline=never")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightq: ") and "bad.safetensors" in lines[0], proc.stderr
    assert f"scale '{Q}.input_scale' holds NaN/Inf values" in lines[0]


def test_lightx2v_config_and_pertensor_file_run_end_to_end(run_lightq, tmp_path, state):
    """A LightX2V config naming dit_quant_scheme fp8-pertensor and its file: imported as fp8-pertensor-torch, run
    with the file's static scales, and result.json says so."""
    from PIL import Image

    file, _ = pertensor_file(state, calibrate(state), "lightx2v")
    save_file(file, tmp_path / "dit-fp8-pertensor.safetensors")
    cfg = tmp_path / "wan_i2v_fp8_pertensor.json"
    cfg.write_text(json.dumps({"dit_quantized": True, "dit_quant_scheme": "fp8-pertensor", "weight_auto_quant": False,
                               "dit_quantized_ckpt": str(tmp_path / "dit-fp8-pertensor.safetensors"), "task": "i2v"}))
    Image.new("RGB", (40, 24), (200, 80, 30)).save(tmp_path / "in.png")
    proc = run_lightq(f"from_lightx2v={cfg}", "from_lightx2v.model_cls=wan2.1", "model=tiny-i2v", "model.frames=5",
                      f"image={tmp_path / 'in.png'}", "quality.baseline=never", f"hydra.run.dir={tmp_path / 'job'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "job" / "result.json").read_text())
    dit = res["components"]["dit"]
    assert dit["mode"] == "fp8-pertensor-torch" and dit["backend"] == "torch" and dit["quantized_layers"] == 24
    assert any("LightX2V's fp8-pertensor is torch._scaled_mm" in n for n in res["from_lightx2v"]["notes"])
    assert dit["checkpoint"]["layout"] == "static-fp8"
    assert dit["checkpoint"]["activations"].startswith("fp8, static per tensor (the file's calibrated input_scale")



def test_convert_writes_per_tensor_scales_and_no_input_scale(tmp_path):
    """lightq.convert scheme=fp8-pertensor: one fp32 [] scale per linear, lightq's header, no input_scale (that is a
    calibration's, not a conversion's): the file loads with dynamic per-tensor activations and says so."""
    from lightq.checkpoints.conversion import convert

    src = open_source(ensure_tiny("tiny-i2v"))
    out = convert(src, component="dit", scheme="fp8-pertensor", output=tmp_path / "dit.safetensors", progress=False)
    written = open_source(out)
    assert written.metadata["lightq.scheme"] == "fp8-pertensor"
    assert written.metadata["lightq.granularity"] == "per-tensor"
    scales = [k for k in written if k.endswith(".weight_scale")]
    assert len(scales) == 24 and all(tuple(written.shape(k)) == () for k in scales)
    assert not any(k.endswith(".input_scale") for k in written)
    got = load_component(build_dit, written, method=QuantMethod.portable("fp8-pertensor"), component="dit")
    assert got.checkpoint_numerics["activations"] == "fp8, dynamic per tensor (max |x| / 448 of each call)"
    with pytest.raises(CheckpointError, match="holds scheme 'fp8-pertensor' \\(lightq.scheme\\) but the mode expects "
                                              "'fp8'"):
        load_component(build_dit, written, method=QuantMethod.portable("fp8"), component="dit")


def test_backends_without_a_static_scale_kernel_refuse_by_name():
    """lightq's triton backend has no static per-tensor quantizer: asked for fp8-pertensor it says so (and auto
    passes over it); the vllm and sgl plugins declare the scheme (their static quantizers)."""
    from lightq.backends.registry import choose, specs
    from lightq.hardware import Hardware

    h100 = Hardware(name="sm90", device="cuda", capability=9.0, gpu_name="H100")
    spec, why = choose("fp8-pertensor", "triton", h100)
    assert spec is None and why == "backend 'triton' does not implement scheme 'fp8-pertensor' (it has: fp8, int8)"
    assert {"vllm", "sgl"} <= {name for name, s in specs().items() if "fp8-pertensor" in s.schemes}
