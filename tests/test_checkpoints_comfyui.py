"""ComfyUI's files, built here in ComfyUI's exact key layouts, load with the numerics they mean (or are refused
in one line): the legacy ``scaled_fp8`` format, the current per-layer ``comfy_quant`` / ``_quantization_metadata``
format, the ``model.diffusion_model.`` / ``model.`` / ``diffusion_model.`` prefixes, kijai's plain fp8 casts."""

import json
from fnmatch import fnmatchcase

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightq.backends.registry import specs
from lightq.checkpoints.conversion import convert
from lightq.checkpoints.loader import load_component
from lightq.checkpoints.conventions import open_source
from lightq.errors import CheckpointError
from lightq.models import family
from lightq.models.tiny import ensure_tiny
from lightq.quant.linear import swap_linears
from lightq.quant.method import QuantMethod
from lightq.quant.schemes import FP8_DTYPE, QuantizedWeight
from test_checkpoints_load import _run, build_dit  # the tiny I2V DiT and its one deterministic forward

DIT = family.QUANTIZABLE["dit"]


@pytest.fixture(scope="module")
def state():
    src = open_source(ensure_tiny("tiny-i2v"))
    return {k: src[k] for k in src}


def _linear(key: str) -> bool:
    return key.endswith(".weight") and any(fnmatchcase(key[:-len(".weight")], p) for p in DIT)


def _conf(obj: dict) -> torch.Tensor:
    """ComfyUI's ``<layer>.comfy_quant``: the uint8 bytes of the layer's JSON object."""
    return torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)


