"""COCO mask evaluation with pycocotools as the oracle.

Predictions are COCO result dicts (image_id, category_id, segmentation RLE, score); ground truth is
a COCO instances json. Run outputs are matched to ground-truth images by file name.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Iterable

import numpy as np
from pycocotools import mask as maskUtils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segpipe.structures import Instances

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "ARmax", "ARs", "ARm", "ARl"]


def instances_to_results(image_id: int, inst: Instances) -> list[dict]:
    """One image's Instances -> COCO result dicts (segmentation = RLE with str counts)."""
    return [
        {
            "image_id": int(image_id),
            "category_id": int(inst.labels[i]),
            "segmentation": inst.masks[i],
            "score": float(inst.scores[i]),
        }
        for i in range(len(inst))
    ]


def load_gt(gt: str | Path | dict) -> COCO:
    """A COCO ground truth from a path or URI (fsspec), or from an already-loaded dict."""
    from segpipe.data.coco import read_json

    coco = COCO()
    coco.dataset = read_json(str(gt)) if not isinstance(gt, dict) else gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


BOUNDARY_DILATION_RATIO = 0.02  # Boundary IoU (Cheng et al., CVPR 2021): band width = 2% of the image diagonal


def boundary_dilation(height: int, width: int, ratio: float = BOUNDARY_DILATION_RATIO) -> int:
    """Boundary band width in pixels for an image: round(ratio x diagonal), at least 1."""
    return max(1, int(round(ratio * float(np.hypot(height, width)))))


def boundary_rle(rle: dict, dilation: int) -> dict:
    """The inner boundary band of an RLE mask: its pixels within ``dilation`` (chessboard
    distance) of the background, the image border counting as background -> RLE. O(box)."""
    from scipy import ndimage

    from segpipe.ops import masks as mask_ops

    h, w = (int(v) for v in rle["size"])
    x, y, bw, bh = (int(round(v)) for v in mask_ops.to_bbox([rle])[0])
    if bw == 0 or bh == 0:
        return rle
    crop = mask_ops.decode_region(rle, (x, y, x + bw, y + bh))  # zero outside: erosion sees background there
    inner = ndimage.binary_erosion(crop, structure=np.ones((3, 3), bool), iterations=dilation, border_value=0)
    return mask_ops.encode_local(crop & ~inner, x, y, h, w)


class _BoundaryEval(COCOeval):
    """pycocotools' segm evaluation with IoU = min(mask IoU, boundary IoU) for non-crowd ground
    truth: the matching rule of Boundary AP."""

    def computeIoU(self, imgId, catId):  # noqa: N802 - pycocotools' name
        from segpipe.ops import masks as mask_ops

        mask_ious = super().computeIoU(imgId, catId)
        p = self.params
        if p.useCats:
            gt, dt = self._gts[imgId, catId], self._dts[imgId, catId]
        else:
            gt = [g for c in p.catIds for g in self._gts[imgId, c]]
            dt = [d for c in p.catIds for d in self._dts[imgId, c]]
        if len(gt) == 0 or len(dt) == 0:
            return mask_ious
        dt = [dt[i] for i in np.argsort([-d["score"] for d in dt], kind="mergesort")][: p.maxDets[-1]]  # as super()
        info = self.cocoGt.imgs[imgId]
        dil = boundary_dilation(int(info["height"]), int(info["width"]))
        for a in gt + dt:
            if "_boundary" not in a:
                a["_boundary"] = boundary_rle(a["segmentation"], dil)
        iscrowd = [int(g.get("iscrowd", 0)) for g in gt]
        b_ious = np.asarray(maskUtils.iou([mask_ops.as_bytes(d["_boundary"]) for d in dt],
                                          [mask_ops.as_bytes(g["_boundary"]) for g in gt], iscrowd))
        out = np.array(mask_ious, dtype=np.float64)
        crowd = np.asarray(iscrowd, bool)
        out[:, ~crowd] = np.minimum(out[:, ~crowd], b_ious[:, ~crowd])
        return out


