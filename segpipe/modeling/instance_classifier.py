"""Second-stage instance classifier of the embedding methods (``classify: instances``).

Why: the embedding methods' per-pixel class maps must name an object's category from every one
of its pixels. On the shapes domain, where the category is the object's outline (ellipse, star,
ring, cross) and textures are random, a small U-Net did not learn it: after 3000 iterations the
discriminative-loss semantic head still labelled 70% of star / ring / cross pixels 'ellipse' and
never said 'star', and a class head on pooled U-Net features stayed at chance (cross-entropy
1.386 = ln 4) for 400 iterations. A classifier that sees each instance's crop together with its
mask reaches 97% instance accuracy in 200 iterations (13 s on 2 cores). So with
``classify: instances`` the U-Net predicts class-agnostic maps, clusters are found as before,
and this network names each cluster, in the spirit of the box head of two-stage detectors.

Input per instance: the normalised image and the instance's binary mask, both sampled
(RoIAlign) over the instance's box grown by ``MARGIN`` on every side into a ``crop`` x ``crop``
grid -> [N, 4, crop, crop]. Output: class logits [N, C].
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
from torch import nn
from torchvision.ops import masks_to_boxes, roi_align

from segpipe.modeling.embed_cluster import Cluster
from segpipe.modeling.embednet import conv_bn_relu

MARGIN = 0.15  # box growth per side, fraction of the box side: the outline needs some background
JITTER = 0.1  # training: each box edge moves by up to this fraction of the box side


def grow_boxes(boxes: torch.Tensor, margin: float = MARGIN) -> torch.Tensor:
    """xyxy [N, 4] (pixels) -> xyxy [N, 4] grown by ``margin`` x side on each side."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1.0)
    return torch.cat([boxes[:, :2] - margin * wh, boxes[:, 2:] + margin * wh], 1)


