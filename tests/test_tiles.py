"""Tile plans on edge sizes, shifting tile masks into the image, and the merge on tiny golden masks."""

from __future__ import annotations

import numpy as np
import pytest

from segpipe.ops import masks as mask_ops
from segpipe.ops.tiles import (Tile, axis_starts, cut_by_internal_edge, merge_greedy, merge_tiles, sparse_ios,
                               owns, plan_tiles, shift)
from segpipe.structures import Instances


@pytest.mark.parametrize("size, tile, overlap, starts", [
    (100, 256, 0, [0]),          # image smaller than a tile: one (short) tile
    (256, 256, 64, [0]),         # exactly one tile
    (512, 256, 0, [0, 256]),     # exact multiple, no overlap
    (257, 256, 0, [0, 1]),       # a 1-pixel remainder: the last tile snaps to the border
    (512, 256, 64, [0, 128, 256]),
    (1, 8, 2, [0]),
])
def test_axis_starts_edge_sizes(size, tile, overlap, starts):
    assert axis_starts(size, tile, overlap) == starts


@pytest.mark.parametrize("seed", range(5))
def test_axis_starts_cover_with_the_overlap_and_end_at_the_border(seed):
    rng = np.random.default_rng(seed)
    for _ in range(200):
        tile = int(rng.integers(2, 300))
        ov = int(rng.integers(0, tile))
        size = int(rng.integers(1, 3000))
        s = axis_starts(size, tile, ov)
        assert s[0] == 0 and s == sorted(set(s))
        assert min(s[-1] + tile, size) == size and all(x + tile <= max(size, tile) for x in s)
        for a, b in zip(s, s[1:]):
            assert a + tile - b >= ov  # neighbours share at least the overlap (so no gap)


def test_bad_tile_parameters_are_refused():
    with pytest.raises(ValueError):
        axis_starts(100, 64, 64)
    with pytest.raises(ValueError):
        plan_tiles(100, 100, 64, 1.0)


@pytest.mark.parametrize("h, w, tile, ov", [(100, 100, 256, 0.2), (512, 257, 256, 0.25), (1000, 777, 128, 0.2), (64, 64, 32, 0.0)])
def test_cores_partition_the_image(h, w, tile, ov):
    tiles = plan_tiles(h, w, tile, ov)
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    count = np.zeros((h, w), int)
    for t in tiles:
        x0, y0, x1, y1 = t.core
        assert t.x0 <= x0 and x1 <= t.x1 and t.y0 <= y0 and y1 <= t.y1  # a core lies in its tile
        count += (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    assert (count == 1).all()


def _inst(masks: np.ndarray, scores, labels=None, probs=True) -> Instances:
    """Dense [N, H, W] masks -> Instances with tight boxes (and box-frame soft masks)."""
    h, w = masks.shape[1:]
    rles = mask_ops.encode(masks.astype(np.uint8)) if len(masks) else []
    xywh = mask_ops.to_bbox(rles)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1) if len(masks) else np.zeros((0, 4), np.float32)
    sp = np.stack([mask_ops.crop_to_box_frame(m.astype(np.float32), b) for m, b in zip(masks, boxes)]).astype(np.float16) \
        if probs and len(masks) else None
    return Instances(height=h, width=w, boxes=boxes.astype(np.float32), scores=np.asarray(scores, np.float32),
                     labels=np.asarray(labels if labels is not None else [1] * len(masks), np.int64), masks=rles, mask_probs=sp)


def test_shift_moves_tile_masks_into_the_image():
    m = np.zeros((1, 6, 8), bool)
    m[0, 1:4, 2:7] = True
    t = Tile(5, 3, 13, 9, (5, 3, 13, 9))
    out = shift(_inst(m, [0.9]), t, 20, 30)
    dense = mask_ops.decode(out.masks)[0]
    want = np.zeros((20, 30), bool)
    want[4:7, 7:12] = True
    assert (dense.astype(bool) == want).all()
    np.testing.assert_allclose(out.boxes[0], [7, 4, 12, 7])
    assert out.mask_probs.shape == (1, 28, 28)


def test_cut_and_owned():
    t = Tile(10, 0, 30, 20, (15, 0, 25, 20))
    boxes = np.array([[10, 5, 14, 9], [16, 5, 20, 9], [26, 5, 30, 9], [12, 0, 18, 4]], np.float32)  # the last touches the image top
    assert cut_by_internal_edge(boxes, t, 20, 40).tolist() == [True, False, True, False]
    assert cut_by_internal_edge(boxes, Tile(0, 0, 30, 20, (0, 0, 25, 20)), 20, 30).tolist() == [False, False, False, False]
    assert owns(boxes, t).tolist() == [False, True, False, True]  # centre x 15 is the core's first column


