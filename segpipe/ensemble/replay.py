"""A finished run's fused instances image by image, next to a COCO ground truth: what the
refiner's priors and the ensemble scorer learn from (``segpipe train pointrend|scorer --priors RUN``).

The run's persisted raw ``predictions/`` are re-fused with the run's own ensemble config (no model
runs; ``runs.shard_predictions``); images are paired with the ground truth by their path relative
to the run's source, which must equal the annotation's ``file_name``. Memory: one shard of
predictions at a time.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator

from segpipe.config import EnsembleConfig
from segpipe.data.coco import ann_rle, read_json
from segpipe.ensemble.fuse import Fused
from segpipe.ensemble.runs import shard_predictions
from segpipe.io.fs import resolve
from segpipe.sinks.writer import read_committed, read_manifest


class ReplayError(ValueError):
    """A run that cannot be replayed against this ground truth."""


@dataclass(frozen=True)
class RunEnsemble:
    """A finished run's models ([(card name, version)], workflow order) and ensemble config."""

    uri: str
    run_id: str
    models: list[tuple[str, str]]
    config: EnsembleConfig

    @classmethod
    def of(cls, run_uri: str) -> "RunEnsemble":
        manifest = read_manifest(run_uri)
        models = [(m["name"], m["version"]) for m in manifest["models"]]
        ens = (manifest.get("workflow") or {}).get("config", {}).get("ensemble") or manifest.get("ensemble")
        if len(models) > 1 and not ens:
            raise ReplayError(f"{run_uri}: the manifest records no ensemble config to fuse its {len(models)} models with")
        return cls(uri=run_uri, run_id=manifest["run_id"], models=models, config=EnsembleConfig.model_validate(ens or {}))


@dataclass(frozen=True)
class FusedImage:
    """One image: its annotation ``file_name``, the fused instances, the truth (COCO RLEs, ids)."""

    file_name: str
    fused: Fused
    gt_rles: list[dict]
    gt_ids: list[int]


def fused_with_truth(run: RunEnsemble, ann_uri: str, image_dir: str | None = None) -> Iterator[FusedImage]:
    """Every ok image of ``run`` that ``ann_uri`` annotates, re-fused, with its ground truth.
    With ``image_dir`` (the annotated images' folder or URI) each file's sha256 must be the one
    the run read, so a run over other images that share the names (generated sets do) is
    refused. ReplayError when the run labelled none of the images, or another file."""
    gt = read_json(ann_uri)
    by_name = {im["file_name"]: im for im in gt["images"]}
    anns: dict[int, list[dict]] = defaultdict(list)
    for a in gt["annotations"]:
        if not a.get("iscrowd", 0):
            anns[a["image_id"]].append(a)
    images = [r for r in read_committed(run.uri, "images").to_pylist() if r["status"] == "ok" and r["relpath"] in by_name]
    if not images:
        raise ReplayError(f"{run.uri} labelled none of the images of {ann_uri} (paths relative to its source must equal file_name)")
    if image_dir is not None:
        fs, root = resolve(image_dir.rstrip("/"))
        for r in images:
            digest = hashlib.sha256(fs.cat_file(f"{root}/{r['relpath']}")).hexdigest()
            if digest != r["sha256"]:
                raise ReplayError(f"{run.uri} labelled another {r['relpath']} than {image_dir} holds (sha256 "
                                  f"{r['sha256'][:12]} against {digest[:12]}): not a run over these images")
    wanted = {r["image_id"] for r in images}
    for sp in shard_predictions(run.uri, shards={r["shard"] for r in images}):
        todo = [im for im in sp.images if im["image_id"] in wanted]
        for im, fused in sp.fused(todo, run.models, run.config):
            info = by_name[im["relpath"]]
            a = anns.get(info["id"], [])
            yield FusedImage(file_name=im["relpath"], fused=fused,
                             gt_rles=[ann_rle(x["segmentation"], info["height"], info["width"]) for x in a],
                             gt_ids=[x["id"] for x in a])
