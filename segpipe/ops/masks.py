"""Pure mask and RLE math.

RLEs are COCO compressed RLE dicts ``{"size": [H, W], "counts": bytes|str}`` (pycocotools order:
column-major runs, starting with a run of zeros). Soft masks are probabilities in a box frame.
Nothing here allocates a dense full-frame array per instance except the explicit ``decode``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from segpipe.ops.shapes import check_shape

RLE = dict


def encode(masks: np.ndarray) -> list[RLE]:
    """Dense binary masks [N, H, W] -> N compressed RLEs (``counts`` as str)."""
    check_shape(masks, ["N", "H", "W"], "masks")
    if masks.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [_as_str(r) for r in rles]


def decode(rles: Sequence[RLE]) -> np.ndarray:
    """N RLEs -> dense uint8 [N, H, W] (0/1). Empty input needs no size: returns [0, 0, 0]."""
    if len(rles) == 0:
        return np.zeros((0, 0, 0), dtype=np.uint8)
    dense = mask_utils.decode([as_bytes(r) for r in rles])
    return np.ascontiguousarray(dense.transpose(2, 0, 1))


def encode_local(local: np.ndarray, x0: int, y0: int, height: int, width: int) -> RLE:
    """Encode a binary mask given only inside a box, as a full-frame RLE.

    ``local`` is [h, w] bool placed with its top-left pixel at (``x0``, ``y0``) in an image of
    ``height`` x ``width``; parts falling outside the image are cut. Cost is O(h*w + W), never
    O(H*W), so it suits many small instances on a huge image.
    """
    check_shape(local, ["h", "w"], "local")
    local = local.astype(bool)
    # Cut to the image.
    ys0, xs0 = max(0, -y0), max(0, -x0)
    ys1 = min(local.shape[0], height - y0)
    xs1 = min(local.shape[1], width - x0)
    if ys1 <= ys0 or xs1 <= xs0:
        return _from_runs(np.zeros((0,), np.int64), np.zeros((0,), np.int64), height, width)
    local = local[ys0:ys1, xs0:xs1]
    x0, y0 = x0 + xs0, y0 + ys0
    h, w = local.shape
    # Transitions down each column (column-major = transpose then row-major).
    padded = np.zeros((w, h + 2), dtype=np.int8)
    padded[:, 1:-1] = local.T
    diff = np.diff(padded, axis=1)  # [w, h+1]
    col_s, row_s = np.nonzero(diff == 1)
    col_e, row_e = np.nonzero(diff == -1)
    starts = (x0 + col_s).astype(np.int64) * height + (y0 + row_s)
    ends = (x0 + col_e).astype(np.int64) * height + (y0 + row_e)
    return _from_runs(starts, ends, height, width)


def encode_stack(stack: np.ndarray, x0: np.ndarray, y0: np.ndarray, height: int | np.ndarray,
                 width: int | np.ndarray) -> list[RLE]:
    """``encode_local`` for a stack at once: ``stack`` [M, h, w] bool, map m placed with its
    top-left pixel at (``x0[m]``, ``y0[m]``) of an image ``height`` x ``width`` (one size for
    all, or per map [M]: the maps may come from several images); every 1-pixel must lie inside
    its image (no cut) -> M full-frame RLEs. The column transitions of all maps come from one diff."""
    check_shape(stack, ["M", "h", "w"], "stack")
    m, h, w = stack.shape
    heights = np.broadcast_to(np.asarray(height, np.int64), (m,))
    widths = np.broadcast_to(np.asarray(width, np.int64), (m,))
    padded = np.zeros((m, w, h + 2), dtype=np.int8)
    padded[:, :, 1:-1] = stack.transpose(0, 2, 1)
    diff = np.diff(padded, axis=2)  # [M, w, h + 1]
    ms, col_s, row_s = np.nonzero(diff == 1)  # C order: by map, then column, then row
    me, col_e, row_e = np.nonzero(diff == -1)
    x0, y0 = np.asarray(x0, np.int64), np.asarray(y0, np.int64)
    starts = (x0[ms] + col_s) * heights[ms] + (y0[ms] + row_s)
    ends = (x0[me] + col_e) * heights[me] + (y0[me] + row_e)
    cut_s, cut_e = np.searchsorted(ms, np.arange(m + 1)), np.searchsorted(me, np.arange(m + 1))
    return [_from_runs(starts[cut_s[k]:cut_s[k + 1]], ends[cut_e[k]:cut_e[k + 1]], int(heights[k]), int(widths[k]))
            for k in range(m)]


def _from_runs(starts: np.ndarray, ends: np.ndarray, height: int, width: int) -> RLE:
    """Sorted half-open 1-runs [starts[i], ends[i]) in column-major order -> compressed RLE."""
    if len(starts):
        # Merge runs that touch across a column boundary (box spanning the full height).
        keep = np.ones(len(starts), dtype=bool)
        keep[1:] = starts[1:] != ends[:-1]
        new_starts = starts[keep]
        new_ends = ends[np.r_[keep[1:], True]]
        starts, ends = new_starts, new_ends
    bounds = np.empty(2 * len(starts) + 2, dtype=np.int64)
    bounds[0] = 0
    bounds[1:-1:2] = starts
    bounds[2:-1:2] = ends
    bounds[-1] = height * width
    counts = np.diff(bounds).astype(np.uint32)
    if len(counts) > 1 and counts[-1] == 0:
        counts = counts[:-1]  # a mask ending in a 1-run has no trailing zero count (as pycocotools)
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width)
    return _as_str(rle)


def counts_of(rle: RLE) -> np.ndarray:
    """The uncompressed run lengths of a compressed RLE (alternating 0-runs and 1-runs,
    column-major, starting with zeros) -> int64 [K]. Parses the COCO string format: 6-bit
    characters (offset 48) carrying 5 value bits and a continuation bit, sign-extended, and
    from the third count on stored as a difference to the count two places back."""
    s = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
    out: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = s[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return np.asarray(out, np.int64)


def decode_region(rle: RLE, region_xyxy: Sequence[int]) -> np.ndarray:
    """The part of an RLE mask inside an integer pixel window (x0, y0, x1, y1; clipped to the
    image) -> bool [y1 - y0, x1 - x0]. Cost O(runs + window), never O(H*W)."""
    h = int(rle["size"][0])
    x0, y0, x1, y1 = (int(v) for v in region_xyxy)
    ww, wh = max(x1 - x0, 0), max(y1 - y0, 0)
    if ww == 0 or wh == 0:
        return np.zeros((wh, ww), bool)
    bounds = np.cumsum(np.r_[0, counts_of(rle)])
    starts, ends = bounds[1:-1:2], bounds[2::2]  # 1-runs [start, end) in column-major order
    starts = starts[: len(ends)]
    # A run covers columns start // h .. (end - 1) // h (it wraps the image height in between):
    # cut it into one piece per column inside the window.
    c_first = np.maximum(starts // h, x0)
    c_last = np.minimum((ends - 1) // h, x1 - 1)
    n = np.maximum(c_last - c_first + 1, 0)
    col = np.repeat(c_first, n) + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))
    s0, e0 = np.repeat(starts, n), np.repeat(ends, n)
    lo, hi = max(y0, 0), min(y1, h)
    r0 = np.clip(s0 - col * h, lo, hi) - y0
    r1 = np.clip(e0 - col * h, lo, hi) - y0
    ok = r1 > r0
    # Mark each piece's rows with +1 / -1 and integrate down the column.
    base = (col[ok] - x0) * (wh + 1)
    marks = np.bincount(np.r_[base + r0[ok], base + r1[ok]], weights=np.r_[np.ones(int(ok.sum())), -np.ones(int(ok.sum()))],
                        minlength=ww * (wh + 1)).reshape(ww, wh + 1)
    return (np.cumsum(marks[:, :wh], axis=1) > 0.5).T  # pixels of the window outside the image stay False


def area(rles: Sequence[RLE]) -> np.ndarray:
    """N RLEs -> [N] pixel counts (int64)."""
    if len(rles) == 0:
        return np.zeros((0,), np.int64)
    # pycocotools' area() sizes an internal uint8 array by the count: 256+ RLEs overflow under
    # numpy 2, so ask in chunks of at most 255.
    rl = [as_bytes(r) for r in rles]
    parts = [np.asarray(mask_utils.area(rl[i : i + 255]), dtype=np.int64).reshape(-1) for i in range(0, len(rl), 255)]
    return np.concatenate(parts)


def to_bbox(rles: Sequence[RLE]) -> np.ndarray:
    """N RLEs -> [N, 4] tight COCO xywh boxes (float32); an empty mask gives zeros."""
    if len(rles) == 0:
        return np.zeros((0, 4), np.float32)
    return np.asarray(mask_utils.toBbox([as_bytes(r) for r in rles]), dtype=np.float32).reshape(-1, 4)


def iou(a: Sequence[RLE], b: Sequence[RLE]) -> np.ndarray:
    """Pairwise mask IoU of N and M RLEs (same size) -> [N, M] float64."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float64)
    out = mask_utils.iou([as_bytes(r) for r in a], [as_bytes(r) for r in b], [0] * len(b))
    return np.asarray(out, dtype=np.float64).reshape(len(a), len(b))


