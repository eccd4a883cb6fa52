"""Bad input to a job is refused at validation, before any model loads, in one line (issue 15 items 4, 8, 11, 13;
issue 16 item 8): sizes, dtype, seed, options of the other task, the I2V picture in every pixel mode, NaN weights."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightq.errors import LightqError
from lightq.images import load_rgb

from .conftest import FAST, input_error, one_line, run_job


@pytest.mark.parametrize("override, needles", [
    ("model.frames=-3", ("model.frames=-3", "4k+1")),
    ("model.frames=0", ("model.frames=0", "4k+1")),
    ("model.frames=6", ("model.frames=6", "4k+1")),
    ("model.height=0", ("model.height/width=0x64", "positive multiples of 16")),
    ("model.width=-16", ("64x-16", "positive multiples of 16")),
    ("model.height=20", ("20x64", "multiples of 16")),
    ("model.dtype=fp64", ("model.dtype='fp64'", "bf16, fp16, fp32")),
    ("model.fps=0", ("model.fps=0", "positive frame rate")),
    ("seed=-1", ("seed=-1", "0 to 4294967295")),
    ("seed=1099511627776", ("seed=1099511627776", "0 to")),
    ("image=cat.png", ("image=", "text-to-video", "model=tiny-i2v")),
    ("clip_quant=int8-torch", ("clip_quant=int8-torch", "does not have", "drop clip_quant=")),
    ("sampler.steps=0", ("steps must be a positive integer",)),
    ("sampler.shift=-1", ("shift must be > 0",)),
])
def test_bad_values_fail_before_anything_loads(tmp_path, override, needles):
    result = run_job(tmp_path, override)
    input_error(result, *needles)
    assert "load" not in result.get("timings_s", {})  # refused before the models load
    assert not (tmp_path / "latents.pt").exists() and not (tmp_path / "video.mp4").exists()


def test_i2v_with_real_weights_and_no_image_fails_before_loading(tmp_path):
    result = run_job(tmp_path, "model=tiny-i2v", f"model.weights={tmp_path}")
    input_error(result, "needs its input picture", "image=")
    assert "load" not in result.get("timings_s", {})


# ---------------------------------------------------------------------------------------------- the I2V picture

GRAY16 = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472


def _png(path: Path, width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> Path:
    """A PNG written byte by byte (for pixel formats Pillow cannot write, and for lying headers)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def _rows(pixels: np.ndarray) -> bytes:
    return b"".join(b"\0" + row.tobytes() for row in pixels)


def test_16_bit_grayscale_png_keeps_its_brightness(tmp_path):
    path = _png(tmp_path / "g16.png", 32, 32, 16, 0, _rows(GRAY16.astype(">u2")))
    assert Image.open(path).mode.startswith("I")
    got = np.asarray(load_rgb(path)).astype(int)
    assert (got[..., 0] == got[..., 2]).all()
    assert np.abs(got[..., 0] - np.round(GRAY16 / 257)).max() <= 0.5


def test_16_bit_rgb_png_is_within_one_level(tmp_path):
    rgb = (np.random.default_rng(0).random((16, 16, 3)) * 65535).astype(">u2")
    path = _png(tmp_path / "rgb16.png", 16, 16, 16, 2, _rows(rgb.reshape(16, -1)))
    assert np.abs(np.asarray(load_rgb(path)).astype(float) - rgb / 257).max() <= 1.0


def _expected_rgb(mode: str) -> tuple[Image.Image, tuple[int, int, int]]:
    """A 4x4 picture in ``mode`` and the RGB it means."""
    colour = {"1": 255, "L": 100, "P": None, "CMYK": (0, 255, 255, 0), "LA": (100, 255), "RGBA": (10, 20, 30, 255),
              "I;16": 100 * 257, "YCbCr": (76, 85, 255)}[mode]
    want = {"1": (255,) * 3, "L": (100,) * 3, "P": (200, 10, 10), "CMYK": (255, 0, 0), "LA": (100,) * 3,
            "RGBA": (10, 20, 30), "I;16": (100,) * 3, "YCbCr": (254, 0, 0)}[mode]
    if mode == "P":
        img = Image.new("RGB", (4, 4), (200, 10, 10)).convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        img = Image.new(mode, (4, 4), colour)
    return img, want


@pytest.mark.parametrize("mode, fmt", [("1", "png"), ("L", "png"), ("P", "png"), ("CMYK", "jpeg"), ("LA", "png"),
                                       ("RGBA", "png"), ("I;16", "png"), ("YCbCr", "jpeg"), ("L", "jpeg"),
                                       ("CMYK", "tiff"), ("I;16", "tiff")])
def test_every_colour_mode_means_what_it_says(tmp_path, mode, fmt):
    img, want = _expected_rgb(mode)
    path = tmp_path / f"in.{fmt}"
    img.save(path)
    got = np.asarray(load_rgb(path)).reshape(-1, 3)
    tolerance = 12 if fmt == "jpeg" else 1
    assert np.abs(got.astype(int) - np.array(want)).max() <= tolerance, (mode, fmt, got[0])


