"""The zoo's own predictions as the refiner's training input ("priors").

A finished segpipe run over the training images is re-fused image by image
(``segpipe.ensemble.replay``); each fused instance scoring at least
``min_score`` is matched one-to-one to a ground-truth instance of the same image by mask IoU
(greedy, highest IoU first, at least ``min_iou``). A matched ground-truth annotation gets its
fused instance's box and box-frame maps as its prior: exactly what the refiner is handed for that
object at inference (the soft mask and the members' spread, [2, S, S] over the box).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from pycocotools import mask as mu

from segpipe.ensemble.fuse import Fused
from segpipe.ensemble.replay import RunEnsemble, fused_with_truth

Log = Callable[[str], None]


@dataclass(frozen=True)
class Prior:
    """One ground-truth instance's fused prediction: ``box`` float32 [4] xyxy pixels; ``maps``
    float16 [2, S, S] over the box (mask probability, members' spread); ``iou`` to the truth."""

    box: np.ndarray
    maps: np.ndarray
    iou: float


def match_priors(fused: Fused, gt_rles: list[dict], gt_ids: list[int], min_iou: float = 0.5,
                 min_score: float = 0.05) -> dict[int, Prior]:
    """One image's fused instances matched one-to-one to its ground truth (``gt_rles``, COCO RLEs,
    with annotation ids ``gt_ids``): greedy by mask IoU, highest first, at least ``min_iou``;
    instances under ``min_score`` and instances without soft masks take no part -> {ann id: Prior}."""
    inst = fused.instances
    cand = [i for i in range(len(inst)) if inst.scores[i] >= min_score] if inst.mask_probs is not None else []
    if not cand or not gt_rles:
        return {}
    iou = np.asarray(mu.iou([inst.masks[i] for i in cand], gt_rles, [0] * len(gt_rles)), dtype=np.float64)
    out: dict[int, Prior] = {}
    used = set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        k, j = divmod(int(flat), len(gt_rles))
        if iou[k, j] < min_iou:
            break
        if k in used or gt_ids[j] in out:
            continue
        i = cand[k]
        spread = fused.spread[i] if fused.spread is not None else np.zeros_like(inst.mask_probs[i])
        out[gt_ids[j]] = Prior(box=inst.boxes[i].astype(np.float32), iou=float(iou[k, j]),
                               maps=np.stack([inst.mask_probs[i], spread]).astype(np.float16))
        used.add(k)
    return out


def load_priors(run_uri: str, ann_uri: str, image_dir: str | None = None, *, min_iou: float = 0.5,
                min_score: float = 0.05, log: Log = print) -> tuple[dict[str, dict[int, Prior]], dict]:
    """Priors for the images of ``ann_uri`` (COCO; in ``image_dir``, checked against the run's
    sha256 when given) from the run at ``run_uri`` (``ensemble.replay``)
    -> ({file_name: {ann id: Prior}}, a summary for the model card: the run, its models and
    ensemble, how many images and instances were matched, the mean IoU of the matches)."""
    run = RunEnsemble.of(run_uri)
    out: dict[str, dict[int, Prior]] = {}
    ious: list[float] = []
    n_gt = 0
    for im in fused_with_truth(run, ann_uri, image_dir):
        got = match_priors(im.fused, im.gt_rles, im.gt_ids, min_iou, min_score)
        out[im.file_name] = got
        ious += [p.iou for p in got.values()]
        n_gt += len(im.gt_ids)
    summary = {"run": run_uri, "run_id": run.run_id, "models": [v for _, v in run.models],
               "ensemble": run.config.model_dump(mode="json"), "min_iou": min_iou, "min_score": min_score,
               "images": len(out), "instances": n_gt, "matched": len(ious),
               "mean_iou": round(float(np.mean(ious)), 4) if ious else None}
    log(f"priors from {run_uri}: {len(ious)} of {n_gt} ground-truth instances in {len(out)} images matched "
        f"(mean IoU {summary['mean_iou']})")
    return out, summary
