"""Per-stage progress lines and the per-stage account of a run (segpipe.pipeline.progress)."""

from __future__ import annotations

import pytest

from segpipe.config import load_workflow
from segpipe.pipeline.progress import StageMeter, format_stage_table, progress_line, stage_table
from segpipe.pipeline.run import run_workflow

from conftest import REPO


def test_meter_counts_images_busy_time_and_distinct_workers():
    m = StageMeter()
    m.add("read", 8, 40.0, "w1")
    m.add("read", 8, 60.0, "w2")
    m.add("read", 4, 10.0, "w1")
    m.add("maskrcnn", 8, 500.0, "a1")
    snap = m.snapshot()
    assert snap["read"]["images"] == 20 and snap["read"]["busy_ms"] == 110.0 and snap["read"]["workers"] == 2
    assert snap["read"]["first_images"] == 8 and snap["read"]["last"] >= snap["read"]["first"]
    assert snap["maskrcnn"]["workers"] == 1


def test_progress_line_rates_and_etas_per_stage():
    snap = {"read": {"images": 100, "busy_ms": 1.0, "workers": 1, "first": 1000.0, "last": 1010.0, "first_images": 20},
            "m": {"images": 40, "busy_ms": 1.0, "workers": 1, "first": 1005.0, "last": 1009.0, "first_images": 10}}
    line = progress_line(snap, ["read", "m", "refine"], 100, 32, 75.0, now=1010.0)
    # read: (100 - 20) images over 10 s -> 8/s, all done; m: 30 images over 5 s -> 6/s, 60 left -> 10 s.
    assert line == "[1m15s] read 100/100 8.0/s done | m 40/100 6.0/s ETA 10s | refine 0/100 | committed 32/100"


def test_stage_table_utilization_efficiency_and_bottleneck():
    stage_ms = {"read": 100.0, "decode": 300.0, "m1": 6000.0, "m2": 2000.0, "ensemble": 500.0, "write": 50.0}
    rows, eff = stage_table(stage_ms, {"m1": 5000.0, "m2": 1500.0}, ["m1", "m2"], images=100, exec_wall_s=10.0,
                            workers={"read": 2, "m1": 1, "m2": 2, "ensemble": 1},
                            kinds={"m1": "actor", "m2": "actor", "write": "driver"}, driver_wait_ms=9000.0, first_row_s=2.0)
    by = {r["name"]: r for r in rows}
    assert [r["name"] for r in rows] == ["read", "decode", "m1", "m2", "ensemble", "write"]
    assert by["m1"]["utilization"] == 0.6 and by["m2"]["utilization"] == 0.1 and by["m2"]["workers"] == 2
    assert by["decode"]["workers"] == 2 and by["decode"]["utilization_joint"] == 0.02  # (100 + 300) / (10 s x 2)
    assert by["write"]["kind"] == "driver" and by["write"]["workers"] == 1
    assert by["m1"]["ms_per_image"] == 60.0 and by["m1"]["forward_ms"] == 5000.0 and by["read"]["forward_ms"] is None
    assert eff == {"wall_s": 10.0, "model_forward_ms": 6500.0, "pipeline_efficiency": 0.65, "model_forward_cpu_ms": None,
                   "cpu_efficiency": None, "cpus": None, "driver_wait_ms": 9000.0, "startup_s": 2.0, "bottleneck": "m1"}
    _, eff2 = stage_table(stage_ms, {"m1": 5000.0}, ["m1", "m2"], 100, 10.0, {}, {}, 0.0, None,
                          forward_cpu_ms={"m1": 9000.0, "m2": 3000.0}, cpus=2.0)
    assert eff2["model_forward_cpu_ms"] == 12000.0 and eff2["cpu_efficiency"] == 0.6  # 12 core-s of 2 x 10 s
    text = format_stage_table(rows, eff)
    assert "bottleneck: m1" in text and "efficiency 0.65" in text


@pytest.mark.slow
def test_a_run_prints_per_stage_progress_and_records_its_account(ray_local, tiny_card, shapes_data, tmp_path):
    cfg = load_workflow(REPO / "workflows" / "shapes.yaml", [
        f"source.uri={shapes_data / 'images'}", f"output.uri={tmp_path / 'out'}", f"models.0.model={tiny_card}",
        "source.shard_size=3", "pipeline.progress=lines", "pipeline.progress_interval_s=0.2", "pipeline.read_batch_size=2",
        "models.0.batch_size=2"])
    lines: list[str] = []
    res = run_workflow(cfg, run_id="progress", progress=lines.append)
    staged = [ln for ln in lines if ln.startswith("[") and "| committed" in ln]
    assert staged, lines
    assert any("read " in ln and "tiny-maskrcnn " in ln and "/s" in ln for ln in staged), staged
    # The last line, printed when the stream ends, has every image through every stage.
    n = res.counts["images"]
    assert f"read {n}/{n}" in staged[-1] and f"tiny-maskrcnn {n}/{n}" in staged[-1] and f"committed {n}/{n}" in staged[-1], staged
    names = [r["name"] for r in res.stages]
    assert names == ["read", "decode", "tiny-maskrcnn", "write"]
    model = res.stages[2]
    assert model["kind"] == "actor" and model["workers"] == model["active_workers"] == 1
    assert 0 < model["forward_ms"] <= model["busy_ms"] and model["forward_cpu_ms"] > 0
    assert 0 < res.efficiency["cpu_efficiency"] <= 1 and res.efficiency["cpus"] == 2
    assert 0 < model["utilization"] <= 1.0
    assert res.efficiency["bottleneck"] in names and 0 < res.efficiency["pipeline_efficiency"] < 1
    import json

    manifest = json.loads((tmp_path / "out" / "_segpipe" / "run.json").read_text())
    assert manifest["stages"] == res.stages and manifest["efficiency"] == res.efficiency
    assert manifest["timings_ms"]["decode"] > 0


def test_ticker_prints_count_rate_eta_and_the_final_line():
    from segpipe.pipeline.progress import Ticker

    out: list[str] = []
    t = Ticker("predict", 10, out.append, interval_s=3600)
    for _ in range(9):
        t.tick()
    assert out == []  # inside the interval: silent until the total is reached
    t.tick()
    assert len(out) == 1 and out[0].startswith("predict 10/10 ") and " done " in out[0]
    t0 = Ticker("x", 4, out.append, interval_s=0)
    t0.tick(2)
    assert out[-1].startswith("x 2/4 ") and "ETA" in out[-1]


def test_progress_off_survives_yaml():
    """--set pipeline.progress=off: YAML reads a bare off as false; it still means off."""
    wf = REPO / "workflows" / "demo.yaml"
    assert load_workflow(wf, ["pipeline.progress=off"]).pipeline.progress == "off"
    assert load_workflow(wf, ["pipeline.progress=bars"]).pipeline.progress == "bars"
    with pytest.raises(Exception, match="pipeline.progress"):
        load_workflow(wf, ["pipeline.progress=sometimes"])
