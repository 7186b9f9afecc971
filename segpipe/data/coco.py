"""COCO instance datasets for training: image + target dicts in torchvision's detection format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segpipe.ops import masks as mask_ops


class CocoInstances(torch.utils.data.Dataset):
    """Items are (image float [3, H, W] in [0, 1], target) with target boxes float [N, 4] xyxy,
    labels int64 [N] (1-based index into ``category_ids``), masks uint8 [N, H, W].

    ``flips`` applies random horizontal/vertical flips and 90-degree rotations (seeded per item
    and epoch through ``set_epoch``).
    """

    def __init__(self, ann_file: str | Path, image_dir: str | Path, *, category_ids: list[int], flips: bool = False, seed: int = 0):
        data = json.loads(Path(ann_file).read_text())
        self.image_dir = Path(image_dir)
        self.images = data["images"]
        self.by_image: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        for a in data["annotations"]:
            if not a.get("iscrowd", 0):
                self.by_image.setdefault(a["image_id"], []).append(a)
        self.label_of = {cid: i + 1 for i, cid in enumerate(category_ids)}
        self.flips = flips
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        info = self.images[i]
        img = np.array(Image.open(self.image_dir / info["file_name"]).convert("RGB"))
        anns = [a for a in self.by_image.get(info["id"], []) if a["category_id"] in self.label_of]
        h, w = img.shape[:2]
        rles = [_rle(a["segmentation"], h, w) for a in anns]
        masks = mask_ops.decode(rles) if rles else np.zeros((0, h, w), np.uint8)
        labels = np.asarray([self.label_of[a["category_id"]] for a in anns], np.int64)
        if self.flips:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            if rng.uniform() < 0.5:
                img, masks = img[:, ::-1], masks[:, :, ::-1]
            if rng.uniform() < 0.5:
                img, masks = img[::-1], masks[:, ::-1]
            k = int(rng.integers(4))
            img, masks = np.rot90(img, k, (0, 1)), np.rot90(masks, k, (1, 2))
        keep = masks.reshape(len(masks), -1).any(1) if len(masks) else np.zeros(0, bool)
        masks, labels = masks[keep], labels[keep]
        boxes = _mask_boxes(masks)
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "masks": torch.from_numpy(np.ascontiguousarray(masks)),
        }
        image = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)
        return image, target


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