def evaluate(gt: COCO, results: list[dict], *, max_dets: int = 100, image_ids: Iterable[int] | None = None,
             boundary: bool = False) -> dict:
    """COCO segm metrics of ``results`` against ``gt``.

    Returns {"AP", "AP50", ..., "ARmax" (recall at ``max_dets``), "per_category": {name: AP},
    "n_images", "n_predictions", "max_dets"}; with ``boundary`` also "BoundaryAP",
    "BoundaryAP50", "BoundaryAP75" (Cheng et al., CVPR 2021: matching on min(mask IoU, boundary
    IoU), band = 2% of the image diagonal). AP values are in [0, 1]; -1 means undefined.
    """
    ids = sorted(gt.getImgIds() if image_ids is None else set(image_ids))
    results = [r for r in results if r["image_id"] in set(ids)]
    ev = _run_eval(COCOeval, gt, results, ids, max_dets)
    # Not ev.summarize(): it takes AP at a hard-coded maxDets=100 (-1 for any other max_dets) and
    # reads maxDets[2] after evaluate() has sorted the list (max_dets < 10 would report 10).
    stats = {name: _summarize(ev, ap, iou, area, max_dets if dets is None else dets)
             for name, (ap, iou, area, dets) in zip(STAT_NAMES, _STAT_SPECS)}
    m = ev.params.maxDets.index(max_dets)
    # precision: [T, R, K, A, M]; area 'all' = 0, M index of max_dets
    prec = ev.eval["precision"][:, :, :, 0, m]
    per_cat = {}
    for k, cid in enumerate(ev.params.catIds):
        p = prec[:, :, k]
        p = p[p > -1]
        per_cat[gt.cats[cid]["name"]] = float(p.mean()) if p.size else -1.0
    stats.update(per_category=per_cat, n_images=len(ids), n_predictions=len(results), max_dets=max_dets)
    if boundary:
        bev = _run_eval(_BoundaryEval, gt, results, ids, max_dets)
        for name, (_, iou, area, _) in zip(("BoundaryAP", "BoundaryAP50", "BoundaryAP75"), _STAT_SPECS[:3]):
            stats[name] = _summarize(bev, True, iou, area, max_dets)
    return stats


def _run_eval(cls, gt: COCO, results: list[dict], ids: list[int], max_dets: int) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes([dict(r) for r in results]) if results else _empty_res(gt)
        ev = cls(gt, dt, iouType="segm")
        ev.params.imgIds = ids
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()  # sorts params.maxDets and keeps at most maxDets[-1] detections per image
        ev.accumulate()
    return ev


# Per STAT_NAMES entry: (AP or AR, IoU threshold or None for .50:.95, area range, maxDets or None
# for the caller's max_dets), as in pycocotools' summarize.
_STAT_SPECS = [
    (True, None, "all", None), (True, 0.5, "all", None), (True, 0.75, "all", None),
    (True, None, "small", None), (True, None, "medium", None), (True, None, "large", None),
    (False, None, "all", 1), (False, None, "all", 10), (False, None, "all", None),
    (False, None, "small", None), (False, None, "medium", None), (False, None, "large", None),
]


def _summarize(ev: COCOeval, ap: bool, iou: float | None, area: str, max_dets: int) -> float:
    """One pycocotools summary statistic at ``max_dets``: the mean over defined (> -1) entries."""
    p = ev.params
    s = ev.eval["precision"] if ap else ev.eval["recall"]  # [T, R, K, A, M] / [T, K, A, M]
    if iou is not None:
        s = s[np.isclose(p.iouThrs, iou)]
    s = s[..., p.areaRngLbl.index(area), p.maxDets.index(max_dets)]
    s = s[s > -1]
    return float(s.mean()) if s.size else -1.0


def _empty_res(gt: COCO) -> COCO:
    res = COCO()
    res.dataset = {"images": list(gt.dataset["images"]), "annotations": [], "categories": list(gt.dataset["categories"])}
    res.createIndex()
    return res


def remap_to_gt(gt: COCO, pred_coco: dict) -> tuple[list[dict], list[int]]:
    """Re-key a predicted COCO dataset's annotations onto ``gt``'s image ids by file name.

    Returns (results, matched gt image ids). Predicted images absent from ``gt`` are ignored.
    """
    by_name = {Path(im["file_name"]).name: im["id"] for im in gt.dataset["images"]}
    id_map = {}
    for im in pred_coco["images"]:
        gid = by_name.get(Path(im["file_name"]).name)
        if gid is not None:
            id_map[im["id"]] = gid
    results = []
    for a in pred_coco["annotations"]:
        if a["image_id"] in id_map:
            results.append(
                {"image_id": id_map[a["image_id"]], "category_id": a["category_id"], "segmentation": a["segmentation"], "score": a.get("score", 1.0)}
            )
    return results, sorted(set(id_map.values()))


