"""pipeline.max_error_rate stops a run early once the budget is exceeded, saying so; the shards
committed so far are kept and a rerun with the same id (and a larger budget) completes it."""

from __future__ import annotations

import shutil

import pytest

from segpipe.config import load_workflow
from segpipe.pipeline.run import run_workflow
from segpipe.sinks.writer import ResumeMismatchError, read_committed, read_manifest

from conftest import REPO, assert_sound

pytestmark = pytest.mark.slow


@pytest.fixture
def mostly_bad(shapes_data, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(6):
        (d / f"a{i}.jpg").write_bytes(b"garbage %d" % i)
    for i, p in enumerate(sorted((shapes_data / "images").glob("0*.jpg"))[:2]):
        shutil.copy(p, d / f"z{i}.jpg")
    return d


def _cfg(tiny_card, src, out, *extra):
    return load_workflow(REPO / "workflows" / "shapes.yaml", [
        f"source.uri={src}", f"output.uri={out}", f"models.0.model={tiny_card}", "source.shard_size=2",
        "pipeline.error_budget_min_images=2", *extra])


def test_error_budget_stops_early_and_a_resume_completes(ray_local, tiny_card, mostly_bad, tmp_path):
    out = tmp_path / "out"
    res = run_workflow(_cfg(tiny_card, mostly_bad, out, "pipeline.max_error_rate=0.5"), run_id="budget", progress=lambda m: None)
    assert res.status == "failed"
    assert "pipeline.max_error_rate=0.5" in res.reason and "stopped early" in res.reason
    man = read_manifest(str(out))
    assert man["status"] == "failed" and man["reason"] == res.reason
    assert 1 <= len(man["shards"]) < 4  # stopped before the last shard
    assert man["counts"]["errors"] == man["counts"]["images"]
    # A different source under the same run id would mix results: refused.
    with pytest.raises(ResumeMismatchError, match="input"):
        run_workflow(_cfg(tiny_card, mostly_bad.parent, out, "pipeline.max_error_rate=1.0"), run_id="budget",
                     progress=lambda m: None)
    again = run_workflow(_cfg(tiny_card, mostly_bad, out, "pipeline.max_error_rate=1.0"), run_id="budget", progress=lambda m: None)
    assert again.status == "complete" and again.skipped_shards == man["shards"]
    images = read_committed(str(out), "images").to_pylist()
    assert sorted(r["relpath"] for r in images) == sorted(p.name for p in mostly_bad.iterdir())
    assert len(read_committed(str(out), "errors")) == 6
    assert_sound("error budget stop, then resume with a larger budget", str(out))