def paste_soft_mask(
    probs: np.ndarray, box_xyxy: Sequence[float], height: int, width: int, threshold: float = 0.5
) -> RLE:
    """Resample an [S, S] box-frame probability map into its box and threshold it -> full-frame RLE.

    The map's pixel grid spans the box exactly (pixel centres at the box's S x S cell centres).
    Only pixels whose centres lie inside the box are filled, so a fractional box never grows.
    """
    check_shape(probs, ["S", "S"], "probs")
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    # Pixels whose centres (i + 0.5) lie inside [x0, x1): i in [ceil(x0 - 0.5), ceil(x1 - 0.5)).
    ix0, iy0 = int(np.ceil(x0 - 0.5)), int(np.ceil(y0 - 0.5))
    ix1, iy1 = int(np.ceil(x1 - 0.5)), int(np.ceil(y1 - 0.5))
    ix0, iy0 = max(ix0, 0), max(iy0, 0)
    ix1, iy1 = min(ix1, width), min(iy1, height)
    if ix1 <= ix0 or iy1 <= iy0 or x1 <= x0 or y1 <= y0:
        return encode_local(np.zeros((0, 0), bool), 0, 0, height, width)
    local = resample_box_frame(probs, (x0, y0, x1, y1), (ix0, iy0, ix1, iy1)) >= threshold
    return encode_local(local, ix0, iy0, height, width)


