"""Polar mask representation (PolarMask): pure numpy geometry, no torch, no I/O.

Coordinates are continuous image coordinates in pixels: x to the right, y down, the centre of
pixel (row r, column c) at (c + 0.5, r + 0.5). Ray k points at angle 2*pi*k/n (k = 0: +x,
n/4: +y). A polar mask is an origin (x, y) and n ray lengths; its contour is the polygon through
origin + d_k * (cos, sin)(angle_k).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segpipe.ops import masks as mask_ops
from segpipe.ops.shapes import check_shape


def ray_angles(n_rays: int) -> np.ndarray:
    """float64 [n] angles in radians, 2*pi*k/n."""
    return np.arange(n_rays, dtype=np.float64) * (2 * np.pi / n_rays)


def mass_centre(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) mean of the pixel centres of a non-empty [H, W] mask."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        raise ValueError("mass_centre of an empty mask")
    return float(xs.mean() + 0.5), float(ys.mean() + 0.5)


def ray_distances(mask: np.ndarray, origins: np.ndarray, n_rays: int, *, step: float = 0.5) -> np.ndarray:
    """Length of each ray from each origin to the mask's outer contour -> float32 [P, n].

    ``mask`` [H, W] (any dtype, nonzero = inside); ``origins`` [P, 2] xy. Along each ray the
    farthest sample (spacing ``step``) whose pixel is inside counts (the paper's rule when a ray
    crosses the contour several times), plus ``step / 2``; a ray that never meets the mask is 0.
    """
    check_shape(mask, ["H", "W"], "mask")
    origins = np.asarray(origins, np.float64).reshape(-1, 2)
    h, w = mask.shape
    if origins.shape[0] == 0:
        return np.zeros((0, n_rays), np.float32)
    corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], np.float64)
    reach = np.sqrt(((origins[:, None, :] - corners[None]) ** 2).sum(-1)).max()
    t = np.arange(0.0, reach + step, step)  # [T]
    a = ray_angles(n_rays)
    dx, dy = np.cos(a), np.sin(a)
    xs = origins[:, 0, None, None] + t[None, None, :] * dx[None, :, None]  # [P, n, T]
    ys = origins[:, 1, None, None] + t[None, None, :] * dy[None, :, None]
    ix, iy = np.floor(xs).astype(np.int64), np.floor(ys).astype(np.int64)
    valid = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    inside = np.zeros(valid.shape, bool)
    inside[valid] = mask[iy[valid], ix[valid]] != 0
    far = np.where(inside, t[None, None, :], -1.0).max(-1)  # [P, n]
    return np.where(far >= 0, far + step / 2, 0.0).astype(np.float32)


def polar_centerness(dists: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """sqrt(min_k d_k / max_k d_k) over the last axis: 1 for a circle about its centre, -> 0 off-centre."""
    d = np.asarray(dists, np.float64)
    return np.sqrt(d.min(-1) / np.maximum(d.max(-1), eps)).astype(np.float32)


def rays_to_polygons(origins: np.ndarray, dists: np.ndarray) -> np.ndarray:
    """origins [N, 2] xy, dists [N, n] -> contour vertices float32 [N, n, 2] xy."""
    origins = np.asarray(origins, np.float64).reshape(-1, 2)
    dists = np.asarray(dists, np.float64)
    check_shape(dists, ["N", "n"], "dists")
    a = ray_angles(dists.shape[1])
    xs = origins[:, 0, None] + dists * np.cos(a)[None]
    ys = origins[:, 1, None] + dists * np.sin(a)[None]
    return np.stack([xs, ys], -1).astype(np.float32)


def polygons_to_rles(polygons: np.ndarray, height: int, width: int) -> list[dict]:
    """[N, n, 2] xy polygons -> COCO RLEs of size (height, width) (pycocotools rasterisation)."""
    from pycocotools import mask as mu

    polygons = np.asarray(polygons, np.float64)
    if len(polygons) == 0:
        return []
    rles = mu.frPyObjects([p.reshape(-1).tolist() for p in polygons], height, width)
    for r in rles:
        if isinstance(r["counts"], bytes):
            r["counts"] = r["counts"].decode("ascii")
    return rles


def polygon_soft_mask(polygon: np.ndarray, box: np.ndarray, size: int = 28, supersample: int = 4) -> np.ndarray:
    """Fraction of each cell of a ``size`` x ``size`` grid over ``box`` (xyxy) that the polygon
    covers -> float32 [size, size] in [0, 1] (the box-frame soft mask of the Instances contract).
    Rasterised like the hard mask (pycocotools) at ``supersample`` x the grid, then averaged."""
    x1, y1, x2, y2 = (float(v) for v in box)
    k = size * supersample
    scale = np.array([k / max(x2 - x1, 1e-6), k / max(y2 - y1, 1e-6)])
    local = (np.asarray(polygon, np.float64) - [x1, y1]) * scale
    fine = mask_ops.decode(polygons_to_rles(local[None], k, k))[0].astype(np.float32)
    return fine.reshape(size, supersample, size, supersample).mean((1, 3))


@dataclass
class PolarTargets:
    """Per-location training targets over all levels concatenated (level-major, row-major).

    labels int64 [L] (0 = background, else 1-based class); rays float32 [L, n] (0 where
    background); instance int64 [L] (index of the assigned instance, -1 = background)."""

    labels: np.ndarray
    rays: np.ndarray
    instance: np.ndarray


def level_locations(shapes: list[tuple[int, int]], strides: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Location centres of feature maps ``shapes`` [(h, w)] at ``strides`` -> (xy float64 [L, 2],
    level index int64 [L]); location (i, j) at stride s sits at (j*s + s/2, i*s + s/2)."""
    xy, lv = [], []
    for k, ((h, w), s) in enumerate(zip(shapes, strides)):
        yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        xy.append(np.stack([xx.ravel() * s + s / 2, yy.ravel() * s + s / 2], 1))
        lv.append(np.full(h * w, k, np.int64))
    return np.concatenate(xy).astype(np.float64), np.concatenate(lv)


