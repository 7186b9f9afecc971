"""segpipe.sinks: declared Arrow schemas, instance rows, the run writer's commit protocol, COCO export.

pycocotools is the oracle for boxes, areas and the exported COCO dataset.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segpipe.ops import masks as mask_ops
from segpipe.sinks.coco import read_coco, write_coco
from segpipe.sinks.tables import SCHEMAS, instance_rows, to_table
from segpipe.sinks.writer import TABLES, OutputExistsError, RunWriter, read_committed, read_markers
from segpipe.structures import Instances

H, W = 12, 16
CATS = [{"id": 1, "name": "ellipse"}, {"id": 2, "name": "star"}]
NAMES = {c["id"]: c["name"] for c in CATS}


# --- helpers -------------------------------------------------------------------------------------


def dense_masks() -> np.ndarray:
    """4 masks [4, H, W]: a box, an L shape, an empty one, a single pixel."""
    m = np.zeros((4, H, W), np.uint8)
    m[0, 2:6, 3:9] = 1
    m[1, 5:11, 10:12] = 1
    m[1, 9:11, 12:15] = 1
    m[3, 0, 15] = 1
    return m


def make_instances(scores=(0.9, 0.4, 0.8, 0.6), labels=(1, 2, 1, 2)) -> Instances:
    m = dense_masks()
    return Instances(
        height=H, width=W,
        boxes=np.tile(np.array([[0, 0, 1, 1]], np.float32), (4, 1)),  # deliberately not the mask boxes
        scores=np.asarray(scores, np.float32),
        labels=np.asarray(labels, np.int64),
        masks=mask_ops.encode(m),
    )


def image_row(run_id: str, image_id: int, relpath: str, *, status: str = "ok", n: int = 0, shard: int = 0) -> dict:
    ok = status == "ok"
    return {
        "run_id": run_id, "image_id": image_id, "uri": f"/data/{relpath}", "relpath": relpath,
        "width": W if ok else None, "height": H if ok else None, "sha256": "ab" * 32 if ok else None,
        "size_bytes": 123, "source_tag": "1700000000.0", "status": status, "n_instances": n, "shard": shard,
    }


def error_row(run_id: str, image_id: int, relpath: str) -> dict:
    return {"run_id": run_id, "image_id": image_id, "uri": f"/data/{relpath}", "stage": "decode",
            "error_type": "not_an_image", "message": "not an image"}


def shard_tables(run_id: str, shard: int, *, with_error: bool = False) -> tuple[dict[str, pa.Table], list[dict]]:
    """One shard: one ok image with the instances of make_instances() (min_score 0.5), optionally
    one error image. Image ids are distinct per shard."""
    iid = 1000 + 10 * shard
    inst = instance_rows(make_instances(), run_id=run_id, image_id=iid, image_uri=f"/data/img{shard}.jpg",
                         model="m", model_version="m@0123456789ab", category_names=NAMES, min_score=0.5)
    images = [image_row(run_id, iid, f"sub/img{shard}.jpg", n=len(inst), shard=shard)]
    errors = []
    if with_error:
        images.append(image_row(run_id, iid + 1, f"bad{shard}.jpg", status="error", shard=shard))
        errors.append(error_row(run_id, iid + 1, f"bad{shard}.jpg"))
    tables = {"instances": to_table("instances", inst), "predictions": to_table("predictions", inst),
              "images": to_table("images", images), "errors": to_table("errors", errors)}
    return tables, inst


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# --- tables --------------------------------------------------------------------------------------


def _valid_rows() -> dict[str, dict]:
    inst = instance_rows(make_instances(), run_id="r", image_id=7, image_uri="/d/a.jpg", model="m",
                         model_version="m@x", category_names=NAMES)[0]
    return {"instances": inst, "images": image_row("r", 7, "a.jpg", n=1), "errors": error_row("r", 8, "b.jpg")}


@pytest.mark.parametrize("name", ["instances", "images", "errors"])
def test_to_table_casts_to_declared_schema(name: str):
    row = _valid_rows()[name]
    t = to_table(name, [row, row])
    assert t.schema == SCHEMAS[name]
    assert t.num_rows == 2
    back = t.to_pylist()[0]
    for k, v in row.items():
        if isinstance(v, float):
            assert back[k] == pytest.approx(v, rel=1e-6)
        elif k == "bbox":
            assert back[k] == pytest.approx(v, rel=1e-6)
        elif k != "members":
            assert back[k] == v, k


@pytest.mark.parametrize("name", ["instances", "images", "errors"])
def test_to_table_empty(name: str):
    t = to_table(name, [])
    assert t.num_rows == 0 and t.schema == SCHEMAS[name]


@pytest.mark.parametrize("name", ["instances", "images", "errors"])
def test_to_table_missing_non_nullable_column_raises(name: str):
    schema = SCHEMAS[name]
    required = [f.name for f in schema if not f.nullable]
    assert required
    for col in required:
        row = dict(_valid_rows()[name])
        del row[col]
        with pytest.raises(pa.ArrowException):
            to_table(name, [row])
        row[col] = None
        with pytest.raises(pa.ArrowException):
            to_table(name, [row])


def test_to_table_nullable_columns_may_be_missing():
    row = dict(_valid_rows()["images"])
    for k in ("width", "height", "sha256"):
        del row[k]
    t = to_table("images", [row])
    assert t.column("width").null_count == 1


@pytest.mark.parametrize("name,col,bad", [
    ("instances", "image_id", "not-an-int"),
    ("instances", "bbox", [1.0, 2.0, 3.0]),  # fixed size list of 4
    ("instances", "score", "high"),
    ("images", "n_instances", "many"),
    ("errors", "image_id", {"a": 1}),
])
def test_to_table_wrong_type_raises(name: str, col: str, bad):
    row = dict(_valid_rows()[name])
    row[col] = bad
    with pytest.raises(pa.ArrowException):
        to_table(name, [row])


def test_instance_rows_against_pycocotools():
    inst = make_instances()
    rows = instance_rows(inst, run_id="run-1", image_id=42, image_uri="s3://b/a.jpg", model="maskrcnn",
                         model_version="maskrcnn@abcdef012345", category_names=NAMES, min_score=0.5)
    # scores (0.9, 0.4, 0.8, 0.6): #1 is under min_score, #2 is an empty mask -> kept #0 and #3.
    assert len(rows) == 2
    dense = dense_masks()
    for row, k in zip(rows, [0, 3]):
        rle = mask_utils.encode(np.asfortranarray(dense[k]))
        assert row["bbox"] == pytest.approx(mask_utils.toBbox(rle).tolist())
        assert row["area"] == int(mask_utils.area(rle)) == int(dense[k].sum())
        decoded = mask_utils.decode({"size": [row["mask_height"], row["mask_width"]], "counts": row["mask_rle"].encode()})
        np.testing.assert_array_equal(decoded, dense[k])
        assert row["score"] == pytest.approx(float(inst.scores[k]))
        assert row["category_id"] == int(inst.labels[k]) and row["category_name"] == NAMES[int(inst.labels[k])]
        assert (row["run_id"], row["image_id"], row["image_uri"]) == ("run-1", 42, "s3://b/a.jpg")
        assert (row["mask_height"], row["mask_width"]) == (H, W)
        assert row["source"] == "maskrcnn"
        assert row["n_votes"] == 1
        assert row["model_versions"] == ["maskrcnn@abcdef012345"]
        assert row["members"] == [{"model": "maskrcnn", "model_version": "maskrcnn@abcdef012345",
                                   "score": pytest.approx(float(inst.scores[k])), "iou": 1.0}]
    assert rows[0]["bbox"] == pytest.approx([3, 2, 6, 4])
    assert rows[0]["area"] == 24 and rows[1]["area"] == 1
    # The rows cast to the declared schema.
    assert to_table("instances", rows).num_rows == 2


def test_instance_rows_min_score_and_empty():
    inst = make_instances()
    assert len(instance_rows(inst, run_id="r", image_id=1, image_uri="u", model="m", model_version="v",
                             category_names=NAMES)) == 3  # all but the empty mask
    assert instance_rows(inst, run_id="r", image_id=1, image_uri="u", model="m", model_version="v",
                         category_names=NAMES, min_score=0.95) == []
    empty = Instances(height=H, width=W)
    assert instance_rows(empty, run_id="r", image_id=1, image_uri="u", model="m", model_version="v", category_names=NAMES) == []
    # An unknown category id keeps its row, with a null name.
    rows = instance_rows(make_instances(labels=(9, 9, 9, 9)), run_id="r", image_id=1, image_uri="u", model="m",
                         model_version="v", category_names=NAMES)
    assert rows and all(r["category_name"] is None and r["category_id"] == 9 for r in rows)


# --- writer --------------------------------------------------------------------------------------


def test_start_on_empty_output(tmp_path: Path):
    w = RunWriter(str(tmp_path / "out"), "run-a")
    assert w.start() == {}


def test_write_shard_publishes_and_leaves_no_staging(tmp_path: Path):
    out = tmp_path / "out"
    w = RunWriter(str(out), "run-a")
    w.start()
    tables, inst = shard_tables("run-a", 0, with_error=True)
    marker = w.write_shard(0, tables, {"counts": {"images": 2}})
    for t in TABLES:
        p = out / t / "shard-00000.parquet"
        assert p.is_file()
        assert pq.read_table(p).num_rows == tables[t].num_rows
    mpath = out / "_segpipe" / "shards" / "shard-00000.json"
    on_disk = json.loads(mpath.read_text())
    assert on_disk == marker
    assert on_disk["run_id"] == "run-a" and on_disk["shard"] == 0 and on_disk["counts"] == {"images": 2}
    assert on_disk["tables"] == {t: f"{t}/shard-00000.parquet" for t in TABLES}
    staging = out / "_segpipe" / "staging"
    assert not staging.exists() or not [p for p in staging.rglob("*") if p.is_file()]
    assert not [f for f in all_files(out) if ".tmp" in f]
    assert read_committed(str(out), "instances").num_rows == len(inst)


def test_write_shard_publishes_only_the_tables_given(tmp_path: Path):
    out = tmp_path / "out"
    w = RunWriter(str(out), "run-a")
    w.start()
    tables, inst = shard_tables("run-a", 0)
    del tables["predictions"]
    marker = w.write_shard(0, tables, {})
    assert set(marker["tables"]) == {"instances", "images", "errors"}
    assert not (out / "predictions").exists()
    assert read_committed(str(out), "predictions").num_rows == 0  # no marker lists it: empty, declared schema
    assert read_committed(str(out), "instances").num_rows == len(inst)
    with pytest.raises(ValueError, match="unknown table"):
        w.write_shard(1, {"bogus": tables["images"]}, {})


def test_read_committed_ignores_unmarked_shards(tmp_path: Path):
    out = tmp_path / "out"
    w = RunWriter(str(out), "run-a")
    w.start()
    t0, inst0 = shard_tables("run-a", 0, with_error=True)
    t1, inst1 = shard_tables("run-a", 1)
    w.write_shard(0, t0, {})
    w.write_shard(1, t1, {})
    # A crash after publishing shard 7's tables but before its marker: files exist, no marker.
    for t in TABLES:
        shutil.copy(out / t / "shard-00000.parquet", out / t / "shard-00007.parquet")
    assert set(read_markers(w.fs, w.root)) == {0, 1}
    inst = read_committed(str(out), "instances")
    assert inst.schema == SCHEMAS["instances"]
    assert inst.num_rows == len(inst0) + len(inst1)
    assert sorted(set(inst.column("image_id").to_pylist())) == [1000, 1010]
    images = read_committed(str(out), "images")
    assert images.num_rows == 3
    assert read_committed(str(out), "errors").num_rows == 1
    # A marker-less shard is not resumed either.
    assert set(RunWriter(str(out), "run-a").start()) == {0, 1}


def test_read_committed_on_empty_output(tmp_path: Path):
    t = read_committed(str(tmp_path), "images")
    assert t.num_rows == 0 and t.schema == SCHEMAS["images"]


def test_start_refuses_another_runs_output(tmp_path: Path):
    out = tmp_path / "out"
    w = RunWriter(str(out), "run-a")
    w.start()
    w.write_shard(0, shard_tables("run-a", 0)[0], {})
    with pytest.raises(OutputExistsError, match="run-a"):
        RunWriter(str(out), "run-b").start()
    # The same run id resumes: its committed markers come back.
    markers = RunWriter(str(out), "run-a").start()
    assert set(markers) == {0} and markers[0]["run_id"] == "run-a"


def test_start_refuses_output_with_another_runs_manifest(tmp_path: Path):
    out = tmp_path / "out"
    w = RunWriter(str(out), "run-a")
    w.start()
    w.finish({"run_id": "run-a", "status": "complete"})
    with pytest.raises(OutputExistsError, match="run-a"):
        RunWriter(str(out), "run-b").start()


def test_rewriting_a_shard_does_not_duplicate(tmp_path: Path):
    out = tmp_path / "out"
    w = RunWriter(str(out), "run-a")
    w.start()
    t0, inst0 = shard_tables("run-a", 0)
    w.write_shard(0, t0, {})
    w2 = RunWriter(str(out), "run-a")
    w2.start()
    w2.write_shard(0, t0, {})
    assert read_committed(str(out), "instances").num_rows == len(inst0)
    assert len(list((out / "instances").glob("*.parquet"))) == 1


def test_write_json_atomic(tmp_path: Path):
    out = tmp_path / "out"
    w = RunWriter(str(out), "run-a")
    w.write_json("a/b/c.json", {"x": 1})
    w.write_json("a/b/c.json", {"x": 2, "y": [1, 2]})  # overwrite in place
    assert json.loads((out / "a" / "b" / "c.json").read_text()) == {"x": 2, "y": [1, 2]}
    assert all_files(out) == ["a/b/c.json"]


def test_finish_writes_manifest_and_drops_staging(tmp_path: Path):
    out = tmp_path / "out"
    w = RunWriter(str(out), "run-a")
    w.start()
    w.write_shard(0, shard_tables("run-a", 0)[0], {})
    # A leftover staged file from an interrupted shard write.
    leftover = out / "_segpipe" / "staging" / "run-a" / "shard-00003"
    leftover.mkdir(parents=True)
    (leftover / "instances.parquet").write_bytes(b"partial")
    manifest = {"run_id": "run-a", "status": "complete", "counts": {"images": 1}}
    w.finish(manifest)
    assert json.loads((out / "_segpipe" / "run.json").read_text()) == manifest
    assert not (out / "_segpipe" / "staging").exists()
    assert not [f for f in all_files(out) if ".tmp" in f]


# --- COCO export ---------------------------------------------------------------------------------


def test_write_coco_loads_in_pycocotools(tmp_path: Path):
    out = tmp_path / "out"
    w = RunWriter(str(out), "run-a")
    w.start()
    t0, inst0 = shard_tables("run-a", 0, with_error=True)
    t1, inst1 = shard_tables("run-a", 1, with_error=True)
    w.write_shard(0, t0, {})
    w.write_shard(1, t1, {})
    # An unmarked shard (crash) must not leak into the export.
    for t in TABLES:
        shutil.copy(out / t / "shard-00000.parquet", out / t / "shard-00009.parquet")
    counts = write_coco(w, CATS)
    rows = inst0 + inst1
    assert counts == {"images": 2, "annotations": len(rows)}
    path = out / "coco" / "instances.json"
    assert not [f for f in all_files(out) if ".tmp" in f]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
    assert read_coco(str(out)) == json.loads(path.read_text())
    # Only status-ok images, with their relpath as file_name.
    assert sorted(coco.getImgIds()) == [1000, 1010]
    assert sorted(im["file_name"] for im in coco.dataset["images"]) == ["sub/img0.jpg", "sub/img1.jpg"]
    assert all(im["width"] == W and im["height"] == H for im in coco.dataset["images"])
    assert coco.getCatIds() == [1, 2]
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == len(rows)
    assert len({a["id"] for a in anns}) == len(anns)
    expected = sorted((r["image_id"], r["category_id"], r["area"], r["mask_rle"]) for r in rows)
    got = sorted((a["image_id"], a["category_id"], a["area"], a["segmentation"]["counts"]) for a in anns)
    assert got == expected
    for a in anns:
        m = coco.annToMask(a)
        assert m.shape == (H, W)
        assert int(m.sum()) == a["area"]
        assert a["bbox"] == pytest.approx(mask_utils.toBbox(coco.annToRLE(a)).tolist(), abs=0.01)
        assert 0 <= a["score"] <= 1
    # Loadable as detection results too (the pseudo-label / evaluation path).
    with contextlib.redirect_stdout(io.StringIO()):
        res = coco.loadRes([{k: a[k] for k in ("image_id", "category_id", "segmentation", "score")} for a in anns])
    assert len(res.getAnnIds()) == len(rows)


def test_write_coco_empty_output(tmp_path: Path):
    w = RunWriter(str(tmp_path / "out"), "run-a")
    w.start()
    assert write_coco(w, CATS) == {"images": 0, "annotations": 0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "out" / "coco" / "instances.json"))
    assert coco.getImgIds() == [] and coco.getAnnIds() == [] and coco.getCatIds() == [1, 2]
