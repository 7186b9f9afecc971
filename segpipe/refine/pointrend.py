"""A model-agnostic PointRend refiner (in the spirit of Kirillov, Wu, He, Girshick, CVPR 2020).

Unlike PointRend's head, which shares its detector's backbone, this refiner owns a light
feature network over the image (the embedding methods' small U-Net, ``feat_channels`` per
pixel) and refines any model's masks. Each instance is handled in its frame: its box grown by
``margin`` per side. Point head: an MLP (1x1 convolutions over points) on the fine features
bilinearly sampled at the point, with the coarse logit (and, with ``use_disagreement``, the
members' disagreement) appended to every layer's input.

Inference (``subdivide``): start from the coarse probabilities in the frame at ``coarse_size``;
each step doubles the resolution bilinearly and re-predicts the ``points`` cells whose logit is
closest to 0 (the most uncertain); stop at ``output_size``.

Training (``forward`` with targets): ground-truth masks are sampled into jittered frames,
degraded into coarse masks (``degrade``), and the head learns the true mask at ``train_points``
per instance, ``importance`` of them the most uncertain of ``oversample`` x as many random
candidates, the rest uniform (the paper's sampling).
"""

from __future__ import annotations

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

    def point_logits(self, feats: torch.Tensor, xy: torch.Tensor, coarse_logit: torch.Tensor,
                     disagreement: torch.Tensor | None, coarse: torch.Tensor | None = None,
                     frames: torch.Tensor | None = None) -> torch.Tensor:
        """One image's features [C, H, W]; points in image pixels [N, P, 2]; the coarse logit and
        disagreement there [N, P]; with ``coarse_patch`` also the coarse probabilities [N, S, S]
        over ``frames`` (xyxy [N, 4]) -> refined logits [N, P]."""
        n, p = xy.shape[:2]
        h, w = feats.shape[-2] * self.stride, feats.shape[-1] * self.stride  # the padded image the features cover
        grid = image_grid(xy, h, w).reshape(1, n * p, 1, 2)
        if self.features is None:  # a patch x patch pixel window around each point, channels-major
            k = self.offsets.shape[0]
            scale = self.offsets.new_tensor([2.0 / w, 2.0 / h])
            grid = grid + (self.offsets * scale).reshape(1, 1, k, 2)
            f = F.grid_sample(feats[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
            x = f[0].permute(1, 0, 2).reshape(n * p, -1)  # [N * P, 3 * K]
            if self.params.coarse_patch:  # the coarse map in the same window, as logits
                uv = image_to_frame(xy[:, :, None, :] + self.offsets[None, None], frames)  # [N, P, K, 2]
                c = sample_maps(coarse, uv.reshape(n, p * k, 2)).reshape(n * p, k)
                x = torch.cat([x, torch.logit(c.clamp(EPS, 1 - EPS)) / 4.0], 1)
        else:
            f = F.grid_sample(feats[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
            x = f[0, :, :, 0].t()  # [N * P, C]: points as rows, so each 1x1 convolution is one matrix product
        side = [coarse_logit.reshape(-1, 1)]
        if self.params.use_disagreement:
            side.append((disagreement if disagreement is not None else torch.zeros_like(coarse_logit)).reshape(-1, 1))
        side_t = torch.cat(side, 1)
        for layer in (*self.layers, self.out):  # each 1x1 convolution over [x, side]: split, so nothing is concatenated
            wt, c = layer.weight[:, :, 0], x.shape[1]
            x = torch.addmm(F.linear(side_t, wt[:, c:], layer.bias), x, wt[:, :c].t())
            if layer is not self.out:
                x = F.relu(x)
        return x.reshape(n, p)

    @torch.no_grad()
    def subdivide(self, feats: torch.Tensor, coarse: torch.Tensor, frames: torch.Tensor,
                  disagreement: torch.Tensor | None = None, output_size: int | None = None) -> torch.Tensor:
        """Adaptive subdivision for one image: ``feats`` [C, H, W]; ``coarse`` probabilities
        [N, S, S] over ``frames`` (xyxy [N, 4], pixels); ``disagreement`` [N, S, S] or None ->
        refined probabilities [N, R, R], R = S x 2^k the first at or above ``output_size``."""
        p = self.params
        out_size = output_size or p.output_size
        logits = torch.logit(coarse.clamp(EPS, 1 - EPS))
        dis = disagreement
        res = logits.shape[-1]
        while res < out_size and logits.shape[0]:
            res *= 2
            logits = F.interpolate(logits[:, None], scale_factor=2, mode="bilinear", align_corners=False)[:, 0]
            if dis is not None:
                dis = F.interpolate(dis[:, None], scale_factor=2, mode="bilinear", align_corners=False)[:, 0]
            k = min(p.points, res * res)
            flat = logits.reshape(logits.shape[0], -1)
            idx = (-flat.abs()).topk(k, dim=1).indices  # the most uncertain cells
            uv = cell_centres(res, idx)
            d = dis.reshape(dis.shape[0], -1).gather(1, idx) if dis is not None else None
            extra = {"coarse": torch.sigmoid(logits), "frames": frames} if p.coarse_patch else {}
            new = self.point_logits(feats, frame_to_image(uv, frames), flat.gather(1, idx), d, **extra)
            logits = flat.scatter(1, idx, new).reshape(-1, res, res)
        return torch.sigmoid(logits)

    def forward(self, images: Sequence[torch.Tensor], targets: Sequence[dict] | None = None) -> dict[str, torch.Tensor]:
        if targets is None:
            raise ValueError("the refiner's forward is its training loss: it needs targets")
        feats = self.image_features(images)
        losses = []
        for b, t in enumerate(targets):
            masks = t["masks"].to(feats.device).bool()
            keep = masks.flatten(1).any(1)
            masks = masks[keep]
            if masks.shape[0] > self.params.max_train_instances:
                masks = masks[torch.randperm(masks.shape[0])[: self.params.max_train_instances]]
            if masks.shape[0] == 0:
                continue
            losses.append(self._instance_loss(feats[b], masks))
        if not losses:
            return {"loss_point": feats.sum() * 0.0}
        return {"loss_point": torch.stack(losses).mean()}

    def _instance_loss(self, feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        p = self.params
        n, s = masks.shape[0], p.coarse_size
        boxes = tight_boxes(masks).to(feats.dtype)
        wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
        frames = grow(boxes + 0.05 * wh * (torch.rand(boxes.shape, device=boxes.device) * 2 - 1), p.margin)
        rois = torch.cat([torch.arange(n, device=boxes.device, dtype=boxes.dtype)[:, None], frames], 1)
        gt_frames = roi_align(masks[:, None].to(feats.dtype), rois, s, 1.0, 2, True)[:, 0]
        gen = torch.Generator().manual_seed(int(torch.randint(2**31 - 1, (1,))))
        coarse, dis = degrade(gt_frames.cpu(), gen, p.mild)
        coarse, dis = coarse.to(feats.device), dis.to(feats.device)
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
