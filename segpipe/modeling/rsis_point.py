"""RSIS's ``point`` decoder variant: each step first points at one object, then segments it.

Per step, a centre heat map (stride ``point_stride``) read from the ConvLSTM hidden state, the
decoder features and the canvas marks the objects not yet emitted; the step takes its peak
(training: the remaining object it rates highest) and a mask head, conditioned on that point by
relative coordinates, a Gaussian bump and a FiLM modulation from the features at the point,
emits that object's mask. The heat map is trained by the CenterNet focal loss (Zhou, Wang,
Kraehenbuehl, "Objects as Points", 2019) towards Gaussian peaks at the remaining objects' most
interior pixels. Not in the RSIS paper: it replaces the set loss's permutation search by the
step's own choice, which is what makes the decoder trainable from scratch on a CPU budget.

Pure pieces first (points, heat targets, the focal loss, coordinate maps), then the heads.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt
from torch import nn


def interior_points(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """bool [N, H, W] -> (points float [N, 2] as (y, x) pixel centres of each instance's most
    interior pixel, the distance-transform maximum (a ring's lies on the ring); radii float [N],
    that maximum in pixels (0 for an empty instance); per instance the flat pixel indices whose
    distance is at least half the maximum: the "core" that training samples fed points from)."""
    n = masks.shape[0]
    points = np.zeros((n, 2), dtype=np.float32)
    radii = np.zeros(n, dtype=np.float32)
    cores: list[np.ndarray] = []
    for j in range(n):
        if not masks[j].any():
            cores.append(np.zeros(0, dtype=np.int64))
            continue
        dist = distance_transform_edt(np.pad(masks[j], 1))[1:-1, 1:-1]
        k = int(dist.argmax())
        points[j] = np.unravel_index(k, dist.shape)
        radii[j] = dist.flat[k]
        cores.append(np.flatnonzero(dist >= max(1.0, 0.5 * radii[j])))
    return points, radii, cores


def sample_points(points: np.ndarray, cores: list[np.ndarray], width: int, rng: np.random.Generator,
                  jitter: bool) -> np.ndarray:
    """float [N, 2] (y, x): with ``jitter`` a random core pixel per instance (inference takes the
    heat map's peak, which need not be the most interior pixel), else ``points``."""
    if not jitter:
        return points.copy()
    out = points.copy()
    for j, core in enumerate(cores):
        if core.size:
            k = int(core[rng.integers(core.size)])
            out[j] = (k // width, k % width)
    return out


def cell_of(points: torch.Tensor, stride: int, grid: tuple[int, int]) -> torch.Tensor:
    """float [N, 2] (y, x) pixels -> int64 [N] flat index of the stride-``stride`` cell holding each."""
    gy = (points[:, 0] // stride).long().clamp(0, grid[0] - 1)
    gx = (points[:, 1] // stride).long().clamp(0, grid[1] - 1)
    return gy * grid[1] + gx


def cell_centre(cells: torch.Tensor, stride: int, grid_width: int) -> torch.Tensor:
    """int64 [B] flat cells -> float [B, 2] (y, x) pixel coordinates of their centres."""
    gy, gx = cells // grid_width, cells % grid_width
    return torch.stack([gy, gx], 1).float() * stride + (stride - 1) / 2.0


def heat_targets(points: torch.Tensor, radii: torch.Tensor, grid: tuple[int, int], stride: int) -> torch.Tensor:
    """Per instance a Gaussian on the stride-``stride`` grid, float [N, h, w] in [0, 1]: centred
    on its point, sigma = max(0.75 cell, radius / 2) in pixels, exactly 1 at the cell that holds
    the point (the focal loss's positive)."""
    n = points.shape[0]
    h, w = grid
    if n == 0:
        return points.new_zeros((0, h, w))
    ys = torch.arange(h, device=points.device, dtype=torch.float32) * stride + (stride - 1) / 2.0
    xs = torch.arange(w, device=points.device, dtype=torch.float32) * stride + (stride - 1) / 2.0
    sigma = torch.clamp(radii / 2.0, min=0.75 * stride)[:, None, None]
    d2 = (ys[None, :, None] - points[:, 0, None, None]) ** 2 + (xs[None, None, :] - points[:, 1, None, None]) ** 2
    g = torch.exp(-d2 / (2.0 * sigma ** 2))
    flat = g.flatten(1)
    flat[torch.arange(n, device=points.device), cell_of(points, stride, grid)] = 1.0
    return flat.reshape(n, h, w)


def focal_heat_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss of heat ``logits`` against ``target`` ([..., h, w],
    1 at peaks), per map: summed over h, w and divided by the map's number of peaks (at least
    1). [h, w] -> scalar, [B, h, w] -> [B]."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = (target >= 1.0).to(logits.dtype)
    terms = pos * (1 - p) ** alpha * torch.log(p) + (1 - pos) * (1 - target) ** beta * p ** alpha * torch.log(1 - p)
    return -terms.flatten(-2).sum(-1) / pos.flatten(-2).sum(-1).clamp(min=1)


def relative_coords(points: torch.Tensor, size: tuple[int, int], stride: int, scale: float) -> torch.Tensor:
    """float [B, 2] (y, x) image pixels -> float [B, 3, h, w] on the stride-``stride`` grid of
    ``size`` = (h, w): (y - py) / scale, (x - px) / scale and the bump exp(-d^2 / 2 scale^2 x 16)."""
    h, w = size
    ys = torch.arange(h, device=points.device, dtype=torch.float32) * stride + (stride - 1) / 2.0
    xs = torch.arange(w, device=points.device, dtype=torch.float32) * stride + (stride - 1) / 2.0
    dy = (ys[None, :, None] - points[:, 0, None, None]).expand(-1, h, w) / scale
    dx = (xs[None, None, :] - points[:, 1, None, None]).expand(-1, h, w) / scale
    bump = torch.exp(-(dy ** 2 + dx ** 2) * 8.0)
    return torch.stack([dy, dx, bump], 1)


def sample_at(features: torch.Tensor, points: torch.Tensor, stride: int) -> torch.Tensor:
    """Bilinear read of ``features`` [B, C, h, w] (a stride-``stride`` map) at ``points`` [B, 2]
    (y, x) image pixels -> [B, C]."""
    h, w = features.shape[-2:]
    gy = (points[:, 0] - (stride - 1) / 2.0) / stride
    gx = (points[:, 1] - (stride - 1) / 2.0) / stride
    grid = torch.stack([gx / max(w - 1, 1) * 2 - 1, gy / max(h - 1, 1) * 2 - 1], 1)[:, None, None, :]
    return F.grid_sample(features, grid.to(features.dtype), align_corners=True)[:, :, 0, 0]


# --- the heads -----------------------------------------------------------------------------------


def film_linear(cin: int, width: int) -> nn.Linear:
    """The FiLM generator: features [B, cin] at the point -> (gamma, beta) [B, 2 x width], started
    near the identity (weights x 0.1, zero bias)."""
    lin = nn.Linear(cin, 2 * width)
    with torch.no_grad():
        lin.weight.mul_(0.1)
        lin.bias.zero_()
    return lin


def film(h: torch.Tensor, gamma_beta: torch.Tensor) -> torch.Tensor:
    """relu(h x (1 + gamma) + beta): ``h`` [B, W, h, w], ``gamma_beta`` [B, 2W] -> [B, W, h, w]."""
    gamma, beta = gamma_beta.chunk(2, 1)
    return torch.relu(h * (1.0 + gamma[:, :, None, None]) + beta[:, :, None, None])


class PointHeads(nn.Module):
    """The point variant's per-step heads.

    ``heat(dec, hidden, side)``: decoder features at the heat stride [B, heat_channels, h, w],
    the finest ConvLSTM hidden state resampled there [B, hidden, h, w] and the side maps (canvas,
    uncovered foreground) [B, side, h, w] -> heat logits [B, h, w].
    ``mask(dec, hidden, side, points, stride)``: the same on the mask grid (decoder features
    [B, mask_channels, h2, w2] at ``stride``) plus the chosen points [B, 2] (y, x) pixels -> mask
    logits [B, h2, w2]."""

    def __init__(self, heat_channels: int, mask_channels: int, hidden: int, side: int, width: int,
                 coord_scale: float, flat_mask: bool = True) -> None:
        super().__init__()
        self.coord_scale = coord_scale
        self.heat_head = nn.Sequential(nn.Conv2d(heat_channels + hidden + side, width, 3, padding=1), nn.ReLU(inplace=True),
                                       nn.Conv2d(width, 1, 1))
        with torch.no_grad():
            self.heat_head[-1].bias.fill_(-2.19)  # CenterNet's prior: sigmoid = 0.1
        if not flat_mask:  # the pyramid head (PyramidMaskHead) emits the masks
            return
        self.mask_in = nn.Conv2d(mask_channels + hidden + side + 3, width, 3, padding=1)
        self.film = film_linear(mask_channels + hidden, width)
        self.mask_out = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(width, 1, 1))

    def heat(self, dec: torch.Tensor, hidden: torch.Tensor, side: torch.Tensor | None) -> torch.Tensor:
        parts = [dec, hidden] + ([side] if side is not None else [])
        return self.heat_head(torch.cat(parts, 1))[:, 0]

    def mask(self, dec: torch.Tensor, hidden: torch.Tensor, side: torch.Tensor | None, points: torch.Tensor,
             stride: int) -> torch.Tensor:
        coords = relative_coords(points, tuple(dec.shape[-2:]), stride, self.coord_scale)
        parts = [dec, hidden] + ([side] if side is not None else []) + [coords]
        h = self.mask_in(torch.cat(parts, 1))
        h = film(h, self.film(sample_at(torch.cat([dec, hidden], 1), points, stride)))
        return self.mask_out(h)[:, 0]


class PyramidMaskHead(nn.Module):
    """The ``pyramid`` point-conditioned mask head: from the finest LSTM level's stride ``s0`` down
    to stride 2, halving per level.

    ``forward(decs, hidden, side, points)``: ``decs`` the U-Net decoder's features per stride
    {s: [B, C_s, Hp/s, Wp/s]} for s = s0, s0/2, ..., 2; ``hidden`` the finest hidden state
    [B, hidden, Hp/s0, Wp/s0]; ``side`` the side maps at stride 2 [B, side, Hp/2, Wp/2]; ``points``
    [B, 2] (y, x) pixels -> mask logits [B, Hp/2, Wp/2]. The first level sees the decoder
    features, the hidden state, the side maps and the relative coordinates, FiLM-modulated by the
    features at the point, through two 3x3 convolutions (a 5 x 5 cell window: 40 px at stride 8);
    each finer level upsamples, adds its decoder features, side maps and coordinates, one 3x3
    convolution. Costs about half the flat head's stride-2 pair at the same width."""

    def __init__(self, channels: dict[int, int], hidden: int, side: int, width: int, coord_scale: float) -> None:
        super().__init__()
        self.strides = sorted(channels, reverse=True)
        self.coord_scale = coord_scale
        s0 = self.strides[0]
        self.first = nn.Conv2d(channels[s0] + hidden + side + 3, width, 3, padding=1)
        self.film = film_linear(channels[s0] + hidden, width)
        self.second = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True))
        self.ups = nn.ModuleList()
        cin = width
        for s in self.strides[1:]:
            cout = max(width // 2, 8) if s == 2 else width
            self.ups.append(nn.Sequential(nn.Conv2d(cin + channels[s] + side + 3, cout, 3, padding=1), nn.ReLU(inplace=True)))
            cin = cout
        self.out = nn.Conv2d(cin, 1, 1)

    def forward(self, decs: dict[int, torch.Tensor], hidden: torch.Tensor, side: torch.Tensor | None,
                points: torch.Tensor) -> torch.Tensor:
        def at(s: int) -> list[torch.Tensor]:
            size = tuple(decs[s].shape[-2:])
            parts = [] if side is None else [F.adaptive_avg_pool2d(side, size) if s != 2 else side]
            return parts + [relative_coords(points, size, s, self.coord_scale)]

        s0 = self.strides[0]
        h = self.first(torch.cat([decs[s0], hidden, *at(s0)], 1))
        h = self.second(film(h, self.film(sample_at(torch.cat([decs[s0], hidden], 1), points, s0))))
        for s, up in zip(self.strides[1:], self.ups):
            h = F.interpolate(h, size=decs[s].shape[-2:], mode="bilinear", align_corners=False)
            h = up(torch.cat([h, decs[s], *at(s)], 1))
        return self.out(h)[:, 0]