def ignored_locations(ignore: np.ndarray, shapes: list[tuple[int, int]], strides: list[int]) -> np.ndarray:
    """bool [L]: the locations (as ``level_locations`` orders them) whose centre pixel lies in
    ``ignore`` (bool [H, W], the image's ignore regions); centres outside the image are not ignored."""
    check_shape(ignore, ["H", "W"], "ignore")
    xy, _ = level_locations(shapes, strides)
    px = np.floor(xy).astype(np.int64)
    inside = (px[:, 0] < ignore.shape[1]) & (px[:, 1] < ignore.shape[0])
    out = np.zeros(len(xy), bool)
    out[inside] = ignore[px[inside, 1], px[inside, 0]]
    return out


def polar_targets(masks: np.ndarray, labels: np.ndarray, shapes: list[tuple[int, int]], strides: list[int], *,
                  size_ranges: list[float], center_radius: float, n_rays: int) -> PolarTargets:
    """Assign instances to locations, PolarMask style.

    masks uint8 [N, H, W]; labels int64 [N] (1-based). Each instance goes to the level whose
    range holds its longest ray from the mass centre (levels split at ``size_ranges``). Its
    positives are that level's locations inside the mask and within ``center_radius * stride``
    (per axis) of the mass centre, or the location nearest the centre if none is. A location
    claimed by several instances takes the smallest. Rays are measured from each positive location.
    """
    check_shape(masks, ["N", "H", "W"], "masks")
    xy, lv = level_locations(shapes, strides)
    n_loc = len(xy)
    out_labels = np.zeros(n_loc, np.int64)
    out_rays = np.zeros((n_loc, n_rays), np.float32)
    out_inst = np.full(n_loc, -1, np.int64)
    best_area = np.full(n_loc, np.inf)
    offsets = np.cumsum([0] + [h * w for h, w in shapes])
    for k, m in enumerate(masks):
        area = int(m.sum())
        if area == 0:
            continue
        ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        crop = m[y0:y1, x0:x1]
        cx, cy = mass_centre(m)
        longest = float(ray_distances(crop, np.array([[cx - x0, cy - y0]]), n_rays).max())
        level = int(np.searchsorted(size_ranges, longest, side="left"))
        level = min(level, len(strides) - 1)
        s = strides[level]
        sel = np.arange(offsets[level], offsets[level + 1])
        lxy = xy[sel]
        near = (np.abs(lxy[:, 0] - cx) <= center_radius * s) & (np.abs(lxy[:, 1] - cy) <= center_radius * s)
        cand = sel[near]
        if cand.size:
            px = np.floor(xy[cand]).astype(np.int64)
            ok = (px[:, 0] >= 0) & (px[:, 0] < m.shape[1]) & (px[:, 1] >= 0) & (px[:, 1] < m.shape[0])
            cand = cand[ok]
            px = px[ok]
            cand = cand[m[px[:, 1], px[:, 0]] != 0]
        if cand.size == 0:
            cand = sel[[int(np.argmin(((lxy - [cx, cy]) ** 2).sum(1)))]]
        cand = cand[area < best_area[cand]]
        if cand.size == 0:
            continue
        best_area[cand] = area
        out_labels[cand] = labels[k]
        out_inst[cand] = k
        out_rays[cand] = ray_distances(crop, xy[cand] - [x0, y0], n_rays)
    return PolarTargets(labels=out_labels, rays=out_rays, instance=out_inst)
