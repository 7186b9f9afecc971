"""The run report and overlay PNGs: pure functions, the page on a hand-made run, `segpipe report`
and `segpipe viz` on a real finished run, and the page in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from segpipe.cli import app
from segpipe.ops import masks as mask_ops
from segpipe.report import overlay as ov
from segpipe.report.charts import histogram, histogram_svg
from segpipe.report.disagreement import (disagreement_by_image, image_disagreement, instance_disagreement, review_queue,
                                         sample_ids)

from browser import check_page, find_chromium
from conftest import REPO

runner = CliRunner()
ARTIFACTS = REPO / "tests" / "artifacts"
SECTIONS = ["summary", "provenance", "counts", "throughput", "accuracy", "gallery", "histograms"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _row(mask: np.ndarray, score: float, name: str = "ellipse", **extra) -> dict:
    """An instances row for a dense bool mask [H, W]."""
    rle = mask_ops.encode(mask[None].astype(np.uint8))[0]
    return {"mask_rle": rle["counts"], "mask_height": mask.shape[0], "mask_width": mask.shape[1], "score": score,
            "category_name": name, **extra}


def _square(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


# --- overlay ------------------------------------------------------------------------------------


def test_instance_colours_are_distinct_and_deterministic():
    c = ov.instance_colours(12)
    assert c.shape == (12, 3) and c.dtype == np.uint8
    assert len({tuple(x) for x in c}) == 12
    np.testing.assert_array_equal(c[:5], ov.instance_colours(5))
    assert ov.instance_colours(0).shape == (0, 3)


def test_overlay_colours_land_on_mask_pixels_only():
    img = np.zeros((20, 30, 3), np.uint8)
    m = _square(20, 30, 5, 15, 8, 18)
    out = ov.overlay(img, [_row(m, 0.9)], alpha=0.5, labels=False)
    colour = ov.instance_colours(1)[0].astype(float)
    edge = ov.inner_edge(m)
    assert out.shape == img.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[~m], 0)  # nothing outside the mask
    np.testing.assert_array_equal(out[edge], np.broadcast_to(colour, (int(edge.sum()), 3)))  # opaque contour
    np.testing.assert_allclose(out[m & ~edge], np.broadcast_to(np.round(0.5 * colour), (int((m & ~edge).sum()), 3)), atol=1)
    assert edge.sum() == 2 * 10 + 2 * 8 and not edge[6:14, 9:17].any()  # the ring of a 10 x 10 square


def test_overlay_draws_the_strongest_on_top_and_drops_low_scores():
    img = np.full((16, 16, 3), 100, np.uint8)
    a, b = _square(16, 16, 2, 12, 2, 12), _square(16, 16, 4, 14, 4, 14)
    rows = [_row(a, 0.2), _row(b, 0.8)]
    colours = ov.instance_colours(2)
    out = ov.overlay(img, rows, alpha=1.0, labels=False)
    np.testing.assert_array_equal(out[8, 8], colours[1])  # overlap: the 0.8 row, drawn last
    np.testing.assert_array_equal(out[3, 3], colours[0])
    kept = ov.overlay(img, rows, alpha=1.0, labels=False, min_score=0.5)
    np.testing.assert_array_equal(kept[3, 3], [100, 100, 100])
    np.testing.assert_array_equal(kept[8, 8], ov.instance_colours(1)[0])
    labelled = ov.overlay(img, rows, alpha=0.0, labels=True)
    assert (labelled != ov.overlay(img, rows, alpha=0.0, labels=False)).any()  # text was written


def test_overlay_downscales_masks_into_the_right_place():
    img = np.zeros((200, 100, 3), np.uint8)
    m = _square(200, 100, 100, 200, 0, 50)  # the bottom-left quarter
    out = ov.overlay(img, [_row(m, 1.0)], max_side=50, alpha=1.0, labels=False)
    assert out.shape == (50, 25, 3)
    painted = out.any(axis=2)
    np.testing.assert_array_equal(painted[25:, :12], True)
    assert not painted[:24].any() and not painted[:, 13:].any()
    assert ov.overlay(img, [], max_side=50).shape == (50, 25, 3)


def test_overlay_checks_its_inputs():
    m = _square(10, 10, 0, 5, 0, 5)
    with pytest.raises(ValueError, match="image"):
        ov.overlay(np.zeros((10, 10), np.uint8), [_row(m, 1.0)])
    with pytest.raises(ValueError, match="mask of size 10x10"):
        ov.overlay(np.zeros((12, 10, 3), np.uint8), [_row(m, 1.0)])
    with pytest.raises(ValueError, match="alpha"):
        ov.overlay(np.zeros((10, 10, 3), np.uint8), [], alpha=2.0)
    with pytest.raises(ValueError, match="fmt"):
        ov.encode(np.zeros((4, 4, 3), np.uint8), "gif")


def test_encode_png_is_lossless_and_jpeg_decodes():
    img = np.random.default_rng(0).integers(0, 255, (9, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(ov.encode(img)))), img)
    assert Image.open(io.BytesIO(ov.encode(img, "jpeg"))).size == (7, 9)


# --- disagreement -------------------------------------------------------------------------------


def test_instance_disagreement_formula():
    assert instance_disagreement(2, 1.0, 2) == 0.0
    assert instance_disagreement(2, 0.9, 2) == pytest.approx(0.1)
    assert instance_disagreement(1, None, 2) == 1.0
    assert instance_disagreement(2, 1.0, 3) == pytest.approx(1 / 3)  # one of three models missed it
    with pytest.raises(ValueError):
        instance_disagreement(1, None, 0)


def test_disagreement_orders_images_for_review():
    def r(image_id, score, votes, agreement):
        return {"image_id": image_id, "score": score, "n_votes": votes, "agreement": agreement}

    rows = [
        r(1, 0.9, 2, 0.95), r(1, 0.8, 2, 0.9),  # the models agree: 0.05, 0.1
        r(2, 0.9, 1, None), r(2, 0.5, 2, 0.6),  # a confident lone vote
        r(3, 0.9, 2, 0.95), r(3, 0.05, 1, None),  # agreement, plus a low-score leftover
    ]
    scores = disagreement_by_image(rows, 2, image_ids=[1, 2, 3, 4])
    assert scores[4] == 0.0  # no instances: nothing to review
    assert scores[1] == pytest.approx((0.9 * 0.05 + 0.8 * 0.1) / 1.7)
    assert scores[3] == pytest.approx((0.9 * 0.05 + 0.05 * 1.0) / 0.95)
    assert scores[2] == pytest.approx((0.9 * 1.0 + 0.5 * 0.4) / 1.4)
    assert review_queue(scores, 10) == [2, 3, 1]  # image 4 (0) never queued
    assert review_queue(scores, 1) == [2]
    assert image_disagreement([], 2) == 0.0 and image_disagreement([r(5, 0.0, 1, None)], 2) == 0.0
    assert review_queue({7: 0.5, 3: 0.5}, 2) == [3, 7]  # ties by id


def test_sample_ids_spread_evenly_and_deterministically():
    ids = list(range(100, 200))
    s = sample_ids(ids[::-1], 5)
    assert s == [100, 125, 150, 174, 199] or s == [100, 125, 150, 175, 199]
    assert len(set(sample_ids(ids, 99))) == 99
    assert sample_ids([3, 1], 5) == [1, 3] and sample_ids(ids, 0) == [] and sample_ids([], 3) == []


# --- charts -------------------------------------------------------------------------------------


def test_histogram_bins_clip_and_skip_nan():
    counts = histogram([0.0, 0.05, 0.1, 0.55, 1.0, 1.7, -3.0, float("nan")], bins=10, lo=0.0, hi=1.0)
    assert counts.tolist() == [3, 1, 0, 0, 0, 1, 0, 0, 0, 2]  # -3 -> first bin; 1.0 and 1.7 -> last
    with pytest.raises(ValueError):
        histogram([1.0], bins=0, lo=0.0, hi=1.0)
    with pytest.raises(ValueError):
        histogram([1.0], bins=3, lo=1.0, hi=1.0)


def test_histogram_svg_has_one_bar_per_bin_scaled_to_the_largest():
    values = [0.1] * 4 + [0.3] * 2 + [0.9]
    svg = histogram_svg(values, title="score <raw>", xlabel="score", bins=5, height=200)
    root = ET.fromstring(svg)  # well-formed XML, the title escaped
    ns = {"s": "http://www.w3.org/2000/svg"}
    bars = root.findall("s:rect", ns)
    assert [int(b.get("data-count")) for b in bars] == [4, 2, 0, 0, 1]
    heights = [float(b.get("height")) for b in bars]
    assert heights[0] == pytest.approx(200 - 22 - 34) and heights[1] == pytest.approx(heights[0] / 2, abs=0.1)
    assert heights[2] == 0 and [b.get("data-lo") for b in bars] == ["0", "0.2", "0.4", "0.6", "0.8"]
    assert "score &lt;raw&gt;" in svg and "(n = 7)" in svg
    empty = ET.fromstring(histogram_svg([], title="t", xlabel="x", bins=4))
    assert [int(b.get("data-count")) for b in empty.findall("s:rect", ns)] == [0, 0, 0, 0]


# --- the page on a hand-made single-model run (no Ray) ---------------------------------------------


def _hand_made_run(root: Path, *, stages: bool) -> Path:
    """A finished single-model run written directly with the sinks: 2 ok images (3 instances) and
    one errored input whose message holds HTML."""
    from segpipe.sinks.tables import instance_rows, to_table
    from segpipe.sinks.writer import RunWriter
    from segpipe.structures import Instances

    (root / "in").mkdir(parents=True)
    out = root / "out"
    rng = np.random.default_rng(1)
    images, inst_rows = [], []
    for k, n in enumerate([2, 1]):
        path = root / "in" / f"im{k}.png"
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
        dense = np.stack([_square(40, 60, 4 + 10 * j, 14 + 10 * j, 5, 25) for j in range(n)]).astype(np.uint8)
        inst = Instances(height=40, width=60, boxes=np.zeros((n, 4), np.float32),
                         scores=np.linspace(0.9, 0.6, n, dtype=np.float32), labels=np.ones(n, np.int64),
                         masks=mask_ops.encode(dense))
        inst_rows += instance_rows(inst, run_id="hand", image_id=k + 1, image_uri=str(path), model="m1",
                                   model_version="m1@000000000000", category_names={1: "ellipse"})
        images.append({"run_id": "hand", "image_id": k + 1, "uri": str(path), "relpath": path.name, "width": 60, "height": 40,
                       "sha256": "0" * 64, "size_bytes": path.stat().st_size, "source_tag": "1", "status": "ok",
                       "n_instances": n, "shard": 0})
    images.append({"run_id": "hand", "image_id": 9, "uri": str(root / "in" / "bad.jpg"), "relpath": "bad.jpg", "width": None,
                   "height": None, "sha256": None, "size_bytes": 3, "source_tag": "1", "status": "error", "n_instances": 0,
                   "shard": 0})
    errors = [{"run_id": "hand", "image_id": 9, "uri": str(root / "in" / "bad.jpg"), "stage": "decode",
               "error_type": "corrupt", "message": "<img src=x onerror=alert(1)> bad bytes"}]
    w = RunWriter(str(out), "hand")
    w.start()
    tables = {"instances": to_table("instances", inst_rows), "predictions": to_table("predictions", inst_rows),
              "images": to_table("images", images), "errors": to_table("errors", errors)}
    w.write_shard(0, tables, {"counts": {"images": 3, "ok": 2, "errors": 1, "instances": 3}})
    card = {"family": "detection", "paper": "hand-made", "metrics": [{"split": "none", "command": "-", "values": {"AP": 0.5}}]}
    manifest = {
        "run_id": "hand", "status": "complete", "reason": None, "started": "2026-01-01T00:00:00+00:00",
        "ended": "2026-01-01T00:00:05+00:00", "wall_s": 5.0, "code": {"segpipe_version": "0.1.0", "git_commit": "abc"},
        "environment": {"python": "3", "packages": {"torch": "2"}, "device": "cpu"},
        "models": [{"name": "m1", "version": "m1@000000000000", "card": card}], "refiner": None,
        "input": {"uri": str(root / "in"), "n_files": 3, "fingerprint": "f", "n_shards": 1},
        "counts": {"images": 3, "ok": 2, "errors": 1, "instances": 3, "errors_by_type": {"corrupt": 1}},
        "timings_ms": {"read": 10.0, "m1": 90.0, "write": 5.0}, "images_per_s": 0.4, "eval": None,
        "outputs": {"instances_source": "m1", "refined_by": None},
    }
    if stages:
        manifest["stages"] = [
            {"name": "read", "kind": "task", "workers": None, "images": 3, "busy_ms": 10.0, "forward_ms": None,
             "utilization": None},
            {"name": "m1", "kind": "actor", "workers": 1, "images": 2, "busy_ms": 90.0, "forward_ms": 70.0, "utilization": 0.018},
            {"name": "write", "kind": "driver", "workers": None, "images": 3, "busy_ms": 5.0, "forward_ms": None,
             "utilization": None}]
        manifest["efficiency"] = {"wall_s": 5.0, "model_forward_ms": 70.0, "pipeline_efficiency": 0.014,
                                  "driver_wait_ms": 4000.0, "bottleneck": "m1"}
    w.finish(manifest)
    return out


@pytest.mark.parametrize("stages", [True, False])
def test_report_of_a_single_model_run(tmp_path, stages):
    from segpipe.report.build import build_report

    run = _hand_made_run(tmp_path, stages=stages)
    page = build_report(str(run), n_sample=5, n_review=5)
    assert all(f'<section id="{s}">' in page for s in SECTIONS)
    assert "Single-model run (no ensemble): no review queue" in page
    assert page.count('<figure class="card"') == 2 and 'data-groups="sample"' in page and "review queue (" not in page
    assert "&lt;img src=x onerror=alert(1)&gt; bad bytes" in page and "<img src=x" not in page  # escaped
    assert "1 of 1 listed" in page and ">corrupt<" in page
    assert "No ground truth" in page
    if stages:
        assert ">actor<" in page and ">driver<" in page and "bottleneck" in page and ">1.8%<" in page
    else:
        assert "summed time per stage only" in page and ">85.7%<" in page  # m1: 90 of 105 ms
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # nothing loaded from anywhere


def test_viz_of_a_hand_made_run_matches_the_pure_overlay(tmp_path):
    from segpipe.report.viz import image_overlays
    from segpipe.sinks.writer import read_committed

    run = _hand_made_run(tmp_path, stages=False)
    (o,) = image_overlays(str(run), "1")
    assert o.source == "instances" and o.label == "instances/ (m1)" and o.n_instances == 2
    pixels = np.asarray(Image.open(tmp_path / "in" / "im0.png").convert("RGB"))
    rows = [r for r in read_committed(str(run), "instances").to_pylist() if r["image_id"] == 1]
    np.testing.assert_array_equal(o.pixels, ov.overlay(pixels, rows))
    assert [x.source for x in image_overlays(str(run), "im1.png", "all")] == ["instances", "m1"]
    # The column and shard selection the report reads with.
    part = read_committed(str(run), "instances", columns=["score", "image_id"])
    assert part.column_names == ["score", "image_id"] and part.num_rows == 3
    assert read_committed(str(run), "instances", columns=["score"], shards={1}).num_rows == 0


# --- the CLI on a real finished run (segpipe demo) ------------------------------------------------------


@pytest.fixture(scope="module")
def report_page(demo_run):
    """`segpipe report RUN --gt GT` on the session's demo run (default output: RUN/report.html)."""
    assert demo_run.exit_code == 0, demo_run.output
    r = invoke("report", demo_run.run, "--gt", demo_run.gt)
    assert r.exit_code == 0, r.output
    path = demo_run.run / "report.html"
    assert f"report: {path}" in r.output
    return path


