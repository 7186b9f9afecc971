"""PolarMask (Xie et al., CVPR 2020): single-shot instance segmentation with polar contours.

An FCOS-style anchor-free head on the small ResNet-FPN predicts, at every location of every
level, class scores, a polar centerness and ``n_rays`` ray lengths; an instance is the polygon
through the ray ends, rasterised. Training: focal loss (classes), BCE (centerness, on
positives), polar IoU loss log(sum max(d, d*) / sum min(d, d*)) weighted by the centerness
target. Locations inside a target's ignore regions (``ignore`` bool [H, W], from crowd
annotations) are left out of the class loss unless they are positives. Inference: score =
sqrt(class prob x centerness), top-k per level, box NMS, polygons.

Images keep their native resolution (padded to a multiple of 64), so object sizes in pixels are
what the levels' size ranges refer to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, sigmoid_focal_loss

from segpipe.config import ModelCard, PolarMaskParams
from segpipe.modeling.backbones import SmallResNetFPN
from segpipe.modeling.base import ModelAdapter
from segpipe.modeling.batching import pad_batch
from segpipe.modeling.registry import register
from segpipe.ops import masks as mask_ops
from segpipe.ops import polar
from segpipe.ops.boxes import clip_xyxy
from segpipe.structures import SOFT_MASK_SIZE, Instances

STRIDES = [4, 8, 16, 32, 64]  # of the backbone's FPN outputs '0', '1', '2', '3', 'pool'
_KEYS = ["0", "1", "2", "3", "pool"]
PAD = 64  # inputs are padded to a multiple of the coarsest stride


def _tower(channels: int, n: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(n):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(min(16, channels // 4), channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class PolarHead(nn.Module):
    """Shared across levels. Per level returns class logits [B, C, h, w], centerness logits
    [B, 1, h, w] and ray lengths in pixels [B, n, h, w] (stride * exp(scale_l * x))."""

    def __init__(self, channels: int, num_classes: int, n_rays: int, n_levels: int, tower_convs: int) -> None:
        super().__init__()
        self.cls_tower = _tower(channels, tower_convs)
        self.reg_tower = _tower(channels, tower_convs)
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.centerness = nn.Conv2d(channels, 1, 3, padding=1)
        self.rays = nn.Conv2d(channels, n_rays, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(n_levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - 0.01) / 0.01))  # prior p = 0.01

    def forward(self, feats: list[torch.Tensor], strides: list[int]):
        out = []
        for k, (f, s) in enumerate(zip(feats, strides)):
            c = self.cls_tower(f)
            r = self.reg_tower(f)
            log_d = (self.scales[k] * self.rays(r)).clamp(max=8.0)  # exp(8) * stride: far beyond any image
            out.append((self.cls_logits(c), self.centerness(r), s * torch.exp(log_d)))
        return out


class PolarMask(nn.Module):
    """``forward(images, targets=None)`` like torchvision's detectors: images a list of float
    [3, H, W] in [0, 1]; in training mode ``targets`` (dicts with ``masks`` uint8 [N, H, W] and
    ``labels`` int64 [N], 1-based) gives a loss dict; in eval mode, per image a dict of boxes
    [N, 4] xyxy, scores [N], labels [N] (1-based), polygons [N, n, 2] xy, all in pixels."""

    def __init__(self, params: PolarMaskParams, num_classes: int) -> None:
        super().__init__()
        self.params = params
        self.num_classes = num_classes
        self.strides = [STRIDES[i] for i in params.levels]
        self.keys = [_KEYS[i] for i in params.levels]
        self.backbone = SmallResNetFPN(channels=params.backbone_channels, blocks_per_stage=params.blocks_per_stage,
                                       fpn_channels=params.fpn_channels)
        self.head = PolarHead(params.fpn_channels, num_classes, params.n_rays, len(self.strides), params.tower_convs)

    def forward(self, images: Sequence[torch.Tensor], targets: Sequence[dict] | None = None):
        feats = self.backbone(pad_batch(images, PAD))
        outs = self.head([feats[k] for k in self.keys], self.strides)
        if self.training:
            if targets is None:
                raise ValueError("training mode needs targets")
            return self.loss(outs, targets)
        return self.detect(outs, [(int(i.shape[1]), int(i.shape[2])) for i in images])

    # --- training ------------------------------------------------------------------------------

    def loss(self, outs, targets: Sequence[dict]) -> dict[str, torch.Tensor]:
        p = self.params
        shapes = [(int(c.shape[2]), int(c.shape[3])) for c, _, _ in outs]
        cls = torch.cat([c.flatten(2) for c, _, _ in outs], 2).permute(0, 2, 1)  # [B, L, C]
        ctr = torch.cat([t.flatten(2) for _, t, _ in outs], 2)[:, 0]  # [B, L]
        rays = torch.cat([r.flatten(2) for _, _, r in outs], 2).permute(0, 2, 1)  # [B, L, n]
        t_labels, t_rays, t_ignored = [], [], []
        for tgt in targets:
            masks = tgt["masks"].cpu().numpy().astype(np.uint8)
            pt = polar.polar_targets(masks, tgt["labels"].cpu().numpy(), shapes, self.strides,
                                     size_ranges=p.size_ranges, center_radius=p.center_radius, n_rays=p.n_rays)
            t_labels.append(torch.from_numpy(pt.labels))
            t_rays.append(torch.from_numpy(pt.rays))
            ign = tgt.get("ignore")  # ignore regions: their locations are not negatives
            t_ignored.append(torch.from_numpy(polar.ignored_locations(ign.cpu().numpy(), shapes, self.strides))
                             if ign is not None else torch.zeros(len(pt.labels), dtype=torch.bool))
        labels = torch.stack(t_labels).to(cls.device)  # [B, L]
        target_rays = torch.stack(t_rays).to(cls.device)  # [B, L, n]
        pos = labels > 0
        n_pos = max(int(pos.sum()), 1)
        onehot = F.one_hot(labels, self.num_classes + 1)[..., 1:].to(cls.dtype)
        counted = ~(torch.stack(t_ignored).to(cls.device) & ~pos)  # [B, L]: positives and non-ignored negatives
        focal = sigmoid_focal_loss(cls, onehot, alpha=p.focal_alpha, gamma=p.focal_gamma, reduction="none")  # [B, L, C]
        loss_cls = (focal * counted.unsqueeze(-1)).sum() / n_pos
        if not pos.any():
            zero = rays.sum() * 0 + ctr.sum() * 0
            return {"loss_cls": loss_cls, "loss_centerness": zero, "loss_polar_iou": zero}
        d_t = target_rays[pos].clamp(min=0.5)
        d_p = rays[pos]
        ctr_t = torch.sqrt(d_t.min(1).values / d_t.max(1).values)
        loss_ctr = F.binary_cross_entropy_with_logits(ctr[pos], ctr_t)
        iou = polar_iou_loss(d_p, d_t)
        loss_iou = (iou * ctr_t).sum() / ctr_t.sum().clamp(min=1e-6)
        return {"loss_cls": loss_cls, "loss_centerness": loss_ctr, "loss_polar_iou": loss_iou}

    # --- inference -----------------------------------------------------------------------------

    @torch.no_grad()
    def detect(self, outs, sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        p = self.params
        results = []
        for b, (h, w) in enumerate(sizes):
            boxes, scores, labels, polys = [], [], [], []
            for (c, t, r), s in zip(outs, self.strides):
                fh, fw = c.shape[2], c.shape[3]
                prob = torch.sigmoid(c[b]).flatten(1)  # [C, hw]
                cand = prob > p.score_thresh
                if not cand.any():
                    continue
                score = torch.sqrt(prob * torch.sigmoid(t[b]).flatten(1))
                score = torch.where(cand, score, torch.zeros_like(score))
                k = min(p.pre_nms_top_n, int(cand.sum()))
                top, idx = score.flatten().topk(k)
                keep = top > 0
                top, idx = top[keep], idx[keep]
                cls_i, loc = idx // (fh * fw), idx % (fh * fw)
                ys = (loc // fw).to(torch.float32) * s + s / 2
                xs = (loc % fw).to(torch.float32) * s + s / 2
                inside = (ys < h) & (xs < w)  # drop padding locations
                cls_i, loc, xs, ys, top = cls_i[inside], loc[inside], xs[inside], ys[inside], top[inside]
                d = r[b].flatten(1)[:, loc].T  # [k, n]
                poly = _polygons(xs, ys, d)
                polys.append(poly)
                boxes.append(torch.stack([poly[..., 0].amin(1), poly[..., 1].amin(1), poly[..., 0].amax(1), poly[..., 1].amax(1)], 1))
                scores.append(top)
                labels.append(cls_i + 1)
            if not boxes:
                results.append(_empty(p.n_rays))
                continue
            boxes_t = torch.cat(boxes)
            boxes_t[:, 0::2] = boxes_t[:, 0::2].clamp(0, w)
            boxes_t[:, 1::2] = boxes_t[:, 1::2].clamp(0, h)
            scores_t, labels_t, polys_t = torch.cat(scores), torch.cat(labels), torch.cat(polys)
            ok = (boxes_t[:, 2] > boxes_t[:, 0]) & (boxes_t[:, 3] > boxes_t[:, 1])
            boxes_t, scores_t, labels_t, polys_t = boxes_t[ok], scores_t[ok], labels_t[ok], polys_t[ok]
            keep = batched_nms(boxes_t, scores_t, labels_t, p.nms_thresh)[: p.detections_per_img]
            results.append({"boxes": boxes_t[keep], "scores": scores_t[keep], "labels": labels_t[keep], "polygons": polys_t[keep]})
        return results


def polar_iou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Polar IoU loss per row: log(sum_k max(d_k, d*_k) / sum_k min(d_k, d*_k)); [P, n] -> [P]."""
    return torch.log(torch.maximum(pred, target).sum(1) / torch.minimum(pred, target).sum(1).clamp(min=1e-6))