def resample_box_frame(
    probs: np.ndarray, box_xyxy: Sequence[float], region_xyxy: Sequence[int]
) -> np.ndarray:
    """Bilinearly sample an [S, S] box-frame map at the pixel centres of an integer region.

    ``box_xyxy`` is the (float) box the map spans; ``region_xyxy`` the integer pixel window to fill.
    Returns float32 [region h, region w]; points outside the box read the border value.
    """
    x0, y0, x1, y1 = box_xyxy
    rx0, ry0, rx1, ry1 = region_xyxy
    xs = (np.arange(rx0, rx1) + 0.5 - x0) / max(x1 - x0, 1e-6) * 2 - 1  # [-1, 1] over the box
    ys = (np.arange(ry0, ry1) + 0.5 - y0) / max(y1 - y0, 1e-6) * 2 - 1
    src = torch.from_numpy(probs.astype(np.float32))[None, None]
    out = F.grid_sample(src, _grid(xs, ys), mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, 0].numpy()


def region_pixels(maps: torch.Tensor, frames: torch.Tensor, regions: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """Frame maps [N, C, R, R] over xyxy ``frames`` [N, 4] read bilinearly (border value past the
    frame) at the pixel centres of integer ``regions`` (xyxy [N, 4]) grown by ``pad`` pixels per
    side -> [N, C, h + 2 pad, w + 2 pad], h and w the largest region's (smaller regions fill the
    top-left corner; the rest reads on past their region)."""
    n = maps.shape[0]
    hw = regions[:, 2:] - regions[:, :2]
    w, h = int(hw[:, 0].max()) + 2 * pad, int(hw[:, 1].max()) + 2 * pad
    ar = torch.arange(max(w, h), dtype=frames.dtype, device=frames.device) + 0.5 - pad
    gx = ((regions[:, 0:1].to(frames.dtype) + ar[:w]) - frames[:, 0:1]) / (frames[:, 2:3] - frames[:, 0:1]) * 2 - 1
    gy = ((regions[:, 1:2].to(frames.dtype) + ar[:h]) - frames[:, 1:2]) / (frames[:, 3:4] - frames[:, 1:2]) * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(n, h, w), gy[:, :, None].expand(n, h, w)], -1)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)


