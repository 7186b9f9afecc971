"""How good a pseudo-label set is, measured against the labels the experiment threw away.

Diagnostic only: the experiment never uses these labels to choose anything (the sweep is read on
val). It says what a student learns from: wrong objects (1 - precision), objects taught as
background (truth neither kept nor under an ignore region), and how much ignore area is real.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import numpy as np
from pycocotools import mask as mask_utils

from segpipe.data.coco import ann_rle


def _by_name(doc: dict) -> dict[str, tuple[dict, list[dict]]]:
    """file base name -> (image record, its annotations)."""
    images = {im["id"]: im for im in doc["images"]}
    out = {PurePosixPath(im["file_name"]).name: (im, []) for im in images.values()}
    for a in doc["annotations"]:
        im = images.get(a["image_id"])
        if im is not None:
            out[PurePosixPath(im["file_name"]).name][1].append(a)
    return out


def match_greedy(ious: np.ndarray, order: np.ndarray, thresh: float) -> np.ndarray:
    """One-to-one matching, COCO style: predictions in ``order`` each take the unmatched truth of
    highest IoU >= ``thresh``. ious float [P, T] -> matched truth index per prediction int [P] (-1: none)."""
    out = np.full(ious.shape[0], -1, np.int64)
    taken = np.zeros(ious.shape[1], bool)
    for p in order:
        if ious.shape[1] == 0:
            break
        cand = np.where(taken, -1.0, ious[p])
        t = int(np.argmax(cand))
        if cand[t] >= thresh:
            out[p], taken[t] = t, True
    return out


def set_quality(set_doc: dict, truth_doc: dict, thresh: float = 0.5) -> dict:
    """Score a pseudo-label COCO set against true labels of the same images (matched by file name).

    kept: instances (iscrowd 0), precision = matched kept / kept, recall = matched truth / all
    truth (``truth_doc``'s every image, written or not). Ignore regions (iscrowd 1):
    ``truth_under_ignore`` = unmatched truth objects at least half under one; ``ignore_on_truth``
    = share of ignore pixels on true objects. ``truth_taught_background`` = truth neither matched
    nor under an ignore region, on written images. Fractions are rounded to 4 places.
    """
    truth = _by_name(truth_doc)
    n_truth = sum(len(a) for _, a in truth.values())
    kept = matched = under_ignore = taught_bg = 0
    ign_px = ign_on_truth_px = n_ignore = 0
    for name, (im, anns) in _by_name(set_doc).items():
        h, w = int(im["height"]), int(im["width"])
        k_anns = [a for a in anns if not a.get("iscrowd", 0)]
        i_anns = [a for a in anns if a.get("iscrowd", 0)]
        t_anns = truth.get(name, (None, []))[1]
        kept += len(k_anns)
        n_ignore += len(i_anns)
        K = [ann_rle(a["segmentation"], h, w) for a in k_anns]
        T = [ann_rle(a["segmentation"], h, w) for a in t_anns]
        hit = np.zeros(len(T), bool)
        if K and T:
            ious = np.asarray(mask_utils.iou(K, T, [0] * len(T)), np.float64).reshape(len(K), len(T))
            order = np.argsort([-float(a.get("score", 1.0)) for a in k_anns], kind="stable")
            m = match_greedy(ious, order, thresh)
            hit[m[m >= 0]] = True
        matched += int(hit.sum())
        if not T:
            continue
        if i_anns:
            region = mask_utils.decode(mask_utils.merge([ann_rle(a["segmentation"], h, w) for a in i_anns])).astype(bool)
            t_masks = mask_utils.decode(T).astype(bool)  # [H, W, T]
            ign_px += int(region.sum())
            ign_on_truth_px += int((region & t_masks.any(-1)).sum())
            for j in np.nonzero(~hit)[0]:
                g = t_masks[..., j]
                if (region & g).sum() * 2 >= g.sum():
                    under_ignore += 1
                else:
                    taught_bg += 1
        else:
            taught_bg += int((~hit).sum())

    def frac(a: int, b: int) -> float | None:
        return round(a / b, 4) if b else None

    return {"kept": kept, "precision": frac(matched, kept), "recall": frac(matched, n_truth), "truth": n_truth,
            "ignore_regions": n_ignore, "truth_under_ignore": frac(under_ignore, n_truth),
            "ignore_on_truth": frac(ign_on_truth_px, ign_px), "truth_taught_background": frac(taught_bg, n_truth),
            "iou_thresh": thresh}
