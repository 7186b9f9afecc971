"""A model-agnostic PointRend refiner (in the spirit of Kirillov, Wu, He, Girshick, CVPR 2020).

Unlike PointRend's head, which shares its detector's backbone, this refiner owns a light
feature network over the image (the embedding methods' small U-Net, ``feat_channels`` per
pixel) and refines any model's masks. Each instance is handled in its frame: its box grown by
``margin`` per side. Point head: an MLP (1x1 convolutions over points) on the fine features
bilinearly sampled at the point, with the coarse logit (and, with ``use_disagreement``, the
members' disagreement) appended to every layer's input.

Inference (``subdivide``): start from the coarse probabilities in the frame at ``coarse_size``;
each step doubles the resolution bilinearly and re-predicts the ``points`` cells whose logit is
closest to 0 (the most uncertain); each instance stops at its own size (at most ``output_size``).
With ``render: pixels`` the grid steps stop while the grid is still coarser than the frame's
pixels, and a last step (``render_pixels``) re-predicts the most uncertain *pixels* of the
image's own grid, so no prediction is resampled. Points whose logit is already ``certain`` are
skipped; the chosen points of all instances go through the head as one flat list.

Training (``forward`` with targets): ground-truth masks are sampled into jittered frames,
degraded into coarse masks (``degrade``), and the head learns the true mask at ``train_points``
per instance, ``importance`` of them the most uncertain of ``oversample`` x as many random
candidates, the rest uniform (the paper's sampling).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from segpipe.config import EmbedNetParams, PointRendParams
from segpipe.modeling.batching import pad_batch
from segpipe.modeling.embednet import EmbedUNet
from segpipe.modeling.instance_classifier import grow_boxes as grow  # the frame: the box grown by margin per side
from segpipe.modeling.instance_classifier import tight_boxes
from segpipe.ops.masks import box_maps_to_frames, in_regions, region_pixels
from segpipe.refine.degrade import degrade

EPS = 1e-4


def frame_to_image(uv: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Points in frame units [N, P, 2] (u, v in [0, 1]) -> image pixel coordinates [N, P, 2] (x, y)."""
    lo, size = frames[:, None, :2], (frames[:, 2:] - frames[:, :2])[:, None, :]
    return lo + uv * size


