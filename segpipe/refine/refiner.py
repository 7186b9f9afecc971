"""A zoo refiner: any model's Instances in, the same instances with refined masks out.

``Refiner.refine(image, instances)``: the image's fine features once, then per instance its
coarse map in the frame (the box grown by ``margin``): the box-frame soft mask resampled
(zero outside its box), or the binary mask when the instances carry no soft masks; adaptive
subdivision (``PointRendRefiner.subdivide``) whose map is resampled onto the frame's pixels, or
with ``render: pixels`` a last step on the pixels themselves (``render_pixels``, instances
batched by size; ``refine_batch`` takes the instances of several images through that step
together); thresholded at 0.5 and encoded. Scores, labels and order are kept; an instance whose
refined mask would be empty keeps its original mask (refinement never loses an instance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torchvision.ops import roi_align

from segpipe.config import ModelCard, PointRendParams
from segpipe.modeling.base import NetworkHolder
from segpipe.modeling.registry import register
from segpipe.ops import masks as mask_ops
from segpipe.refine.pointrend import PaddedImages, PointRendRefiner, build_network, grow
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
        return self.refine_batch([image], [inst], [disagreement], min_score)[0]

    @torch.inference_mode()
    def refine_batch(self, images: Sequence[np.ndarray], insts: Sequence[Instances],
                     disagreements: Sequence[np.ndarray | None] | None = None, min_score: float = 0.0) -> list[Instances]:
        """``refine`` for several images -> one Instances per image, each as ``refine`` gives it.
        With ``render: pixels`` and ``fine: patch`` the pixel step takes the instances of all the
        images at once (batched by region size), so the images share its per-call cost; other
        refiners go image by image."""
        dis_in = list(disagreements) if disagreements is not None else [None] * len(insts)
        p: PointRendParams = self.network.params
        if len(images) > 1 and not (p.render == "pixels" and self.network.features is None):
            return [self.refine_batch([im], [ins], [d], min_score)[0] for im, ins, d in zip(images, insts, dis_in)]
        preps = [self._prepare(im, ins, d, min_score) for im, ins, d in zip(images, insts, dis_in)]
        todo = [k for k, q in enumerate(preps) if q is not None]
        if todo and p.render != "pixels":  # one image (see above)
            q = preps[todo[0]]
            maps = self.network.subdivide(q.feats, q.coarse, q.frames, q.dis,
                                          torch.from_numpy(self._useful_sizes(q.frames.numpy(), p)).to(self.device))
            sel, reg = torch.from_numpy(q.ok).to(self.device), torch.from_numpy(q.regions[q.ok]).to(self.device)
            px = mask_ops.region_pixels(maps[sel][:, None], q.frames[sel], reg)[:, 0]
            for j, *refined in self._paste(px, q.regions[q.ok], q.h, q.w):
                q.put(q.ok[j], *refined)
        elif todo:
            self._render_pixels([preps[k] for k in todo])
        return [ins if q is None else Instances(height=ins.height, width=ins.width, boxes=q.out[0].astype(np.float32),
                                                scores=ins.scores, labels=ins.labels, masks=q.out[1], mask_probs=q.out[2])
                for ins, q in zip(insts, preps)]

    def _prepare(self, image: np.ndarray, inst: Instances, disagreement: np.ndarray | None,
                 min_score: float) -> "_Prepared | None":
        """One image's inputs to the refinement; None when none of its instances is refined."""
        if len(inst) == 0:
            return None
        p: PointRendParams = self.network.params
        h, w = inst.height, inst.width
        frames = grow(torch.from_numpy(inst.boxes.astype(np.float32)), p.margin).numpy()
        regions = np.stack([np.maximum(np.floor(frames[:, 0]), 0), np.maximum(np.floor(frames[:, 1]), 0),
                            np.minimum(np.ceil(frames[:, 2]), w), np.minimum(np.ceil(frames[:, 3]), h)], 1).astype(np.int64)
        ok = np.nonzero((regions[:, 2] > regions[:, 0]) & (regions[:, 3] > regions[:, 1]) & (inst.scores >= min_score))[0]
        if len(ok) == 0:
            return None
        t = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).to(self.device).permute(2, 0, 1)
        if self.network.features is None:  # fine=patch: the features are the image, normalised as pad_batch does
            feats = t.float().mul_(1.0 / 63.75).sub_(2.0)  # (x / 255 - 0.5) / 0.25
        else:
            feats = self.network.image_features([t.float().div_(255.0)])[0]
        coarse = torch.from_numpy(coarse_in_frames(inst, frames, p.coarse_size)).to(self.device)
        dis = None
        if disagreement is not None and p.use_disagreement:
            dis = torch.from_numpy(box_maps_in_frames(disagreement, inst.boxes, frames, p.coarse_size)).to(self.device)
        out = (inst.boxes.copy(), list(inst.masks),
               np.array(inst.mask_probs if inst.mask_probs is not None else np.zeros((len(inst), SOFT_MASK_SIZE, SOFT_MASK_SIZE)), np.float16))
        return _Prepared(h=h, w=w, feats=feats, frames=torch.from_numpy(frames).to(self.device), coarse=coarse, dis=dis,
                         regions=regions, ok=ok, out=out)

    def _render_pixels(self, preps: list["_Prepared"]) -> None:
        """``render: pixels`` for prepared images (several only with fine=patch): each image's grid
        steps, then the pixel step over all their instances, batched by region size so one
        large object does not make every small one pay for its area; pasted into each ``out``."""
        stepped = [self._grid_steps(q.feats, q.coarse, q.frames, q.dis) for q in preps]
        patch = self.network.features is None
        # Every refined instance of every image, as (image k, instance i): the batches take from these.
        kk = np.concatenate([np.full(len(q.ok), k) for k, q in enumerate(preps)])
        ii = np.concatenate([q.ok for q in preps])
        windows = PaddedImages.of([self.network.pad_window(q.feats) for q in preps], torch.from_numpy(kk).to(self.device)) \
            if patch else None
        regions = np.concatenate([q.regions[q.ok] for q in preps])
        res = np.array([stepped[k][0].shape[-1] for k in kk])  # the grid side each instance's logits reached
        side = (regions[:, 2:] - regions[:, :2]).max(1)
        bucket = np.ceil(np.log2(np.maximum(side, 32) / 32)).astype(np.int64)
        for key in np.unique(np.stack([res, bucket], 1), axis=0):
            part = np.nonzero((res == key[0]) & (bucket == key[1]))[0]
            ks, idx = kk[part], ii[part]
            pick = [(k, torch.from_numpy(idx[ks == k]).to(self.device)) for k in np.unique(ks)]  # image order = part order
            logits = torch.cat([stepped[k][0][sel] for k, sel in pick])
            frames = torch.cat([preps[k].frames[sel] for k, sel in pick])
            dis = None if stepped[ks[0]][1] is None else torch.cat([stepped[k][1][sel] for k, sel in pick])
            reg = torch.from_numpy(regions[part]).to(self.device)
            if patch:
                px = self.network.render_pixels(None, logits, frames, reg, dis, windows.select(torch.from_numpy(part)))
            else:
                px = self.network.render_pixels(preps[ks[0]].feats, logits, frames, reg, dis)
            hs, ws = np.array([preps[k].h for k in ks]), np.array([preps[k].w for k in ks])
            for j, *refined in self._paste(torch.sigmoid(px), regions[part], hs, ws):
                preps[ks[j]].put(idx[j], *refined)

    @staticmethod
    def _paste(px: torch.Tensor, regions: np.ndarray, h: int | np.ndarray, w: int | np.ndarray):
        """Refined probabilities ``px`` [M, ph, pw] over integer ``regions`` [M, 4] (region j in
        the top-left corner of map j) of images ``h`` x ``w`` (one size, or per map [M]) -> per
        map j whose mask (thresholded at 0.5) is not empty: (j, its RLE, its tight xyxy box, its
        box-frame soft mask float16 [S, S]). An empty one yields nothing, so the instance keeps its
        original mask (refinement never loses an instance)."""
        m, ph, pw = px.shape
        px = px * mask_ops.in_regions(torch.from_numpy(regions).to(px.device), ph, pw)
        keep = px >= 0.5
        tight, soft, nonempty = mask_ops.tight_frames(keep, px[:, None], SOFT_MASK_SIZE)
        keep_np, tight_np = keep.cpu().numpy(), tight.cpu().numpy().astype(np.int64)
        soft_np, nonempty_np = soft[:, 0].cpu().numpy().astype(np.float16), nonempty.cpu().numpy()
        done = np.nonzero(nonempty_np)[0]
        hs, ws = np.broadcast_to(np.asarray(h), (m,)), np.broadcast_to(np.asarray(w), (m,))
        encoded = mask_ops.encode_stack(keep_np[done], regions[done, 0], regions[done, 1], hs[done], ws[done])
        for j, rle in zip(done, encoded):
            x0, y0, x1, y1 = tight_np[j]
            ox, oy = int(regions[j, 0]), int(regions[j, 1])
            yield int(j), rle, (ox + x0, oy + y0, ox + x1, oy + y1), soft_np[j]

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


@dataclass
class _Prepared:
    """One image's refinement inputs: size, fine features [C, H, W], frames xyxy [N, 4], coarse
    probabilities [N, S, S], disagreement alike or None, integer regions [N, 4], the refined
    instances ``ok`` [M], and its outputs (boxes [N, 4], RLEs, soft masks [N, S, S] float16)
    that the paste fills in."""

    h: int
    w: int
    feats: torch.Tensor
    frames: torch.Tensor
    coarse: torch.Tensor
    dis: torch.Tensor | None
    regions: np.ndarray
    ok: np.ndarray
    out: tuple[np.ndarray, list, np.ndarray]

    def put(self, i: int, rle: dict, box: tuple, soft: np.ndarray) -> None:
        """Instance ``i``'s refined RLE, xyxy box and soft mask into the outputs."""
        boxes, rles, probs = self.out
        rles[i], boxes[i], probs[i] = rle, box, soft


@register("pointrend")
def build(card: ModelCard) -> Refiner:
    return Refiner.from_card(card)
