"""Splitting a COCO dataset by image: a labelled part and an unlabelled rest (pseudo-labelling)."""

from __future__ import annotations

import numpy as np


def split_by_image(doc: dict, fraction: float, seed: int, images_uri: str) -> tuple[dict, dict]:
    """-> (labelled, unlabelled) COCO documents: ``round(fraction * n)`` images drawn by ``seed``
    keep their annotations; the rest lose theirs. Every image record gains ``segpipe_uri``
    (``images_uri``/``file_name``) so the files can be read from anywhere."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    images = sorted(doc["images"], key=lambda im: im["id"])
    n_lab = int(round(fraction * len(images)))
    if not 0 < n_lab < len(images):
        raise ValueError(f"a fraction {fraction} of {len(images)} images leaves one part empty")
    pick = np.sort(np.random.default_rng(seed).permutation(len(images))[:n_lab])
    chosen = {images[i]["id"] for i in pick}
    root = images_uri.rstrip("/")
    recs = [im | {"segpipe_uri": f"{root}/{im['file_name']}"} for im in images]
    head = {k: v for k, v in doc.items() if k not in ("images", "annotations")}
    labelled = head | {"images": [im for im in recs if im["id"] in chosen],
                       "annotations": [a for a in doc["annotations"] if a["image_id"] in chosen]}
    unlabelled = head | {"images": [im for im in recs if im["id"] not in chosen], "annotations": []}
    return labelled, unlabelled
