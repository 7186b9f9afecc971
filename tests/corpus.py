"""A deterministic corpus of good, odd and bad image files (issue 7, "Bad inputs").

``write_corpus(folder)`` writes every file (generated with Pillow/numpy, nothing committed) and
returns, per path relative to ``folder``, what decoding it must give: an RGB image of a given
(width, height) in the displayed (EXIF-oriented) frame, with a few probe pixels, or an error
record of a given stage and error_type.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
QUADS = np.array([[RED, GREEN], [BLUE, WHITE]], np.uint8)  # [row, col] -> RGB of each quadrant


@dataclass(frozen=True)
class Expect:
    """An ok image of ``size`` (width, height) in the displayed frame whose pixel (x, y) of each
    ``probes`` entry is within ``tol`` of its RGB; or, with ``error_type``, an error record."""

    size: tuple[int, int] | None = None
    probes: tuple[tuple[int, int, tuple[int, int, int]], ...] = ()
    tol: int = 0
    grey: bool = False  # the three channels must be equal
    error_type: str | None = None
    stage: str = "decode"
    note: str = ""
    bomb: bool = False  # must be refused from the header, without allocating the pixels

    @property
    def ok(self) -> bool:
        return self.error_type is None


@dataclass
class _Corpus:
    folder: Path
    expect: dict[str, Expect] = field(default_factory=dict)

    def add(self, rel: str, data: bytes, expect: Expect) -> None:
        path = self.folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.expect[rel] = expect


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def quadrants(w: int, h: int, colours: np.ndarray = QUADS) -> np.ndarray:
    """uint8 [h, w, 3]: four blocks coloured ``colours[row, col]`` (top-left red by default)."""
    rows = (np.arange(h) >= h // 2).astype(int)
    cols = (np.arange(w) >= w // 2).astype(int)
    return colours[rows[:, None], cols[None, :]]


def quad_probes(w: int, h: int, colours: np.ndarray = QUADS) -> tuple:
    """(x, y, rgb) at the centre of each quadrant of a ``quadrants(w, h, colours)`` image."""
    xs, ys = (w // 4, w // 2 + w // 4), (h // 4, h // 2 + h // 4)
    return tuple((xs[c], ys[r], tuple(int(v) for v in colours[r, c])) for r in range(2) for c in range(2))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bomb(w: int, h: int) -> bytes:
    """A valid 1-bit greyscale PNG of w x h black pixels: ~w*h/8 bytes of zeros deflated to ~1/1000."""
    comp = zlib.compressobj(9)
    row = b"\0" * (1 + (w + 7) // 8)  # filter byte + packed bits
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _riff_chunk(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("<I", len(body)) + body + (b"\0" if len(body) % 2 else b"")


def webp_canvas_bomb(w: int, h: int) -> bytes:
    """A valid animated WebP whose canvas is w x h but whose one frame is 1 x 1 (a few hundred
    bytes): libwebp's animation decoder allocates the whole canvas when it is created."""
    small = _save(Image.new("RGB", (1, 1), RED), "WEBP", lossless=True)
    assert small[12:16] == b"VP8L", small[:16]
    frame = small[12:]  # the VP8L chunk, header included
    u24 = lambda v: struct.pack("<I", v)[:3]  # noqa: E731
    vp8x = bytes([0x02, 0, 0, 0]) + u24(w - 1) + u24(h - 1)  # flags: animation
    anim = struct.pack("<IH", 0, 0)  # background colour, loop forever
    anmf = u24(0) + u24(0) + u24(0) + u24(0) + u24(100) + bytes([0]) + frame  # x/2, y/2, w-1, h-1, duration, flags
    body = b"WEBP" + _riff_chunk(b"VP8X", vp8x) + _riff_chunk(b"ANIM", anim) + _riff_chunk(b"ANMF", anmf)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def jpeg_declaring(w: int, h: int, jpeg: bytes) -> bytes:
    """``jpeg`` with the size in its first SOF0 segment replaced by w x h (the scan stays as is)."""
    at = jpeg.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    return jpeg[: at + 5] + struct.pack(">HH", h, w) + jpeg[at + 9 :]


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """uint8 [h, w, 3] with photo-like statistics: smooth colour fields, edges and sensor noise."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (h // 200 + 2, w // 200 + 2, 3), dtype=np.uint8))
    arr = np.asarray(low.resize((w, h), Image.Resampling.BICUBIC)).copy()
    for _ in range(12):  # hard-edged shapes
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        arr[y0 : y0 + int(rng.integers(50, 800)), x0 : x0 + int(rng.integers(50, 800))] = rng.integers(0, 256, 3)
    noise = rng.integers(-6, 7, (h, w // 8, 1), dtype=np.int16).repeat(8, axis=1)[:, :w]  # cheap, coarse grain
    return np.clip(arr.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def write_corpus(folder: Path, *, large: bool = True) -> dict[str, Expect]:
    """Write the corpus under ``folder`` (created) and return {relpath: Expect}. ``large`` adds the
    6000 x 4000 photo (about 1 s to generate)."""
    folder.mkdir(parents=True, exist_ok=True)
    c = _Corpus(folder)
    rng = np.random.default_rng(7)
    q = quadrants(64, 48)
    ok_q = Expect(size=(64, 48), probes=quad_probes(64, 48))

    # -- not images, or broken ones
    c.add("zero_byte.jpg", b"", Expect(error_type="empty_file"))
    noisy = _save(Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)), "JPEG", quality=90)
    c.add("truncated.jpg", noisy[: len(noisy) // 2], Expect(error_type="truncated"))
    c.add("random_bytes.png", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), Expect(error_type="not_an_image"))
    c.add("html_page.jpg", b"<!DOCTYPE html><html><head><title>404</title></head><body>Not found</body></html>\n",
          Expect(error_type="not_an_image"))
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 48, 8, 2, 0, 0, 0))
    c.add("png_header_garbage.png", b"\x89PNG\r\n\x1a\n" + ihdr + rng.integers(0, 256, 2048, dtype=np.uint8).tobytes(),
          Expect(error_type="corrupt", note="valid signature and IHDR, then random bytes"))
    c.add("bomb.png", png_bomb(30000, 30000),
          Expect(error_type="too_large", bomb=True, note="30000x30000 1-bit PNG, ~110 kB; past Pillow's own limit"))
    c.add("bomb_canvas.webp", webp_canvas_bomb(12000, 12000),
          Expect(error_type="too_large", bomb=True, note="12000x12000 WebP canvas, one 1x1 frame, ~100 B"))
    c.add("bomb.tiff", _save(Image.new("1", (12000, 12000)), "TIFF", compression="group4"),
          Expect(error_type="too_large", bomb=True, note="12000x12000 1-bit TIFF, ~5 kB; past Pillow's warning limit"))
    c.add("bomb_header.jpg", jpeg_declaring(30000, 30000, _save(Image.fromarray(q), "JPEG")),
          Expect(error_type="too_large", bomb=True,
                 note="a 64x48 JPEG whose SOF says 30000x30000; past Pillow's error limit"))

    # -- formats and modes that must decode
    c.add("jpeg_named.png", _save(Image.fromarray(q), "JPEG", quality=95), replace(ok_q, tol=40))
    g16 = np.where(np.arange(64)[None, :] < 32, 1000, 4000).astype(np.uint16).repeat(48, axis=0)
    c.add("gray16.png", _save(Image.fromarray(g16), "PNG"),
          Expect(size=(64, 48), probes=((8, 8, (63, 63, 63)), (56, 40, (255, 255, 255))), tol=1, grey=True,
                 note="scaled by the image maximum: 1000/4000*255"))
    cmyk_colours = np.array([[(255, 0, 0, 0), (0, 255, 0, 0)], [(0, 0, 255, 0), (0, 0, 0, 255)]], np.uint8)
    rgb_of_cmyk = np.array([[(0, 255, 255), (255, 0, 255)], [(255, 255, 0), (0, 0, 0)]], np.uint8)
    c.add("cmyk.jpg", _save(Image.fromarray(quadrants(64, 48, cmyk_colours), mode="CMYK"), "JPEG", quality=95),
          Expect(size=(64, 48), probes=quad_probes(64, 48, rgb_of_cmyk), tol=40))
    pal = Image.fromarray(quadrants(64, 48, np.array([[[0], [1]], [[2], [3]]], np.uint8))[..., 0], mode="P")  # indices
    pal.putpalette([10, 20, 30, 200, 100, 50, 0, 0, 255, 255, 255, 255] + [0] * (252 * 3))
    pal_colours = np.array([[(10, 20, 30), (200, 100, 50)], [(0, 0, 255), (255, 255, 255)]], np.uint8)
    c.add("palette_transparent.png", _save(pal, "PNG", transparency=bytes([0, 128, 255, 255])),
          Expect(size=(64, 48), probes=quad_probes(64, 48, pal_colours), note="tRNS: index 0 transparent, 1 half"))
    rgba = np.dstack([q, np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))])
    c.add("rgba.png", _save(Image.fromarray(rgba, mode="RGBA"), "PNG"), replace(ok_q, note="alpha 0..255"))
    bits = np.arange(64)[None, :].repeat(48, axis=0) >= 32
    c.add("bilevel_1bit.png", _save(Image.fromarray(bits).convert("1"), "PNG"),
          Expect(size=(64, 48), probes=((8, 8, (0, 0, 0)), (56, 40, (255, 255, 255))), grey=True))
    grey = np.where(np.arange(64)[None, :] < 32, 50, 200).astype(np.uint8).repeat(48, axis=0)
    c.add("grayscale.jpg", _save(Image.fromarray(grey, mode="L"), "JPEG", quality=95),
          Expect(size=(64, 48), probes=((8, 8, (50, 50, 50)), (56, 40, (200, 200, 200))), tol=6, grey=True))
    c.add("one_pixel.png", _save(Image.new("RGB", (1, 1), (12, 34, 56)), "PNG"),
          Expect(size=(1, 1), probes=((0, 0, (12, 34, 56)),)))
    stored = quadrants(80, 48)  # stored landscape; both orientations display it as portrait 48 x 80
    for orientation, k in ((6, -1), (8, 1)):  # 6: turn clockwise to display; 8: counter-clockwise
        exif = Image.Exif()
        exif[0x0112] = orientation
        shown = np.rot90(quadrants(2, 2), k=k)  # where each stored quadrant ends up
        c.add(f"exif_orientation_{orientation}.jpg", _save(Image.fromarray(stored), "JPEG", quality=95, exif=exif),
              Expect(size=(48, 80), probes=quad_probes(48, 80, shown), tol=40,
                     note=f"stored 80x48, EXIF Orientation {orientation}"))
    frames = [Image.fromarray(quadrants(64, 48, colours)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
              for colours in (QUADS, QUADS[::-1, ::-1])]
    c.add("animated.gif", _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
          replace(ok_q, note="2 frames, the second rotated 180 degrees: the first is decoded"))
    c.add("image.bmp", _save(Image.fromarray(q), "BMP"), ok_q)
    c.add("image.webp", _save(Image.fromarray(q), "WEBP", lossless=True), ok_q)
    c.add("image.tiff", _save(Image.fromarray(q), "TIFF", compression="tiff_lzw"), ok_q)
    c.add("name with spaces.jpg", _save(Image.fromarray(q), "JPEG", quality=95), replace(ok_q, tol=40))
    c.add("ünïcödé 写真.png", _save(Image.fromarray(q), "PNG"), ok_q)
    c.add("folder.jpg/inside.png", _save(Image.fromarray(q), "PNG"),
          replace(ok_q, note="an ordinary input inside a directory named like an image"))
    if large:
        c.add("large_photo.jpg", _save(Image.fromarray(photo(6000, 4000)), "JPEG", quality=90), Expect(size=(6000, 4000)))
    return c.expect
