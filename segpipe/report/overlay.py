"""Overlays: an image and its instance rows -> an RGB picture of the masks; image encoding.

Pure functions, no I/O. Rows are instances/ or predictions/ rows (``mask_rle``, ``mask_height``,
``mask_width``, ``score``, optional ``category_name``). Each mask is decoded only inside its box
(``ops.masks.decode_region``) and, when the overlay is downscaled, resized there: never a dense
full-frame array per instance.
"""

from __future__ import annotations

import colorsys
import io
import math
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segpipe.ops import masks as mask_ops
from segpipe.ops.shapes import check_shape

GOLDEN = 0.618033988749895


def instance_colours(n: int) -> np.ndarray:
    """``n`` distinct, deterministic colours -> uint8 [n, 3] (hues stepped by the golden ratio)."""
    hues = (0.08 + GOLDEN * np.arange(n)) % 1.0
    rgb = [colorsys.hsv_to_rgb(float(h), 0.8, 1.0) for h in hues]
    return np.asarray(np.round(np.asarray(rgb, np.float64).reshape(n, 3) * 255), np.uint8)


def scale_for(height: int, width: int, max_side: int | None) -> float:
    """The factor (<= 1) that brings the longer side to at most ``max_side`` pixels (None: 1)."""
    if max_side is None or max(height, width) <= max_side:
        return 1.0
    return max_side / max(height, width)


def resize_image(image: np.ndarray, scale: float) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> [round(H*scale), round(W*scale), 3] (area filter; scale 1: unchanged)."""
    check_shape(image, ["H", "W", 3], "image")
    if scale == 1.0:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BOX))


def row_rle(row: Mapping) -> dict:
    """An instances row's mask as a COCO RLE dict."""
    return {"size": [int(row["mask_height"]), int(row["mask_width"])], "counts": row["mask_rle"]}


def mask_window(row: Mapping, scale: float, out_hw: tuple[int, int]) -> tuple[np.ndarray, int, int] | None:
    """One row's mask in the overlay's frame, cut to its box -> (bool [h, w], x0, y0), the top-left
    pixel of the window in the (scaled) overlay; None for an empty mask. Downscaling averages the
    mask's pixels (area filter) and keeps output pixels at least half covered."""
    rle = row_rle(row)
    x, y, w, h = (float(v) for v in mask_ops.to_bbox([rle])[0])
    if w <= 0 or h <= 0:
        return None
    x0, y0, x1, y1 = int(x), int(y), int(math.ceil(x + w)), int(math.ceil(y + h))
    crop = mask_ops.decode_region(rle, (x0, y0, x1, y1))
    if scale == 1.0:
        return crop, x0, y0
    oh, ow = out_hw
    sx0, sy0 = min(int(x0 * scale), ow - 1), min(int(y0 * scale), oh - 1)
    sx1 = min(max(sx0 + 1, int(math.ceil(x1 * scale))), ow)
    sy1 = min(max(sy0 + 1, int(math.ceil(y1 * scale))), oh)
    small = Image.fromarray(crop.astype(np.uint8) * 255).resize((sx1 - sx0, sy1 - sy0), Image.BOX)
    return np.asarray(small) >= 128, sx0, sy0


def inner_edge(mask: np.ndarray) -> np.ndarray:
    """The pixels of a bool mask [h, w] with a 4-neighbour outside it (the window's border counts
    as outside) -> bool [h, w]."""
    check_shape(mask, ["h", "w"], "mask")
    p = np.pad(mask, 1, constant_values=False)
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~interior


def overlay(image: np.ndarray, rows: Sequence[Mapping], *, max_side: int | None = None, alpha: float = 0.45,
            labels: bool = True, min_score: float = 0.0) -> np.ndarray:
    """Draw instance masks on an image -> RGB uint8 [h, w, 3].

    ``image`` RGB uint8 [H, W, 3] of the size the rows' masks were made at; ``rows`` instances
    rows. Rows scoring below ``min_score`` are left out; the rest are drawn weakest first (the
    strongest on top), row k (in the kept order of ``rows``) in ``instance_colours`` colour k:
    the mask blended at ``alpha``, its inner edge opaque, and with ``labels`` the category and
    score at the box's top-left corner. With ``max_side`` the result is downscaled so that its
    longer side is at most that many pixels.
    """
    check_shape(image, ["H", "W", 3], "image")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    kept = [r for r in rows if r["score"] >= min_score]
    for r in kept:
        if (int(r["mask_height"]), int(r["mask_width"])) != image.shape[:2]:
            raise ValueError(f"a mask of size {r['mask_height']}x{r['mask_width']} on an image of shape {image.shape}")
    scale = scale_for(image.shape[0], image.shape[1], max_side)
    base = resize_image(image, scale)
    out = base.astype(np.float32)
    colours = instance_colours(len(kept))
    placed = []
    for k in np.argsort([r["score"] for r in kept], kind="stable"):
        win = mask_window(kept[k], scale, base.shape[:2])
        if win is None:
            continue
        m, x0, y0 = win
        view = out[y0 : y0 + m.shape[0], x0 : x0 + m.shape[1]]
        c = colours[k].astype(np.float32)
        view[m] = (1.0 - alpha) * view[m] + alpha * c
        view[inner_edge(m)] = c
        placed.append((k, x0, y0))
    pic = np.asarray(np.clip(np.round(out), 0, 255), np.uint8)
    if labels and placed:
        im = Image.fromarray(pic)
        draw = ImageDraw.Draw(im)
        font = ImageFont.load_default()
        for k, x0, y0 in placed:
            r = kept[k]
            text = f"{r.get('category_name') or r.get('category_id', '')} {r['score']:.2f}".strip()
            draw.text((x0 + 1, max(0, y0 - 11)), text, fill=tuple(int(v) for v in colours[k]), font=font,
                      stroke_width=1, stroke_fill=(0, 0, 0))
        pic = np.asarray(im)
    return pic


def encode(image: np.ndarray, fmt: str = "png", quality: int = 85) -> bytes:
    """RGB uint8 [H, W, 3] -> PNG (lossless) or JPEG (``quality``) bytes."""
    check_shape(image, ["H", "W", 3], "image")
    if image.dtype != np.uint8:
        raise TypeError(f"image must be uint8, got {image.dtype}")
    kinds = {"png": ("PNG", {}), "jpeg": ("JPEG", {"quality": quality})}
    if fmt not in kinds:
        raise ValueError(f"fmt must be one of {sorted(kinds)}, got {fmt!r}")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, kinds[fmt][0], **kinds[fmt][1])
    return buf.getvalue()
