"""segpipe.ops.boxes and segpipe.ops.shapes: smoke, exception and cardinality tests (Kornia style)."""

from __future__ import annotations

import numpy as np
import pytest

from segpipe.ops import boxes as box_ops
from segpipe.ops.shapes import check_shape

XYXY = np.array([[0, 0, 10, 20], [5.5, 2.0, 7.5, 3.0], [3, 4, 3, 4]], np.float32)
XYWH = np.array([[0, 0, 10, 20], [5.5, 2.0, 2.0, 1.0], [3, 4, 0, 0]], np.float32)


# --- check_shape --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, dims",
    [((3, 4), ["N", 4]), ((0, 4), ["N", 4]), ((2, 5, 5), ["N", "S", "S"]), ((7,), [7]), ((), [])],
)
def test_check_shape_accepts(shape, dims):
    check_shape(np.zeros(shape), dims)  # no exception


@pytest.mark.parametrize(
    "shape, dims",
    [
        ((3, 5), ["N", 4]),  # wrong fixed size
        ((4,), ["N", 4]),  # wrong rank
        ((1, 3, 4), ["N", 4]),  # wrong rank
        ((2, 5, 6), ["N", "S", "S"]),  # equal letters disagree
        ((6,), [7]),
    ],
)
def test_check_shape_raises_with_actual_shape(shape, dims):
    with pytest.raises(ValueError) as err:
        check_shape(np.zeros(shape), dims, "thing")
    msg = str(err.value)
    assert msg.startswith("thing")
    assert str(list(shape)) in msg
    assert str(list(dims)) in msg


def test_check_shape_works_on_torch_tensors():
    torch = pytest.importorskip("torch")
    check_shape(torch.zeros(2, 4), ["N", 4])
    with pytest.raises(ValueError, match=r"\[2, 3\]"):
        check_shape(torch.zeros(2, 3), ["N", 4])


# --- conversions --------------------------------------------------------------------------------


def test_xyxy_to_xywh():
    out = box_ops.xyxy_to_xywh(XYXY)
    assert out.dtype == np.float32 and out.shape == (3, 4)
    np.testing.assert_allclose(out, XYWH)


def test_xywh_to_xyxy():
    out = box_ops.xywh_to_xyxy(XYWH)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, XYXY)


def test_conversion_roundtrip_random():
    rng = np.random.default_rng(0)
    xy = rng.uniform(-50, 500, (64, 2))
    wh = rng.uniform(0, 200, (64, 2))
    xywh = np.concatenate([xy, wh], 1).astype(np.float32)
    np.testing.assert_allclose(box_ops.xyxy_to_xywh(box_ops.xywh_to_xyxy(xywh)), xywh, rtol=1e-5, atol=1e-3)
    xyxy = box_ops.xywh_to_xyxy(xywh)
    np.testing.assert_allclose(box_ops.xywh_to_xyxy(box_ops.xyxy_to_xywh(xyxy)), xyxy, rtol=1e-5, atol=1e-3)


def test_conversions_do_not_modify_input():
    a = XYXY.copy()
    box_ops.xyxy_to_xywh(a)
    box_ops.xywh_to_xyxy(a)
    box_ops.clip_xyxy(a, 5, 5)
    np.testing.assert_array_equal(a, XYXY)


def test_conversions_accept_float64_and_return_float32():
    out = box_ops.xyxy_to_xywh(XYXY.astype(np.float64))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, XYWH)


@pytest.mark.parametrize(
    "fn",
    [box_ops.xyxy_to_xywh, box_ops.xywh_to_xyxy, box_ops.box_area, lambda b: box_ops.clip_xyxy(b, 10, 10)],
)
def test_empty_boxes(fn):
    out = fn(np.zeros((0, 4), np.float32))
    assert out.shape[0] == 0


@pytest.mark.parametrize(
    "fn",
    [box_ops.xyxy_to_xywh, box_ops.xywh_to_xyxy, box_ops.box_area, lambda b: box_ops.clip_xyxy(b, 10, 10)],
)
@pytest.mark.parametrize("shape", [(4,), (3, 5), (2, 4, 1)])
def test_bad_shape_raises(fn, shape):
    with pytest.raises(ValueError, match="boxes.*" + str(list(shape)).replace("[", r"\[").replace("]", r"\]")):
        fn(np.zeros(shape, np.float32))


# --- clip / area --------------------------------------------------------------------------------


