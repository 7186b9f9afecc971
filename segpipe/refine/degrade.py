"""Coarse masks made from ground truth, to train the refiner: pure functions on box-frame maps.

Every map here is float [S, S] (or [N, S, S]) over an instance's expanded box ("the frame"),
values in [0, 1]. A degradation imitates what segmentation models hand to the refiner: a mask
seen at low resolution, a boundary a few pixels off, a polygon with few vertices, or the fused
average of several disagreeing members (which also gives a disagreement map).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from segpipe.ops import polar

KINDS = ("lowres", "morph", "polygon", "fused")
MILD_KINDS = ("cells", "nudge", "half_morph", "fused_mild")


def lowres(frame: torch.Tensor, side: int) -> torch.Tensor:
    """[N, S, S] -> the same seen at ``side`` x ``side`` (area average) and upsampled bilinearly."""
    s = frame.shape[-1]
    small = F.adaptive_avg_pool2d(frame[:, None], side)
    return F.interpolate(small, size=(s, s), mode="bilinear", align_corners=False)[:, 0]


def morph(frame: torch.Tensor, radius: int) -> torch.Tensor:
    """[N, S, S] thresholded at 0.5, then dilated (``radius`` > 0) or eroded (< 0) by |radius|
    cells with a square element -> float {0, 1}."""
    m = (frame >= 0.5).float()[:, None]
    k = 2 * abs(radius) + 1
    if radius > 0:
        m = F.max_pool2d(m, k, stride=1, padding=abs(radius))
    elif radius < 0:
        m = -F.max_pool2d(-m, k, stride=1, padding=abs(radius))
    return m[:, 0]


def shift(frame: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """[N, S, S] moved by (dx, dy) cells, zeros shifted in."""
    out = torch.zeros_like(frame)
    s = frame.shape[-1]
    xs, xd = (slice(0, s - dx), slice(dx, s)) if dx >= 0 else (slice(-dx, s), slice(0, s + dx))
    ys, yd = (slice(0, s - dy), slice(dy, s)) if dy >= 0 else (slice(-dy, s), slice(0, s + dy))
    out[:, yd, xd] = frame[:, ys, xs]
    return out


def polygon(frame: np.ndarray, n_rays: int) -> np.ndarray:
    """[S, S] -> its star-shaped polygon with ``n_rays`` vertices from the mass centre,
    rasterised as cell coverage (holes and hidden parts are lost, corners cut)."""
    s = frame.shape[-1]
    m = frame >= 0.5
    if not m.any():
        return np.zeros_like(frame, dtype=np.float32)
    cx, cy = polar.mass_centre(m)
    d = polar.ray_distances(m, np.array([[cx, cy]]), n_rays)
    poly = polar.rays_to_polygons(np.array([[cx, cy]]), d)[0]
    return polar.polygon_soft_mask(poly, np.array([0.0, 0.0, s, s]), s, supersample=2)


def degrade(frames: torch.Tensor, generator: torch.Generator, mild: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground-truth frames [N, S, S] in [0, 1] -> (coarse probabilities [N, S, S], disagreement
    [N, S, S] in [0, 0.5]: the std of the fused copies, 0 for single degradations). Each frame
    gets one of ``KINDS`` at random: lowres (side 4..S/2), morph (radius -2..2), polygon
    (6..16 rays), fused (3 copies, each shifted by up to 2 cells and morphed by up to 1); or,
    with probability ``mild``, one of ``MILD_KINDS``, the sub-cell errors of a good model's or an
    ensemble's mask seen through its S x S soft mask: cells (the frame as it is), nudge (half
    way to a copy shifted by one cell), half_morph (half way to a copy dilated or eroded by one
    cell), fused_mild (3 copies shifted by up to 1 cell)."""
    n, s = frames.shape[0], frames.shape[-1]
    coarse = torch.empty_like(frames)
    spread = torch.zeros_like(frames)
    kinds = torch.randint(len(KINDS), (n,), generator=generator).tolist()
    gentle = (torch.rand(n, generator=generator) < mild).tolist()

    def rint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=generator))

    for i, kind in enumerate(kinds):
        f = frames[i : i + 1]
        if gentle[i]:
            name = MILD_KINDS[kind % len(MILD_KINDS)]
            if name == "cells":
                coarse[i] = f[0]
            elif name == "nudge":
                dx, dy = (rint(-1, 1), 0) if rint(0, 1) else (0, rint(-1, 1))
                coarse[i] = 0.5 * (f[0] + shift(f, dx, dy)[0])
            elif name == "half_morph":
                coarse[i] = 0.5 * (f[0] + morph(f, 1 if rint(0, 1) else -1)[0])
            else:
                copies = torch.stack([shift(f, rint(-1, 1), rint(-1, 1))[0] for _ in range(3)])
                coarse[i], spread[i] = copies.mean(0), copies.std(0, unbiased=False)
            continue
        if KINDS[kind] == "lowres":
            coarse[i] = lowres(f, rint(4, max(4, s // 2)))[0]
        elif KINDS[kind] == "morph":
            coarse[i] = lowres(morph(f, rint(-2, 2)), s // 2)[0]  # softened edge
        elif KINDS[kind] == "polygon":
            coarse[i] = torch.from_numpy(polygon(f[0].cpu().numpy(), rint(6, 16))).to(frames)
        else:
            copies = torch.stack([morph(shift(f, rint(-2, 2), rint(-2, 2)), rint(-1, 1))[0] for _ in range(3)])
            coarse[i], spread[i] = copies.mean(0), copies.std(0, unbiased=False)
    return coarse.clamp(0.0, 1.0), spread
