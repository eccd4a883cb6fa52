"""The I2V input picture: any image file Pillow can open, as 8-bit RGB, or one line saying why not.

``load_rgb(path)`` converts by what the pixels mean, not by Pillow's default ``convert("RGB")``, which clips
16- and 32-bit values to 255 (a 16-bit grayscale PNG would come out almost white):

- RGB as is (16-bit-per-channel RGB files open as 8-bit RGB: Pillow keeps the high byte);
- ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's colour conversion;
- 16-bit grayscale (``I;16*``, and ``I`` from a PNG, whose only 32-bit-integer form is 16-bit grayscale): value
  v becomes round(v / 257), so 0 -> 0 and 65535 -> 255 exactly;
- with an alpha channel (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, ``P`` with transparency): accepted when every
  pixel is opaque (the alpha is dropped), refused otherwise — what belongs under a transparent pixel is the
  user's choice, so they flatten it;
- 32-bit float (``F``) and 32-bit integer from other formats: refused, their range is not known.

Images over Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) are refused before they are decoded;
an unreadable or truncated file is refused with the reason. Torch-free: ``config.validate`` calls it before
anything loads.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from .errors import LightqError

COLOUR_MODES = ("RGB", "1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
GRAY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise LightqError(f"image={path}: no such file: give the path of a PNG or JPEG")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise LightqError(f"image={path} is too large to decode safely ({exc}): use a smaller picture, under "
                              f"{Image.MAX_IMAGE_PIXELS // 10**6} megapixels (it is resized to the video size)") from None
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise LightqError(f"image={path}: cannot read it as an image ({exc}): give a PNG or JPEG") from None
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise LightqError(f"image={path}: the file is damaged ({exc}): export it again") from None
    return img


def _gray16(img):
    import numpy as np
    from PIL import Image

    values = np.asarray(img).astype(np.uint32)
    return Image.fromarray(((values * 2 + 257) // 514).astype(np.uint8), mode="L").convert("RGB")  # round(v/257)


def _without_alpha(img, path: Path):
    rgba = img.convert("RGBA") if img.mode == "P" else img
    alpha = rgba.getchannel("A")
    if alpha.getextrema()[0] < 255:
        raise LightqError(f"image={path} has transparent pixels (mode {img.mode}): I2V needs an opaque picture; "
                          "flatten it onto a background first (e.g. ImageMagick: convert in.png -background white "
                          "-flatten out.png)")
    if rgba.mode == "La":
        return rgba.getchannel("L").convert("RGB")
    return rgba.convert("RGB")


def load_rgb(path: str | Path):
    """The picture at ``path`` as an 8-bit RGB ``PIL.Image`` (see the module doc for each mode)."""
    path = Path(path)
    img = _open(path)
    mode = img.mode
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        return _without_alpha(img, path)
    if mode in COLOUR_MODES:
        return img.convert("RGB")
    if mode in GRAY16_MODES or (mode == "I" and img.format == "PNG"):
        return _gray16(img)
    raise LightqError(f"image={path} has pixel mode {mode} ({'floating point' if mode == 'F' else 'unknown range'}), "
                      "which lightq cannot map to colours without guessing: save it as an 8- or 16-bit PNG or JPEG")
