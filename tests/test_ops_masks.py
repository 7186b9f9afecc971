"""segpipe.ops.masks: RLE encode/decode, box-local encoding, areas, boxes, IoU and soft-mask pasting.

pycocotools is the oracle: every RLE we produce must equal what ``pycocotools.mask.encode`` gives
for the equivalent dense full-frame mask, byte for byte.
"""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from segpipe.ops import masks as mask_ops

# --- golden masks (H=4, W=4), written out literally ---------------------------------------------

GOLD_A = np.array(
    [
        [0, 1, 1, 0],
        [0, 1, 1, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
    ],
    np.uint8,
)
GOLD_B = np.array(
    [
        [0, 0, 0, 0],
        [0, 1, 1, 1],
        [0, 1, 1, 1],
        [0, 0, 0, 0],
    ],
    np.uint8,
)
GOLD_C = np.array(  # touches the first and the last pixel (column-major): leading and trailing 1-runs
    [
        [1, 0, 0, 0],
        [1, 0, 0, 0],
        [1, 0, 0, 0],
        [1, 0, 0, 1],
    ],
    np.uint8,
)
# Computed once with pycocotools 2.0.x and checked in; re-checked against pycocotools below.
GOLD_COUNTS = {"A": "42204", "B": "522000O", "C": "04;M"}
GOLD_AREA = {"A": 4, "B": 6, "C": 5}
GOLD_BBOX = {"A": [1, 0, 2, 2], "B": [1, 1, 3, 2], "C": [0, 0, 4, 4]}
GOLD = {"A": GOLD_A, "B": GOLD_B, "C": GOLD_C}


def coco_encode(mask: np.ndarray) -> dict:
    """The oracle: pycocotools' RLE of one dense [H, W] mask, counts as str."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def dense_from_local(local: np.ndarray, x0: int, y0: int, height: int, width: int) -> np.ndarray:
    """Reference placement of a box-local mask into a full frame (slow, obviously right)."""
    full = np.zeros((height, width), np.uint8)
    for r in range(local.shape[0]):
        for c in range(local.shape[1]):
            y, x = y0 + r, x0 + c
            if local[r, c] and 0 <= y < height and 0 <= x < width:
                full[y, x] = 1
    return full


# --- encode / decode ----------------------------------------------------------------------------


def test_golden_counts_still_match_pycocotools():
    for key, mask in GOLD.items():
        assert coco_encode(mask)["counts"] == GOLD_COUNTS[key]


def test_encode_golden():
    rles = mask_ops.encode(np.stack([GOLD_A, GOLD_B, GOLD_C]))
    assert [r["counts"] for r in rles] == [GOLD_COUNTS["A"], GOLD_COUNTS["B"], GOLD_COUNTS["C"]]
    assert all(r["size"] == [4, 4] for r in rles)
    assert all(isinstance(r["counts"], str) for r in rles)


def test_encode_accepts_bool_and_c_order():
    masks = np.stack([GOLD_A, GOLD_B]).astype(bool)
    assert [r["counts"] for r in mask_ops.encode(masks)] == [GOLD_COUNTS["A"], GOLD_COUNTS["B"]]


def test_encode_non_square_matches_pycocotools():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 5, 7)) > 0.5
    got = mask_ops.encode(masks)
    for m, r in zip(masks, got):
        assert r == coco_encode(m)
        assert r["size"] == [5, 7]


def test_encode_empty_batch():
    assert mask_ops.encode(np.zeros((0, 6, 9), np.uint8)) == []


@pytest.mark.parametrize("shape", [(4, 4), (1, 2, 3, 4)])
def test_encode_rejects_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"masks.*" + str(list(shape)).replace("[", r"\[").replace("]", r"\]")):
        mask_ops.encode(np.zeros(shape, np.uint8))


def test_decode_golden_roundtrip():
    rles = [{"size": [4, 4], "counts": GOLD_COUNTS[k]} for k in "ABC"]
    dense = mask_ops.decode(rles)
    assert dense.shape == (3, 4, 4)
    assert dense.dtype == np.uint8
    np.testing.assert_array_equal(dense, np.stack([GOLD_A, GOLD_B, GOLD_C]))


def test_decode_accepts_bytes_counts():
    dense = mask_ops.decode([{"size": [4, 4], "counts": GOLD_COUNTS["B"].encode()}])
    np.testing.assert_array_equal(dense[0], GOLD_B)


def test_decode_empty():
    out = mask_ops.decode([])
    assert out.shape == (0, 0, 0)


def test_encode_decode_random_roundtrip():
    rng = np.random.default_rng(1)
    masks = (rng.random((4, 13, 29)) > 0.7).astype(np.uint8)
    np.testing.assert_array_equal(mask_ops.decode(mask_ops.encode(masks)), masks)


# --- encode_local -------------------------------------------------------------------------------


def check_local(local: np.ndarray, x0: int, y0: int, height: int, width: int) -> None:
    got = mask_ops.encode_local(local, x0, y0, height, width)
    want = coco_encode(dense_from_local(local, x0, y0, height, width))
    assert got["size"] == [height, width]
    assert isinstance(got["counts"], str)
    assert got["counts"] == want["counts"], (local.astype(int).tolist(), x0, y0, height, width)


L_SHAPE = np.array(
    [
        [1, 0, 0],
        [1, 0, 0],
        [1, 1, 1],
    ],
    bool,
)


@pytest.mark.parametrize(
    "x0, y0",
    [
        (2, 2),  # inside
        (0, 0),  # top-left corner
        (7, 5),  # bottom-right corner: mask ends on the last pixel of the frame
        (0, 5),  # bottom-left
        (7, 0),  # top-right
        (-1, -1),  # partly outside, top-left
        (-2, 3),  # partly outside, left
        (8, 6),  # partly outside, bottom-right
        (9, 2),  # only the first column inside (x0 = W-1)
        (3, 7),  # only the top row inside (y0 = H-1)
    ],
)
def test_encode_local_borders_and_partial(x0, y0):
    check_local(L_SHAPE, x0, y0, height=8, width=10)


@pytest.mark.parametrize("x0, y0", [(-3, 0), (0, -3), (10, 0), (0, 8), (50, 50), (-10, -10), (-3, 8)])
def test_encode_local_fully_outside_is_empty(x0, y0):
    rle = mask_ops.encode_local(L_SHAPE, x0, y0, 8, 10)
    assert rle == coco_encode(np.zeros((8, 10), np.uint8))
    assert mask_ops.area([rle])[0] == 0


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (4, 0), (3, 3)])
def test_encode_local_empty_local_mask(shape):
    rle = mask_ops.encode_local(np.zeros(shape, bool), 1, 1, 6, 7)
    assert rle == coco_encode(np.zeros((6, 7), np.uint8))


def test_encode_local_full_height_merges_runs_across_columns():
    local = np.ones((6, 3), bool)  # a box spanning the full image height: one run over 3 columns
    check_local(local, 2, 0, 6, 7)
    rle = mask_ops.encode_local(local, 2, 0, 6, 7)
    assert mask_ops.area([rle])[0] == 18
    # Taller than the image and hanging off both ends: still one merged run.
    check_local(np.ones((10, 3), bool), 2, -2, 6, 7)
    # Full frame.
    check_local(np.ones((6, 7), bool), 0, 0, 6, 7)


def test_encode_local_full_height_with_gaps():
    local = np.ones((5, 4), bool)
    local[4, 1] = False  # run breaks at the bottom of column 1
    local[0, 3] = False  # and at the top of column 3
    check_local(local, 0, 0, 5, 6)
    check_local(local, 2, 0, 5, 6)


@pytest.mark.parametrize("value", [0, 1])
@pytest.mark.parametrize("x0, y0", [(0, 0), (-1, 0), (0, 1), (1, 1)])
def test_encode_local_1x1_image(value, x0, y0):
    check_local(np.full((1, 1), value, bool), x0, y0, 1, 1)


def test_encode_local_accepts_uint8_values():
    local = np.array([[0, 3], [255, 0]], np.uint8)  # nonzero = foreground
    check_local(local, 1, 1, 4, 4)


def test_encode_local_random_against_pycocotools():
    rng = np.random.default_rng(1234)
    for _ in range(300):
        height, width = int(rng.integers(1, 24)), int(rng.integers(1, 24))
        h, w = int(rng.integers(0, 14)), int(rng.integers(0, 14))
        x0 = int(rng.integers(-w - 2, width + 2))
        y0 = int(rng.integers(-h - 2, height + 2))
        local = rng.random((h, w)) < rng.uniform(0.1, 0.95)
        check_local(local, x0, y0, height, width)


def test_encode_local_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"local.*\[1, 2, 3\]"):
        mask_ops.encode_local(np.zeros((1, 2, 3), bool), 0, 0, 4, 4)


# --- area / to_bbox / iou -----------------------------------------------------------------------


def gold_rles(keys: str = "ABC") -> list[dict]:
    return [{"size": [4, 4], "counts": GOLD_COUNTS[k]} for k in keys]


def test_area_golden():
    out = mask_ops.area(gold_rles())
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, [GOLD_AREA[k] for k in "ABC"])
    np.testing.assert_array_equal(out, [int(GOLD[k].sum()) for k in "ABC"])


def test_area_empty():
    out = mask_ops.area([])
    assert out.shape == (0,) and out.dtype == np.int64


def test_to_bbox_golden():
    out = mask_ops.to_bbox(gold_rles())
    assert out.shape == (3, 4) and out.dtype == np.float32
    np.testing.assert_array_equal(out, [GOLD_BBOX[k] for k in "ABC"])


def test_to_bbox_single_and_empty_mask():
    empty = coco_encode(np.zeros((4, 4), np.uint8))
    out = mask_ops.to_bbox([empty])
    assert out.shape == (1, 4)
    np.testing.assert_array_equal(out, np.zeros((1, 4)))
    assert mask_ops.to_bbox([]).shape == (0, 4)


def test_iou_golden_hand_computed():
    # A = rows 0-1 x cols 1-2 (4 px); B = rows 1-2 x cols 1-3 (6 px); A&B = row 1 x cols 1-2 (2 px)
    # IoU(A, B) = 2 / (4 + 6 - 2) = 0.25; C is disjoint from both.
    out = mask_ops.iou(gold_rles("ABC"), gold_rles("ABC"))
    want = np.array(
        [
            [1.0, 0.25, 0.0],
            [0.25, 1.0, 0.0],
            [0.0, 0.0, 1.0],
        ]
    )
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, want)


def test_iou_rectangular_shapes():
    out = mask_ops.iou(gold_rles("A"), gold_rles("BC"))
    assert out.shape == (1, 2)
    np.testing.assert_allclose(out, [[0.25, 0.0]])
    out = mask_ops.iou(gold_rles("BC"), gold_rles("A"))
    assert out.shape == (2, 1)
    np.testing.assert_allclose(out, [[0.25], [0.0]])


@pytest.mark.parametrize("n, m", [(0, 0), (0, 3), (2, 0)])
def test_iou_empty(n, m):
    out = mask_ops.iou(gold_rles("ABC"[:n]), gold_rles("ABC"[:m]))
    assert out.shape == (n, m)


# --- soft masks ---------------------------------------------------------------------------------


def test_paste_constant_one_fills_exactly_integer_box():
    rle = mask_ops.paste_soft_mask(np.ones((28, 28), np.float32), (3, 2, 11, 7), 12, 15)
    want = np.zeros((12, 15), np.uint8)
    want[2:7, 3:11] = 1
    assert rle == coco_encode(want)


def test_paste_constant_one_accepts_float16_and_list_box():
    rle = mask_ops.paste_soft_mask(np.ones((28, 28), np.float16), [0, 0, 15, 12], 12, 15)
    assert rle == coco_encode(np.ones((12, 15), np.uint8))


def test_paste_constant_zero_is_empty():
    rle = mask_ops.paste_soft_mask(np.zeros((28, 28), np.float32), (3, 2, 11, 7), 12, 15)
    assert rle == coco_encode(np.zeros((12, 15), np.uint8))


@pytest.mark.parametrize(
    "box, window",
    [
        ((-4, -3, 5, 6), (slice(0, 6), slice(0, 5))),
        ((10, 8, 30, 20), (slice(8, 12), slice(10, 15))),
        ((-5, 4, 40, 9), (slice(4, 9), slice(0, 15))),
    ],
)
def test_paste_box_partly_outside_is_clipped(box, window):
    rle = mask_ops.paste_soft_mask(np.ones((28, 28), np.float32), box, 12, 15)
    want = np.zeros((12, 15), np.uint8)
    want[window] = 1
    assert rle == coco_encode(want)


@pytest.mark.parametrize("box", [(20, 0, 30, 5), (-10, -10, -1, -1), (5, 5, 5, 9), (6, 5, 4, 9)])
def test_paste_box_outside_or_degenerate_is_empty(box):
    rle = mask_ops.paste_soft_mask(np.ones((28, 28), np.float32), box, 12, 15)
    assert rle == coco_encode(np.zeros((12, 15), np.uint8))


def test_paste_left_half_of_map():
    probs = np.zeros((28, 28), np.float32)
    probs[:, :14] = 1.0  # left half of the box frame
    rle = mask_ops.paste_soft_mask(probs, (2, 1, 10, 5), 6, 12)
    want = np.zeros((6, 12), np.uint8)
    want[1:5, 2:6] = 1
    assert rle == coco_encode(want)


def test_paste_threshold():
    probs = np.full((28, 28), 0.4, np.float32)
    box = (1, 1, 5, 5)
    assert mask_ops.area([mask_ops.paste_soft_mask(probs, box, 8, 8)])[0] == 0
    assert mask_ops.area([mask_ops.paste_soft_mask(probs, box, 8, 8, threshold=0.3)])[0] == 16


def test_paste_rejects_non_square_map():
    with pytest.raises(ValueError, match=r"probs.*\[28, 14\]"):
        mask_ops.paste_soft_mask(np.ones((28, 14), np.float32), (0, 0, 4, 4), 8, 8)


@pytest.mark.parametrize("size", [28, 14, 7])
def test_crop_to_box_frame_shape_and_range(size):
    mask = np.zeros((20, 30), np.uint8)
    mask[5:12, 8:20] = 1
    out = mask_ops.crop_to_box_frame(mask, (7.5, 4.0, 21.0, 13.2), size=size)
    assert out.shape == (size, size)
    assert out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_crop_to_box_frame_inside_object_is_one_outside_is_zero():
    mask = np.zeros((20, 30), np.uint8)
    mask[5:12, 8:20] = 1
    np.testing.assert_allclose(mask_ops.crop_to_box_frame(mask, (10, 7, 16, 10)), 1.0)
    np.testing.assert_allclose(mask_ops.crop_to_box_frame(mask, (22, 13, 29, 19)), 0.0)


def test_crop_then_paste_roundtrips_a_rectangle():
    mask = np.zeros((20, 30), np.uint8)
    mask[5:12, 8:20] = 1
    box = (8, 5, 20, 12)  # the rectangle's own box
    probs = mask_ops.crop_to_box_frame(mask, box)
    assert mask_ops.paste_soft_mask(probs, box, 20, 30) == coco_encode(mask)


def test_crop_to_box_frame_samples_a_stack_like_each_map():
    rng = np.random.default_rng(3)
    stack = rng.random((3, 9, 7)).astype(np.float32)
    box = (1.2, 0.5, 6.3, 8.0)
    got = mask_ops.crop_to_box_frame(stack, box, 12)
    assert got.shape == (3, 12, 12)
    for c in range(3):
        np.testing.assert_array_equal(got[c], mask_ops.crop_to_box_frame(stack[c], box, 12))


def test_crop_to_box_frame_rejects_a_4d_mask():
    with pytest.raises(ValueError, match=r"mask.*\[1, 2, 5, 5\]"):
        mask_ops.crop_to_box_frame(np.zeros((1, 2, 5, 5)), (0, 0, 2, 2))


@pytest.mark.parametrize("region", [(0, 0, 5, 7), (2, 3, 12, 4), (-3, -1, 4, 9)])
def test_resample_box_frame_shape(region):
    out = mask_ops.resample_box_frame(np.ones((28, 28), np.float32), (0.0, 0.0, 6.0, 6.0), region)
    rx0, ry0, rx1, ry1 = region
    assert out.shape == (ry1 - ry0, rx1 - rx0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, 1.0)  # constant map: every sample (border-padded) is 1


def test_resample_box_frame_is_identity_on_matching_grid():
    rng = np.random.default_rng(5)
    probs = rng.random((28, 28)).astype(np.float32)
    # Box of 28 x 28 pixels at (3, 4): pixel centres coincide with the map's cell centres.
    out = mask_ops.resample_box_frame(probs, (3, 4, 31, 32), (3, 4, 31, 32))
    np.testing.assert_allclose(out, probs, atol=1e-5)


def test_paste_constant_one_fractional_box_fills_only_pixel_centres_inside():
    # Pixel i has its centre at i + 0.5; only pixels 3 and 4 (centres 3.5, 4.5) lie in [2.9, 5.1].
    rle = mask_ops.paste_soft_mask(np.ones((28, 28), np.float32), (2.9, 2.9, 5.1, 5.1), 10, 10)
    want = np.zeros((10, 10), np.uint8)
    want[3:5, 3:5] = 1
    assert rle == coco_encode(want)


def test_area_of_more_than_255_masks():
    # pycocotools' area() overflows an internal uint8 array at 256+ RLEs under numpy 2; nuclei
    # images hold up to 375 instances.
    masks = np.zeros((600, 8, 8), np.uint8)
    masks[:, 2:4, 2:5] = 1
    masks[-1] = 0
    masks[300, 0, 0] = 1
    a = mask_ops.area(mask_ops.encode(masks))
    assert a.shape == (600,) and a[0] == 6 and a[300] == 7 and a[-1] == 0


def test_decode_region_matches_a_full_decode_on_random_masks_and_windows():
    rng = np.random.default_rng(0)
    for t in range(200):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        m = rng.random((1, h, w)) < rng.random()
        if t % 3 == 0:  # a block touching the bottom edge: runs wrap across columns
            m[:] = False
            m[0, rng.integers(0, h):, : rng.integers(0, w) + 1] = True
        rle = mask_ops.encode(m)[0]
        assert mask_ops.counts_of(rle).sum() == h * w
        x0, y0 = int(rng.integers(-3, w)), int(rng.integers(-3, h))
        x1, y1 = x0 + int(rng.integers(0, w + 3)), y0 + int(rng.integers(0, h + 3))
        padded = np.zeros((h + 2 * 40, w + 2 * 40), bool)  # the window may leave the image: zeros there
        padded[40 : 40 + h, 40 : 40 + w] = m[0]
        want = padded[y0 + 40 : y1 + 40, x0 + 40 : x1 + 40]
        got = mask_ops.decode_region(rle, (x0, y0, x1, y1))
        assert got.dtype == bool and np.array_equal(got, want), (t, h, w, x0, y0, x1, y1)


def test_encode_stack_equals_encode_local_per_map():
    """One diff for a whole stack gives each map's own RLE, as encode_local does map by map."""
    rng = np.random.default_rng(3)
    for _ in range(100):
        m, h, w = (int(v) for v in rng.integers(1, 6, 1).tolist() + rng.integers(1, 24, 2).tolist())
        stack = rng.random((m, h, w)) > 0.5
        x0, y0 = rng.integers(0, 50 - w + 1, m), rng.integers(0, 40 - h + 1, m)
        want = [mask_ops.encode_local(stack[k], int(x0[k]), int(y0[k]), 40, 50) for k in range(m)]
        assert mask_ops.encode_stack(stack, x0, y0, 40, 50) == want
    full = np.ones((1, 40, 50), bool)  # a run across every column boundary merges into one
    assert mask_ops.encode_stack(full, [0], [0], 40, 50) == mask_ops.encode(full.astype(np.uint8))


def test_encode_stack_with_a_size_per_map():
    """Maps of several images in one stack: each map's RLE is for its own image's size."""
    rng = np.random.default_rng(4)
    for _ in range(50):
        m, h, w = (int(v) for v in rng.integers(1, 6, 1).tolist() + rng.integers(1, 20, 2).tolist())
        stack = rng.random((m, h, w)) > 0.5
        heights, widths = rng.integers(h, 45, m), rng.integers(w, 45, m)
        x0, y0 = rng.integers(0, widths - w + 1), rng.integers(0, heights - h + 1)
        want = [mask_ops.encode_local(stack[k], int(x0[k]), int(y0[k]), int(heights[k]), int(widths[k])) for k in range(m)]
        got = mask_ops.encode_stack(stack, x0, y0, heights, widths)
        assert got == want
        assert [r["size"] for r in got] == [[int(a), int(b)] for a, b in zip(heights, widths)]


def test_tight_frames_boxes_the_kept_pixels_and_samples_their_frame():
    import torch

    maps = torch.zeros((2, 1, 20, 30))
    maps[0, 0, 3:9, 5:17] = 1.0
    maps[0, 0, 4, 6] = 0.7
    keep = maps[:, 0] >= 0.5
    tight, frames, nonempty = mask_ops.tight_frames(keep, maps, 12)
    assert nonempty.tolist() == [True, False]
    assert tight[0].tolist() == [5, 3, 17, 9]
    want = mask_ops.crop_to_box_frame(maps[0, 0].numpy(), (5, 3, 17, 9), 12)
    np.testing.assert_allclose(frames[0, 0].numpy(), want, atol=1e-6)
