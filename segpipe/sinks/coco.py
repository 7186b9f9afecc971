"""COCO export of a run's committed shards: a dataset loadable by pycocotools, usable for training."""

from __future__ import annotations

import json

import fsspec

from segpipe.io.fs import read_parquet, resolve
from segpipe.sinks.writer import RunWriter, read_markers


def write_coco(writer: RunWriter, categories: list[dict], *, relpath: str = "coco/instances.json") -> dict:
    """Stream committed images (status ok) and instances into one COCO json, written atomically.

    Image ``file_name`` is the path relative to the source root; ``segpipe_uri`` the full URI.
    Returns counts {"images", "annotations"}.
    """
    fs, root = writer.fs, writer.root
    final = writer.path(relpath)
    tmp = f"{final}.tmp"
    fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
    n_img = n_ann = 0
    markers = read_markers(fs, root)
    with fs.open(tmp, "wb") as f:
        f.write(b'{"info": {"description": "segpipe predictions"}, "categories": ')
        f.write(json.dumps(categories).encode())
        f.write(b', "images": [')
        for _, m in sorted(markers.items()):
            images = read_parquet(fs, f"{root}/{m['tables']['images']}").to_pylist()
            for im in images:
                if im["status"] != "ok":
                    continue
                rec = {"id": im["image_id"], "file_name": im["relpath"], "width": im["width"], "height": im["height"], "segpipe_uri": im["uri"]}
                f.write((b", " if n_img else b"") + json.dumps(rec).encode())
                n_img += 1
        f.write(b'], "annotations": [')
        for _, m in sorted(markers.items()):
            rows = read_parquet(fs, f"{root}/{m['tables']['instances']}").to_pylist()
            for r in rows:
                n_ann += 1
                ann = {
                    "id": n_ann,
                    "image_id": r["image_id"],
                    "category_id": r["category_id"],
                    "segmentation": {"size": [r["mask_height"], r["mask_width"]], "counts": r["mask_rle"]},
                    "area": r["area"],
                    "bbox": [round(v, 2) for v in r["bbox"]],
                    "iscrowd": 0,
                    "score": round(r["score"], 5),
                    "source": r["source"],
                }
                f.write((b", " if n_ann > 1 else b"") + json.dumps(ann).encode())
        f.write(b"]}")
    fs.mv(tmp, final)
    return {"images": n_img, "annotations": n_ann}


def read_coco(output_uri: str, fs: fsspec.AbstractFileSystem | None = None, relpath: str = "coco/instances.json") -> dict:
    fs, root = resolve(output_uri, fs)
    return json.loads(fs.cat_file(f"{root}/{relpath}"))
