"""A zoo refiner: any model's Instances in, the same instances with refined masks out.

``Refiner.refine(image, instances)``: the image's fine features once, then per instance its
coarse map in the frame (the box grown by ``margin``): the box-frame soft mask resampled
(zero outside its box), or the binary mask when the instances carry no soft masks; adaptive
subdivision (``PointRendRefiner.subdivide``) whose map is resampled onto the frame's pixels, or
with ``render: pixels`` a last step on the pixels themselves (``render_pixels``, instances
batched by size); thresholded at 0.5 and encoded. Scores, labels and order are kept; an instance whose
refined mask would be empty keeps its original mask (refinement never loses an instance).
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import roi_align

from segpipe.config import ModelCard, PointRendParams
from segpipe.modeling.base import NetworkHolder
from segpipe.modeling.registry import register
from segpipe.ops import masks as mask_ops
from segpipe.refine.pointrend import PointRendRefiner, build_network, grow
from segpipe.structures import SOFT_MASK_SIZE, Instances


def box_maps_in_frames(maps: np.ndarray, boxes: np.ndarray, frames: np.ndarray, size: int) -> np.ndarray:
    """``mask_ops.box_maps_to_frames`` on numpy arrays -> float32 [N, size, size]."""
    t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    return mask_ops.box_maps_to_frames(t(maps), t(boxes), t(frames), size).numpy()


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
    def refine(self, image: np.ndarray, inst: Instances, disagreement: np.ndarray | None = None,
               min_score: float = 0.0) -> Instances:
        """``image`` uint8 [H, W, 3]; ``inst`` of that image; ``disagreement`` optional float
        [N, S, S] in each instance's box frame -> Instances with refined masks, tight boxes and
        box-frame soft masks (instances scoring under ``min_score`` come back as they were)."""
        if len(inst) == 0:
            return inst
        p: PointRendParams = self.network.params
        h, w = inst.height, inst.width
        t = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).to(self.device).permute(2, 0, 1)
        if self.network.features is None:  # fine=patch: the features are the image, normalised as pad_batch does
            feats = t.float().mul_(1.0 / 63.75).sub_(2.0)  # (x / 255 - 0.5) / 0.25
        else:
            feats = self.network.image_features([t.float().div_(255.0)])[0]
        frames = grow(torch.from_numpy(inst.boxes.astype(np.float32)), p.margin).numpy()
        coarse = torch.from_numpy(coarse_in_frames(inst, frames, p.coarse_size)).to(self.device)
        dis = None
        if disagreement is not None and p.use_disagreement:
            dis = torch.from_numpy(box_maps_in_frames(disagreement, inst.boxes, frames, p.coarse_size)).to(self.device)
        regions = np.stack([np.maximum(np.floor(frames[:, 0]), 0), np.maximum(np.floor(frames[:, 1]), 0),
                            np.minimum(np.ceil(frames[:, 2]), w), np.minimum(np.ceil(frames[:, 3]), h)], 1).astype(np.int64)
        ok = np.nonzero((regions[:, 2] > regions[:, 0]) & (regions[:, 3] > regions[:, 1]) & (inst.scores >= min_score))[0]
        if len(ok) == 0:
            return inst
        ft = torch.from_numpy(frames).to(self.device)
        out = (inst.boxes.copy(), list(inst.masks),
               np.array(inst.mask_probs if inst.mask_probs is not None else np.zeros((len(inst), SOFT_MASK_SIZE, SOFT_MASK_SIZE)), np.float16))
        if p.render == "pixels":
            logits, dis = self._grid_steps(feats, coarse, ft, dis)
            padded = self.network.pad_window(feats) if self.network.features is None else None
            # Regions are padded to the largest in a batch: batch them by size, so one large
            # object does not make every small one pay for its area.
            side = (regions[ok, 2:] - regions[ok, :2]).max(1)
            bucket = np.ceil(np.log2(np.maximum(side, 32) / 32)).astype(np.int64)
            for b in np.unique(bucket):
                part = ok[bucket == b]
                sel, reg = torch.from_numpy(part).to(self.device), torch.from_numpy(regions[part]).to(self.device)
                px = self.network.render_pixels(feats, logits[sel], ft[sel], reg, None if dis is None else dis[sel], padded)
                self._paste(torch.sigmoid(px), regions[part], part, h, w, *out)
        else:
            maps = self.network.subdivide(feats, coarse, ft, dis, torch.from_numpy(self._useful_sizes(frames, p)).to(self.device))
            sel, reg = torch.from_numpy(ok).to(self.device), torch.from_numpy(regions[ok]).to(self.device)
            self._paste(mask_ops.region_pixels(maps[sel][:, None], ft[sel], reg)[:, 0], regions[ok], ok, h, w, *out)
        boxes, rles, probs = out
        return Instances(height=h, width=w, boxes=boxes.astype(np.float32), scores=inst.scores, labels=inst.labels,
                         masks=rles, mask_probs=probs)

    @staticmethod
    def _paste(px: torch.Tensor, regions: np.ndarray, ok: np.ndarray, h: int, w: int,
               boxes: np.ndarray, rles: list, probs: np.ndarray) -> None:
        """Refined probabilities ``px`` [M, ph, pw] over integer ``regions`` [M, 4] (region j in
        the top-left corner of map j) of instances ``ok`` [M] of an ``h`` x ``w`` image, written
        into ``boxes`` [N, 4], ``rles`` and ``probs`` [N, S, S] (float16) in place: each mask
        thresholded at 0.5, its tight box and its box-frame soft mask. An instance whose refined
        mask is empty keeps its original one (refinement never loses an instance)."""
        m, ph, pw = px.shape
        px = px * mask_ops.in_regions(torch.from_numpy(regions).to(px.device), ph, pw)
        keep = px >= 0.5
        tight, soft, nonempty = mask_ops.tight_frames(keep, px[:, None], SOFT_MASK_SIZE)
        keep_np, tight_np = keep.cpu().numpy(), tight.cpu().numpy().astype(np.int64)
        soft_np, nonempty_np = soft[:, 0].cpu().numpy(), nonempty.cpu().numpy()
        done = np.nonzero(nonempty_np)[0]
        encoded = mask_ops.encode_stack(keep_np[done], regions[done, 0], regions[done, 1], h, w)
        for j, rle in zip(done, encoded):
            i, (x0, y0, x1, y1) = ok[j], tight_np[j]
            ox, oy = int(regions[j, 0]), int(regions[j, 1])
            rles[i] = rle
            boxes[i] = (ox + x0, oy + y0, ox + x1, oy + y1)
            probs[i] = soft_np[j]

    def _grid_steps(self, feats: torch.Tensor, coarse: torch.Tensor, frames: torch.Tensor,
                    dis: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``render: pixels``, before the pixel step: subdivision while the grid stays coarser than
        each frame's pixels (at most ``output_size``) -> (logits [N, R, R], disagreement alike)."""
        p: PointRendParams = self.network.params
        side = (frames[:, 2:] - frames[:, :2]).amax(1)
        steps = torch.floor(torch.log2((side / p.coarse_size).clamp(min=1.0)))
        sizes = (p.coarse_size * 2**steps).clamp(max=max(p.output_size, p.coarse_size)).to(torch.int64)
        return self.network.subdivide_logits(feats, coarse, frames, dis, sizes)

    @staticmethod
    def _useful_sizes(frames: np.ndarray, p: PointRendParams) -> np.ndarray:
        """Per instance, the side its refined map needs: about one cell per pixel of its frame's
        longer side, at most ``output_size``, and at least one subdivision step (a small object
        still gets its uncertain points re-predicted) -> int64 [N]."""
        side = np.ceil((frames[:, 2:] - frames[:, :2]).max(1)) if len(frames) else np.zeros(0)
        return np.clip(side, 2 * p.coarse_size, max(p.output_size, 2 * p.coarse_size)).astype(np.int64)


@register("pointrend")
def build(card: ModelCard) -> Refiner:
    return Refiner.from_card(card)
