"""A pseudo-label set scored against the thrown-away labels, on hand-made masks with known answers."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from segpipe.experiments.set_quality import match_greedy, set_quality


def _ann(i, image_id, m, score=1.0, crowd=0):
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"id": i, "image_id": image_id, "category_id": 1, "iscrowd": crowd, "score": score,
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}}


def _box(y0, y1, x0, x1, h=40, w=40):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_match_greedy_is_one_to_one_in_score_order():
    ious = np.array([[0.6, 0.9], [0.8, 0.2], [0.7, 0.0]])
    assert match_greedy(ious, np.array([0, 1, 2]), 0.5).tolist() == [1, 0, -1]
    assert match_greedy(ious, np.array([2, 1, 0]), 0.5).tolist() == [1, -1, 0]
    assert match_greedy(ious, np.array([0, 1, 2]), 0.95).tolist() == [-1, -1, -1]
    assert match_greedy(np.zeros((2, 0)), np.array([0, 1]), 0.5).tolist() == [-1, -1]


def test_set_quality_counts_right_wrong_ignored_and_background():
    a, b, c, d = _box(0, 10, 0, 10), _box(20, 30, 0, 10), _box(0, 10, 20, 30), _box(20, 30, 20, 30)
    truth = {"images": [{"id": 1, "file_name": "x/one.png", "height": 40, "width": 40},
                        {"id": 2, "file_name": "two.png", "height": 40, "width": 40}],
             "annotations": [_ann(1, 1, a), _ann(2, 1, b), _ann(3, 1, c), _ann(4, 1, d), _ann(5, 2, a)]}
    # The set names images by their own ids: kept a (right) and a false object; c under an
    # ignore region twice its size (half of the region on truth); b and d taught background;
    # image two not written.
    wrong = _box(32, 38, 32, 38)
    region = _box(0, 10, 20, 40)
    pseudo = {"images": [{"id": 7, "file_name": "one.png", "height": 40, "width": 40}],
              "annotations": [_ann(1, 7, a, 0.9), _ann(2, 7, wrong, 0.8), _ann(3, 7, region, 0.3, crowd=1)]}
    q = set_quality(pseudo, truth)
    assert q["kept"] == 2 and q["precision"] == 0.5 and q["truth"] == 5 and q["recall"] == 0.2
    assert q["ignore_regions"] == 1 and q["truth_under_ignore"] == 0.2 and q["ignore_on_truth"] == 0.5
    assert q["truth_taught_background"] == 0.4  # b and d; image two's object is not taught at all
    no_ignore = {**pseudo, "annotations": pseudo["annotations"][:2]}
    q = set_quality(no_ignore, truth)
    assert q["truth_taught_background"] == 0.6 and q["ignore_on_truth"] is None and q["truth_under_ignore"] == 0.0