def jitter_boxes(boxes: torch.Tensor, amount: float = JITTER) -> torch.Tensor:
    """Move each edge of xyxy ``boxes`` [N, 4] by U(-amount, amount) x the box side (training
    augmentation: inference boxes come from imperfect clusters)."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1.0).repeat(1, 2)
    noise = torch.rand(boxes.shape, device=boxes.device) * 2 - 1
    return boxes + amount * wh * noise


class InstanceClassifier(nn.Module):
    """Crops [N, 4, S, S] (image channels normalised, mask channel in {-2, 2}) -> logits [N, C]."""

    def __init__(self, num_classes: int, crop: int = 32, channels: Sequence[int] = (32, 64, 128)) -> None:
        super().__init__()
        self.crop = crop
        layers, cin = [], 4
        for i, c in enumerate(channels):
            layers += [conv_bn_relu(cin, c, stride=1 if i == 0 else 2), conv_bn_relu(c, c)]
            cin = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(crops))

    def crops(self, image: torch.Tensor, masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``image`` normalised [3, H, W]; ``masks`` [N, H, W] (bool or float, image frame);
        ``boxes`` xyxy [N, 4] pixels -> [N, 4, crop, crop] sampled over the grown boxes."""
        n = boxes.shape[0]
        rois = torch.cat([torch.zeros((n, 1), device=boxes.device), grow_boxes(boxes)], 1)
        img = roi_align(image[None], rois, self.crop, 1.0, 2, True)
        rois_m = torch.cat([torch.arange(n, device=boxes.device, dtype=boxes.dtype)[:, None], rois[:, 1:]], 1)
        msk = roi_align(masks[:, None].to(image.dtype), rois_m, self.crop, 1.0, 2, True)
        return torch.cat([img, msk * 4.0 - 2.0], 1)

    def truth_crops(self, images: torch.Tensor, targets: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Crops of every non-empty ground-truth instance of a batch on jittered boxes ->
        (crops [N, 4, crop, crop], 0-based labels int64 [N]). ``images`` normalised [B, 3, Hp,
        Wp]; ``targets`` per image ``masks`` [N, h, w] (h <= Hp, w <= Wp, same top-left) and
        ``labels`` 1-based [N]."""
        crops, labels = [images.new_zeros((0, 4, self.crop, self.crop))], [torch.zeros(0, dtype=torch.int64, device=images.device)]
        for b, t in enumerate(targets):
            masks = t["masks"].to(images.device).bool()
            keep = masks.flatten(1).any(1)
            if not bool(keep.any()):
                continue
            masks = masks[keep]
            crops.append(self.crops(images[b], masks, jitter_boxes(tight_boxes(masks).to(images.dtype))))
            labels.append(t["labels"].to(images.device)[keep] - 1)
        return torch.cat(crops), torch.cat(labels)

    def loss(self, crops: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of ``crops`` [N, 4, crop, crop] against 0-based ``labels`` [N]; a
        zero that still has a graph when N = 0."""
        if labels.numel() == 0:
            return self.fc.weight.sum() * 0.0
        return nn.functional.cross_entropy(self(crops), labels)

    def batch_loss(self, images: torch.Tensor, targets: Sequence[dict]) -> torch.Tensor:
        """Mean cross-entropy over every ground-truth instance of a batch (``truth_crops``); 0
        without instances."""
        return self.loss(*self.truth_crops(images, targets))

    def cluster_crops(self, image: torch.Tensor, clusters: list[Cluster]) -> torch.Tensor:
        """As ``crops`` for the clusters of one image (each mask built in its own tight frame:
        memory O(box), not O(image)) -> [N, 4, crop, crop]."""
        out = []
        dev, dt = image.device, image.dtype
        h, w = image.shape[-2:]
        for c in clusters:
            # The frame is the tight box plus a zero border of 1 px, clipped to the image: RoIAlign
            # clamps samples within 1 px outside a tensor to its edge, so frame edges must look
            # like the image's (zero inside the image, the image edge itself at the image edge).
            x0, y0 = max(int(c.xs.min()) - 1, 0), max(int(c.ys.min()) - 1, 0)
            x1, y1 = min(int(c.xs.max()) + 2, int(w)), min(int(c.ys.max()) + 2, int(h))
            local = torch.zeros((1, 1, y1 - y0, x1 - x0), device=dev, dtype=dt)
            local[0, 0, torch.as_tensor(c.ys - y0), torch.as_tensor(c.xs - x0)] = 1.0
            box = torch.tensor([[c.xs.min(), c.ys.min(), c.xs.max() + 1, c.ys.max() + 1]], device=dev, dtype=dt)
            roi = torch.cat([torch.zeros((1, 1), device=dev, dtype=dt), grow_boxes(box)], 1)
            shift = torch.tensor([[0.0, x0, y0, x0, y0]], device=dev, dtype=dt)
            img = roi_align(image[None], roi, self.crop, 1.0, 2, True)
            msk = roi_align(local, roi - shift, self.crop, 1.0, 2, True)
            out.append(torch.cat([img, msk * 4.0 - 2.0], 1))
        return torch.cat(out) if out else image.new_zeros((0, 4, self.crop, self.crop))

    @torch.no_grad()
    def classify(self, image: torch.Tensor, clusters: list[Cluster]) -> list[Cluster]:
        """Relabel ``clusters`` of one image (``image`` normalised [3, H, W]): label = the most
        probable class, score = cluster score x that class's probability."""
        if not clusters:
            return clusters
        probs = torch.softmax(self(self.cluster_crops(image, clusters)), 1).cpu().numpy()
        best = probs.argmax(1)
        return [replace(c, label=int(k) + 1, score=float(c.score * probs[i, k])) for i, (c, k) in enumerate(zip(clusters, best))]


def tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """bool [N, H, W] (each non-empty) -> float xyxy [N, 4], half-open pixel edges."""
    return masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0], device=masks.device)


def match_clusters(clusters: Sequence[Cluster], masks: torch.Tensor, min_iou: float = 0.5) -> list[tuple[int, int]]:
    """Each cluster's best-overlapping ground-truth instance, when their mask IoU reaches
    ``min_iou``: ``masks`` bool [N, H, W] (image frame) -> [(cluster index, instance index)]
    (several clusters may name one instance)."""
    if masks.shape[0] == 0:
        return []
    areas = masks.flatten(1).sum(1).float()
    out = []
    for i, c in enumerate(clusters):
        inter = masks[:, torch.as_tensor(c.ys, device=masks.device), torch.as_tensor(c.xs, device=masks.device)].sum(1).float()
        iou = inter / (areas + len(c.ys) - inter).clamp(min=1.0)
        j = int(iou.argmax())
        if float(iou[j]) >= min_iou:
            out.append((i, j))
    return out


def uses_classifier(params, num_classes: int) -> bool:
    """Whether an embedding network with these params (``EmbedNetParams``) names its instances
    with an ``InstanceClassifier``: ``classify: instances`` and at least two classes."""
    return params.classify == "instances" and num_classes >= 2


def make_classifier(params, num_classes: int) -> InstanceClassifier | None:
    """The classifier of an embedding network, or None when its class maps name the instances."""
    return InstanceClassifier(num_classes, params.class_crop, params.class_channels) if uses_classifier(params, num_classes) else None