def format_table(stats: dict) -> str:
    lines = [f"segm (maxDets={stats['max_dets']}, {stats['n_images']} images, {stats['n_predictions']} predictions)"]
    lines.append("  " + "  ".join(f"{k}={stats[k]:.3f}" for k in ["AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax"]))
    if "BoundaryAP" in stats:
        lines.append("  " + "  ".join(f"{k}={stats[k]:.3f}" for k in ["BoundaryAP", "BoundaryAP50", "BoundaryAP75"]))
    for name, ap in stats["per_category"].items():
        lines.append(f"  AP[{name}] = {ap:.3f}")
    if stats.get("images_at_bound"):
        where = "images reached" if stats.get("bound_unit", "image") == "image" else "images had a tile that reached"
        lines.append(f"  {stats['images_at_bound']} of {stats['n_images']} {where} the model's bound of "
                     f"{stats['instance_bound']} instances per {stats.get('bound_unit', 'image')}: objects past it are missing")
    return "\n".join(lines)


def predict_dataset(adapter, gt: COCO, image_dir: str | Path, *, batch_size: int = 4, refiner=None,
                    unrefined: list[dict] | None = None, progress=None, tiling=None,
                    at_bound: list[bool] | None = None) -> list[dict]:
    """Run an adapter in-process over every gt image (``image_dir`` a path or URI); no Ray.
    With a ``refiner`` (``segpipe.refine.refiner.Refiner``) its refined instances are returned
    and the adapter's own results appended to ``unrefined`` when given. ``progress``: a
    callable that gets a count, rate and ETA line every 10 s. ``tiling`` (a ``TilingConfig``
    with its ``tile`` set) runs the images it selects tile by tile (``segpipe.modeling.tiled``),
    4 x ``batch_size`` tiles per forward pass. ``at_bound`` gets one flag per image (in image
    id order): whether it, or one of its tiles, reached the adapter's instance bound."""
    from segpipe.modeling.tiled import needs_tiling, tiled_predict
    from segpipe.pipeline.progress import Ticker
    from PIL import Image

    from segpipe.io.fs import resolve

    fs, root = resolve(str(image_dir))

    def read(name: str) -> np.ndarray:
        with fs.open(f"{root}/{name}", "rb") as f:
            return np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))

    results: list[dict] = []
    infos = [gt.imgs[i] for i in sorted(gt.getImgIds())]
    ticker = Ticker("predict", len(infos), progress) if progress is not None else None
    for s in range(0, len(infos), batch_size):
        chunk = infos[s : s + batch_size]
        imgs = [read(im["file_name"]) for im in chunk]
        tiled = [tiling is not None and needs_tiling(img.shape[0], img.shape[1], tiling.tile, tiling) for img in imgs]
        hits: list[bool] = []
        whole_imgs = [img for img, t in zip(imgs, tiled) if not t]
        whole = iter(adapter.predict(whole_imgs, None, hits) if whole_imgs else [])
        whole_hits = iter(hits)
        preds, flags = [], []
        for img, t in zip(imgs, tiled):
            if t:
                one: list[bool] = []
                preds.append(tiled_predict(adapter, img, tiling.tile, tiling, 4 * batch_size, None, one))
                flags.append(one[0])
            else:
                preds.append(next(whole))
                flags.append(next(whole_hits))
        if at_bound is not None:
            at_bound.extend(flags)
        for im, img, inst in zip(chunk, imgs, preds):
            if refiner is not None:
                if unrefined is not None:
                    unrefined.extend(instances_to_results(im["id"], inst))
                inst = refiner.refine(img, inst)
            results.extend(instances_to_results(im["id"], inst))
        if ticker is not None:
            ticker.tick(len(chunk))
    return results


def evaluate_refiner(refiner, base, gt: COCO, image_dir: str | Path, *, max_dets: int = 100,
                     progress=None) -> tuple[dict, dict]:
    """Score ``base``'s predictions on ``gt`` before and after ``refiner`` -> (base stats,
    refined stats), both with Boundary AP."""
    before: list[dict] = []
    after = predict_dataset(base, gt, image_dir, refiner=refiner, unrefined=before, progress=progress)
    return evaluate(gt, before, max_dets=max_dets, boundary=True), evaluate(gt, after, max_dets=max_dets, boundary=True)


