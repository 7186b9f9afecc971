"""How much the models of an ensemble disagree on an image: the review queue for pseudo-labels.

Pure functions over ensemble instances rows (``source`` = ``ensemble``: ``score``, ``n_votes``,
``agreement``). Definitions, with M the number of models in the run:

- a fused instance's disagreement ``d = 1 - a * v / M`` where ``v`` = n_votes (how many models
  found it) and ``a`` = agreement (the mean pairwise mask IoU of its members; a lone member has
  no pair and counts as 0). ``d`` is in [0, 1]: 0 when every model found the object with
  identical masks, 1 when a single model found it;
- an image's disagreement is the score-weighted mean of ``d`` over its fused instances,
  ``sum(s_i d_i) / sum(s_i)``, so confident instances (the likely pseudo-labels) dominate and
  low-score leftovers barely count; 0 for an image without instances (nothing to review).

A single-model run has no ensemble and no disagreement.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import numpy as np


def instance_disagreement(n_votes: int, agreement: float | None, n_models: int) -> float:
    """``1 - agreement * n_votes / n_models`` (agreement None -> 0), in [0, 1]."""
    if n_models < 1:
        raise ValueError(f"n_models must be >= 1, got {n_models}")
    a = 0.0 if agreement is None else float(agreement)
    return float(min(1.0, max(0.0, 1.0 - a * int(n_votes) / n_models)))


def image_disagreement(rows: Iterable[Mapping], n_models: int) -> float:
    """One image's ensemble rows -> its score-weighted mean instance disagreement in [0, 1]
    (0 without rows, or when every score is 0)."""
    num = den = 0.0
    for r in rows:
        s = float(r["score"])
        num += s * instance_disagreement(r["n_votes"] or 1, r["agreement"], n_models)
        den += s
    return num / den if den > 0 else 0.0


def disagreement_by_image(rows: Iterable[Mapping], n_models: int, image_ids: Iterable[int] = ()) -> dict[int, float]:
    """Ensemble rows of many images -> {image_id: disagreement}; every id of ``image_ids`` is
    present (0 for an image without rows)."""
    groups: dict[int, list[Mapping]] = defaultdict(list)
    for r in rows:
        groups[int(r["image_id"])].append(r)
    out = {int(i): 0.0 for i in image_ids}
    out.update({i: image_disagreement(g, n_models) for i, g in groups.items()})
    return out


def review_queue(scores: Mapping[int, float], n: int) -> list[int]:
    """The ``n`` image ids of highest disagreement, highest first (ties by id); images scoring 0
    are never queued."""
    ranked = sorted((i for i, s in scores.items() if s > 0), key=lambda i: (-scores[i], i))
    return ranked[: max(n, 0)]


def sample_ids(image_ids: Sequence[int], n: int) -> list[int]:
    """A deterministic sample of ``n`` ids spread evenly over the sorted ids (all when fewer)."""
    ids = sorted(image_ids)
    if n <= 0 or not ids:
        return []
    if len(ids) <= n:
        return ids
    return [ids[int(k)] for k in np.floor(np.linspace(0, len(ids) - 1, n) + 0.5)]  # step > 1: distinct
