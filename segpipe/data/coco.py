"""COCO instance datasets for training: image + target dicts in torchvision's detection format.

The annotation file and the image folder are URIs (local path, file://, s3://, ...) read through
fsspec; a filesystem is opened per dataset (and re-opened lazily in DataLoader workers).
"""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image

from segpipe.io.fs import resolve
from segpipe.ops import masks as mask_ops


def read_json(uri: str) -> dict:
    """A JSON document from any fsspec URI."""
    fs, path = resolve(str(uri))
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


class CocoInstances(torch.utils.data.Dataset):
    """Items are (image float [3, H, W] in [0, 1], target) with target boxes float [N, 4] xyxy,
    labels int64 [N] (1-based index into ``category_ids``), masks uint8 [N, H, W].

    ``crop``: a random ``crop`` x ``crop`` window (zero-padded when the image is smaller);
    instances cut by the window keep their visible part (at least ``min_visible_px`` pixels).
    ``flips``: random horizontal/vertical flips and 90-degree rotations. Randomness is a pure
    function of (seed, epoch, index); call ``set_epoch`` each epoch.
    """

    def __init__(self, ann_uri: str, image_dir: str, *, category_ids: list[int], flips: bool = False,
                 crop: int | None = None, min_visible_px: int = 4, seed: int = 0):
        data = read_json(str(ann_uri))
        self.image_dir = str(image_dir).rstrip("/")
        self.images = data["images"]
        self.by_image: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        for a in data["annotations"]:
            if not a.get("iscrowd", 0):
                self.by_image.setdefault(a["image_id"], []).append(a)
        self.label_of = {cid: i + 1 for i, cid in enumerate(category_ids)}
        self.flips = flips
        self.crop = crop
        self.min_visible_px = min_visible_px
        self.seed = seed
        self.epoch = 0
        self._fs = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def _read_image(self, file_name: str) -> np.ndarray:
        if self._fs is None:
            self._fs, self._root = resolve(self.image_dir)
        with self._fs.open(f"{self._root}/{file_name}", "rb") as f:
            return np.array(Image.open(io.BytesIO(f.read())).convert("RGB"))

    def __getitem__(self, i: int):
        info = self.images[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        img = self._read_image(info["file_name"])
        h, w = img.shape[:2]
        anns = [a for a in self.by_image.get(info["id"], []) if a["category_id"] in self.label_of]
        y0, x0, ch, cw = 0, 0, h, w
        if self.crop:
            ch = cw = self.crop
            y0 = int(rng.integers(0, max(h - ch, 0) + 1))
            x0 = int(rng.integers(0, max(w - cw, 0) + 1))
            anns = [a for a in anns if _box_meets(a.get("bbox"), x0, y0, cw, ch)]
        masks = np.zeros((len(anns), ch, cw), np.uint8)
        for k, a in enumerate(anns):  # decode one at a time and crop at once: memory O(H*W), not O(N*H*W)
            m = mask_ops.decode([_rle(a["segmentation"], h, w)])[0, y0 : y0 + ch, x0 : x0 + cw]
            masks[k, : m.shape[0], : m.shape[1]] = m
        if self.crop:
            canvas = np.zeros((ch, cw, 3), np.uint8)
            part = img[y0 : y0 + ch, x0 : x0 + cw]
            canvas[: part.shape[0], : part.shape[1]] = part
            img = canvas
        labels = np.asarray([self.label_of[a["category_id"]] for a in anns], np.int64)
        if self.flips:
            if rng.uniform() < 0.5:
                img, masks = img[:, ::-1], masks[:, :, ::-1]
            if rng.uniform() < 0.5:
                img, masks = img[::-1], masks[:, ::-1]
            k = int(rng.integers(4))
            img, masks = np.rot90(img, k, (0, 1)), np.rot90(masks, k, (1, 2))
        keep = masks.reshape(len(masks), -1).sum(1) >= self.min_visible_px if len(masks) else np.zeros(0, bool)
        masks, labels = masks[keep], labels[keep]
        boxes = _mask_boxes(masks)
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "masks": torch.from_numpy(np.ascontiguousarray(masks)),
        }
        image = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)
        return image, target


def _box_meets(bbox, x0: int, y0: int, w: int, h: int) -> bool:
    """Whether a COCO xywh box overlaps the window; a missing box counts as overlapping."""
    if not bbox:
        return True
    bx, by, bw, bh = bbox
    return bx < x0 + w and bx + bw > x0 and by < y0 + h and by + bh > y0


def _rle(seg, h: int, w: int) -> dict:
    from pycocotools import mask as mu

    if isinstance(seg, list):  # polygons
        return mu.merge(mu.frPyObjects(seg, h, w))
    if isinstance(seg["counts"], list):  # uncompressed RLE
        return mu.frPyObjects(seg, h, w)
    return seg


def _mask_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy boxes of [N, H, W] masks (x1/y1 exclusive) -> float32 [N, 4]."""
    out = np.zeros((len(masks), 4), np.float32)
    for i, m in enumerate(masks):
        ys = np.nonzero(m.any(1))[0]
        xs = np.nonzero(m.any(0))[0]
        out[i] = [xs[0], ys[0], xs[-1] + 1, ys[-1] + 1]
    return out


def collate(batch):
    return tuple(zip(*batch))