def output_results(output_uri: str, *, table: str = "instances", source: str | None = None,
                   fs=None) -> tuple[list[dict], list[dict]]:
    """A run output's committed (images with status ok, instance results) as COCO-style dicts.

    ``table`` is ``instances`` (the workflow's result) or ``predictions`` (every model's raw
    instances); ``source`` keeps only the rows of that model (or ``ensemble``)."""
    from segpipe.sinks.writer import read_committed

    images = [r for r in read_committed(output_uri, "images", fs).to_pylist() if r["status"] == "ok"]
    inst = read_committed(output_uri, table, fs).to_pylist()
    if source is not None:
        inst = [r for r in inst if r["source"] == source]
    results = [
        {
            "image_id": r["image_id"],
            "category_id": r["category_id"],
            "segmentation": {"size": [r["mask_height"], r["mask_width"]], "counts": r["mask_rle"]},
            "score": r["score"],
        }
        for r in inst
    ]
    return images, results


def evaluate_output(output_uri: str, gt_path: str | Path | dict, *, max_dets: int = 100, table: str = "instances",
                    source: str | None = None, boundary: bool = False, fs=None) -> dict:
    """Score a run output against a COCO ground truth; images are matched by file name.

    Only ground-truth images that the run processed successfully are scored; how many GT images
    were matched is reported as ``n_images`` (and ``n_gt_images``)."""
    gt = load_gt(gt_path)
    images, results = output_results(output_uri, table=table, source=source, fs=fs)
    pred = {"images": [{"id": im["image_id"], "file_name": im["relpath"]} for im in images], "annotations": results}
    remapped, ids = remap_to_gt(gt, pred)
    if not ids:
        where = "the ground truth" if isinstance(gt_path, dict) else str(gt_path)
        raise ValueError(f"no image of {output_uri} matches a file name in {where}")
    stats = evaluate(gt, remapped, max_dets=max_dets, image_ids=ids, boundary=boundary)
    stats["n_gt_images"] = len(gt.getImgIds())
    return stats


def compare_table(rows: list[tuple[str, dict]]) -> str:
    """Several result sets scored on one ground truth -> one aligned text table (one line each:
    AP, AP50, AP75, ARmax, Boundary AP / AP75 when computed, images, predictions)."""
    boundary = all("BoundaryAP" in st for _, st in rows)
    cols = ["AP", "AP50", "AP75", "ARmax"] + (["BoundaryAP", "BoundaryAP75"] if boundary else [])
    width = max([len(name) for name, _ in rows] + [10])
    head = f"{'result':<{width}}  " + "  ".join(f"{c:>12}" for c in cols) + f"  {'images':>6}  {'preds':>7}"
    lines = [head, "-" * len(head)]
    for name, st in rows:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{st[c]:>12.3f}" for c in cols)
                     + f"  {st['n_images']:>6}  {st['n_predictions']:>7}")
    return "\n".join(lines)


def polar_bound_results(gt: COCO, n_rays: int = 36) -> list[dict]:
    """Every ground-truth mask re-drawn as its polar polygon (``n_rays`` rays from the mass
    centre, score 1): scored against ``gt`` this is the AP ceiling of the polar representation
    (holes and parts hidden from the centre are lost)."""
    from segpipe.ops import masks as mask_ops
    from segpipe.ops import polar

    results = []
    for img_id in sorted(gt.getImgIds()):
        info = gt.imgs[img_id]
        h, w = int(info["height"]), int(info["width"])
        for a in gt.imgToAnns.get(img_id, []):
            if a.get("iscrowd", 0):
                continue
            m = gt.annToMask(a)
            ys, xs = np.nonzero(m)
            if xs.size == 0:
                continue
            y0, x0 = ys.min(), xs.min()
            crop = m[y0 : ys.max() + 1, x0 : xs.max() + 1]
            cx, cy = polar.mass_centre(crop)
            d = polar.ray_distances(crop, np.array([[cx, cy]]), n_rays)
            poly = polar.rays_to_polygons(np.array([[cx + x0, cy + y0]]), d)
            rle = polar.polygons_to_rles(poly, h, w)[0]
            if mask_ops.area([rle])[0] > 0:
                results.append({"image_id": img_id, "category_id": a["category_id"], "segmentation": rle, "score": 1.0})
    return results
