"""`segpipe bench pipeline` and `segpipe bench memory` on a few images: the figures are there,
consistent with each other and with the work done (timings themselves are not asserted)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from segpipe.bench import memory, pipeline
from segpipe.cli import app
from segpipe.config import load_workflow

from conftest import REPO

pytestmark = pytest.mark.slow


def test_scaled_sets_every_pool_and_shares_one_gpu():
    cfg = load_workflow(REPO / "workflows" / "demo.yaml")
    two = pipeline.scaled(cfg, 2, has_gpu=False, cpus=0.25)
    assert [m.concurrency for m in two.models] == [2, 2] and two.refine.concurrency == 2
    assert all(m.num_cpus == 0.25 and m.num_gpus == 0 for m in two.models) and two.refine.num_gpus == 0
    gpu = pipeline.scaled(cfg, 2, has_gpu=True, cpus=None)
    shares = [m.num_gpus for m in gpu.models] + [gpu.refine.num_gpus]
    assert shares == [0.1666] * 3 and sum(s * 2 for s in shares) <= 1.0
    assert [m.num_cpus for m in gpu.models] == [m.num_cpus for m in cfg.models]


def test_bench_pipeline_compares_the_loop_with_one_and_two_actors(ray_local, shapes_data, tmp_path):
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", "pipeline", "--data", str(shapes_data), "--n", "5", "--cpus", "0.25",
                                 "--actors", "1", "--actors", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    seq, p1, p2 = res["runs"]
    assert seq["mode"] == "sequential" and seq["images"] == 5
    models = ["maskrcnn-shapes", "spatialemb-shapes"]
    for run in (seq, p1, p2):
        assert set(run["stage_ms"]) >= {"read", "decode", *models, "ensemble", "refine", "write"}, run["stage_ms"]
        assert set(run["forward_ms"]) == set(models) and all(v > 0 for v in run["forward_ms"].values())
        assert run["efficiency"] > 0 and run["model_forward_s"] > 0
        # CPU time of the forwards, all threads: at most the machine's capacity over the wall.
        assert set(run["forward_cpu_ms"]) == set(models) and 0 < run["cpu_efficiency"] <= 1.0
        assert run["images_per_s"] == pytest.approx(run["images"] / run["wall_s"])
    # shapes_data holds 8 files, the first 5 sorted; the pipeline accounts for each (errors included).
    assert p1["images"] == p2["images"] == 5
    assert (p1["actors_per_stage"], p2["actors_per_stage"]) == (1, 2)
    assert p1["ratio_vs_sequential"] == pytest.approx(p1["images_per_s"] / seq["images_per_s"])
    workers = {s["name"]: s["workers"] for s in p2["stages"]}
    assert workers["maskrcnn-shapes"] == workers["refine"] == 2, p2["stages"]
    assert all(1 <= s["active_workers"] <= 2 for s in p2["stages"] if s["kind"] == "actor"), p2["stages"]
    assert p2["account"]["bottleneck"] in workers
    assert "| sequential loop |" in r.output and "| pipeline, 2 actor(s)/stage |" in r.output and "bottleneck" in r.output


def test_bench_memory_samples_the_whole_process_tree(tmp_path):
    out = tmp_path / "memory.json"
    r = CliRunner().invoke(app, ["bench", "memory", "--count", "12", "--count", "6", "--size", "64", "--interval", "0.2",
                                 "--data", str(tmp_path / "imgs"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    a, b = res["runs"]  # in increasing count
    assert (a["images"], b["images"]) == (6, 12)
    for r in (a, b):
        # The driver, Ray's GCS and raylet, and at least the read and model workers.
        assert r["processes"] >= 4, r
        assert 0 < r["driver_rss_mib"] < r["tree_pss_mib"] <= r["tree_rss_mib"], r
        assert r["samples"] and max(s[1] for s in r["samples"]) == pytest.approx(r["tree_pss_mib"], abs=0.11)
    assert "pss_growth_vs_first" in b and "| 12 |" in memory.table(res)
