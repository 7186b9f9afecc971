"""End-to-end runs on a local Ray over a handful of images (real Ray Data, real Parquet, pycocotools)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from pycocotools.coco import COCO

from segpipe.config import load_workflow
from segpipe.pipeline.run import run_workflow
from segpipe.sinks.tables import SCHEMAS
from segpipe.sinks.writer import OutputExistsError, read_committed

from conftest import REPO

pytestmark = pytest.mark.slow


def _cfg(tiny_card, shapes_data, out, **extra):
    sets = [
        f"source.uri={shapes_data / 'images'}",
        f"output.uri={out}",
        f"models.0.model={tiny_card}",
        "source.shard_size=3",
        f"eval.gt={shapes_data / 'annotations.json'}",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_workflow(REPO / "workflows" / "shapes.yaml", sets)


@pytest.fixture(scope="module")
def first_run(ray_local, tiny_card, shapes_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    cfg = _cfg(tiny_card, shapes_data, out)
    result = run_workflow(cfg, run_id="test-run-1", progress=lambda m: None)
    return cfg, out, result


def test_outputs_exist_and_match_schemas(first_run):
    cfg, out, result = first_run
    assert result.status == "complete"
    for name, schema in SCHEMAS.items():
        files = sorted((out / name).glob("shard-*.parquet"))
        assert len(files) == 3, name  # 8 inputs / shard_size 3
        for f in files:
            assert pq.read_schema(f).equals(schema, check_metadata=False), f
    assert not (out / "_segpipe" / "staging").exists()


def test_every_input_accounted_for(first_run, shapes_data):
    _, out, result = first_run
    inputs = sorted(str(p) for p in (shapes_data / "images").iterdir())
    images = read_committed(str(out), "images").to_pylist()
    errors = read_committed(str(out), "errors").to_pylist()
    assert sorted(r["uri"] for r in images) == inputs
    ok = {r["uri"] for r in images if r["status"] == "ok"}
    bad = {r["uri"] for r in errors}
    assert ok.isdisjoint(bad) and ok | bad == set(inputs)
    assert result.counts == {**result.counts, "images": 8, "ok": 6, "errors": 2}


def test_bad_files_become_error_records(first_run, shapes_data):
    _, out, _ = first_run
    errors = {r["uri"].rsplit("/", 1)[-1]: r for r in read_committed(str(out), "errors").to_pylist()}
    assert set(errors) == {"corrupt.jpg", "notes.png"}
    assert errors["corrupt.jpg"]["stage"] == "decode"
    assert errors["corrupt.jpg"]["error_type"] in {"truncated", "corrupt", "unreadable"}
    assert errors["notes.png"]["error_type"] == "not_an_image"


def test_coco_loads_and_matches_tables(first_run):
    _, out, _ = first_run
    coco = COCO(str(out / "coco" / "instances.json"))
    inst = read_committed(str(out), "instances")
    assert len(coco.getImgIds()) == 6
    assert len(coco.getAnnIds()) == inst.num_rows
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"ellipse", "star", "ring", "cross"}
    for ann in coco.loadAnns(coco.getAnnIds()[:20]):
        m = coco.annToMask(ann)
        assert m.sum() == ann["area"] > 0


def test_rows_carry_model_version_and_manifest(first_run, tiny_card):
    from segpipe.config import ModelCard

    cfg, out, result = first_run
    version = ModelCard.from_yaml(tiny_card).version()
    inst = read_committed(str(out), "instances").to_pylist()
    assert inst, "an untrained model still proposes instances at threshold 0.05"
    assert {tuple(r["model_versions"]) for r in inst} == {(version,)}
    assert {r["run_id"] for r in inst} == {"test-run-1"}
    manifest = json.loads((out / "_segpipe" / "run.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["workflow"]["sha256"] == cfg.digest()
    assert manifest["models"][0]["version"] == version
    assert manifest["counts"]["images"] == 8 and manifest["shards"] == [0, 1, 2]
    for pkg in ("torch", "torchvision", "ray"):
        assert manifest["environment"]["packages"][pkg]
    assert manifest["eval"]["n_images"] == 6
    assert manifest["code"]["segpipe_version"]
    if (REPO / ".git").exists():
        assert len(manifest["code"]["git_commit"].split("+")[0]) == 40
    assert manifest["input"]["n_files"] == 8 and len(manifest["input"]["fingerprint"]) == 64


def test_rerun_same_id_resumes_and_other_id_refused(first_run, tiny_card, shapes_data):
    cfg, out, result = first_run
    before = read_committed(str(out), "instances").to_pylist()
    again = run_workflow(cfg, run_id="test-run-1", progress=lambda m: None)
    assert again.skipped_shards == [0, 1, 2]
    assert read_committed(str(out), "instances").to_pylist() == before
    with pytest.raises(OutputExistsError, match="test-run-1"):
        run_workflow(cfg, run_id="another-run", progress=lambda m: None)
