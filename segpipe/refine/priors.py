"""The zoo's own predictions as the refiner's training input ("priors").

A finished segpipe run over the training images (its persisted raw ``predictions/``) is re-fused
with the run's own ensemble config, image by image; each fused instance scoring at least
``min_score`` is matched one-to-one to a ground-truth instance of the same image by mask IoU
(greedy, highest IoU first, at least ``min_iou``). A matched ground-truth annotation gets its
fused instance's box and box-frame maps as its prior: exactly what the refiner is handed for that
object at inference (the soft mask and the members' spread, [2, S, S] over the box).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np
from pycocotools import mask as mu

from segpipe.config import EnsembleConfig
from segpipe.data.coco import ann_rle, read_json
from segpipe.ensemble.fuse import Fused, ModelOutput, fuse_image
from segpipe.sinks.tables import rows_to_instances
from segpipe.sinks.writer import read_committed, read_manifest

Log = Callable[[str], None]


class PriorsError(ValueError):
    """A run that cannot give priors for this training set."""


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


def load_priors(run_uri: str, ann_uri: str, *, min_iou: float = 0.5, min_score: float = 0.05,
                log: Log = print) -> tuple[dict[str, dict[int, Prior]], dict]:
    """Priors for the images of ``ann_uri`` (COCO) from the run at ``run_uri`` (images matched by
    their path relative to the run's source, which must equal the annotation's ``file_name``)
    -> ({file_name: {ann id: Prior}}, a summary for the model card: the run, its models and
    ensemble, how many images and instances were matched, the mean IoU of the matches)."""
    manifest = read_manifest(run_uri)
    models = [(m["name"], m["version"]) for m in manifest["models"]]
    ens = (manifest.get("workflow") or {}).get("config", {}).get("ensemble") or manifest.get("ensemble")
    if len(models) > 1 and not ens:
        raise PriorsError(f"{run_uri}: the manifest records no ensemble config to fuse its {len(models)} models with")
    cfg = EnsembleConfig.model_validate(ens or {})
    gt = read_json(ann_uri)
    by_name = {im["file_name"]: im for im in gt["images"]}
    anns: dict[int, list[dict]] = defaultdict(list)
    for a in gt["annotations"]:
        if not a.get("iscrowd", 0):
            anns[a["image_id"]].append(a)
    images = [r for r in read_committed(run_uri, "images").to_pylist() if r["status"] == "ok" and r["relpath"] in by_name]
    if not images:
        raise PriorsError(f"{run_uri} labelled none of the images of {ann_uri} (paths relative to its source must equal file_name)")
    out: dict[str, dict[int, Prior]] = {}
    ious: list[float] = []
    for shard in sorted({r["shard"] for r in images}):
        rows: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for r in read_committed(run_uri, "predictions", shards=[shard]).to_pylist():
            rows[r["image_id"]][r["source"]].append(r)
        for im in (r for r in images if r["shard"] == shard):
            outs = [ModelOutput(n, v, rows_to_instances(rows[im["image_id"]].get(n, []), im["height"], im["width"]))
                    for n, v in models]
            fused = fuse_image(outs, cfg)
            info = by_name[im["relpath"]]
            a = anns.get(info["id"], [])
            rles = [ann_rle(x["segmentation"], info["height"], info["width"]) for x in a]
            got = match_priors(fused, rles, [x["id"] for x in a], min_iou, min_score)
            out[im["relpath"]] = got
            ious += [p.iou for p in got.values()]
    n_gt = sum(len(anns.get(by_name[f]["id"], [])) for f in out)
    summary = {"run": run_uri, "run_id": manifest["run_id"], "models": [v for _, v in models],
               "ensemble": cfg.model_dump(mode="json"), "min_iou": min_iou, "min_score": min_score,
               "images": len(out), "instances": n_gt, "matched": len(ious),
               "mean_iou": round(float(np.mean(ious)), 4) if ious else None}
    log(f"priors from {run_uri}: {len(ious)} of {n_gt} ground-truth instances in {len(out)} images matched "
        f"(mean IoU {summary['mean_iou']})")
    return out, summary

