"""`segpipe bench tiling`: mask AP of tiled vs untiled inference on large images, seam IoU, and
the memory and time of merging a huge image's tiles.

Untiled is measured two ways: *downscaled* (the image resized to one tile, predicted once and
mapped back: what fits a model's training size) and *native* (the whole image in one pass at
full resolution, when the model is fully convolutional and memory allows).
"""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from segpipe.config import TilingConfig
from segpipe.evaluation import evaluate, instances_to_results, load_gt
from segpipe.modeling.tiled import resize, default_tile, tiled_predict, upscale
from segpipe.modeling.zoo import load_adapter
from segpipe.ops import masks as mask_ops
from segpipe.ops.tiles import plan_tiles


def crossing(bboxes_xywh: np.ndarray, height: int, width: int, tile: int, overlap: float) -> np.ndarray:
    """bool [N]: the box straddles an internal tile edge of the plan (a tile side inside the image)."""
    tiles = plan_tiles(height, width, tile, overlap)
    xs = sorted({t.x0 for t in tiles if t.x0 > 0} | {t.x1 for t in tiles if t.x1 < width})
    ys = sorted({t.y0 for t in tiles if t.y0 > 0} | {t.y1 for t in tiles if t.y1 < height})
    b = np.asarray(bboxes_xywh, np.float64).reshape(-1, 4)
    x0, y0, x1, y1 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    cx = np.zeros(len(b), bool)
    for e in xs:
        cx |= (x0 < e) & (x1 > e)
    for e in ys:
        cx |= (y0 < e) & (y1 > e)
    return cx


@contextmanager
def uncapped(adapter, detections: int = 2000):
    """While in the block, a Mask R-CNN sees the whole image at its native scale (no resize to
    its training size) with its per-image caps (proposals kept, detections) raised, so a large
    image is not cut to a 256-pixel budget (other methods have no such caps or resizing)."""
    net = getattr(adapter, "network", None)
    heads, rpn = getattr(net, "roi_heads", None), getattr(net, "rpn", None)
    if heads is None or rpn is None:
        yield
        return
    from segpipe.modeling.maskrcnn import NativeScaleTransform

    saved = (heads.detections_per_img, dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n), net.transform)
    heads.detections_per_img = detections
    rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"] = 4 * detections, 2 * detections
    t = net.transform  # a card trained with resizing would shrink the whole image to its training size
    net.transform = NativeScaleTransform(t.min_size, t.max_size, t.image_mean, t.image_std)
    try:
        yield
    finally:
        heads.detections_per_img, rpn._pre_nms_top_n, rpn._post_nms_top_n, net.transform = saved


def best_iou(gt_rles: list[dict], pred_rles: list[dict]) -> np.ndarray:
    """[N] each ground-truth mask's best IoU with any prediction (0 without predictions)."""
    if not gt_rles:
        return np.zeros(0)
    if not pred_rles:
        return np.zeros(len(gt_rles))
    return mask_ops.iou(gt_rles, pred_rles).max(1)


