"""segpipe bench tiling: the seam selection, best IoU, and the merge-memory benchmark on a small
case (every object found exactly once after merging its tile copies)."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from segpipe.bench.tiling import best_iou, crossing, merge_memory
from segpipe.cli import app
from segpipe.ops import masks as mask_ops


def test_crossing_marks_boxes_that_straddle_an_internal_tile_edge():
    # 512 x 512, tiles of 256 with no overlap: one internal edge at x = 256 and one at y = 256.
    boxes = np.array([[10, 10, 20, 20], [250, 10, 20, 20], [10, 250, 20, 20], [256, 300, 10, 10], [400, 400, 30, 30]])
    assert crossing(boxes, 512, 512, 256, 0.0).tolist() == [False, True, True, False, False]


def test_best_iou():
    g = np.zeros((2, 10, 10), np.uint8)
    g[0, :4, :4] = 1
    g[1, 6:, 6:] = 1
    p = np.zeros((1, 10, 10), np.uint8)
    p[0, :4, :2] = 1
    np.testing.assert_allclose(best_iou(mask_ops.encode(g), mask_ops.encode(p)), [0.5, 0.0])
    assert best_iou(mask_ops.encode(g), []).tolist() == [0.0, 0.0]


def test_merge_memory_finds_every_object_once():
    r = merge_memory(size=1200, n_instances=120, tile=256)
    assert r["merged"] == 120 and r["tile_predictions"] > 120 and r["tiles"] == 36


def test_bench_tiling_memory_cli(tmp_path):
    out = tmp_path / "m.json"
    r = CliRunner().invoke(app, ["bench", "tiling-memory", "--size", "600", "--instances", "40", "--tile", "256",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["merged"] == 40
