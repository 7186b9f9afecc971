"""The one image-format conversion point: bytes -> EXIF-oriented RGB uint8 [H, W, 3]."""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class DecodeError(Exception):
    """An input that cannot become an image; ``error_type`` is a short stable tag."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode ``data`` to RGB uint8 [H, W, 3] with EXIF orientation applied (animations: the
    first frame).

    16-bit and float images are scaled to 8 bits by their maximum; CMYK, palette, grey and alpha
    images are converted to RGB (alpha dropped). Raises DecodeError for empty, unreadable,
    truncated or too large (> ``max_pixels``) inputs; too large is decided from the header,
    before any pixel buffer exists (PNG, GIF and WebP sizes are read here, before Pillow, whose
    WebP reader allocates the whole canvas when it opens a file).
    """
    if len(data) == 0:
        raise DecodeError("empty_file", "the file is empty (0 bytes)")
    size = declared_size(data)
    if size is not None:
        _check_size(*size, max_pixels)
    _follow_pillow_limit(max_pixels)
    kind = "unreadable"  # a failure before the header is read; after it, the data is "corrupt"
    try:
        with warnings.catch_warnings():
            # Pillow warns past its limit (>= max_pixels, see _follow_pillow_limit): that is our refusal.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # the header only: no pixel buffer yet
            kind = "corrupt"
            _check_size(*img.size, max_pixels)  # a GIF frame larger than its screen has grown img.size
            img.load()  # the first frame of an animation
            ImageOps.exif_transpose(img, in_place=True)
            return _to_rgb(img)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError("too_large", f"Pillow's bomb guard: {e} (max_pixels={max_pixels})") from None
    except UnidentifiedImageError:
        fmt = _signature(data)
        if fmt is None:
            raise DecodeError("not_an_image", "the bytes are not an image format Pillow can read") from None
        raise DecodeError("corrupt", f"the bytes start like a {fmt} file but its header cannot be read") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds on bad headers and data
        raise DecodeError(_kind(e, kind), f"{type(e).__name__}: {e}") from None


def _check_size(w: int, h: int, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise DecodeError("too_large", f"{w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}")
    if w == 0 or h == 0:
        raise DecodeError("empty_image", f"image has size {w}x{h}")


def _follow_pillow_limit(max_pixels: int) -> None:
    """Pillow's own bomb guard (process-wide ``Image.MAX_IMAGE_PIXELS``) warns past its limit and
    refuses past twice that; raise the limit to ``max_pixels`` so that it never refuses an image
    that ``max_pixels`` allows. Never lowered, so a smaller max_pixels elsewhere is unaffected
    (every call applies its own max_pixels)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and limit < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


_SIGNATURES = [(b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
               (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP")]


def _signature(data: bytes) -> str | None:
    """The format whose magic number ``data`` starts with, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((fmt for magic, fmt in _SIGNATURES if data.startswith(magic)), None)


def declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as declared by a PNG, GIF or WebP header (the first 30 bytes), without
    decoding; None for other formats or a header too short to read."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])  # the logical screen
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8X":  # extended (animation, alpha, metadata): the canvas
            return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
        if chunk == b"VP8L" and data[20] == 0x2F:  # lossless: 14-bit width-1, height-1
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":  # lossy key frame: 14-bit sizes
            return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


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
        # Palette transparency goes through RGBA (Pillow warns on P -> RGB); the alpha is dropped.
        img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "PA") else img.convert("RGB")
    return np.array(img, dtype=np.uint8)