def run(models: list[str], data: Path, *, overlap: float = 0.25, max_images: int | None = None, native: bool = True,
        max_dets: int = 1000, score_min: float = 0.3, log=print) -> dict:
    """Per model: AP / APs / ARmax of tiled, downscaled and native inference on ``data``
    (annotations.json + images/), seconds per image, and the seam check: the mean best IoU of
    the ground-truth objects that straddle an internal tile edge, tiled vs native (predictions
    scoring >= ``score_min``)."""
    from PIL import Image

    gt = load_gt(str(data / "annotations.json"))
    ids = sorted(gt.getImgIds())[:max_images]
    out = {}
    for name in models:
        adapter, card = load_adapter(name)
        tile = default_tile(card)
        cfg = TilingConfig(mode="on", overlap=overlap)
        res = {k: [] for k in ("tiled", "downscaled", "native")}
        secs = {k: 0.0 for k in res}
        seam = {"tiled": [], "native": []}
        for iid in ids:
            info = gt.imgs[iid]
            image = np.array(Image.open(data / "images" / info["file_name"]).convert("RGB"))
            h, w = image.shape[:2]
            preds = {}
            t = time.perf_counter()
            preds["tiled"] = tiled_predict(adapter, image, tile, cfg, batch_size=4)
            secs["tiled"] += time.perf_counter() - t
            t = time.perf_counter()
            s = tile / max(h, w)
            preds["downscaled"] = upscale(adapter.predict([resize(image, max(1, round(h * s)), max(1, round(w * s)))])[0], h, w)
            secs["downscaled"] += time.perf_counter() - t
            if native:
                t = time.perf_counter()
                with uncapped(adapter):
                    preds["native"] = adapter.predict([image])[0]
                secs["native"] += time.perf_counter() - t
            for k, p in preds.items():
                res[k].extend(instances_to_results(iid, p))
            anns = gt.loadAnns(gt.getAnnIds(imgIds=[iid]))
            cross = crossing(np.array([a["bbox"] for a in anns]), h, w, tile, overlap)
            g = [gt.annToRLE(a) for a, c in zip(anns, cross) if c]
            for k in seam:
                if k in preds:
                    p = preds[k].select(np.nonzero(preds[k].scores >= score_min)[0])
                    seam[k].extend(best_iou(g, p.masks).tolist())
            log(f"  {name} image {iid}: {len(anns)} objects, {int(cross.sum())} crossing tile edges, "
                + ", ".join(f"{k} {len(p)}" for k, p in preds.items()))
        row = {"tile": tile, "overlap": overlap, "n_images": len(ids)}
        for k, r in res.items():
            if k == "native" and not native:
                continue
            st = evaluate(gt, r, max_dets=max_dets, image_ids=ids)
            row[k] = {"AP": st["AP"], "APs": st["APs"], "APm": st["APm"], "ARmax": st["ARmax"],
                      "s_per_image": secs[k] / max(len(ids), 1)}
        row["seam"] = {"n_objects": len(seam["tiled"]), "tiled_mean_iou": float(np.mean(seam["tiled"])) if seam["tiled"] else None,
                       "native_mean_iou": float(np.mean(seam["native"])) if seam["native"] else None}
        out[name] = row
    return out


def table(results: dict) -> str:
    lines = ["| model | tile | tiled AP / APs | downscaled AP / APs | native AP / APs | APs tiled - downscaled | "
             "seam IoU tiled vs native (n) | s/img tiled, downscaled, native |", "| --- " * 8 + "|"]
    for name, r in results.items():
        def ap(k):
            return f"{r[k]['AP']:.3f} / {r[k]['APs']:.3f}" if k in r else "-"
        sm = r["seam"]
        seam = (f"{sm['tiled_mean_iou']:.3f} vs {sm['native_mean_iou']:.3f} ({sm['n_objects']})"
                if sm["tiled_mean_iou"] is not None and sm["native_mean_iou"] is not None else "-")
        speed = ", ".join(f"{r[k]['s_per_image']:.2f}" for k in ("tiled", "downscaled", "native") if k in r)
        gain = r["tiled"]["APs"] - r["downscaled"]["APs"]
        lines.append(f"| {name} | {r['tile']} | {ap('tiled')} | {ap('downscaled')} | {ap('native')} | {gain:+.3f} | {seam} | {speed} |")
    return "\n".join(lines)


def _disjoint_discs(rng, size: int, n: int, r_lo: float = 5, r_hi: float = 30) -> tuple[np.ndarray, ...]:
    """``n`` non-overlapping discs (centres x, y and radii) inside a ``size`` square, by rejection."""
    xs, ys, rs = np.zeros(n), np.zeros(n), np.zeros(n)
    k = tries = 0
    while k < n:
        tries += 1
        if tries > 200 * n:
            raise ValueError(f"cannot place {n} disjoint discs in {size} x {size}")
        x, y, r = rng.uniform(r_hi, size - r_hi), rng.uniform(r_hi, size - r_hi), rng.uniform(r_lo, r_hi)
        if k and (np.hypot(xs[:k] - x, ys[:k] - y) < rs[:k] + r + 2).any():
            continue
        xs[k], ys[k], rs[k] = x, y, r
        k += 1
    return xs, ys, rs


