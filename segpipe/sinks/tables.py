"""The declared Arrow schemas of the Parquet outputs, and row builders that cast to them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from segpipe.ops import masks as mask_ops
from segpipe.structures import SOFT_MASK_SIZE, Instances

MEMBER = pa.struct(
    [
        pa.field("model", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("iou", pa.float32()),
    ]
)

INSTANCES = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("category_id", pa.int64(), nullable=False),
        pa.field("category_name", pa.string()),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("bbox", pa.list_(pa.float32(), 4), nullable=False),  # COCO x, y, w, h (pixels)
        pa.field("area", pa.int64(), nullable=False),  # mask pixels
        pa.field("mask_rle", pa.string(), nullable=False),  # COCO compressed RLE counts
        pa.field("mask_height", pa.int32(), nullable=False),
        pa.field("mask_width", pa.int32(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # 'ensemble' or the model name
        pa.field("members", pa.list_(MEMBER)),
        pa.field("n_votes", pa.int32()),
        pa.field("agreement", pa.float32()),  # mean pairwise mask IoU of members; null for one
        pa.field("confidence", pa.float32()),  # ensemble: score x agreement; one model: its score
        pa.field("refined_by", pa.string()),
        pa.field("model_versions", pa.list_(pa.string())),
        pa.field("soft_box", pa.list_(pa.float32(), 4)),  # xyxy pixels: the frame of soft_mask
        pa.field("soft_mask", pa.binary()),  # float16 [28, 28] C-order probabilities over soft_box
    ]
)

IMAGES = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("relpath", pa.string(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("sha256", pa.string()),
        pa.field("size_bytes", pa.int64()),
        pa.field("source_tag", pa.string()),  # etag or mtime at listing time
        pa.field("status", pa.string(), nullable=False),  # 'ok' or 'error'
        pa.field("n_instances", pa.int32(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
    ]
)

ERRORS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
    ]
)

# predictions/: every model's raw instances (source = the model), same columns as instances/.
SCHEMAS = {"instances": INSTANCES, "predictions": INSTANCES, "images": IMAGES, "errors": ERRORS}


def _soft(inst: Instances, i: int) -> dict:
    if inst.mask_probs is None:
        return {"soft_box": None, "soft_mask": None}
    return {"soft_box": [float(v) for v in inst.boxes[i]], "soft_mask": inst.mask_probs[i].astype(np.float16).tobytes()}


def rows_to_instances(rows: list[dict], height: int, width: int) -> Instances:
    """Rows of one image and one source (instances/ or predictions/) -> Instances. Boxes are
    the soft masks' frames (``soft_box``), else the masks' tight boxes; ``mask_probs`` is set
    only when every row carries a soft mask."""
    n = len(rows)
    soft = n > 0 and all(r.get("soft_mask") is not None for r in rows)
    boxes = np.zeros((n, 4), np.float32)
    for k, r in enumerate(rows):
        if r.get("soft_box") is not None:
            boxes[k] = r["soft_box"]
        else:
            x, y, w, h = r["bbox"]
            boxes[k] = (x, y, x + w, y + h)
    probs = np.stack([np.frombuffer(r["soft_mask"], np.float16).reshape(SOFT_MASK_SIZE, SOFT_MASK_SIZE) for r in rows]) if soft else None
    return Instances(height=height, width=width, boxes=boxes, scores=np.asarray([r["score"] for r in rows], np.float32),
                     labels=np.asarray([r["category_id"] for r in rows], np.int64),
                     masks=[{"size": [height, width], "counts": r["mask_rle"]} for r in rows], mask_probs=probs)


def instance_rows(
    inst: Instances, *, run_id: str, image_id: int, image_uri: str, model: str, model_version: str,
    category_names: dict[int, str], min_score: float = 0.0,
) -> list[dict]:
    """One model's Instances for one image -> rows of the instances table (single-model source)."""
    keep = [i for i in range(len(inst)) if inst.scores[i] >= min_score]
    if not keep:
        return []
    inst = inst.select(keep)
    areas = mask_ops.area(inst.masks)
    boxes = mask_ops.to_bbox(inst.masks)
    rows = []
    for i in range(len(inst)):
        if areas[i] == 0:
            continue  # a box whose mask thresholded to nothing is not an instance
        score = float(inst.scores[i])
        rows.append(_mask_row(inst, i, boxes[i], int(areas[i]), run_id=run_id, image_id=image_id, image_uri=image_uri,
                              category_names=category_names) | {
            "source": model,
            "members": [{"model": model, "model_version": model_version, "score": score, "iou": 1.0}],
            "n_votes": 1, "agreement": None, "confidence": score, "refined_by": None, "model_versions": [model_version],
        })
    return rows


def _mask_row(inst: Instances, i: int, bbox, area: int, *, run_id: str, image_id: int, image_uri: str,
              category_names: dict[int, str]) -> dict:
    """The instances-table fields every source shares, for instance ``i`` (``bbox`` COCO xywh of
    its mask, ``area`` its pixels): ids, category, score, box, RLE, image size, soft mask."""
    return {"run_id": run_id, "image_id": image_id, "image_uri": image_uri,
            "category_id": int(inst.labels[i]), "category_name": category_names.get(int(inst.labels[i])),
            "score": float(inst.scores[i]), "bbox": [float(v) for v in bbox], "area": area,
            "mask_rle": inst.masks[i]["counts"], "mask_height": inst.height, "mask_width": inst.width, **_soft(inst, i)}


def ensemble_rows(fused, *, run_id: str, image_id: int, image_uri: str, category_names: dict[int, str],
                  min_score: float = 0.0, min_confidence: float = 0.0, min_votes: int = 1) -> list[dict]:
    """An ``ensemble.fuse.Fused`` for one image -> instances rows (source 'ensemble'), keeping
    those at or above ``min_score``, ``min_confidence`` and ``min_votes``."""
    inst = fused.instances
    areas = mask_ops.area(inst.masks)
    boxes = mask_ops.to_bbox(inst.masks)
    rows = []
    for i in range(len(inst)):
        score, conf, votes = float(inst.scores[i]), float(fused.confidence[i]), int(fused.n_votes[i])
        if areas[i] == 0 or score < min_score or conf < min_confidence or votes < min_votes:
            continue
        members = fused.members[i]
        rows.append(_mask_row(inst, i, boxes[i], int(areas[i]), run_id=run_id, image_id=image_id, image_uri=image_uri,
                              category_names=category_names) | {
            "source": "ensemble",
            "members": [{"model": m.model, "model_version": m.model_version, "score": m.score, "iou": m.iou} for m in members],
            "n_votes": votes, "agreement": fused.agreement[i], "confidence": conf, "refined_by": None,
            "model_versions": sorted({m.model_version for m in members}),
        })
    return rows


def to_table(name: str, rows: list[dict]) -> pa.Table:
    """Rows -> a table cast to the declared schema (raises on a missing or mistyped column)."""
    schema = SCHEMAS[name]
    table = pa.Table.from_pylist(rows, schema=schema)
    # from_pylist fills a missing key with null even where the field is declared non-nullable.
    for f in schema:
        if not f.nullable and table.column(f.name).null_count:
            raise pa.ArrowInvalid(f"{name}: column {f.name!r} is not nullable but has "
                                  f"{table.column(f.name).null_count} missing/null value(s)")
    return table