def test_clip_xyxy():
    boxes = np.array([[-5, -3, 20, 8], [2, 3, 4, 5], [12, 11, 30, 40]], np.float32)
    out = box_ops.clip_xyxy(boxes, height=10, width=15)
    np.testing.assert_array_equal(out, [[0, 0, 15, 8], [2, 3, 4, 5], [12, 10, 15, 10]])
    assert out.dtype == np.float32


def test_box_area():
    boxes = np.array([[0, 0, 10, 20], [1, 1, 2.5, 3], [3, 3, 3, 9], [5, 5, 2, 9]], np.float32)
    np.testing.assert_allclose(box_ops.box_area(boxes), [200, 3, 0, 0])  # degenerate and inverted -> 0
    assert box_ops.box_area(boxes).dtype == np.float32


# --- box_iou ------------------------------------------------------------------------------------


def test_box_iou_hand_computed():
    a = np.array([[0, 0, 10, 10], [0, 0, 2, 2]], np.float32)
    b = np.array([[5, 5, 15, 15], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 5]], np.float32)
    # a0 vs b0: inter 5*5 = 25, union 100 + 100 - 25 = 175
    # a0 vs b3: b3 inside a0: 50 / 100; a1 vs b1: a1 inside b1: 4 / 100; a1 vs b3: 4 / 50
    want = np.array(
        [
            [25 / 175, 1.0, 0.0, 0.5],
            [0.0, 0.04, 0.0, 0.08],
        ]
    )
    out = box_ops.box_iou(a, b)
    assert out.shape == (2, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out, want, rtol=1e-6)


def test_box_iou_touching_edges_is_zero():
    a = np.array([[0, 0, 5, 5]], np.float32)
    b = np.array([[5, 0, 10, 5], [0, 5, 5, 10]], np.float32)
    np.testing.assert_array_equal(box_ops.box_iou(a, b), [[0.0, 0.0]])


def test_box_iou_degenerate_boxes_give_zero_not_nan():
    a = np.array([[3, 3, 3, 3]], np.float32)
    out = box_ops.box_iou(a, a)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, [[0.0]])


def test_box_iou_symmetric_and_bounded():
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 50, (20, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 30, (20, 2))], 1).astype(np.float32)
    out = box_ops.box_iou(boxes, boxes)
    np.testing.assert_allclose(out, out.T, rtol=1e-6)
    np.testing.assert_allclose(np.diag(out), 1.0, rtol=1e-6)
    assert (out >= 0).all() and (out <= 1 + 1e-6).all()


def test_box_iou_matches_pycocotools_bbox_iou():
    mask_utils = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(4)
    xy = rng.uniform(0, 50, (7, 2))
    a = np.concatenate([xy, xy + rng.uniform(1, 30, (7, 2))], 1).astype(np.float32)
    xy = rng.uniform(0, 50, (5, 2))
    b = np.concatenate([xy, xy + rng.uniform(1, 30, (5, 2))], 1).astype(np.float32)
    want = mask_utils.iou(
        box_ops.xyxy_to_xywh(a).astype(np.float64), box_ops.xyxy_to_xywh(b).astype(np.float64), [0] * len(b)
    )
    np.testing.assert_allclose(box_ops.box_iou(a, b), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n, m", [(0, 0), (0, 3), (2, 0)])
def test_box_iou_cardinality_empty(n, m):
    out = box_ops.box_iou(np.zeros((n, 4), np.float32), np.zeros((m, 4), np.float32))
    assert out.shape == (n, m)


def test_box_iou_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match=r"^a:.*\[2, 3\]"):
        box_ops.box_iou(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"^b:.*\[4\]"):
        box_ops.box_iou(np.zeros((2, 4)), np.zeros((4,)))


def test_box_flips_and_turns_follow_numpy_on_the_image():
    """A box moved by hflip/vflip/rot90 is the tight box of the same pixels moved by numpy."""
    from segpipe.ops.boxes import hflip_boxes, rot90_boxes, vflip_boxes

    h, w = 7, 11
    img = np.zeros((h, w), bool)
    img[1:4, 2:9] = True
    box = np.array([[2, 1, 9, 4]], np.float32)

    def tight(m):
        ys, xs = np.nonzero(m)
        return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]

    assert hflip_boxes(box, w)[0].tolist() == tight(img[:, ::-1])
    assert vflip_boxes(box, h)[0].tolist() == tight(img[::-1])
    for k in range(5):
        assert rot90_boxes(box, k, h, w)[0].tolist() == tight(np.rot90(img, k)), k