@pytest.mark.parametrize("make, needles", [
    (lambda p: Image.new("RGBA", (4, 4), (1, 2, 3, 0)).save(p / "x.png"), ("transparent pixels", "flatten")),
    (lambda p: Image.new("LA", (4, 4), (1, 128)).save(p / "x.png"), ("transparent pixels",)),
    (lambda p: Image.new("F", (4, 4), 0.5).save(p / "x.tiff"), ("mode F", "floating point", "8- or 16-bit")),
    (lambda p: Image.new("I", (4, 4), 70000).save(p / "x.tiff"), ("mode I", "unknown range")),
    (lambda p: (p / "x.png").write_bytes(b"not an image at all"), ("cannot read it as an image",)),
    (lambda p: _png(p / "x.png", 30000, 30000, 8, 0, b""), ("decompression", "smaller")),
    (lambda p: _png(p / "x.png", 10000, 10000, 8, 0, b""), ("too large to decode safely", "89478485 pixels", "smaller")),
    (lambda p: (p / "x.png").write_bytes(_png(p / "full.png", 64, 64, 8, 0, _rows(np.zeros((64, 64), np.uint8)))
                                         .read_bytes()[:60]), ("damaged",)),
    (lambda p: None, ("no such file",)),
])
def test_unusable_pictures_are_refused_in_one_line(tmp_path, make, needles):
    make(tmp_path)
    path = next(iter(sorted(tmp_path.glob("x.*"))), tmp_path / "x.png")
    with pytest.raises(LightqError) as err:
        load_rgb(path)
    one_line(str(err.value), *needles)


def test_a_bad_picture_fails_the_job_before_loading(tmp_path):
    _png(tmp_path / "bomb.png", 30000, 30000, 8, 0, b"")
    result = run_job(tmp_path / "job", "model=tiny-i2v", f"image={tmp_path / 'bomb.png'}")
    input_error(result, "bomb.png", "smaller")
    assert "load" not in result.get("timings_s", {})


def test_a_16_bit_picture_reaches_the_model_as_its_brightness(tmp_path):
    from omegaconf import OmegaConf

    from lightq.pipeline.components import input_image

    path = _png(tmp_path / "g16.png", 32, 32, 16, 0, _rows(np.full((32, 32), 65535 // 4, ">u2")))
    cfg = OmegaConf.create({"image": str(path), "model": {"weights": "synthetic", "i2v_size": "crop"}})
    x = input_image(cfg, 16, 16)
    assert torch.allclose(x, torch.full_like(x, round(65535 / 4 / 257) / 127.5 - 1))


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    """The tiny model's folder with one NaN in an unquantized umT5 tensor (a norm weight)."""
    from lightq.models.tiny import T5_FILE, ensure_tiny

    folder = tmp_path_factory.mktemp("nan-model")
    for f in ensure_tiny("tiny").iterdir():
        (folder / f.name).symlink_to(f)
    (folder / T5_FILE).unlink()
    state = torch.load(ensure_tiny("tiny") / T5_FILE, weights_only=True)
    key = next(k for k in state if "norm" in k and k.endswith("weight"))
    state[key] = state[key].clone()
    state[key][0] = float("nan")
    torch.save(state, folder / T5_FILE)
    return folder, key


def test_nan_in_an_unquantized_tensor_fails_at_load_and_writes_nothing(tmp_path, nan_model):
    folder, key = nan_model
    result = run_job(tmp_path, f"model.weights={folder}", *FAST)
    input_error(result, key, "NaN/Inf", "damaged")
    assert not (tmp_path / "latents.pt").exists() and not (tmp_path / "video.mp4").exists()
    assert "denoise" not in result.get("timings_s", {})


def test_skip_pattern_that_matches_nothing_fails_before_any_tensor_is_read(tmp_path):
    result = run_job(tmp_path, "dit_quant=int8-torch", "dit_quant.skip=[blocks.99.*]")
    input_error(result, "dit_quant.skip", "'blocks.99.*' matches none", "fix the pattern")


def test_lazy_load_counts_its_quantized_layers_and_offload_on_cpu_is_said(tmp_path):
    from lightq.checkpoints.conversion import convert
    from lightq.convert import open_component_source
    from lightq.models.family import QUANTIZABLE
    from lightq.models.wan_dit import DIT_ARCHS, WanDiT
    from lightq.quant.linear import selected

    split = tmp_path / "split"
    convert(open_component_source("tiny", "dit"), component="dit", scheme="fp8", output=split, layout="blocks",
            skip=["blocks.0.ffn.2"], progress=False)
    with torch.device("meta"):
        linears = [n for n, m in WanDiT(DIT_ARCHS["tiny"]).named_modules() if isinstance(m, torch.nn.Linear)]
    want = sum(selected(n, QUANTIZABLE["dit"], ["blocks.0.ffn.2"]) for n in linears)
    result = run_job(tmp_path / "job", "dit_quant=fp8-torch", f"dit_quant.ckpt={split}", "dit_quant.skip=[blocks.0.ffn.2]",
                     "offload=block", "offload.lazy_load=true", *FAST)
    assert result["status"] == "ok", result.get("reason")
    assert result["components"]["dit"]["quantized_layers"] == want > 0
    one_line(result["warnings"][0], "offload=block", "on the CPU", "saves nothing")
