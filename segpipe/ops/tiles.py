"""Sliding-window tiling: tile plans, shifting tile predictions to the image, merging them.

Pure functions. Masks stay RLE throughout (``ops.masks.encode_local`` shifts a tile mask into
the image in O(tile + image width)), so memory follows instances x their own size, never
instances x image pixels.

Ownership: tiles overlap; the overlaps are split at their middles into *cores* that partition
the image. An instance found whole in a tile (not touching an edge of the tile that lies inside
the image) is kept by the tile whose core holds its box centre. An instance cut by an internal
tile edge is dropped when a kept instance covers it (the neighbouring tile saw it whole);
otherwise it stays as a piece. Last, pieces and any remaining duplicates are merged greedily
on intersection-over-smaller (IoS), the union of their masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from pycocotools import mask as mask_utils

from segpipe.ops import masks as mask_ops
from segpipe.structures import Instances


@dataclass(frozen=True)
class Tile:
    """A window (x0, y0, x1, y1), pixels, half-open, and its core (the part of the image it
    owns; the cores of a plan partition the image)."""

    x0: int
    y0: int
    x1: int
    y1: int
    core: tuple[float, float, float, float]

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


def axis_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering [0, size) with at least ``overlap``
    pixels shared by neighbours, spread evenly and snapped so the last ends at ``size``. One
    tile (starting at 0, possibly shorter than ``tile``) when ``size <= tile``."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"tile {tile} and overlap {overlap}: need tile >= 1 and 0 <= overlap < tile")
    if size <= tile:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    span = size - tile
    return [round(i * span / (n - 1)) for i in range(n)]


def _cores(starts: list[int], tile: int, size: int) -> list[tuple[float, float]]:
    """Per tile along one axis, the [lo, hi) it owns: split each overlap at its middle."""
    ends = [min(s + tile, size) for s in starts]
    cuts = [(ends[i] + starts[i + 1]) / 2 for i in range(len(starts) - 1)]
    return [(0.0 if i == 0 else cuts[i - 1], float(size) if i == len(starts) - 1 else cuts[i]) for i in range(len(starts))]


def plan_tiles(height: int, width: int, tile: int, overlap: float) -> list[Tile]:
    """Tiles over an image, row-major. ``overlap`` is a ratio of ``tile`` in [0, 1)."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap ratio {overlap}: need 0 <= overlap < 1")
    ov = int(round(overlap * tile))
    xs, ys = axis_starts(width, tile, ov), axis_starts(height, tile, ov)
    cx, cy = _cores(xs, tile, width), _cores(ys, tile, height)
    return [Tile(x, y, min(x + tile, width), min(y + tile, height), (cx[i][0], cy[j][0], cx[i][1], cy[j][1]))
            for j, y in enumerate(ys) for i, x in enumerate(xs)]


def shift(inst: Instances, tile: Tile, height: int, width: int) -> Instances:
    """A tile's Instances (tile coordinates) -> image coordinates: boxes offset, masks re-encoded
    into the image frame from their tile-sized decoding. Soft masks (box frame) are unchanged."""
    if len(inst) == 0:
        return Instances(height=height, width=width, mask_probs=inst.mask_probs)
    masks = []
    for r, xywh in zip(inst.masks, np.rint(mask_ops.to_bbox(inst.masks)).astype(int)):
        bx, by, bw, bh = (int(v) for v in xywh)
        local = mask_ops.decode_region(r, (bx, by, bx + bw, by + bh))
        masks.append(mask_ops.encode_local(local, tile.x0 + bx, tile.y0 + by, height, width))
    boxes = inst.boxes + np.array([tile.x0, tile.y0, tile.x0, tile.y0], np.float32)
    return Instances(height=height, width=width, boxes=boxes.astype(np.float32), scores=inst.scores.copy(),
                     labels=inst.labels.copy(), masks=masks, mask_probs=None if inst.mask_probs is None else inst.mask_probs.copy())


def cut_by_internal_edge(boxes_xyxy: np.ndarray, tile: Tile, height: int, width: int, margin: float = 1.0) -> np.ndarray:
    """bool [N]: the box (image coordinates) touches an edge of ``tile`` that is not an image border."""
    b = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
    left = (tile.x0 > 0) & (b[:, 0] <= tile.x0 + margin)
    top = (tile.y0 > 0) & (b[:, 1] <= tile.y0 + margin)
    right = (tile.x1 < width) & (b[:, 2] >= tile.x1 - margin)
    bottom = (tile.y1 < height) & (b[:, 3] >= tile.y1 - margin)
    return left | top | right | bottom