@pytest.mark.slow
def test_report_command_on_a_real_run(demo_run, report_page):
    page = report_page.read_text()
    manifest = json.loads((demo_run.run / "_segpipe" / "run.json").read_text())
    assert all(f'<section id="{s}">' in page for s in SECTIONS)
    assert len(page.encode()) < 3_000_000
    # AP per model, the unrefined ensemble, the refined result; the run's own evaluation agrees.
    for name, st in [*manifest["eval"]["per_model"].items(), ("ensemble, refined by pointrend-shapes", manifest["eval"])]:
        assert re.search(rf"<td>{re.escape(name)}</td><td class=\"n\" data-v=\"[^\"]+\">{st['AP']:.3f}</td>", page), name
    assert "<td>ensemble, unrefined</td>" in page
    # The gallery: all 8 images sampled; the review queue with every model's overlay.
    assert page.count('<figure class="card"') == 8 and "review sample" in page
    assert "8 of 8 ok images sampled" in page and "Review queue (" in page
    for v in (manifest["models"][0]["version"], manifest["refiner"]["version"], manifest["workflow"]["sha256"]):
        assert v in page
    assert not re.search(r'(src|href)="(?!data:|#)', page) and "url(" not in page
    # Smaller gallery, explicit output.
    small = demo_run.root / "small.html"
    r = invoke("report", demo_run.run, "--out", small, "--sample", 2, "--review", 1, "--max-side", 128)
    assert r.exit_code == 0, r.output
    page = small.read_text()
    cards = re.findall(r'<figure class="card" id="img-(\d+)" data-groups="([a-z ]*)"', page)
    assert 2 <= len(cards) <= 3 and sum("review" in g for _, g in cards) == 1 and sum("sample" in g for _, g in cards) == 2
    assert page.count("<img ") == len(cards) + 2  # the review image also shows the two models' raw overlays
    assert "No ground truth" not in page and "Recorded by the run itself" in page  # the run's own eval.gt