def _dense_ios(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Reference IoS of dense bool masks [N, H, W] x [M, H, W] -> [N, M] (0 where either is empty)."""
    inter = np.einsum("nhw,mhw->nm", a.astype(np.int64), b.astype(np.int64)).astype(np.float64)
    smaller = np.minimum(a.sum((1, 2))[:, None], b.sum((1, 2))[None, :]).astype(np.float64)
    return np.where(smaller > 0, inter / np.maximum(smaller, 1), 0.0)


def _xyxy(m: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(m)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def test_ios_known_values():
    a = np.zeros((2, 10, 10), bool)
    a[0, :4, :4] = True  # 16 px
    a[1, :2, :2] = True  # 4 px, inside a[0]
    ra, ba = mask_ops.encode(a.astype(np.uint8)), np.stack([_xyxy(m) for m in a])
    assert sparse_ios(ra, ba, ra, ba) == {(0, 0): 1.0, (0, 1): 1.0, (1, 0): 1.0, (1, 1): 1.0}
    b = np.zeros((1, 10, 10), bool)
    b[0, 2:6, 2:6] = True  # overlaps a[0] on 4 px; a[1]'s box misses it
    assert sparse_ios(ra, ba, mask_ops.encode(b.astype(np.uint8)), _xyxy(b[0])[None]) == {(0, 0): 0.25}


def test_merge_greedy_unions_by_class():
    m = np.zeros((3, 10, 10), bool)
    m[0, 1:5, 1:5] = True
    m[1, 1:5, 3:8] = True  # IoS with m[0]: 8 / 16 = 0.5
    m[2, 1:5, 3:8] = True
    inst = _inst(m, [0.9, 0.8, 0.7], labels=[1, 1, 2])
    out = merge_greedy(inst, 0.5)
    assert len(out) == 2 and out.labels.tolist() == [1, 2]
    dense = mask_ops.decode(out.masks)
    assert (dense[0].astype(bool) == (m[0] | m[1])).all() and abs(float(out.scores[0]) - 0.9) < 1e-6
    np.testing.assert_allclose(out.boxes[0], [1, 1, 8, 5])
    assert len(merge_greedy(inst, 0.5, class_aware=False)) == 1


def test_merge_tiles_golden():
    """Image 20 x 40, two tiles [0, 24) and [16, 40) overlapping on 8 columns (cores split at 20).
    A: whole in the left tile only. B: in the overlap, seen whole by both: one copy kept.
    C: cut by the left tile's right edge, whole in the right tile: the whole copy wins.
    D: wider than the overlap, cut in both tiles: the two pieces merge into the union."""
    H, W = 20, 40
    left, right = Tile(0, 0, 24, 20, (0, 0, 20, 20)), Tile(16, 0, 40, 20, (20, 0, 40, 20))
    A = (slice(2, 6), slice(2, 8))
    B = (slice(2, 6), slice(18, 22))
    C = (slice(8, 12), slice(21, 27))
    D = (slice(14, 18), slice(10, 34))

    def view(t, regions):
        m = np.zeros((len(regions), H, W), bool)
        for k, r in enumerate(regions):
            m[k][r] = True
        m = m[:, t.y0:t.y1, t.x0:t.x1]
        return m[m.reshape(len(regions), -1).any(1)]

    lm, rm = view(left, [A, B, C, D]), view(right, [A, B, C, D])
    assert len(lm) == 4 and len(rm) == 3  # A is not in the right tile
    out = merge_tiles([(left, _inst(lm, [0.9, 0.8, 0.7, 0.6])), (right, _inst(rm, [0.85, 0.75, 0.65]))], H, W)
    dense = mask_ops.decode(out.masks).astype(bool)
    want = np.zeros((4, H, W), bool)
    for k, r in enumerate([A, B, C, D]):
        want[k][r] = True
    got = sorted(tuple(np.argwhere(d)[0]) + (int(d.sum()),) for d in dense)
    assert got == sorted(tuple(np.argwhere(w)[0]) + (int(w.sum()),) for w in want)
    assert len(out) == 4


def test_merge_tiles_keeps_nothing_from_empty_tiles():
    t = Tile(0, 0, 10, 10, (0, 0, 10, 10))
    out = merge_tiles([(t, Instances(height=10, width=10))], 10, 10)
    assert len(out) == 0 and (out.height, out.width) == (10, 10)


def test_overlapping_pairs_equal_brute_force_and_sparse_ios_the_dense_one():
    from segpipe.ops.tiles import overlapping_pairs

    rng = np.random.default_rng(3)
    for _ in range(20):
        a = rng.uniform(0, 900, (40, 2))
        a = np.concatenate([a, a + rng.uniform(1, 300, (40, 2))], 1)
        b = rng.uniform(0, 900, (30, 2))
        b = np.concatenate([b, b + rng.uniform(1, 300, (30, 2))], 1)
        ii, jj = overlapping_pairs(a, b, cell=128)
        brute = {(i, j) for i in range(40) for j in range(30)
                 if min(a[i, 2], b[j, 2]) > max(a[i, 0], b[j, 0]) and min(a[i, 3], b[j, 3]) > max(a[i, 1], b[j, 1])}
        assert set(zip(ii.tolist(), jj.tolist())) == brute
    m = np.zeros((6, 64, 64), np.uint8)
    for k in range(6):
        y, x = rng.integers(0, 48, 2)
        m[k, y:y + 16, x:x + 12] = 1
    inst = _inst(m.astype(bool), np.linspace(0.9, 0.4, 6))
    dense = _dense_ios(m.astype(bool), m.astype(bool))
    sparse = sparse_ios(inst.masks, inst.boxes, inst.masks, inst.boxes)
    for i in range(6):
        for j in range(6):
            assert abs(sparse.get((i, j), 0.0) - dense[i, j]) < 1e-9