def _fp8(w: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's TensorCoreFP8Layout quantization: s = amax / 448 (per tensor, or per row), q = fp8(w / s)."""
    amax = w.float().abs().amax(dim=1) if per_channel else w.float().abs().amax()
    s = amax / 448
    q = (w.float() / (s[:, None] if per_channel else s)).to(FP8_DTYPE)
    return q, s


def _save(tmp_path, tensors: dict, name="comfy.safetensors", metadata=None):
    save_file(tensors, tmp_path / name, metadata=metadata)
    return open_source(tmp_path / name)


def _reference(state, quantized: dict, scheme: str | None):
    """The DiT built by hand: float tensors from ``state``; each quantized linear from ``quantized[name] = (data,
    scale)`` as a QLinear on the portable backend (``scheme``), or dequantized into bf16 (``scheme=None``)."""
    model = build_dit()
    model.load_state_dict(state)
    model = model.to(torch.bfloat16)
    if scheme is None:
        for name, (d, s) in quantized.items():
            w = d.float() * (s.reshape(-1, 1) if s.numel() > 1 else s)
            model.get_submodule(name).weight.data = w.to(torch.bfloat16)
        return model.eval()

    def weight_for(name, lin):
        d, s = quantized[name]
        return QuantizedWeight(scheme, d, s.float().reshape(-1, 1).expand(d.shape[0], 1).contiguous(), *d.shape)

    swap_linears(model, DIT, (), specs()["torch"].load(), scheme, weight_for)
    return model.eval()


def _legacy(state, marker_elements: int, scale_input: float | None = 1.0, prefix: str = ""):
    """ComfyUI's legacy scaled fp8: ``scale_weight`` fp32 scalar, ``scale_input`` scalar, the ``scaled_fp8`` marker."""
    file, quantized = {}, {}
    for k, w in state.items():
        if _linear(k):
            layer = k[:-len(".weight")]
            q, s = _fp8(w)
            file[prefix + k], file[prefix + layer + ".scale_weight"] = q, s.reshape(())
            if scale_input is not None:
                file[prefix + layer + ".scale_input"] = torch.tensor(scale_input)
            quantized[layer] = (q, s)
        else:
            file[prefix + k] = w
    file[prefix + "scaled_fp8"] = torch.zeros(marker_elements, dtype=FP8_DTYPE)
    return file, quantized


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_legacy_scaled_fp8_runs_w8a8(tmp_path, state, prefix):
    file, quantized = _legacy(state, 0, prefix=prefix)
    src = _save(tmp_path, file)
    got = load_component(build_dit, src, include=DIT, method=QuantMethod.portable("fp8"), component="dit")
    assert torch.equal(_run(got), _run(_reference(state, quantized, "fp8")))
    assert got.checkpoint_numerics == {"layout": "comfyui", "key_names": "official",
                                       "weights": "fp8, read from the file (per-tensor scales held per channel)",
                                       "activations": "fp8, dynamic per token"}
    with pytest.raises(CheckpointError, match="stored as fp8-pertensor but the mode expects int8: pick an "
                                              "fp8-pertensor or fp8 mode"):
        load_component(build_dit, src, include=DIT, method=QuantMethod.portable("int8"))


def test_legacy_weight_only_marker_runs_weight_only_or_is_refused(tmp_path, state):
    """A 2-element marker is ComfyUI's full_precision_matrix_mult: bf16 GEMM on the dequantized weights."""
    file, quantized = _legacy(state, 2)
    src = _save(tmp_path, file)
    with pytest.raises(CheckpointError, match=r"weight-only .* run it with dit_quant=none"):
        load_component(build_dit, src, include=DIT, method=QuantMethod.portable("fp8"), component="dit")
    got = load_component(build_dit, src, include=DIT, method=QuantMethod.portable(None), component="dit")
    assert torch.equal(_run(got), _run(_reference(state, quantized, None)))
    assert got.checkpoint_numerics["weights"] == "the file's quantized weights dequantized to bfloat16 at load " \
                                                 "(weight-only)"


def test_calibrated_input_scale_is_refused_not_ignored(tmp_path, state):
    file, _ = _legacy(state, 0, scale_input=0.02)
    with pytest.raises(CheckpointError, match=r"static activation scale \('blocks\.0\.self_attn\.q\.input_scale'\)"):
        load_component(build_dit, _save(tmp_path, file), include=DIT, method=QuantMethod.portable("fp8"))


def _current(state, prefix="model.diffusion_model.", per_channel=False, fmt="float8_e4m3fn", in_header=False,
             input_scale=None):
    """ComfyUI's current format: ``weight_scale``, per-layer ``comfy_quant`` tensors (or the header table)."""
    file, quantized, layers = {}, {}, {}
    for k, w in state.items():
        if _linear(k):
            layer = k[:-len(".weight")]
            q, s = _fp8(w, per_channel)
            file[prefix + k], file[prefix + layer + ".weight_scale"] = q, s
            if input_scale is not None:
                file[prefix + layer + ".input_scale"] = torch.tensor(input_scale)
            layers[prefix + layer] = {"format": fmt}
            if not in_header:
                file[prefix + layer + ".comfy_quant"] = _conf({"format": fmt})
            quantized[layer] = (q, s)
        else:
            file[prefix + k] = w
    table = json.dumps({"format_version": "1.0", "layers": layers})
    metadata = {"_quantization_metadata": table} if in_header else None
    return file, quantized, metadata


@pytest.mark.parametrize("prefix, per_channel, in_header", [
    ("model.diffusion_model.", False, False), ("diffusion_model.", True, False), ("model.", False, True),
    ("", True, True)])
def test_current_format_loads_exactly(tmp_path, state, prefix, per_channel, in_header):
    file, quantized, metadata = _current(state, prefix, per_channel, in_header=in_header)
    src = _save(tmp_path, file, metadata=metadata)
    assert not any(k.endswith(".comfy_quant") or k.startswith(prefix or "@") for k in src)
    got = load_component(build_dit, src, include=DIT, method=QuantMethod.portable("fp8"), component="dit")
    assert torch.equal(_run(got), _run(_reference(state, quantized, "fp8")))


def test_current_format_int8_tensorwise_per_row(tmp_path, state):
    file, quantized = {}, {}
    for k, w in state.items():
        if _linear(k):
            layer = k[:-len(".weight")]
            s = w.float().abs().amax(dim=1, keepdim=True) / 127
            q = torch.round(w.float() / s).clamp(-127, 127).to(torch.int8)
            file[k], file[layer + ".weight_scale"], file[layer + ".comfy_quant"] = q, s, _conf(
                {"format": "int8_tensorwise"})
            quantized[layer] = (q, s)
        else:
            file[k] = w
    got = load_component(build_dit, _save(tmp_path, file), include=DIT, method=QuantMethod.portable("int8"))
    assert torch.equal(_run(got), _run(_reference(state, quantized, "int8")))


@pytest.mark.parametrize("change, match", [
    (dict(fmt="nvfp4"), "is ComfyUI format 'nvfp4'; lightq reads float8_e4m3fn and int8_tensorwise"),
    (dict(input_scale=0.05), "static activation scale"),
])
def test_current_format_refusals(tmp_path, state, change, match):
    file, _, metadata = _current(state, **change)
    with pytest.raises(CheckpointError, match=match):
        load_component(build_dit, _save(tmp_path, file, metadata=metadata), include=DIT,
                       method=QuantMethod.portable("fp8"))


def test_prefixed_bf16_file_loads_like_the_official_one(tmp_path, state):
    src = _save(tmp_path, {"model.diffusion_model." + k: v for k, v in state.items()})
    a = load_component(build_dit, src, method=None)
    b = load_component(build_dit, open_source(ensure_tiny("tiny-i2v")), method=None)
    assert torch.equal(_run(a), _run(b))
    # keys both inside and outside the prefix: left alone, the loader names the mismatch
    mixed = {"model.diffusion_model." + k: v for k, v in state.items()} | {"first_stage_model.x": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_component(build_dit, _save(tmp_path, mixed, "mixed.safetensors"), method=None)


def test_kijai_plain_fp8_cast_loads_with_scale_one(tmp_path, state):
    file, quantized = {}, {}
    for k, w in state.items():
        file[k] = w.to(FP8_DTYPE) if _linear(k) else w
        if _linear(k):
            quantized[k[:-len(".weight")]] = (file[k], torch.tensor(1.0))
    got = load_component(build_dit, _save(tmp_path, file), include=DIT, method=QuantMethod.portable("fp8"))
    assert torch.equal(_run(got), _run(_reference(state, quantized, "fp8")))
    assert got.checkpoint_numerics["layout"] == "fp8-cast"


def test_lightq_writes_comfyuis_current_format(tmp_path, state):
    src = open_source(ensure_tiny("tiny-i2v"))
    out = convert(src, component="dit", scheme="fp8", output=tmp_path / "c.safetensors", layout="comfyui",
                  progress=False)
    raw = load_file(out)
    layer = "blocks.0.self_attn.q"
    assert "scaled_fp8" not in raw and raw[layer + ".weight"].dtype == FP8_DTYPE
    assert raw[layer + ".weight_scale"].shape == () and raw[layer + ".weight_scale"].dtype == torch.float32
    assert json.loads(bytes(raw[layer + ".comfy_quant"].tolist())) == {"format": "float8_e4m3fn"}
    quantized = {k[:-len(".weight")]: (raw[k], raw[k[:-len(".weight")] + ".weight_scale"])
                 for k in raw if _linear(k)}
    got = load_component(build_dit, open_source(out), include=DIT, method=QuantMethod.portable("fp8"))
    assert torch.equal(_run(got), _run(_reference(state, quantized, "fp8")))
