"""Mask R-CNN (He et al., ICCV 2017) from torchvision's detection components, small backbone.

The adapter stops before torchvision pastes masks into full frames: ``forward`` returns boxes in
the original frame with the 28x28 box-frame mask probabilities, and ``postprocess`` pastes each
into its own box only and encodes RLE (memory O(box), never O(N x H x W)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign

from segpipe.config import MaskRCNNParams, ModelCard
from segpipe.modeling.backbones import SmallResNetFPN
from segpipe.modeling.base import ModelAdapter
from segpipe.modeling.registry import register
from segpipe.ops import masks as mask_ops
from segpipe.ops.boxes import clip_xyxy
from segpipe.structures import Instances


def build_network(*, params: MaskRCNNParams, num_classes: int) -> MaskRCNN:
    """An untrained Mask R-CNN; ``num_classes`` excludes the background."""
    backbone = SmallResNetFPN(
        channels=params.backbone_channels,
        blocks_per_stage=params.blocks_per_stage,
        fpn_channels=params.fpn_channels,
    )
    c = params.fpn_channels
    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in params.anchor_sizes),
        aspect_ratios=(tuple(params.aspect_ratios),) * len(params.anchor_sizes),
    )
    names = ["0", "1", "2", "3"]
    net = MaskRCNN(
        backbone,
        num_classes=None,
        min_size=params.min_size,
        max_size=params.max_size,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.25, 0.25, 0.25],
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(c, len(params.aspect_ratios)),
        rpn_pre_nms_top_n_train=params.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=params.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=params.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=params.rpn_post_nms_top_n_test,
        box_roi_pool=MultiScaleRoIAlign(names, 7, 2),
        box_head=TwoMLPHead(c * 7 * 7, params.representation_size),
        box_predictor=FastRCNNPredictor(params.representation_size, num_classes + 1),
        box_batch_size_per_image=params.box_batch_size_per_image,
        box_detections_per_img=params.box_detections_per_img,
        box_score_thresh=params.box_score_thresh,
        box_nms_thresh=params.box_nms_thresh,
        mask_roi_pool=MultiScaleRoIAlign(names, 14, 2),
        mask_head=MaskRCNNHeads(c, params.mask_head_channels, 1),
        mask_predictor=MaskRCNNPredictor(params.mask_head_channels[-1], params.mask_head_channels[-1], num_classes + 1),
    )
    if not params.resize:
        t = net.transform
        net.transform = NativeScaleTransform(t.min_size, t.max_size, t.image_mean, t.image_std)
    return net


class NativeScaleTransform(GeneralizedRCNNTransform):
    """Normalises and batches like torchvision's transform but never resizes (objects keep their
    pixel size, e.g. nuclei that are 5-140 px whatever the image size)."""

    def resize(self, image, target=None):
        return image, target


@dataclass
class MaskRCNNBatch:
    tensors: list[torch.Tensor]  # each [3, H, W] float in [0, 1]
    sizes: list[tuple[int, int]]  # original (H, W)


class MaskRCNNAdapter(ModelAdapter):
    """Adapter for :func:`build_network`; category ids are the card's, in order (label i -> ids[i-1])."""

    @classmethod
    def from_card(cls, card: ModelCard) -> "MaskRCNNAdapter":
        params = MaskRCNNParams.model_validate(card.params)
        net = build_network(params=params, num_classes=len(card.categories))
        return cls(network=net, categories=[c.model_dump() for c in card.categories],
                   instance_bound=params.box_detections_per_img)

    def set_score_threshold(self, value: float) -> None:
        self.network.roi_heads.score_thresh = float(value)

    def preprocess(self, images: Sequence[np.ndarray]) -> MaskRCNNBatch:
        tensors, sizes = self.to_tensors(images)
        return MaskRCNNBatch(tensors=tensors, sizes=sizes)

    def forward(self, batch: MaskRCNNBatch) -> list[dict[str, torch.Tensor]]:
        """Returns per image: boxes [N, 4] (original frame), scores [N], labels [N] (1-based
        class index), mask_probs [N, 28, 28] for the predicted class."""
        net = self.network
        images, _ = net.transform([t.to(self.device) for t in batch.tensors])
        feats = net.backbone(images.tensors)
        proposals, _ = net.rpn(images, feats)
        dets, _ = net.roi_heads(feats, proposals, images.image_sizes)
        out = []
        for det, resized, orig in zip(dets, images.image_sizes, batch.sizes):
            out.append(
                {
                    "boxes": resize_boxes(det["boxes"], resized, orig).cpu(),
                    "scores": det["scores"].cpu(),
                    "labels": det["labels"].cpu(),
                    "mask_probs": det["masks"][:, 0].cpu(),
                }
            )
        return out

    def raw_counts(self, raw: list[dict[str, torch.Tensor]]) -> list[int]:
        """Detections per image after the score threshold, NMS and the ``box_detections_per_img`` cap."""
        return [int(det["scores"].shape[0]) for det in raw]

    def postprocess(self, raw: list[dict[str, torch.Tensor]], batch: MaskRCNNBatch) -> list[Instances]:
        results = []
        for det, (h, w) in zip(raw, batch.sizes):
            boxes = clip_xyxy(det["boxes"].numpy().astype(np.float32).reshape(-1, 4), h, w)
            probs = det["mask_probs"].numpy().astype(np.float32)
            rles = [mask_ops.paste_soft_mask(p, b, h, w) for p, b in zip(probs, boxes)]
            results.append(
                Instances(
                    height=h,
                    width=w,
                    boxes=boxes,
                    scores=det["scores"].numpy().astype(np.float32),
                    labels=self.category_ids[det["labels"].numpy().astype(np.int64) - 1],
                    masks=rles,
                    mask_probs=probs.astype(np.float16),
                )
            )
        return results


@register("maskrcnn")
def build(card: ModelCard) -> MaskRCNNAdapter:
    return MaskRCNNAdapter.from_card(card)