def owns(boxes_xyxy: np.ndarray, tile: Tile) -> np.ndarray:
    """bool [N]: the box centre lies in the tile's core."""
    b = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    x0, y0, x1, y1 = tile.core
    return (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)


def overlapping_pairs(a_xyxy: np.ndarray, b_xyxy: np.ndarray, cell: float = 256.0) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j) whose boxes intersect (positive area), found through a uniform grid
    of ``cell``-pixel buckets: O(N + M + pairs) memory instead of N x M."""
    a = np.asarray(a_xyxy, np.float64).reshape(-1, 4)
    b = np.asarray(b_xyxy, np.float64).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    buckets: dict[tuple[int, int], list[int]] = {}
    for j, (x0, y0, x1, y1) in enumerate(b):
        for gx in range(int(x0 // cell), int(max(x1 - 1e-9, x0) // cell) + 1):
            for gy in range(int(y0 // cell), int(max(y1 - 1e-9, y0) // cell) + 1):
                buckets.setdefault((gx, gy), []).append(j)
    pairs = set()
    for i, (x0, y0, x1, y1) in enumerate(a):
        for gx in range(int(x0 // cell), int(max(x1 - 1e-9, x0) // cell) + 1):
            for gy in range(int(y0 // cell), int(max(y1 - 1e-9, y0) // cell) + 1):
                for j in buckets.get((gx, gy), ()):
                    if (i, j) in pairs:
                        continue
                    bx0, by0, bx1, by1 = b[j]
                    if min(x1, bx1) > max(x0, bx0) and min(y1, by1) > max(y0, by0):
                        pairs.add((i, j))
    if not pairs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ij = np.array(sorted(pairs), np.int64)
    return ij[:, 0], ij[:, 1]


def sparse_ios(a_rles: Sequence[dict], a_xyxy: np.ndarray, b_rles: Sequence[dict], b_xyxy: np.ndarray) -> dict[tuple[int, int], float]:
    """{(i, j): IoS} over the pairs whose boxes intersect (all others are 0)."""
    ii, jj = overlapping_pairs(a_xyxy, b_xyxy)
    if len(ii) == 0:
        return {}
    area_a, area_b = mask_ops.area(list(a_rles)).astype(np.float64), mask_ops.area(list(b_rles)).astype(np.float64)
    out = {}
    for i in np.unique(ii):
        js = jj[ii == i]
        over = np.asarray(mask_utils.iou([mask_ops.as_bytes(a_rles[i])], [mask_ops.as_bytes(b_rles[j]) for j in js],
                                         [1] * len(js)), np.float64).reshape(-1)  # |a ∩ b| / |a|
        inter = over * area_a[i]
        smaller = np.minimum(area_a[i], area_b[js])
        for j, v, s in zip(js, inter, smaller):
            out[(int(i), int(j))] = float(v / s) if s > 0 else 0.0
    return out


def merge_greedy(inst: Instances, ios_thresh: float = 0.5, class_aware: bool = True,
                 sources: np.ndarray | None = None) -> Instances:
    """Greedy merge by score: each instance absorbs the lower-scoring ones (same class when
    ``class_aware``) whose IoS with it reaches ``ios_thresh``; the result's mask is the union, its
    box the union's box, its score and soft mask the leader's (re-framed to the new box).
    ``sources`` (int [N], e.g. the tile of each instance): a group takes at most one instance per
    source, so a model's own overlapping instances are never merged with each other."""
    n = len(inst)
    if n <= 1:
        return inst
    order = np.argsort(-inst.scores, kind="stable")
    ios = sparse_ios(inst.masks, inst.boxes, inst.masks, inst.boxes)
    near: dict[int, list[int]] = {}
    for (a, b), v in ios.items():
        if a != b and v >= ios_thresh:
            near.setdefault(a, []).append(b)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    used = np.zeros(n, bool)
    keep, masks, boxes, probs = [], [], [], []
    for i in order:
        if used[i]:
            continue
        used[i] = True
        group = [i]
        taken = {None if sources is None else int(sources[i])}
        for j in sorted(near.get(int(i), ()), key=lambda k: rank[k]):  # in score order, as a dense scan would
            src = None if sources is None else int(sources[j])
            if used[j] or (class_aware and inst.labels[j] != inst.labels[i]):
                continue
            if sources is not None and src in taken:
                continue
            used[j] = True
            group.append(j)
            taken.add(src)
        keep.append(i)
        if len(group) == 1:
            masks.append(inst.masks[i])
            boxes.append(inst.boxes[i])
            probs.append(None if inst.mask_probs is None else inst.mask_probs[i])
            continue
        union = mask_ops._as_str(mask_utils.merge([mask_ops.as_bytes(inst.masks[k]) for k in group], intersect=False))
        x, y, w, h = mask_ops.to_bbox([union])[0]
        box = np.array([x, y, x + w, y + h], np.float32)
        masks.append(union)
        boxes.append(box)
        probs.append(None if inst.mask_probs is None else _reframe(inst.mask_probs[i], inst.boxes[i], box))
    return Instances(height=inst.height, width=inst.width, boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                     scores=inst.scores[keep].copy(), labels=inst.labels[keep].copy(), masks=masks,
                     mask_probs=None if inst.mask_probs is None else np.stack(probs).astype(inst.mask_probs.dtype))


