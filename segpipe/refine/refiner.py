"""A zoo refiner: any model's Instances in, the same instances with refined masks out.

``Refiner.refine(image, instances)``: the image's fine features once, then per instance its
coarse map in the frame (the box grown by ``margin``): the box-frame soft mask resampled
(zero outside its box), or the binary mask when the instances carry no soft masks; adaptive
subdivision (``PointRendRefiner.subdivide``); the refined map is resampled onto the frame's
pixels, thresholded at 0.5 and encoded. Scores, labels and order are kept; an instance whose
refined mask would be empty keeps its original mask (refinement never loses an instance).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from segpipe.config import ModelCard, PointRendParams
from segpipe.modeling.base import NetworkHolder
from segpipe.modeling.registry import register
from segpipe.ops import masks as mask_ops
from segpipe.refine.pointrend import PointRendRefiner, build_network, grow
from segpipe.structures import SOFT_MASK_SIZE, Instances


def box_maps_in_frames(maps: np.ndarray, boxes: np.ndarray, frames: np.ndarray, size: int) -> np.ndarray:
    """Box-frame maps [N, S, S] spanning xyxy ``boxes`` [N, 4], sampled bilinearly at the
    ``size`` x ``size`` cell centres of xyxy ``frames`` [N, 4] (zero outside each box) -> float32
    [N, size, size]."""
    f = torch.from_numpy(frames.astype(np.float32))
    b = torch.from_numpy(boxes.astype(np.float32))
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    xs = f[:, None, 0] + c[None] * (f[:, 2] - f[:, 0])[:, None]  # [N, size] image x of the cell centres
    ys = f[:, None, 1] + c[None] * (f[:, 3] - f[:, 1])[:, None]
    gx = (xs - b[:, None, 0]) / (b[:, 2] - b[:, 0]).clamp(min=1e-6)[:, None] * 2 - 1  # in the box frame
    gy = (ys - b[:, None, 1]) / (b[:, 3] - b[:, 1]).clamp(min=1e-6)[:, None] * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(-1, size, -1), gy[:, :, None].expand(-1, -1, size)], -1)
    src = torch.from_numpy(maps.astype(np.float32))[:, None]
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0].numpy()


def coarse_in_frames(inst: Instances, frames: np.ndarray, size: int) -> np.ndarray:
    """Each instance's mask probabilities at the ``size`` x ``size`` cell centres of its frame
    (xyxy ``frames`` [N, 4]) -> float32 [N, size, size]."""
    n = len(inst)
    if n == 0:
        return np.zeros((0, size, size), np.float32)
    if inst.mask_probs is not None:
        return box_maps_in_frames(inst.mask_probs, inst.boxes, frames, size)
    out = np.zeros((n, size, size), np.float32)
    for i in range(n):
        x0, y0 = int(np.floor(frames[i, 0])), int(np.floor(frames[i, 1]))
        x1, y1 = int(np.ceil(frames[i, 2])), int(np.ceil(frames[i, 3]))
        local = torch.from_numpy(mask_ops.decode_region(inst.masks[i], (x0, y0, x1, y1)).astype(np.float32))
        roi = torch.tensor([[0.0, frames[i, 0] - x0, frames[i, 1] - y0, frames[i, 2] - x0, frames[i, 3] - y0]])
        out[i] = roi_align(local[None, None], roi, size, 1.0, 2, True)[0, 0].numpy()
    return out


class Refiner(NetworkHolder):
    """Holds a ``PointRendRefiner``; no global state (safe in a Ray actor)."""

    def __init__(self, network: PointRendRefiner, name: str = "refiner", version: str = "") -> None:
        self.network = network
        self.name, self.version = name, version
        self.device = torch.device("cpu")

    @classmethod
    def from_card(cls, card: ModelCard) -> "Refiner":
        return cls(build_network(params=PointRendParams.model_validate(card.params)), card.name)

    @torch.inference_mode()
    def refine(self, image: np.ndarray, inst: Instances, disagreement: np.ndarray | None = None) -> Instances:
        """``image`` uint8 [H, W, 3]; ``inst`` of that image; ``disagreement`` optional float
        [N, S, S] in each instance's box frame -> Instances with refined masks, tight boxes and
        box-frame soft masks."""
        if len(inst) == 0:
            return inst
        p: PointRendParams = self.network.params
        h, w = inst.height, inst.width
        t = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0).to(self.device)
        feats = self.network.image_features([t])[0]
        frames = grow(torch.from_numpy(inst.boxes.astype(np.float32)), p.margin).numpy()
        coarse = torch.from_numpy(coarse_in_frames(inst, frames, p.coarse_size)).to(self.device)
        dis = None
        if disagreement is not None and p.use_disagreement:
            dis = torch.from_numpy(box_maps_in_frames(disagreement, inst.boxes, frames, p.coarse_size)).to(self.device)
        out_size = min(p.output_size, max(2 * p.coarse_size, self._useful_size(frames)))  # at least one step
        refined = self.network.subdivide(feats, coarse, torch.from_numpy(frames).to(self.device), dis, out_size).cpu().numpy()
        boxes, rles, probs = inst.boxes.copy(), list(inst.masks), np.array(inst.mask_probs if inst.mask_probs is not None
                                                                             else np.zeros((len(inst), SOFT_MASK_SIZE, SOFT_MASK_SIZE)), np.float16)
        for i in range(len(inst)):
            region = (max(int(np.floor(frames[i, 0])), 0), max(int(np.floor(frames[i, 1])), 0),
                      min(int(np.ceil(frames[i, 2])), w), min(int(np.ceil(frames[i, 3])), h))
            if region[2] <= region[0] or region[3] <= region[1]:
                continue
            px = mask_ops.resample_box_frame(refined[i], frames[i], region)
            keep = px >= 0.5
            if not keep.any():
                continue  # never lose an instance: keep its original mask
            ys, xs = np.nonzero(keep)
            tight = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            rles[i] = mask_ops.encode_local(keep, region[0], region[1], h, w)
            boxes[i] = (tight[0] + region[0], tight[1] + region[1], tight[2] + region[0], tight[3] + region[1])
            probs[i] = mask_ops.crop_to_box_frame(px, tight, SOFT_MASK_SIZE)
        return Instances(height=h, width=w, boxes=boxes.astype(np.float32), scores=inst.scores, labels=inst.labels,
                         masks=rles, mask_probs=probs.astype(np.float16))

    @staticmethod
    def _useful_size(frames: np.ndarray) -> int:
        """Refining past about one cell per pixel of the largest frame side adds nothing (one
        subdivision step always runs: small objects still get their uncertain points re-predicted)."""
        return int(np.ceil((frames[:, 2:] - frames[:, :2]).max())) if len(frames) else 0


@register("pointrend")
def build(card: ModelCard) -> Refiner:
    return Refiner.from_card(card)
