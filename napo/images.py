"""The one image decoder of napo: every image ``generate``, ``logps``, ``eval``, ``analyze`` and the training
collator see goes through :func:`rgb_image`, so that all of them see the same pixels.

Two things Pillow's ``convert("RGB")`` alone gets wrong:

- High-bit-depth greyscale is clipped, not scaled: a 16-bit or 32-bit integer image (modes ``I;16*``, ``I``)
  turns pure white and a float image (mode ``F``) with values in [0, 1] pure black. Here the values are scaled
  to 8 bits by the range their type says: 16-bit by 255/65535; 32-bit integers by 255/65535 when every value
  fits in 16 bits (Pillow opens 16-bit PNGs as mode ``I``), else by 255/(2**31 - 1); floats by 255 when every
  value is in [0, 1], as they are when every value is in [0, 255]. Other float values (negative, above 255, NaN)
  are refused: no scale is implied by them.
- The EXIF orientation tag is ignored: a photo taken on its side stays on its side. Here it is applied, as
  `datasets` does when it decodes an ``Image`` feature (TRL's path): ``PIL.ImageOps.exif_transpose``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

__all__ = ["ImageDecodeError", "open_image", "rgb_image"]

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageDecodeError(ValueError):
    """An image whose pixels do not say how to show them in 8 bits (a float image with values outside [0, 255])."""


def _eight_bit(image: Any) -> Any:
    """A mode ``L`` image of a high-bit-depth greyscale ``image`` (see the module docstring)."""
    import numpy as np
    from PIL import Image

    values = np.asarray(image)
    if image.mode in _SIXTEEN_BIT:
        scaled = values.astype(np.float64) * (255 / 65535)
    elif image.mode == "I":
        full = 65535 if values.size == 0 or values.max() <= 65535 else 2**31 - 1
        scaled = np.clip(values.astype(np.float64), 0, None) * (255 / full)
    else:  # "F"
        finite = bool(np.isfinite(values).all())
        low = float(values.min()) if values.size else 0.0
        high = float(values.max()) if values.size else 0.0
        if not finite or low < 0 or high > 255:
            raise ImageDecodeError(
                f"a float image with values from {low} to {high}{'' if finite else ' and NaN or infinity'}: only "
                "[0, 1] or [0, 255] say how to show it in 8 bits; convert it to an 8-bit image"
            )
        scaled = values.astype(np.float64) * (255 if high <= 1 else 1)
    return Image.fromarray(np.rint(scaled).clip(0, 255).astype(np.uint8), mode="L")


def rgb_image(image: Any) -> Any:
    """``image`` (a PIL image) upright as its EXIF orientation says, in 8-bit RGB, its values scaled rather
    than clipped (see the module docstring)."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in (*_SIXTEEN_BIT, "I", "F"):
        image = _eight_bit(image)
    return image.convert("RGB")


def open_image(source: bytes | bytearray | str | Path) -> Any:
    """The :func:`rgb_image` of encoded bytes or of a file."""
    from PIL import Image

    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as image:
        image.load()
        return rgb_image(image)