def merge_memory(size: int = 8000, n_instances: int = 2000, tile: int = 512, overlap: float = 0.25, seed: int = 0) -> dict:
    """Peak RSS and time of merging the tiles of a ``size`` x ``size`` image holding
    ``n_instances`` disjoint objects (discs of 10-60 px, each predicted by every tile that sees
    it, whole or cut, as a model would), without a model: the cost of the tiling machinery
    itself. A sound merge returns exactly ``n_instances``."""
    from segpipe.ops.tiles import merge_tiles
    from segpipe.structures import Instances

    rng = np.random.default_rng(seed)
    cx, cy, rad = _disjoint_discs(rng, size, n_instances)
    tiles = plan_tiles(size, size, tile, overlap)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    per_tile = []
    for t in tiles:
        inside = (cx + rad > t.x0) & (cx - rad < t.x1) & (cy + rad > t.y0) & (cy - rad < t.y1)
        masks, boxes = [], []
        for k in np.nonzero(inside)[0]:
            x0, y0 = int(max(cx[k] - rad[k], t.x0)), int(max(cy[k] - rad[k], t.y0))
            x1, y1 = int(min(cx[k] + rad[k] + 1, t.x1)), int(min(cy[k] + rad[k] + 1, t.y1))
            yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
            local = (xx - cx[k]) ** 2 + (yy - cy[k]) ** 2 <= rad[k] ** 2
            if not local.any():
                continue
            masks.append(mask_ops.encode_local(local, x0 - t.x0, y0 - t.y0, t.height, t.width))
            boxes.append([x0 - t.x0, y0 - t.y0, x1 - t.x0, y1 - t.y0])
        n = len(masks)
        per_tile.append((t, Instances(height=t.height, width=t.width, boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                                      scores=rng.uniform(0.5, 1, n).astype(np.float32), labels=np.ones(n, np.int64),
                                      masks=masks, mask_probs=np.full((n, 28, 28), 0.9, np.float16))))
    t_build = time.perf_counter() - t0
    t1 = time.perf_counter()
    merged = merge_tiles(per_tile, size, size)
    t_merge = time.perf_counter() - t1
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"size": size, "instances": n_instances, "tiles": len(tiles),
            "tile_predictions": int(sum(len(i) for _, i in per_tile)), "merged": len(merged),
            "merge_s": round(t_merge, 2), "build_s": round(t_build, 2),
            "peak_rss_mb": round(rss1 / 1024, 1), "rss_growth_mb": round((rss1 - rss0) / 1024, 1),
            "dense_full_frame_per_instance_mb": round(size * size / 2**20, 1)}


def model_memory(model: str, data: Path, size: int = 8000, overlap: float = 0.25, batch_size: int = 8) -> dict:
    """Peak RSS and time of ``tiled_predict`` with a zoo model over a ``size`` x ``size`` mosaic of
    ``data``'s images (repeated as needed): the end-to-end cost of a huge image."""
    from PIL import Image

    paths = sorted((data / "images").glob("*"))
    tiles_img = [np.array(Image.open(p).convert("RGB")) for p in paths]
    th, tw = tiles_img[0].shape[:2]
    rows = []
    k = 0
    for _ in range(-(-size // th)):
        row = []
        for _ in range(-(-size // tw)):
            row.append(tiles_img[k % len(tiles_img)][:th, :tw])
            k += 1
        rows.append(np.concatenate(row, 1))
    image = np.ascontiguousarray(np.concatenate(rows, 0)[:size, :size])
    del rows, tiles_img
    adapter, card = load_adapter(model)
    tile = default_tile(card)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    inst = tiled_predict(adapter, image, tile, TilingConfig(mode="on", overlap=overlap), batch_size)
    wall = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"model": model, "size": size, "tile": tile, "tiles": len(plan_tiles(size, size, tile, overlap)),
            "instances": len(inst), "wall_s": round(wall, 1), "peak_rss_mb": round(rss1 / 1024, 1),
            "rss_before_mb": round(rss0 / 1024, 1), "image_mb": round(image.nbytes / 2**20, 1)}