def image_to_frame(xy: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Inverse of ``frame_to_image``: image pixels [N, ..., 2] -> frame units (u, v) of xyxy
    ``frames`` [N, 4]."""
    shape = (frames.shape[0],) + (1,) * (xy.dim() - 2) + (2,)
    return (xy - frames[:, :2].reshape(shape)) / (frames[:, 2:] - frames[:, :2]).reshape(shape)


def image_grid(xy: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Image pixels [..., 2] (x, y) -> grid_sample coordinates [..., 2] of a ``height`` x ``width``
    map (align_corners=False: -1 and 1 are the outer pixel edges)."""
    return torch.stack([xy[..., 0] / width * 2 - 1, xy[..., 1] / height * 2 - 1], -1)


def sample_maps(maps: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear values of frame maps [N, S, S] at frame points [N, P, 2] (u, v in [0, 1]) -> [N, P]."""
    grid = (uv * 2 - 1)[:, :, None, :]  # [N, P, 1, 2]
    return F.grid_sample(maps[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0, :, 0]


def sample_masks(masks: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Full-image masks [N, H, W] read at points in image pixels [N, P, 2] (x, y; the pixel
    holding the point, 0 outside the image) -> [N, P]."""
    grid = image_grid(xy, *masks.shape[-2:])[:, :, None, :]
    return F.grid_sample(masks[:, None], grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0, :, 0]


def near_boundary(read, xy: torch.Tensor) -> torch.Tensor:
    """Whether each point [N, P, 2] (image pixels) lies within one pixel of its mask's boundary:
    ``read(xy)`` [N, P] differs between the point and one of its four neighbours one pixel away
    -> bool [N, P]."""
    centre = read(xy)
    near = torch.zeros_like(centre, dtype=torch.bool)
    for d in ((1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0)):
        near |= read(xy + xy.new_tensor(d)) != centre
    return near


def boundary_points(masks: torch.Tensor, frames: torch.Tensor, k: int, candidates: int) -> torch.Tensor:
    """``k`` random points per instance within one pixel of its mask's boundary (``masks``
    [N, H, W], float), drawn from ``candidates`` uniform points in its frame (xyxy [N, 4]);
    when too few candidates are near, the rest are uniform -> image pixels [N, k, 2]."""
    n = masks.shape[0]
    cand = frame_to_image(torch.rand((n, max(candidates, k), 2), device=masks.device), frames)
    near = near_boundary(lambda xy: sample_masks(masks, xy), cand)
    pick = (near.float() + torch.rand(near.shape, device=masks.device) * 0.5).topk(k, dim=1).indices
    return cand.gather(1, pick[..., None].expand(-1, -1, 2))


@dataclass(frozen=True)
class PaddedImages:
    """fine=patch: one or more images' ``pad_window`` maps, flattened side by side (``flat``
    [C, L]), and per instance the start of its image in ``flat`` and that image's padded width
    (``start``, ``width``: int64 [N]), so ``render_pixels`` can serve instances of several images."""

    flat: torch.Tensor
    start: torch.Tensor
    width: torch.Tensor

    @classmethod
    def of(cls, padded: Sequence[torch.Tensor], image_of: torch.Tensor) -> "PaddedImages":
        """``padded`` [C, Hp_b, Wp_b] per image b; ``image_of`` int64 [N]: each instance's image."""
        flats = [q.reshape(q.shape[0], -1) for q in padded]
        starts = torch.tensor([0, *accumulate(f.shape[1] for f in flats)][:-1], dtype=torch.int64, device=image_of.device)
        widths = torch.tensor([q.shape[-1] for q in padded], dtype=torch.int64, device=image_of.device)
        flat = flats[0] if len(flats) == 1 else torch.cat(flats, 1)
        return cls(flat=flat, start=starts[image_of], width=widths[image_of])

    def select(self, idx: torch.Tensor) -> "PaddedImages":
        """The same images for instances ``idx`` [M] of these only."""
        return PaddedImages(flat=self.flat, start=self.start[idx], width=self.width[idx])


def cell_centres(res: int, idx: torch.Tensor) -> torch.Tensor:
    """Flat cell indices [N, P] of a res x res grid -> their centres in frame units [N, P, 2] (u, v)."""
    return torch.stack([(idx % res).float() + 0.5, (idx // res).float() + 0.5], -1) / res


class PointRendRefiner(nn.Module):
    """``forward(images, targets)``: the training loss dict (``loss_point``). Inference goes
    through ``image_features`` once per image and ``subdivide`` per batch of instances."""

    def __init__(self, params: PointRendParams) -> None:
        super().__init__()
        self.params = params
        if params.fine == "patch":  # the params validate the window (odd side; coarse_patch only with it)
            self.features, self.stride = None, 1
            fine = (3 + (1 if params.coarse_patch else 0)) * params.patch**2
            r = params.patch // 2
            d = torch.arange(-r, r + 1, dtype=torch.float32)
            self.register_buffer("offsets", torch.stack(torch.meshgrid(d, d, indexing="xy"), -1).reshape(-1, 2), persistent=False)
        else:
            trunk = EmbedNetParams(channels=params.channels, full_res_channels=params.full_res_channels,
                                   context_dilations=params.context_dilations)
            self.features = EmbedUNet(trunk, params.feat_channels, full_res=params.feature_stride == 1)
            self.stride, fine = params.feature_stride, params.feat_channels
        extra = 1 + (1 if params.use_disagreement else 0)  # coarse logit (+ disagreement), re-fed to every layer
        widths = [fine, params.hidden, params.hidden, params.hidden]
        self.layers = nn.ModuleList(nn.Conv1d(widths[i] + extra, widths[i + 1], 1) for i in range(3))
        self.out = nn.Conv1d(params.hidden + extra, 1, 1)

    def image_features(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Images float [3, H, W] in [0, 1] -> fine features [B, feat_channels, Hp / s, Wp / s]
        (s = ``feature_stride``; padded at the bottom/right; pixel (x, y) of image b is column
        x / s, row y / s)."""
        if self.features is None:  # fine=patch: the normalised image is the feature map
            return pad_batch(images, 1)
        return self.features(pad_batch(images, self.features.multiple))

    def point_inputs(self, feats: torch.Tensor, xy: torch.Tensor, coarse: torch.Tensor | None = None,
                     frames: torch.Tensor | None = None, inst: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The point head's fine inputs, as blocks of columns: one image's features [C, H, W] read
        at points in image pixels [M, 2]; with ``coarse_patch``, also the coarse probabilities of
        each point's instance (``coarse`` [N, S, S] over xyxy ``frames`` [N, 4]; ``inst`` [M],
        int64) in the same window, as logits / 4 -> blocks [M, *] (patch: one per image channel,
        then the coarse one, each [M, patch^2] in row-major window order)."""
        m = xy.shape[0]
        h, w = feats.shape[-2] * self.stride, feats.shape[-1] * self.stride  # the padded image the features cover
        grid = image_grid(xy, h, w).reshape(1, m, 1, 2)
        if self.features is None:  # a patch x patch pixel window around each point
            grid = grid + (self.offsets * self.offsets.new_tensor([2.0 / w, 2.0 / h]))[None, None]  # [1, M, K, 2]
            f = F.grid_sample(feats[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
            parts = list(f)  # per image channel, [M, K] (contiguous: no copy)
            if self.params.coarse_patch:
                parts.append(self._coarse_window(coarse, frames, inst, xy))
            return parts
        f = F.grid_sample(feats[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
        return [f[0, :, :, 0].t()]  # [M, C]: points as rows, so each 1x1 convolution is one matrix product

    def _coarse_window(self, coarse: torch.Tensor, frames: torch.Tensor, inst: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        """Each point's instance map (``coarse`` [N, S, S] over ``frames`` [N, 4]; ``inst`` [M])
        read bilinearly in the pixel window around the point (``xy`` [M, 2]), the border value
        past the frame -> logits / 4 [M, K]. The N maps are stacked into one [N * S, S] atlas
        and every read is clamped to its own map's edge cells, so one grid_sample serves points
        of different instances (a flat point list needs no per-instance padding)."""
        n, sh, sw = coarse.shape
        fr = frames[inst]
        size = fr[:, 2:] - fr[:, :2]  # [M, 2]
        uv = (xy - fr[:, :2]) / size  # the point in its frame, [M, 2]
        cells = uv.new_tensor([sw, sh])
        # clamped to the outer cell centres: border padding, and never a neighbour's cells
        grid = torch.max(torch.min(uv[:, None, :] + self.offsets[None] / size[:, None, :], 1 - 0.5 / cells), 0.5 / cells)
        shift = torch.stack([torch.full_like(uv[:, 0], -1.0), inst.to(uv.dtype) * (2.0 / n) - 1.0], -1)  # [M, 2]
        grid = grid.mul_(grid.new_tensor([2.0, 2.0 / n])).add_(shift[:, None, :])[None]  # the atlas: map i is rows i*S..
        c = F.grid_sample(coarse.reshape(1, 1, n * sh, sw), grid, mode="bilinear", padding_mode="border",
                          align_corners=False)[0, 0]
        return torch.logit(c.clamp_(EPS, 1 - EPS)).div_(4.0)

    def point_logits(self, feats: torch.Tensor, xy: torch.Tensor, coarse_logit: torch.Tensor,
                     disagreement: torch.Tensor | None, coarse: torch.Tensor | None = None,
                     frames: torch.Tensor | None = None, inst: torch.Tensor | None = None) -> torch.Tensor:
        """One image's features [C, H, W]; points in image pixels [N, P, 2] (or a flat list
        [M, 2] with each point's instance ``inst`` [M]); the coarse logit and disagreement there
        [N, P] (or [M]); with ``coarse_patch`` also the coarse probabilities [N, S, S] over
        ``frames`` (xyxy [N, 4]) -> refined logits shaped like ``coarse_logit``."""
        shape = coarse_logit.shape
        if inst is None and xy.dim() == 3:
            inst = torch.arange(xy.shape[0], device=xy.device).repeat_interleave(xy.shape[1])
        parts = self.point_inputs(feats, xy.reshape(-1, 2), coarse, frames, inst)
        return self.head(parts, coarse_logit.reshape(-1), None if disagreement is None else disagreement.reshape(-1)).reshape(shape)

    def head(self, parts: list[torch.Tensor], coarse_logit: torch.Tensor, disagreement: torch.Tensor | None) -> torch.Tensor:
        """The MLP over points: fine input blocks [M, *] (``point_inputs``' order), the coarse
        logit [M] and disagreement [M] or None (read as 0) -> logits [M]."""
        side = [coarse_logit[:, None]]
        if self.params.use_disagreement:
            side.append((disagreement if disagreement is not None else torch.zeros_like(coarse_logit))[:, None])
        side_t = torch.cat(side, 1)
        # Each 1x1 convolution over [fine, side] is split by input block, so nothing is concatenated.
        layers = self._split_layers(tuple(q.shape[1] for q in parts))
        blocks, w_side, bias = layers[0]
        x = F.linear(side_t, w_side, bias)
        for q, wq in zip(parts, blocks):
            x = x.addmm_(q, wq)
        for blocks, w_side, bias in layers[1:]:
            x = F.linear(side_t, w_side, bias).addmm_(F.relu_(x), blocks[0])
        return x[:, 0]

    def _split_layers(self, widths: tuple[int, ...]) -> list[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]:
        """The head's 1x1 convolutions split by input block: per layer ([W_k^T, one per fine
        block of ``widths`` (the first layer) or the previous layer's output], W_side, bias).
        Without gradients the split is cached while the weights are unchanged (their version
        counters), so inference does not re-slice and re-copy them on every call."""
        chain = (*self.layers, self.out)
        key = (widths, tuple(layer.weight._version for layer in chain))
        cached = self.__dict__.get("_split_cache")
        if not torch.is_grad_enabled() and cached is not None and cached[0] == key:
            return cached[1]
        out = []
        for n, layer in enumerate(chain):
            wt = layer.weight[:, :, 0]
            ws = widths if n == 0 else (wt.shape[1] - (2 if self.params.use_disagreement else 1),)
            edges = [0, *accumulate(ws)]
            out.append(([wt[:, a:b].t().contiguous() for a, b in zip(edges, edges[1:])], wt[:, edges[-1]:].contiguous(), layer.bias))
        if not torch.is_grad_enabled():
            self.__dict__["_split_cache"] = (key, out)
        return out

    @torch.no_grad()
    def subdivide(self, feats: torch.Tensor, coarse: torch.Tensor, frames: torch.Tensor,
                  disagreement: torch.Tensor | None = None, output_size: int | torch.Tensor | None = None) -> torch.Tensor:
        """Adaptive subdivision for one image: ``feats`` [C, H, W]; ``coarse`` probabilities
        [N, S, S] over ``frames`` (xyxy [N, 4], pixels); ``disagreement`` [N, S, S] or None;
        ``output_size`` one side for all or per instance [N] (default ``params.output_size``) ->
        refined probabilities [N, R, R], R = S x 2^k the first at or above the largest size.
        Instance i is re-predicted at every step up to its own size; past it, it is only
        upsampled (so a small instance costs no points at resolutions finer than it needs)."""
        logits, _ = self.subdivide_logits(feats, coarse, frames, disagreement, output_size)
        return torch.sigmoid(logits)

    @torch.no_grad()
    def subdivide_logits(self, feats: torch.Tensor, coarse: torch.Tensor, frames: torch.Tensor,
                         disagreement: torch.Tensor | None = None,
                         output_size: int | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``subdivide`` in logits: -> (refined logits [N, R, R], the disagreement upsampled
        alongside [N, R, R] or None)."""
        p = self.params
        n = coarse.shape[0]
        sizes = torch.as_tensor(p.output_size if output_size is None else output_size, device=coarse.device).expand(n)
        logits = torch.logit(coarse.clamp(EPS, 1 - EPS))
        dis = disagreement
        res = logits.shape[-1]
        while n and res < int(sizes.max()):
            active = torch.nonzero(sizes > res)[:, 0]  # instances that still want a finer map
            res *= 2
            logits = F.interpolate(logits[:, None], scale_factor=2, mode="bilinear", align_corners=False)[:, 0]
            if dis is not None:
                dis = F.interpolate(dis[:, None], scale_factor=2, mode="bilinear", align_corners=False)[:, 0]
            every = active.numel() == n
            sub = logits if every else logits[active]
            flat = sub.reshape(sub.shape[0], -1)
            idx = (-flat.abs()).topk(min(p.points, res * res), dim=1).indices  # the most uncertain cells
            fr = frames if every else frames[active]
            d = None if dis is None else (dis if every else dis[active]).reshape(sub.shape[0], -1)
            coarse_p = torch.sigmoid(sub) if p.coarse_patch else None

            def inputs(i: torch.Tensor, j: torch.Tensor) -> list[torch.Tensor]:
                xy = frame_to_image(cell_centres(res, j)[:, None], fr[i])[:, 0]
                return self.point_inputs(feats, xy, coarse_p, fr, i)

            flat = self._repredict(flat, idx, inputs, d).reshape(-1, res, res)
            if every:
                logits = flat
            else:
                logits[active] = flat
        return logits, dis

    @torch.no_grad()
    def render_pixels(self, feats: torch.Tensor | None, logits: torch.Tensor, frames: torch.Tensor, regions: torch.Tensor,
                      disagreement: torch.Tensor | None = None, padded: "PaddedImages | None" = None) -> torch.Tensor:
        """The last subdivision step, on the image's own pixel grid: each instance's frame map
        (``logits`` [N, R, R] over xyxy ``frames`` [N, 4]; ``disagreement`` alike or None) is read
        bilinearly at the pixel centres of its integer ``regions`` (xyxy [N, 4], inside the image),
        and its ``points`` most uncertain pixels are re-predicted there -> pixel logits [N, h, w]
        (h, w the largest region's; instance i's map is [:, :y1 - y0, :x1 - x0], the rest padding).
        With ``fine=patch`` every window read falls on pixel centres, so the windows are gathered
        by integer index from the image and from the maps read once per pixel (the same values
        ``point_inputs`` would interpolate, without a sampling grid per window pixel). ``padded``
        (``PaddedImages``; fine=patch only) gives each instance's padded image instead of
        ``feats``: the instances may then come from several images, and ``feats`` is unused."""
        p = self.params
        n = logits.shape[0]
        r = p.patch // 2 if self.features is None else 0  # the maps are read r pixels past each region
        chans = [logits] + ([torch.sigmoid(logits)] if p.coarse_patch else []) + ([disagreement] if disagreement is not None else [])
        maps = region_pixels(torch.stack(chans, 1), frames, regions, r)  # [N, C, hp, wp]
        hp, wp = maps.shape[-2:]
        h, w = hp - 2 * r, wp - 2 * r
        flat = maps[:, 0, r:r + h, r:r + w].reshape(n, -1)  # the logits at the regions' pixels
        inside = in_regions(regions, h, w).reshape(n, -1)
        unc = torch.where(inside, -flat.abs(), torch.full_like(flat, -float("inf")))
        idx = unc.topk(min(p.points, h * w), dim=1).indices  # the most uncertain pixels of each region
        dis = maps[:, -1, r:r + h, r:r + w].reshape(n, -1) if disagreement is not None else None
        if self.features is None:
            ox, oy = self.offsets[:, 0].long(), self.offsets[:, 1].long()  # [K], row-major window order
            win = padded if padded is not None else PaddedImages.of([self.pad_window(feats)], torch.zeros(n, dtype=torch.int64))
            one_width = bool((win.width == win.width[0]).all()) if n else True
            step = (oy * win.width[0] + ox)[None] if one_width and n else None  # [1, K]: the window in win.flat
            # The coarse window's input, logit(p) / 4, for every pixel of the maps at once (fewer
            # pixels than windows read), gathered per point below.
            coarse_in = torch.logit(maps[:, 1].clamp(EPS, 1 - EPS)).div_(4.0).reshape(-1) if p.coarse_patch else None

            def inputs(i: torch.Tensor, cells: torch.Tensor) -> list[torch.Tensor]:
                a, b = cells % w, cells // w  # the point's column and row in its region
                iw = win.width[i]
                centre = win.start[i] + (regions[i, 1] + b + r) * iw + (regions[i, 0] + a + r)  # its pixel in win.flat
                lin = (centre[:, None] + (step if step is not None else oy[None] * iw[:, None] + ox[None])).reshape(-1)
                c_in = win.flat.shape[0]
                parts = list(win.flat.index_select(1, lin).reshape(c_in, -1, ox.numel()))  # [M * K] reads per channel
                if coarse_in is not None:
                    centre = i * (hp * wp) + (b + r) * wp + (a + r)
                    lin = (centre[:, None] + (oy * wp + ox)[None]).reshape(-1)
                    parts.append(coarse_in.index_select(0, lin).reshape(-1, ox.numel()))
                return parts
        else:
            def inputs(i: torch.Tensor, cells: torch.Tensor) -> list[torch.Tensor]:
                xy = torch.stack([regions[i, 0] + cells % w, regions[i, 1] + cells // w], -1).to(frames.dtype) + 0.5
                return self.point_inputs(feats, xy)
        return self._repredict(flat, idx, inputs, dis, inside).reshape(n, h, w)

    def pad_window(self, feats: torch.Tensor) -> torch.Tensor:
        """fine=patch: the image [C, H, W] grown by half a window per side, edge pixels repeated
        (so an integer window read past the border gives what grid_sample's border padding gives)."""
        r = self.params.patch // 2
        return F.pad(feats[None], (r, r, r, r), mode="replicate")[0]

    def _repredict(self, flat: torch.Tensor, idx: torch.Tensor, inputs, dis: torch.Tensor | None,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
        """Re-predict the chosen cells ``idx`` [N, k] of flat logit maps ``flat`` [N, L], except
        those already ``certain`` (|logit| at or above it) or not ``valid`` ([N, L] bool, or None
        for all): ``inputs(i, j)`` gives the head's fine blocks (``point_inputs``' order) for
        cells j [M] of instances i [M]; ``dis`` [N, L] or None -> the updated ``flat``. The chosen
        points of all instances go through the head as one flat list."""
        p = self.params
        chosen = flat.gather(1, idx)
        keep = torch.ones_like(chosen, dtype=torch.bool) if valid is None else valid.gather(1, idx)
        if p.certain is not None:
            keep &= chosen.abs() < p.certain
        i, j = keep.nonzero(as_tuple=True)
        if i.numel() == 0:
            return flat
        cells = idx[i, j]
        out = flat.clone()
        out[i, cells] = self.head(inputs(i, cells), chosen[i, j], None if dis is None else dis[i, cells])
        return out

    def forward(self, images: Sequence[torch.Tensor], targets: Sequence[dict] | None = None) -> dict[str, torch.Tensor]:
        if targets is None:
            raise ValueError("the refiner's forward is its training loss: it needs targets")
        feats = self.image_features(images)
        losses = []
        for b, t in enumerate(targets):
            masks = t["masks"].to(feats.device).bool()
            keep = torch.nonzero(masks.flatten(1).any(1))[:, 0]
            if keep.numel() > self.params.max_train_instances:
                keep = keep[torch.randperm(keep.numel(), device=keep.device)[: self.params.max_train_instances]]
            if keep.numel() == 0:
                continue
            prior = None
            if "prior" in t:
                prior = tuple(t[k].to(feats.device)[keep] for k in ("prior_boxes", "prior_maps", "prior"))
            losses.append(self._instance_loss(feats[b], masks[keep], prior))
        if not losses:
            return {"loss_point": feats.sum() * 0.0}
        return {"loss_point": torch.stack(losses).mean()}

    def _instance_loss(self, feats: torch.Tensor, masks: torch.Tensor,
                       prior: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The point loss of one image's instances: ``masks`` bool [N, H, W]; ``prior`` None or
        (boxes [N, 4], box-frame maps [N, 2, S', S'] (probability, spread), has [N] bool): an
        instance with a prior, taken with probability ``prior_share``, learns from it in its
        inference frame (the prior's box grown by ``margin``); the others from a degraded copy of
        the truth in a jittered frame."""
        p = self.params
        n, s = masks.shape[0], p.coarse_size
        boxes = tight_boxes(masks).to(feats.dtype)
        wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
        frames = grow(boxes + 0.05 * wh * (torch.rand(boxes.shape, device=boxes.device) * 2 - 1), p.margin)
        use = None
        if prior is not None:
            use = prior[2] & (torch.rand(n, device=boxes.device) < p.prior_share)
            frames = torch.where(use[:, None], grow(prior[0].to(feats.dtype), p.margin), frames)
        rois = torch.cat([torch.arange(n, device=boxes.device, dtype=boxes.dtype)[:, None], frames], 1)
        gt_frames = roi_align(masks[:, None].to(feats.dtype), rois, s, 1.0, 2, True)[:, 0]
        gen = torch.Generator().manual_seed(int(torch.randint(2**31 - 1, (1,))))
        coarse, dis = degrade(gt_frames.cpu(), gen, p.mild)
        coarse, dis = coarse.to(feats.device), dis.to(feats.device)
        if use is not None and bool(use.any()):
            k = torch.nonzero(use)[:, 0]
            pb, pm = prior[0][k].to(feats.dtype), prior[1][k].to(feats.dtype)
            coarse[k] = box_maps_to_frames(pm[:, 0], pb, frames[k], s).clamp(0.0, 1.0)
            dis[k] = box_maps_to_frames(pm[:, 1], pb, frames[k], s)
        # The paper's point sampling: uncertain candidates by the coarse map, plus uniform ones;
        # with ``boundary``, a share first from candidates within a pixel of the true boundary.
        n_pts = p.train_points
        fmasks = masks.to(feats.dtype)
        k_bnd = int(round(p.boundary * n_pts))
        parts = [boundary_points(fmasks, frames, k_bnd, int(p.oversample * 4 * k_bnd))] if k_bnd else []
        n_rest = n_pts - k_bnd
        cand = torch.rand((n, int(p.oversample * n_rest), 2), device=feats.device)
        unc = -(sample_maps(coarse, cand) - 0.5).abs()
        k_imp = int(round(p.importance * n_rest))
        top = unc.topk(k_imp, dim=1).indices
        uv = torch.cat([cand.gather(1, top[..., None].expand(-1, -1, 2)),
                        torch.rand((n, n_rest - k_imp, 2), device=feats.device)], 1)
        xy = frame_to_image(uv, frames)
        if parts:
            xy = torch.cat(parts + [xy], 1)
            uv = image_to_frame(xy, frames)
        target = sample_masks(fmasks, xy)
        extra = {"coarse": coarse, "frames": frames} if p.coarse_patch else {}
        logits = self.point_logits(feats, xy, torch.logit(sample_maps(coarse, uv).clamp(EPS, 1 - EPS)),
                                   sample_maps(dis, uv), **extra)
        return F.binary_cross_entropy_with_logits(logits, target)


def build_network(*, params: PointRendParams, num_classes: int = 1) -> PointRendRefiner:
    """An untrained refiner (class-agnostic: ``num_classes`` is ignored)."""
    return PointRendRefiner(params)