def _reframe(probs: np.ndarray, old_box: np.ndarray, new_box: np.ndarray) -> np.ndarray:
    """An [S, S] soft mask spanning ``old_box`` resampled to span ``new_box`` (0 outside the old box)."""
    s = probs.shape[0]
    x0, y0, x1, y1 = (float(v) for v in new_box)
    cx = x0 + (np.arange(s) + 0.5) * (x1 - x0) / s
    cy = y0 + (np.arange(s) + 0.5) * (y1 - y0) / s
    ox0, oy0, ox1, oy1 = (float(v) for v in old_box)
    u = (cx - ox0) / max(ox1 - ox0, 1e-6) * s - 0.5
    v = (cy - oy0) / max(oy1 - oy0, 1e-6) * s - 0.5
    inside = ((u >= -0.5) & (u <= s - 0.5))[None, :] & ((v >= -0.5) & (v <= s - 0.5))[:, None]
    ui, vi = np.clip(np.round(u).astype(int), 0, s - 1), np.clip(np.round(v).astype(int), 0, s - 1)
    return np.where(inside, probs.astype(np.float32)[vi[:, None], ui[None, :]], 0.0)


def merge_tiles(per_tile: Sequence[tuple[Tile, Instances]], height: int, width: int, *, ios_thresh: float = 0.5,
                class_aware: bool = True) -> Instances:
    """Tile predictions (tile coordinates) -> one image's Instances: shift, keep whole instances
    the tile owns, keep cut pieces no kept instance covers, then ``merge_greedy``."""
    whole, pieces, whole_src, piece_src = [], [], [], []
    for k, (tile, inst) in enumerate(per_tile):
        if len(inst) == 0:
            continue
        shifted = shift(inst, tile, height, width)
        cut = cut_by_internal_edge(shifted.boxes, tile, height, width)
        own = owns(shifted.boxes, tile)
        whole.append(shifted.select(np.nonzero(~cut & own)[0]))
        pieces.append(shifted.select(np.nonzero(cut)[0]))
        whole_src.append(np.full(len(whole[-1]), k))
        piece_src.append(np.full(len(pieces[-1]), k))
    kept, ksrc = _concat_with(whole, whole_src, height, width)
    cut, csrc = _concat_with(pieces, piece_src, height, width)
    if len(cut) and len(kept):
        drop = np.zeros(len(cut), bool)
        for (i, j), v in sparse_ios(cut.masks, cut.boxes, kept.masks, kept.boxes).items():
            if v >= ios_thresh and csrc[i] != ksrc[j] and (not class_aware or cut.labels[i] == kept.labels[j]):
                drop[i] = True  # seen whole by another tile
        cut, csrc = cut.select(np.nonzero(~drop)[0]), csrc[~drop]
    both, src = _concat_with([kept, cut], [ksrc, csrc], height, width)
    return merge_greedy(both, ios_thresh, class_aware, sources=src)


def _concat_with(parts: Sequence[Instances], srcs: Sequence[np.ndarray], height: int, width: int) -> tuple[Instances, np.ndarray]:
    """``concat`` that carries a per-instance source array along (same order)."""
    src = np.concatenate([s for p, s in zip(parts, srcs) if len(p)]) if any(len(p) for p in parts) else np.zeros(0, np.int64)
    parts = [p for p in parts if len(p)]
    if not parts:
        return Instances(height=height, width=width), src
    scores = np.concatenate([p.scores for p in parts])
    order = np.argsort(-scores, kind="stable")
    return concat(parts, height, width), src[order]


def concat(parts: Sequence[Instances], height: int, width: int) -> Instances:
    """Instances of one image concatenated (sorted by score, descending)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return Instances(height=height, width=width)
    probs = None if any(p.mask_probs is None for p in parts) else np.concatenate([p.mask_probs for p in parts])
    out = Instances(height=height, width=width, boxes=np.concatenate([p.boxes for p in parts]).astype(np.float32),
                    scores=np.concatenate([p.scores for p in parts]), labels=np.concatenate([p.labels for p in parts]),
                    masks=[m for p in parts for m in p.masks], mask_probs=probs)
    return out.select(np.argsort(-out.scores, kind="stable"))
