"""The one image-format conversion point: bytes -> EXIF-oriented RGB uint8 [H, W, 3]."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class DecodeError(Exception):
    """An input that cannot become an image; ``error_type`` is a short stable tag."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode ``data`` to RGB uint8 [H, W, 3] with EXIF orientation applied.

    16-bit and float images are scaled to 8 bits by their maximum; CMYK, palette, grey and alpha
    images are converted to RGB (alpha dropped). Raises DecodeError for empty, unreadable,
    truncated or too large (> ``max_pixels``) inputs.
    """
    if len(data) == 0:
        raise DecodeError("empty_file", "the file is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DecodeError("not_an_image", "the bytes are not an image format Pillow can read") from None
    except Image.DecompressionBombError as e:  # Pillow's own bomb guard fires in open(), before ours
        raise DecodeError("too_large", str(e)) from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds on bad headers
        raise DecodeError(_kind(e, "unreadable"), f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise DecodeError("too_large", f"{w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}")
    if w == 0 or h == 0:
        raise DecodeError("empty_image", f"image has size {w}x{h}")
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DecodeError(_kind(e, "corrupt"), f"{type(e).__name__}: {e}") from None


def _kind(exc: Exception, default: str) -> str:
    return "truncated" if "truncated" in str(exc).lower() else default


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        top = arr.max()
        arr = (arr / top * 255.0) if top > 0 else arr
        grey = arr.clip(0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "PA") else img.convert("RGB")
    return np.array(img, dtype=np.uint8)
