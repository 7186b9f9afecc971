"""Incremental labeling: the ledger plan on hand-made rows, and three runs on a local Ray: new
images only, then a model version bump that re-runs only that model (the other's predictions
reused, the ensemble re-fused), then nothing new. Every input is labeled exactly once per model
version over all runs."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest

from segpipe.config import WorkflowConfig, load_workflow
from segpipe.io.listing import SourceFile
from segpipe.provenance.ledger import plan

from conftest import REPO


def _f(uri, size=10, tag="t1", i=0):
    return SourceFile(uri=uri, image_id=i, relpath=uri, size=size, tag=tag, index=i, shard=0)


def _row(uri, model, version, run, status="ok", size=10, tag="t1"):
    return {"uri": uri, "size": size, "tag": tag, "model": model, "model_version": version, "run_id": run, "status": status}


def test_plan_new_changed_partial_retry_skipped():
    models = [("a", "a1"), ("b", "b2")]
    rows = [_row("done", "a", "a1", "r1"), _row("done", "b", "b2", "r1"),
            _row("old_b", "a", "a1", "r1"), _row("old_b", "b", "b1", "r1"),  # b was bumped since
            _row("edited", "a", "a1", "r1", tag="t0"), _row("edited", "b", "b2", "r1", tag="t0"),
            _row("bad", "a", "a1", "r1", "error"), _row("bad", "b", "b2", "r1", "error")]
    files = [_f("done"), _f("old_b"), _f("edited"), _f("bad"), _f("fresh")]
    p = plan(files, models, rows)
    by = {t.file.uri: t for t in p.todo}
    assert set(by) == {"old_b", "edited", "fresh"}
    assert (by["old_b"].kind, by["old_b"].run, by["old_b"].cached) == ("partial", ["b"], {"a": "r1"})
    assert (by["edited"].kind, by["edited"].run) == ("changed", ["a", "b"])
    assert (by["fresh"].kind, by["fresh"].run, by["fresh"].cached) == ("new", ["a", "b"], {})
    assert p.counts == {"listed": 5, "new": 1, "changed": 1, "partial": 1, "retry": 0, "skipped": 2}
    retry = plan(files, models, rows, retry_errors=True)
    assert {t.file.uri: t.kind for t in retry.todo}["bad"] == "retry"
    # A later ok row for the same input and version wins over an error row.
    healed = plan([_f("bad")], models, rows + [_row("bad", "a", "a1", "r2"), _row("bad", "b", "b2", "r2")], retry_errors=True)
    assert healed.todo == [] and healed.skipped == 1


@pytest.fixture(scope="module")
def polar_cards(tmp_path_factory):
    from conftest import make_polar_card

    root = tmp_path_factory.mktemp("polar")
    return make_polar_card(root / "v1", seed=0), make_polar_card(root / "v2", seed=1)


def _cfg(tiny_card, polar, src, out, incremental=True):
    data = load_workflow(REPO / "workflows" / "shapes.yaml", [
        f"source.uri={src}", f"output.uri={out}", f"models.0.model={tiny_card}", "source.shard_size=2",
        "models.0.num_cpus=0.5", "pipeline.read_num_cpus=0.25", "output.min_score=0"]).model_dump(mode="json")
    data["models"].append({"model": str(polar), "num_cpus": 0.5, "score_threshold": 0.0, "batch_size": 2})
    data["ensemble"] = {"method": "soft"}
    data["incremental"] = {} if incremental else None
    return WorkflowConfig.model_validate(data)


def _read(uri, table):
    from segpipe.sinks.writer import read_committed

    return read_committed(uri, table).to_pylist()


@pytest.mark.slow
def test_three_incremental_runs(ray_local, tiny_card, polar_cards, shapes_data, tmp_path):
    from segpipe.config import ModelCard
    from segpipe.io.fs import resolve
    from segpipe.pipeline.run import run_workflow
    from segpipe.provenance import ledger

    src, root = tmp_path / "src", tmp_path / "labels"
    src.mkdir()
    good = sorted((shapes_data / "images").glob("0*.jpg"))
    for p in good[:4]:
        shutil.copy(p, src / p.name)
    quiet = lambda m: None  # noqa: E731
    v1, v2 = (ModelCard.from_yaml(c).version() for c in polar_cards)
    mrcnn = ModelCard.from_yaml(tiny_card).version()
    assert v1 != v2

    r1 = run_workflow(_cfg(tiny_card, polar_cards[0], src, root), run_id="r1", progress=quiet)
    assert r1.status == "complete" and r1.counts["images"] == 4
    for p in good[4:6]:  # two images arrive
        shutil.copy(p, src / p.name)
    r2 = run_workflow(_cfg(tiny_card, polar_cards[0], src, root), run_id="r2", progress=quiet)
    assert r2.counts["images"] == 2
    assert {r["relpath"] for r in _read(f"{root}/runs/r2", "images")} == {p.name for p in good[4:6]}
    # The PolarMask version changes: only it re-runs, on all six; Mask R-CNN's predictions are reused.
    r3 = run_workflow(_cfg(tiny_card, polar_cards[1], src, root), run_id="r3", progress=quiet)
    assert r3.counts["images"] == 6
    assert r3.stage_ms.get("tiny-maskrcnn", 0.0) == 0.0 and r3.stage_ms["tiny-polarmask"] > 0
    preds3 = _read(f"{root}/runs/r3", "predictions")
    assert {r["source"] for r in preds3} == {"tiny-polarmask"} and {tuple(r["model_versions"]) for r in preds3} == {(v2,)}
    # The re-fused ensemble equals a fresh, non-incremental run with the new version.
    fresh = run_workflow(_cfg(tiny_card, polar_cards[1], src, tmp_path / "fresh", incremental=False), run_id="f",
                         progress=quiet)
    key = lambda r: (r["image_id"], r["category_id"], r["mask_rle"], round(r["score"], 4), r["n_votes"])  # noqa: E731
    assert sorted(map(key, _read(f"{root}/runs/r3", "instances"))) == sorted(map(key, _read(fresh.output_uri, "instances")))
    r4 = run_workflow(_cfg(tiny_card, polar_cards[1], src, root), run_id="r4", progress=quiet)
    assert r4.status == "complete" and r4.counts["images"] == 0

    fs, lroot = resolve(f"{root}/_ledger")
    records = {r["run_id"]: r["counts"] for r in ledger.read_records(fs, lroot)}
    assert (records["r1"]["new"], records["r2"]["new"], records["r2"]["skipped"]) == (4, 2, 4)
    assert (records["r3"]["partial"], records["r3"]["model_runs"], records["r4"]["skipped"]) == (6, 6, 6)
    # Every input exactly once per model version, over all runs: in the ledger and in predictions/.
    rows = ledger.read_rows(fs, lroot)
    per = Counter((r["uri"], r["model"], r["model_version"]) for r in rows)
    assert set(per.values()) == {1}
    versions = Counter((m, v) for _, m, v in per)
    assert versions == {("tiny-maskrcnn", mrcnn): 6, ("tiny-polarmask", v1): 6, ("tiny-polarmask", v2): 6}
    labeled_by = Counter()
    for run in ("r1", "r2", "r3"):
        for r in _read(f"{root}/runs/{run}", "predictions"):
            labeled_by[(r["image_uri"], r["source"], r["model_versions"][0], run)] = 1
    runs_per = Counter((u, s, v) for u, s, v, _ in labeled_by)
    assert set(runs_per.values()) == {1}
    from typer.testing import CliRunner

    from segpipe.cli import app

    out = CliRunner().invoke(app, ["ledger", str(root)]).output
    assert f"tiny-polarmask@{v2}: 6 inputs labeled, 0 failed" in out and "r2 complete: listed 6, new 2" in out
