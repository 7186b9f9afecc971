"""segpipe.structures.Instances: validation, select, and the pickle-free byte round trip."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from segpipe.ops import masks as mask_ops
from segpipe.structures import SOFT_MASK_SIZE, Instances

H, W = 12, 16


def make(n: int = 3, probs: bool = False, seed: int = 0) -> Instances:
    rng = np.random.default_rng(seed)
    dense = np.zeros((n, H, W), np.uint8)
    boxes = np.zeros((n, 4), np.float32)
    for i in range(n):
        x0, y0 = int(rng.integers(0, W - 4)), int(rng.integers(0, H - 4))
        dense[i, y0 : y0 + 3 + i % 2, x0 : x0 + 4] = 1
        boxes[i] = [x0, y0, x0 + 4, y0 + 3 + i % 2]
    return Instances(
        height=H,
        width=W,
        boxes=boxes,
        scores=rng.uniform(0, 1, n).astype(np.float32),
        labels=rng.integers(1, 5, n).astype(np.int64),
        masks=mask_ops.encode(dense),
        mask_probs=rng.uniform(0, 1, (n, SOFT_MASK_SIZE, SOFT_MASK_SIZE)).astype(np.float16) if probs else None,
    )


def assert_same(a: Instances, b: Instances) -> None:
    assert (a.height, a.width) == (b.height, b.width)
    assert len(a) == len(b)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.boxes.dtype == b.boxes.dtype and a.scores.dtype == b.scores.dtype and a.labels.dtype == b.labels.dtype
    assert [m["size"] for m in a.masks] == [m["size"] for m in b.masks]
    assert [_counts_str(m) for m in a.masks] == [_counts_str(m) for m in b.masks]
    if a.mask_probs is None:
        assert b.mask_probs is None
    else:
        assert b.mask_probs is not None and b.mask_probs.dtype == np.float16
        np.testing.assert_array_equal(a.mask_probs, b.mask_probs)


def _counts_str(rle: dict) -> str:
    c = rle["counts"]
    return c.decode("ascii") if isinstance(c, bytes) else c


# --- construction and validation ----------------------------------------------------------------


def test_default_is_empty():
    inst = Instances(height=H, width=W)
    assert len(inst) == 0
    assert inst.boxes.shape == (0, 4) and inst.scores.shape == (0,) and inst.labels.shape == (0,)
    assert inst.masks == [] and inst.mask_probs is None


def test_valid_instances():
    inst = make(3, probs=True)
    assert len(inst) == 3


@pytest.mark.parametrize(
    "field, value, exc",
    [
        ("boxes", np.zeros((3, 4), np.float64), TypeError),
        ("scores", np.zeros((3,), np.float64), TypeError),
        ("labels", np.zeros((3,), np.int32), TypeError),
        ("labels", np.zeros((3,), np.float32), TypeError),
        ("mask_probs", np.zeros((3, 28, 28), np.float32), TypeError),
    ],
)
def test_wrong_dtype(field, value, exc):
    kwargs = make(3).__dict__ | {field: value}
    with pytest.raises(exc, match=str(value.dtype)):
        Instances(**kwargs)


@pytest.mark.parametrize(
    "field, value, shape_in_msg",
    [
        ("boxes", np.zeros((3, 5), np.float32), "[3, 5]"),
        ("boxes", np.zeros((4,), np.float32), "[4]"),
        ("scores", np.zeros((2,), np.float32), "[2]"),
        ("labels", np.zeros((4,), np.int64), "[4]"),
        ("scores", np.zeros((3, 1), np.float32), "[3, 1]"),
        ("mask_probs", np.zeros((2, 28, 28), np.float16), "[2, 28, 28]"),
        ("mask_probs", np.zeros((3, 28, 14), np.float16), "[3, 28, 14]"),
    ],
)
def test_mismatched_lengths_and_shapes(field, value, shape_in_msg):
    kwargs = make(3).__dict__ | {field: value}
    with pytest.raises(ValueError) as err:
        Instances(**kwargs)
    assert shape_in_msg in str(err.value)


def test_mask_count_mismatch():
    kwargs = make(3).__dict__
    kwargs["masks"] = kwargs["masks"][:2]
    with pytest.raises(ValueError, match="expected 3 RLEs, got 2"):
        Instances(**kwargs)


def test_mask_size_mismatch():
    kwargs = make(3).__dict__
    kwargs["masks"] = kwargs["masks"][:2] + mask_ops.encode(np.zeros((1, H, W + 1), np.uint8))
    with pytest.raises(ValueError, match=r"mask size \[12, 17\]"):
        Instances(**kwargs)


def test_mask_size_transposed_is_rejected():
    kwargs = make(1).__dict__
    kwargs["masks"] = mask_ops.encode(np.zeros((1, W, H), np.uint8))
    with pytest.raises(ValueError, match="mask size"):
        Instances(**kwargs)


# --- select -------------------------------------------------------------------------------------


def test_select_int_indices_in_order():
    inst = make(4, probs=True)
    sub = inst.select([2, 0])
    assert len(sub) == 2
    np.testing.assert_array_equal(sub.boxes, inst.boxes[[2, 0]])
    np.testing.assert_array_equal(sub.scores, inst.scores[[2, 0]])
    np.testing.assert_array_equal(sub.labels, inst.labels[[2, 0]])
    assert sub.masks == [inst.masks[2], inst.masks[0]]
    np.testing.assert_array_equal(sub.mask_probs, inst.mask_probs[[2, 0]])
    assert (sub.height, sub.width) == (H, W)


def test_select_numpy_int_array_and_repeats():
    inst = make(3)
    sub = inst.select(np.array([1, 1, 2]))
    assert len(sub) == 3
    assert sub.masks == [inst.masks[1], inst.masks[1], inst.masks[2]]


def test_select_single_int():
    inst = make(3, probs=True)
    sub = inst.select(1)
    assert len(sub) == 1
    np.testing.assert_array_equal(sub.boxes, inst.boxes[1:2])
    assert sub.masks == [inst.masks[1]]
    assert sub.mask_probs.shape == (1, 28, 28)


def test_select_bool_mask():
    inst = make(4)
    keep = np.array([True, False, False, True])
    sub = inst.select(keep)
    assert len(sub) == 2
    np.testing.assert_array_equal(sub.scores, inst.scores[keep])
    assert sub.masks == [inst.masks[0], inst.masks[3]]
    assert sub.mask_probs is None


def test_select_bool_mask_from_score_threshold():
    inst = make(5, seed=3)
    sub = inst.select(inst.scores > 0.5)
    assert (sub.scores > 0.5).all()
    assert len(sub) == int((inst.scores > 0.5).sum())


@pytest.mark.parametrize("index", [[], np.zeros((0,), np.int64), np.zeros(3, bool)])
def test_select_nothing_from_non_empty(index):
    inst = make(3, probs=True)
    sub = inst.select(index)
    assert len(sub) == 0
    assert sub.boxes.shape == (0, 4) and sub.boxes.dtype == np.float32
    assert sub.labels.dtype == np.int64
    assert sub.mask_probs.shape == (0, 28, 28)


@pytest.mark.parametrize("index", [[], np.zeros((0,), bool)])
def test_select_from_empty(index):
    sub = Instances(height=H, width=W).select(index)
    assert len(sub) == 0


def test_select_out_of_range_raises():
    with pytest.raises(IndexError):
        make(3).select([3])
    with pytest.raises(IndexError):
        Instances(height=H, width=W).select([0])


def test_select_returns_copies_not_views_of_lists():
    inst = make(3)
    sub = inst.select([0, 1])
    sub.masks.append(inst.masks[2])
    assert len(inst.masks) == 3


# --- bytes round trip ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 5])
@pytest.mark.parametrize("probs", [False, True])
def test_bytes_roundtrip(n, probs):
    inst = make(n, probs=probs)
    data = inst.to_bytes()
    assert isinstance(data, bytes)
    back = Instances.from_bytes(data)
    assert_same(inst, back)
    # Masks still decode to the same pixels.
    if n:
        np.testing.assert_array_equal(mask_ops.decode(back.masks), mask_ops.decode(inst.masks))


def test_bytes_roundtrip_with_bytes_counts():
    inst = make(2)
    inst.masks = [{"size": m["size"], "counts": m["counts"].encode("ascii")} for m in inst.masks]
    back = Instances.from_bytes(inst.to_bytes())
    assert [m["counts"] for m in back.masks] == [m["counts"].decode("ascii") for m in inst.masks]


def test_bytes_roundtrip_of_empty_default():
    inst = Instances(height=7, width=3)
    back = Instances.from_bytes(inst.to_bytes())
    assert len(back) == 0 and (back.height, back.width) == (7, 3)


def test_to_bytes_is_pickle_free_raw_arrays():
    import json
    import struct

    from segpipe.structures import MAGIC

    data = make(3, probs=True).to_bytes()
    assert data[:4] == MAGIC
    (n,) = struct.unpack_from("<I", data, 4)
    head = json.loads(data[8 : 8 + n])
    assert {a[0] for a in head["arrays"]} == {"boxes", "scores", "labels", "rle_blob", "rle_offsets", "mask_probs"}
    assert all(np.dtype(a[1]).kind in "biuf" for a in head["arrays"])  # numbers only: nothing to unpickle
    sizes = sum(np.dtype(d).itemsize * int(np.prod(s)) for _, d, s in head["arrays"])
    assert len(data) == 8 + n + sizes


def test_from_bytes_refuses_foreign_or_broken_payloads():
    import json
    import struct

    from segpipe.structures import MAGIC

    def payload(arrays, body=b""):
        head = json.dumps({"size": [H, W], "arrays": arrays}).encode()
        return MAGIC + struct.pack("<I", len(head)) + head + body

    # An array that would need pickle (object dtype): refused, never unpickled.
    with pytest.raises(ValueError, match="non-numeric"):
        Instances.from_bytes(payload([["boxes", "|O", [1, 4]]], b"\0" * 32))
    with pytest.raises(ValueError, match="past the end"):
        Instances.from_bytes(payload([["boxes", "<f4", [2, 4]]], b"\0" * 16))
    buf = io.BytesIO()
    np.savez(buf, size=np.asarray([H, W], np.int64))
    with pytest.raises(ValueError, match="bad magic"):
        Instances.from_bytes(buf.getvalue())


def test_from_bytes_validates():
    inst = make(2)
    inst.scores = inst.scores.astype(np.float64)  # wrong dtype must not be silently converted
    data = Instances.to_bytes(inst)
    with pytest.raises(TypeError, match="float64"):
        Instances.from_bytes(data)
