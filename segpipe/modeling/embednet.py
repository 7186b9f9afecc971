"""The encoder-decoder shared by the embedding methods (SpatialEmbeddings, discriminative loss).

A small U-Net: one encoder level per entry of ``channels`` at strides 2, 4, 8, ... (16 with four),
a dilated context block at the coarsest stride, a decoder back to stride 2 with skip connections, and a stride-1 refinement that
joins the upsampled decoder features with a few full-resolution convolutions of the image, so
boundaries are predicted per pixel. Output: [B, out_channels, H, W] raw values (no activation).
Also here: the adapter both methods share (clusters -> Instances) and its soft-mask helper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segpipe.config import EmbedNetParams, ModelCard
from segpipe.modeling.base import ModelAdapter
from segpipe.modeling.embed_cluster import Cluster
from segpipe.ops.masks import crop_to_box_frame, encode_local
from segpipe.structures import SOFT_MASK_SIZE, Instances

def conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def encoder(params: EmbedNetParams) -> tuple[nn.ModuleList, nn.Sequential]:
    """The shared encoder: one level (a stride-2 conv and a conv) per entry of ``params.channels``,
    and the dilated context block run on the last level's output."""
    ch = list(params.channels)
    down, cin = nn.ModuleList(), 3
    for c in ch:
        down.append(nn.Sequential(conv_bn_relu(cin, c, stride=2), conv_bn_relu(c, c)))
        cin = c
    return down, nn.Sequential(*[conv_bn_relu(ch[-1], ch[-1], dilation=d) for d in params.context_dilations])


class EmbedUNet(nn.Module):
    """[B, 3, H, W] normalised image (H, W multiples of ``multiple``) -> [B, out_channels, H, W]
    (``full_res``), or [B, out_channels, H/2, W/2] without the full-resolution branch."""

    def __init__(self, params: EmbedNetParams, out_channels: int, full_res: bool = True) -> None:
        super().__init__()
        ch = list(params.channels)
        fr = params.full_res_channels
        self.full_res = full_res
        self.full = nn.Sequential(conv_bn_relu(3, fr), conv_bn_relu(fr, fr)) if full_res else None
        self.down, self.context = encoder(params)
        self.up = nn.ModuleList()
        for c_skip, c_in in zip(reversed(ch[:-1]), reversed(ch[1:])):
            self.up.append(nn.Sequential(conv_bn_relu(c_in + c_skip, c_skip), conv_bn_relu(c_skip, c_skip)))
        self.refine = conv_bn_relu(ch[0] + params.full_res_channels, ch[0]) if full_res else None
        self.head = nn.Conv2d(ch[0], out_channels, 1)
        self.multiple = max(16, 2 ** len(ch))  # inputs are padded to a multiple of the coarsest stride (at least 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = self.full(x) if self.full is not None else None
        skips = []
        for stage in self.down:
            x = stage(x)
            skips.append(x)
        x = self.context(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        if full is None:
            return self.head(x)  # stride 2
        x = F.interpolate(x, size=full.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.refine(torch.cat([x, full], 1)))


def pad_masks(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [N, h, w] -> bool [N, height, width] (zero padding at the bottom and right)."""
    out = torch.zeros((masks.shape[0], height, width), dtype=torch.bool, device=masks.device)
    out[:, : masks.shape[1], : masks.shape[2]] = masks.bool()
    return out


def box_soft_masks(prob_maps: Sequence[np.ndarray], offsets: Sequence[tuple[int, int]], boxes: np.ndarray, size: int) -> np.ndarray:
    """Per instance, a local probability map float [h_i, w_i] whose top-left pixel sits at
    ``offsets[i]`` = (x0, y0) in the image, sampled into an [size, size] map spanning
    ``boxes[i]`` (xyxy, image pixels) -> float16 [N, size, size]."""
    out = np.zeros((len(prob_maps), size, size), np.float32)
    for i, (pm, (x0, y0), box) in enumerate(zip(prob_maps, offsets, boxes)):
        local_box = (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)
        out[i] = crop_to_box_frame(pm, local_box, size)
    return out.astype(np.float16)


@dataclass
class EmbBatch:
    tensors: list[torch.Tensor]  # each [3, H, W] float in [0, 1]
    sizes: list[tuple[int, int]]  # (H, W)


class ClusterAdapter(ModelAdapter):
    """Adapter of the embedding methods: the network's eval-mode forward returns, per image, the
    clusters of ``segpipe.modeling.embed_cluster``; postprocess turns them into Instances (RLE
    masks, tight boxes, box-frame soft masks sampled from the clusters' membership
    probabilities), dropping clusters scoring below ``score_threshold``."""

    params_cls: type[EmbedNetParams] = EmbedNetParams
    build_network: staticmethod
    bound_param: str | None = "max_instances"  # the params field that caps the clusters per image

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.score_threshold = 0.0

    @classmethod
    def from_card(cls, card: ModelCard) -> "ClusterAdapter":
        params = cls.params_cls.model_validate(card.params)
        return cls(network=cls.build_network(params=params, num_classes=len(card.categories)),
                   categories=[c.model_dump() for c in card.categories],
                   instance_bound=getattr(params, cls.bound_param, None) if cls.bound_param else None)

    def set_score_threshold(self, value: float) -> None:
        self.score_threshold = float(value)

    def preprocess(self, images: Sequence[np.ndarray]) -> EmbBatch:
        tensors, sizes = self.to_tensors(images)
        return EmbBatch(tensors=tensors, sizes=sizes)

    def forward(self, batch: EmbBatch) -> list[list[Cluster]]:
        return self.network([t.to(self.device) for t in batch.tensors])

    def raw_counts(self, raw: list[list[Cluster]]) -> list[int]:
        """Clusters per image, before the score threshold drops any."""
        return [len(cl) for cl in raw]

    def postprocess(self, raw: list[list[Cluster]], batch: EmbBatch) -> list[Instances]:
        return [self.clusters_to_instances([c for c in cl if c.score >= self.score_threshold], h, w)
                for cl, (h, w) in zip(raw, batch.sizes)]

    def clusters_to_instances(self, clusters: list[Cluster], height: int, width: int) -> Instances:
        clusters = sorted(clusters, key=lambda c: -c.score)
        rles, boxes = [], np.zeros((len(clusters), 4), np.float32)
        for i, c in enumerate(clusters):
            x0, y0 = int(c.xs.min()), int(c.ys.min())
            local = np.zeros((int(c.ys.max()) - y0 + 1, int(c.xs.max()) - x0 + 1), bool)
            local[c.ys - y0, c.xs - x0] = True
            rles.append(encode_local(local, x0, y0, height, width))
            boxes[i] = (x0, y0, x0 + local.shape[1], y0 + local.shape[0])
        probs = box_soft_masks([c.prob for c in clusters], [c.window[:2] for c in clusters], boxes, SOFT_MASK_SIZE)
        labels = np.asarray([c.label for c in clusters], np.int64)
        return Instances(
            height=height,
            width=width,
            boxes=boxes,
            scores=np.asarray([c.score for c in clusters], np.float32),
            labels=self.category_ids[labels - 1] if len(labels) else np.zeros(0, np.int64),
            masks=rles,
            mask_probs=probs,
        )