def box_maps_to_frames(maps: torch.Tensor, boxes: torch.Tensor, frames: torch.Tensor, size: int) -> torch.Tensor:
    """Box-frame maps [N, S, S] spanning xyxy ``boxes`` [N, 4] (pixels), sampled bilinearly at
    the ``size`` x ``size`` cell centres of xyxy ``frames`` [N, 4] (zero outside each box) ->
    [N, size, size] (the refiner's coarse map of an instance, from its box-frame soft mask)."""
    c = (torch.arange(size, dtype=frames.dtype, device=frames.device) + 0.5) / size
    xs = frames[:, None, 0] + c[None] * (frames[:, 2] - frames[:, 0])[:, None]  # [N, size] image x of the cell centres
    ys = frames[:, None, 1] + c[None] * (frames[:, 3] - frames[:, 1])[:, None]
    gx = (xs - boxes[:, None, 0]) / (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-6)[:, None] * 2 - 1  # in the box frame
    gy = (ys - boxes[:, None, 1]) / (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-6)[:, None] * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(-1, size, -1), gy[:, :, None].expand(-1, -1, size)], -1)
    return F.grid_sample(maps[:, None].to(frames.dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


def tight_frames(keep: torch.Tensor, maps: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per map of a padded region stack: the tight box of its kept pixels (``keep`` bool
    [M, h, w]) and the maps [M, C, h, w] sampled bilinearly at the ``size`` x ``size`` cell
    centres of that box (zero past the stack) -> (tight xyxy [M, 4] float in region pixels,
    frames [M, C, size, size], nonempty bool [M]; an empty map's box and frame are meaningless)."""
    m, h, w = keep.shape
    rows, cols = keep.any(2), keep.any(1)  # [M, h], [M, w]
    ty0, tx0 = rows.to(torch.uint8).argmax(1), cols.to(torch.uint8).argmax(1)
    ty1, tx1 = h - rows.flip(1).to(torch.uint8).argmax(1), w - cols.flip(1).to(torch.uint8).argmax(1)
    tight = torch.stack([tx0, ty0, tx1, ty1], 1).to(maps.dtype)
    c = (torch.arange(size, dtype=maps.dtype, device=maps.device) + 0.5) / size
    gx = (tight[:, 0:1] + c * (tight[:, 2:3] - tight[:, 0:1])) / w * 2 - 1  # [M, size]
    gy = (tight[:, 1:2] + c * (tight[:, 3:4] - tight[:, 1:2])) / h * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(-1, size, -1), gy[:, :, None].expand(-1, -1, size)], -1)
    frames = F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return tight, frames, rows.any(1)


def in_regions(regions: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Which cells of [N, h, w] region maps (``region_pixels`` with no pad) lie inside each
    integer region (xyxy [N, 4]) -> bool [N, h, w]."""
    hw = regions[:, 2:] - regions[:, :2]
    return ((torch.arange(w, device=regions.device)[None, None, :] < hw[:, None, 0:1])
            & (torch.arange(h, device=regions.device)[None, :, None] < hw[:, None, 1:2]))


def crop_to_box_frame(mask: np.ndarray, box_xyxy: Sequence[float], size: int = 28) -> np.ndarray:
    """Sample a dense [H, W] mask (or a stack [C, H, W] of maps) into an [size, size] (or
    [C, size, size]) float map spanning ``box_xyxy``."""
    if mask.ndim != 3:
        check_shape(mask, ["H", "W"], "mask")
        return crop_to_box_frame(mask[None], box_xyxy, size)[0]
    h, w = mask.shape[-2:]
    x0, y0, x1, y1 = box_xyxy
    cx = x0 + (np.arange(size) + 0.5) * (x1 - x0) / size
    cy = y0 + (np.arange(size) + 0.5) * (y1 - y0) / size
    src = torch.from_numpy(mask.astype(np.float32))[None]
    return F.grid_sample(src, _grid(cx / w * 2 - 1, cy / h * 2 - 1), mode="bilinear", padding_mode="zeros",
                         align_corners=False)[0].numpy()


def _grid(gx: np.ndarray, gy: np.ndarray) -> torch.Tensor:
    """A separable grid_sample grid [1, len(gy), len(gx), 2] (x, y in [-1, 1])."""
    grid = np.empty((1, len(gy), len(gx), 2), np.float32)
    grid[0, :, :, 0] = gx[None, :]
    grid[0, :, :, 1] = gy[:, None]
    return torch.from_numpy(grid)


def _as_str(rle: RLE) -> RLE:
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def as_bytes(rle: RLE) -> RLE:
    """The RLE with ``counts`` as bytes, as pycocotools wants."""
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}
