"""The declared Arrow schemas of the Parquet outputs, and row builders that cast to them."""

from __future__ import annotations

import pyarrow as pa

from segpipe.ops import masks as mask_ops
from segpipe.structures import Instances

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
        pa.field("refined_by", pa.string()),
        pa.field("model_versions", pa.list_(pa.string())),
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
        rows.append(
            {
                "run_id": run_id,
                "image_id": image_id,
                "image_uri": image_uri,
                "category_id": int(inst.labels[i]),
                "category_name": category_names.get(int(inst.labels[i])),
                "score": score,
                "bbox": [float(v) for v in boxes[i]],
                "area": int(areas[i]),
                "mask_rle": inst.masks[i]["counts"],
                "mask_height": inst.height,
                "mask_width": inst.width,
                "source": model,
                "members": [{"model": model, "model_version": model_version, "score": score, "iou": 1.0}],
                "n_votes": 1,
                "agreement": None,
                "refined_by": None,
                "model_versions": [model_version],
            }
        )
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