def _polygons(xs: torch.Tensor, ys: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Origins [k] x, y and ray lengths [k, n] -> vertices [k, n, 2] (torch twin of ops.polar.rays_to_polygons)."""
    a = torch.arange(d.shape[1], dtype=torch.float32, device=d.device) * (2 * math.pi / d.shape[1])
    return torch.stack([xs[:, None] + d * torch.cos(a), ys[:, None] + d * torch.sin(a)], -1)


def _empty(n_rays: int) -> dict[str, torch.Tensor]:
    return {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
            "polygons": torch.zeros((0, n_rays, 2))}


def build_network(*, params: PolarMaskParams, num_classes: int) -> PolarMask:
    """An untrained PolarMask; ``num_classes`` excludes the background."""
    return PolarMask(params, num_classes)


@dataclass
class PolarBatch:
    tensors: list[torch.Tensor]  # each [3, H, W] float in [0, 1]
    sizes: list[tuple[int, int]]  # (H, W)


class PolarMaskAdapter(ModelAdapter):
    """Instances from PolarMask: RLE masks are the rasterised polygons; ``mask_probs`` (the
    box-frame soft mask) is the polygon's fractional coverage of each 28x28 cell of its box
    (4x supersampled), a documented substitute for a predicted probability map."""

    @classmethod
    def from_card(cls, card: ModelCard) -> "PolarMaskAdapter":
        params = PolarMaskParams.model_validate(card.params)
        return cls(network=build_network(params=params, num_classes=len(card.categories)),
                   categories=[c.model_dump() for c in card.categories], instance_bound=params.detections_per_img)

    def set_score_threshold(self, value: float) -> None:
        self.network.params = self.network.params.model_copy(update={"score_thresh": float(value)})

    def preprocess(self, images: Sequence[np.ndarray]) -> PolarBatch:
        tensors, sizes = self.to_tensors(images)
        return PolarBatch(tensors=tensors, sizes=sizes)

    def forward(self, batch: PolarBatch) -> list[dict[str, torch.Tensor]]:
        out = self.network([t.to(self.device) for t in batch.tensors])
        return [{k: v.cpu() for k, v in o.items()} for o in out]

    def raw_counts(self, raw: list[dict[str, torch.Tensor]]) -> list[int]:
        """Detections per image after the score threshold, NMS and the ``detections_per_img`` cap."""
        return [int(det["scores"].shape[0]) for det in raw]

    def postprocess(self, raw: list[dict[str, torch.Tensor]], batch: PolarBatch) -> list[Instances]:
        results = []
        for det, (h, w) in zip(raw, batch.sizes):
            polys = det["polygons"].numpy().astype(np.float64)
            boxes = clip_xyxy(det["boxes"].numpy().astype(np.float32).reshape(-1, 4), h, w)
            rles = polar.polygons_to_rles(polys, h, w)
            keep = mask_ops.area(rles) > 0 if rles else np.zeros(0, bool)
            probs = np.stack([polar.polygon_soft_mask(pg, bx, SOFT_MASK_SIZE) for pg, bx in zip(polys[keep], boxes[keep])]) \
                if keep.any() else np.zeros((0, SOFT_MASK_SIZE, SOFT_MASK_SIZE), np.float32)
            results.append(
                Instances(
                    height=h,
                    width=w,
                    boxes=boxes[keep],
                    scores=det["scores"].numpy().astype(np.float32)[keep],
                    labels=self.category_ids[det["labels"].numpy().astype(np.int64)[keep] - 1],
                    masks=[r for r, k in zip(rles, keep) if k],
                    mask_probs=probs.astype(np.float16),
                )
            )
        return results


@register("polarmask")
def build(card: ModelCard) -> PolarMaskAdapter:
    return PolarMaskAdapter.from_card(card)
