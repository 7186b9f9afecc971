"""Run any adapter tiled (sliding window) over a large image; see segpipe.ops.tiles for the plan
and the merge. Tiles of one image go through the adapter in batches of ``batch_size``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from segpipe.config import ModelCard, TilingConfig
from segpipe.ops import masks as mask_ops
from segpipe.ops.tiles import concat, merge_greedy, merge_tiles, plan_tiles
from segpipe.structures import Instances

DEFAULT_TILE = 512


def default_tile(card: ModelCard) -> int:
    """The model's training resolution: its training crop, else its training images' longer
    side (shapes generator), else DEFAULT_TILE."""
    tr = card.training
    if tr is not None:
        crop = (tr.config or {}).get("crop")
        if crop:
            return int(crop)
        spec = (tr.data or {}).get("train")
        if isinstance(spec, dict) and spec.get("height") and spec.get("width"):
            return int(max(spec["height"], spec["width"]))
    return DEFAULT_TILE


def needs_tiling(height: int, width: int, tile: int, cfg: TilingConfig) -> bool:
    if cfg.mode == "off":
        return False
    if cfg.mode == "on":
        return max(height, width) > tile
    return max(height, width) > cfg.auto_factor * tile


def tiled_predict(adapter, image: np.ndarray, tile: int, cfg: TilingConfig, batch_size: int,
                  timings: dict[str, float] | None = None, at_bound: list[bool] | None = None) -> Instances:
    """uint8 [H, W, 3] -> Instances in image coordinates, predicted tile by tile and merged
    (plus the downscaled full-image pass's large objects with ``cfg.full_image``). ``timings``:
    as ``ModelAdapter.predict``'s, summed over the tile batches. ``at_bound``: gets one flag for
    the image, whether any tile (or the full-image pass) reached the adapter's instance bound."""
    h, w = image.shape[:2]
    tiles = plan_tiles(h, w, tile, cfg.overlap)
    preds: list[Instances] = []
    flags: list[bool] | None = [] if at_bound is not None else None
    for i in range(0, len(tiles), batch_size):
        chunk = tiles[i:i + batch_size]
        preds.extend(_predict(adapter, [np.ascontiguousarray(image[t.y0:t.y1, t.x0:t.x1]) for t in chunk], timings, flags))
    merged = merge_tiles(list(zip(tiles, preds)), h, w, ios_thresh=cfg.ios_thresh)
    if not cfg.full_image:
        if at_bound is not None:
            at_bound.append(any(flags))
        return merged
    scale = tile / max(h, w)
    small = resize(image, max(1, round(h * scale)), max(1, round(w * scale)))
    coarse = upscale(_predict(adapter, [small], timings, flags)[0], h, w)
    if at_bound is not None:
        at_bound.append(any(flags))
    side = np.maximum(coarse.boxes[:, 2] - coarse.boxes[:, 0], coarse.boxes[:, 3] - coarse.boxes[:, 1])
    large = coarse.select(np.nonzero(side > cfg.full_image_min_size * tile)[0])
    return merge_greedy(concat([merged, large], h, w), cfg.ios_thresh)


def _predict(adapter, images: list[np.ndarray], timings: dict[str, float] | None,
             at_bound: list[bool] | None = None) -> list[Instances]:
    """``adapter.predict``, passing ``timings`` and ``at_bound`` only when asked (any object with
    ``predict(images)`` works; one without ``reached_bound`` never reports the bound)."""
    if at_bound is not None and not hasattr(adapter, "reached_bound"):
        at_bound.extend([False] * len(images))
        at_bound = None
    kw = {k: v for k, v in (("timings", timings), ("at_bound", at_bound)) if v is not None}
    return adapter.predict(images, **kw)


def resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    y = F.interpolate(x, size=(h, w), mode="area" if h < image.shape[0] else "bilinear", align_corners=None)
    return y[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def upscale(inst: Instances, height: int, width: int) -> Instances:
    """Instances of a downscaled image -> the full ``height`` x ``width`` frame: boxes scaled,
    masks pasted at full resolution from their box-frame soft masks (from the small mask when
    there are none), never a dense full-frame array."""
    if len(inst) == 0:
        return Instances(height=height, width=width)
    sy, sx = height / inst.height, width / inst.width
    boxes = inst.boxes * np.array([sx, sy, sx, sy], np.float32)
    if inst.mask_probs is not None:
        probs = inst.mask_probs.astype(np.float32)
    else:
        dense = mask_ops.decode(inst.masks).astype(np.float32)
        probs = np.stack([mask_ops.crop_to_box_frame(m, b) for m, b in zip(dense, inst.boxes)])
    masks = [mask_ops.paste_soft_mask(p, b, height, width) for p, b in zip(probs, boxes)]
    keep = np.nonzero(mask_ops.area(masks) > 0)[0]
    out = Instances(height=height, width=width, boxes=boxes.astype(np.float32), scores=inst.scores.copy(),
                    labels=inst.labels.copy(), masks=masks, mask_probs=probs.astype(np.float16))
    return out.select(keep)
