"""Pure box math. Boxes are float32 pixels; ``xyxy`` = [x0, y0, x1, y1], ``xywh`` = COCO [x, y, w, h]."""

from __future__ import annotations

import numpy as np

from segpipe.ops.shapes import check_shape


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """[N, 4] xyxy -> [N, 4] COCO xywh (float32)."""
    check_shape(boxes, ["N", 4], "boxes")
    out = boxes.astype(np.float32, copy=True)
    out[:, 2:] = boxes[:, 2:] - boxes[:, :2]
    return out


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """[N, 4] COCO xywh -> [N, 4] xyxy (float32)."""
    check_shape(boxes, ["N", 4], "boxes")
    out = boxes.astype(np.float32, copy=True)
    out[:, 2:] = boxes[:, :2] + boxes[:, 2:]
    return out


def clip_xyxy(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Clip [N, 4] xyxy boxes to an image of ``height`` x ``width`` pixels."""
    check_shape(boxes, ["N", 4], "boxes")
    out = boxes.astype(np.float32, copy=True)
    out[:, 0::2] = out[:, 0::2].clip(0, width)
    out[:, 1::2] = out[:, 1::2].clip(0, height)
    return out


def box_area(boxes: np.ndarray) -> np.ndarray:
    """[N, 4] xyxy -> [N] areas (0 for degenerate boxes)."""
    check_shape(boxes, ["N", 4], "boxes")
    wh = (boxes[:, 2:] - boxes[:, :2]).clip(min=0)
    return (wh[:, 0] * wh[:, 1]).astype(np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of [N, 4] and [M, 4] xyxy boxes -> [N, M] float32."""
    check_shape(a, ["N", 4], "a")
    check_shape(b, ["M", 4], "b")
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clip(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0).astype(np.float32)


def hflip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """xyxy boxes [N, 4] (pixels) of an image ``width`` wide, mirrored left-right (``img[:, ::-1]``)."""
    check_shape(boxes, ["N", 4], "boxes")
    return np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)


def vflip_boxes(boxes: np.ndarray, height: int) -> np.ndarray:
    """xyxy boxes [N, 4] (pixels) of an image ``height`` tall, mirrored top-bottom (``img[::-1]``)."""
    check_shape(boxes, ["N", 4], "boxes")
    return np.stack([boxes[:, 0], height - boxes[:, 3], boxes[:, 2], height - boxes[:, 1]], 1)


def rot90_boxes(boxes: np.ndarray, k: int, height: int, width: int) -> np.ndarray:
    """xyxy boxes [N, 4] (pixels) of a ``height`` x ``width`` image turned as ``np.rot90(img, k)``
    (k quarter turns counter-clockwise; the point (x, y) goes to (y, W - x) per turn)."""
    check_shape(boxes, ["N", 4], "boxes")
    out = np.asarray(boxes, dtype=np.float32)
    for _ in range(k % 4):
        out = np.stack([out[:, 1], width - out[:, 2], out[:, 3], width - out[:, 0]], 1)
        height, width = width, height
    return out