@pytest.mark.slow
def test_report_and_viz_errors(demo_run, tmp_path):
    r = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "not a finished segpipe run" in r.output
    other = tmp_path / "gt.json"
    other.write_text(json.dumps({"images": [{"id": 1, "file_name": "elsewhere.jpg", "height": 8, "width": 8}],
                                 "annotations": [], "categories": [{"id": 1, "name": "ellipse"}]}))
    r = runner.invoke(app, ["report", str(demo_run.run), "--gt", str(other), "--out", str(tmp_path / "r.html")])
    assert r.exit_code == 2 and "matches a file name" in r.output
    r = runner.invoke(app, ["viz", str(tmp_path / "nothing"), "--image", "1"])
    assert r.exit_code == 2 and "not a finished segpipe run" in r.output
    r = runner.invoke(app, ["viz", str(demo_run.run), "--image", "12345"])
    assert r.exit_code == 2 and "no image '12345'" in r.output
    r = runner.invoke(app, ["viz", str(demo_run.run), "--image", "4242_000000.jpg", "--source", "polarmask-shapes"])
    assert r.exit_code == 2 and "expected one of ensemble, maskrcnn-shapes, spatialemb-shapes, all" in r.output
    r = runner.invoke(app, ["viz", str(demo_run.run), "--image", "4242_000000.jpg", "--source", "all", "--out",
                            str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "give a folder" in r.output


@pytest.mark.slow
def test_viz_command_writes_overlay_pngs(demo_run, tmp_path):
    from segpipe.sinks.writer import read_committed

    images = read_committed(str(demo_run.run), "images").to_pylist()
    im = images[0]
    r = invoke("viz", demo_run.run, "--image", im["relpath"], "--source", "all", "--out", tmp_path / "all")
    assert r.exit_code == 0, r.output
    stem = Path(im["relpath"]).stem
    names = sorted(p.name for p in (tmp_path / "all").iterdir())
    assert names == sorted(f"{stem}-{s}.png" for s in ("ensemble", "maskrcnn-shapes", "spatialemb-shapes"))
    for n in names:
        assert Image.open(tmp_path / "all" / n).size == (im["width"], im["height"])
    # By image_id, default source (the refined ensemble) and default place; it is the pure overlay.
    r = invoke("viz", demo_run.run, "--image", im["image_id"])
    assert r.exit_code == 0 and "ensemble, refined by pointrend-shapes" in r.output, r.output
    got = np.asarray(Image.open(demo_run.run / "viz" / f"{stem}-ensemble.png"))
    rows = [x for x in read_committed(str(demo_run.run), "instances").to_pylist() if x["image_id"] == im["image_id"]]
    pixels = np.asarray(Image.open(im["uri"]).convert("RGB"))
    np.testing.assert_array_equal(got, ov.overlay(pixels, rows))
    r = invoke("viz", demo_run.run, "--image", im["relpath"], "--source", "maskrcnn-shapes", "--out", tmp_path / "m.png",
               "--max-side", 64, "--no-labels", "--min-score", 0.5)
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "m.png").size == (64, 64)


def test_help_lists_report_and_viz():
    r = invoke("--help")
    assert "report" in r.output and "viz" in r.output


# --- headless Chromium --------------------------------------------------------------------------


def _chromium() -> str:
    exe = find_chromium()
    if exe is None:
        if os.environ.get("SEGPIPE_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is not installed and SEGPIPE_REQUIRE_CHROMIUM=1 (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium); set SEGPIPE_REQUIRE_CHROMIUM=1 to fail")
    return exe


PAGE_FACTS = {
    "sections": "Array.from(document.querySelectorAll('section[id]')).map(function (s) { return s.id; })",
    "images": "document.images.length",
    "decoded": "Array.from(document.images).every(function (i) { return i.complete && i.naturalWidth > 0; })",
    "charts": "document.querySelectorAll('svg.hist rect.bar').length",
    "review_hidden_after_filter": "(function () { document.querySelector('#gallery button[data-filter=sample]').click();"
                                  " var n = document.querySelectorAll('#gallery .card[hidden]').length;"
                                  " document.querySelector('#gallery button[data-filter=all]').click(); return n; })()",
    "sorted": "(function () { var th = document.querySelector('#accuracy table.sortable th:nth-child(2)'); th.click();"
              " var v = Array.from(th.closest('table').tBodies[0].rows).map(function (r) {"
              " return parseFloat(r.cells[1].getAttribute('data-v')); });"
              " return v.every(function (x, i) { return i === 0 || v[i - 1] <= x; }); })()",
}


@pytest.mark.slow
def test_report_page_in_headless_chromium(report_page):
    exe = _chromium()
    shot = ARTIFACTS / "report-screenshot.png"
    check = check_page(report_page, expressions=PAGE_FACTS, screenshot=shot, chromium=exe)
    print(f"\nreport screenshot: {shot}")
    assert check.errors == []
    facts = check.evaluated
    assert facts["sections"] == SECTIONS
    assert facts["images"] >= 8 and facts["decoded"] is True
    assert facts["charts"] >= 20 * 5  # score, agreement, disagreement and two models' score histograms
    assert facts["review_hidden_after_filter"] == 0  # every image is also sampled (8 of 8)
    assert facts["sorted"] is True
    with Image.open(shot) as im:
        assert im.size[0] == 1280 and im.size[1] > 2000


def test_browser_check_reports_broken_scripts_and_images(tmp_path):
    """The negative control: the same check fails on a page with a broken script, a console
    error and a data-URI image that does not decode."""
    exe = _chromium()
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><head><link rel=icon href='data:,'></head><body><p>x</p>"
                   "<img src='data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB'>"
                   "<script>console.error('logged failure'); notDefinedAnywhere();</script></body></html>")
    check = check_page(bad, chromium=exe)
    joined = "\n".join(check.errors)
    assert "notDefinedAnywhere" in joined and "logged failure" in joined and "image not decoded" in joined, check.errors
    good = tmp_path / "good.html"
    good.write_text("<!DOCTYPE html><html><head><link rel=icon href='data:,'></head><body><p>fine</p>"
                    f"<img src='data:image/png;base64,{base64.b64encode(ov.encode(np.zeros((2, 2, 3), np.uint8))).decode()}'>"
                    "<script>document.body.dataset.ok = '1';</script></body></html>")
    fine = check_page(good, chromium=exe, expressions={"ok": "document.body.dataset.ok"})
    assert fine.errors == [] and fine.evaluated == {"ok": "1"}
