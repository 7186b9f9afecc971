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
from pycocotools import mask as mask_utils

from segpipe.io.fs import resolve
from segpipe.ops import boxes as box_ops
from segpipe.ops import masks as mask_ops
from segpipe.structures import SOFT_MASK_SIZE


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

    Crowd annotations (iscrowd 1: ignore regions, e.g. pseudo-labels the teachers were unsure of)
    are not instances: an image with any in its window gets target ``ignore`` bool [H, W], their
    union (moved with the crop, flips and turns), for losses that honour it.

    ``priors`` ({file_name: {annotation id: prior}}, a prior having ``box`` xyxy [4] and box-frame
    ``maps`` [C, S, S], as ``segpipe.refine.priors`` makes them): the target also holds
    prior_boxes float32 [N, 4] (moved with the crop, flips and turns), prior_maps float16
    [N, C, S, S] (turned alike) and prior bool [N]: whether the instance has one (not when the
    crop cuts the instance, whose prior covers what the crop lost).
    """

    def __init__(self, ann_uri: str, image_dir: str, *, category_ids: list[int], flips: bool = False,
                 crop: int | None = None, min_visible_px: int = 4, seed: int = 0, priors: dict | None = None):
        data = read_json(str(ann_uri))
        self.image_dir = str(image_dir).rstrip("/")
        self.images = data["images"]
        self.by_image: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        self.crowd_by_image: dict[int, list[dict]] = {}
        for a in data["annotations"]:
            if not a.get("iscrowd", 0):
                self.by_image.setdefault(a["image_id"], []).append(a)
            else:
                self.crowd_by_image.setdefault(a["image_id"], []).append(a)
        self.label_of = {cid: i + 1 for i, cid in enumerate(category_ids)}
        self.flips = flips
        self.crop = crop
        self.min_visible_px = min_visible_px
        self.seed = seed
        self.priors = priors
        self.epoch = 0
        self._fs = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def _read_image(self, info: dict) -> np.ndarray:
        """The image of a record: its ``segpipe_uri`` (segpipe's COCO outputs) else ``image_dir``/``file_name``."""
        uri = info.get("segpipe_uri")
        if uri:
            fs, path = resolve(uri)
        else:
            if self._fs is None:
                self._fs, self._root = resolve(self.image_dir)
            fs, path = self._fs, f"{self._root}/{info['file_name']}"
        with fs.open(path, "rb") as f:
            return np.array(Image.open(io.BytesIO(f.read())).convert("RGB"))

    def __getitem__(self, i: int):
        return self.load(i)

    def load(self, i: int, draw: int = 0):
        """Item ``i``; ``draw`` > 0 gives another random crop/flip of it in the same epoch (an image
        drawn several times per epoch by a weighted mix)."""
        info = self.images[i]
        rng = np.random.default_rng([self.seed, self.epoch, i] + ([draw] if draw else []))
        img = self._read_image(info)
        h, w = img.shape[:2]
        anns = [a for a in self.by_image.get(info["id"], []) if a["category_id"] in self.label_of]
        crowd = [a for a in self.crowd_by_image.get(info["id"], []) if a["category_id"] in self.label_of]
        y0, x0, ch, cw = 0, 0, h, w
        if self.crop:
            ch = cw = self.crop
            y0 = int(rng.integers(0, max(h - ch, 0) + 1))
            x0 = int(rng.integers(0, max(w - cw, 0) + 1))
            anns = [a for a in anns if _box_meets(a.get("bbox"), x0, y0, cw, ch)]
            crowd = [a for a in crowd if _box_meets(a.get("bbox"), x0, y0, cw, ch)]
        ignore = np.zeros((ch, cw), bool) if crowd else None
        for a in crowd:
            m = mask_ops.decode([ann_rle(a["segmentation"], h, w)])[0, y0 : y0 + ch, x0 : x0 + cw]
            ignore[: m.shape[0], : m.shape[1]] |= m.astype(bool)
        masks = np.zeros((len(anns), ch, cw), np.uint8)
        whole = np.ones(len(anns), bool)
        for k, a in enumerate(anns):  # decode one at a time and crop at once: memory O(H*W), not O(N*H*W)
            rle = ann_rle(a["segmentation"], h, w)
            m = mask_ops.decode([rle])[0, y0 : y0 + ch, x0 : x0 + cw]
            masks[k, : m.shape[0], : m.shape[1]] = m
            if self.priors is not None:
                whole[k] = int(m.sum()) >= int(mask_utils.area(rle))
        pri = self._priors(info["file_name"], anns, whole, x0, y0) if self.priors is not None else None
        if self.crop:
            canvas = np.zeros((ch, cw, 3), np.uint8)
            part = img[y0 : y0 + ch, x0 : x0 + cw]
            canvas[: part.shape[0], : part.shape[1]] = part
            img = canvas
        labels = np.asarray([self.label_of[a["category_id"]] for a in anns], np.int64)
        if self.flips:
            if rng.uniform() < 0.5:
                img, masks = img[:, ::-1], masks[:, :, ::-1]
                ignore = ignore[:, ::-1] if ignore is not None else None
                if pri is not None:
                    pri = (box_ops.hflip_boxes(pri[0], img.shape[1]), pri[1][..., ::-1], pri[2])
            if rng.uniform() < 0.5:
                img, masks = img[::-1], masks[:, ::-1]
                ignore = ignore[::-1] if ignore is not None else None
                if pri is not None:
                    pri = (box_ops.vflip_boxes(pri[0], img.shape[0]), pri[1][..., ::-1, :], pri[2])
            k = int(rng.integers(4))
            if pri is not None:
                pri = (box_ops.rot90_boxes(pri[0], k, *img.shape[:2]), np.rot90(pri[1], k, (-2, -1)), pri[2])
            img, masks = np.rot90(img, k, (0, 1)), np.rot90(masks, k, (1, 2))
            ignore = np.rot90(ignore, k) if ignore is not None else None
        keep = masks.reshape(len(masks), -1).sum(1) >= self.min_visible_px if len(masks) else np.zeros(0, bool)
        masks, labels = masks[keep], labels[keep]
        boxes = _mask_boxes(masks)
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "masks": torch.from_numpy(np.ascontiguousarray(masks)),
        }
        if ignore is not None:
            target["ignore"] = torch.from_numpy(np.ascontiguousarray(ignore))
        if pri is not None:
            target |= {"prior_boxes": torch.from_numpy(np.ascontiguousarray(pri[0][keep], dtype=np.float32)),
                       "prior_maps": torch.from_numpy(np.ascontiguousarray(pri[1][keep])),
                       "prior": torch.from_numpy(pri[2][keep])}
        image = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)
        return image, target


    def _priors(self, file_name: str, anns: list[dict], whole: np.ndarray, x0: int, y0: int):
        """The priors of ``anns`` (in order) in the crop window at (x0, y0) -> (boxes float32
        [N, 4], maps float16 [N, C, S, S], has bool [N]); only ``whole`` (uncut) instances have one."""
        mine = self.priors.get(file_name, {})
        some = next(iter(mine.values()), None)
        c, s = (some.maps.shape[0], some.maps.shape[-1]) if some is not None else (2, SOFT_MASK_SIZE)
        boxes = np.zeros((len(anns), 4), np.float32)
        maps = np.zeros((len(anns), c, s, s), np.float16)
        has = np.zeros(len(anns), bool)
        for k, a in enumerate(anns):
            p = mine.get(a.get("id"))
            if p is not None and whole[k]:
                boxes[k] = np.asarray(p.box, np.float32) - np.array([x0, y0, x0, y0], np.float32)
                maps[k], has[k] = p.maps, True
        return boxes, maps, has


def _box_meets(bbox, x0: int, y0: int, w: int, h: int) -> bool:
    """Whether a COCO xywh box overlaps the window; a missing box counts as overlapping."""
    if not bbox:
        return True
    bx, by, bw, bh = bbox
    return bx < x0 + w and bx + bw > x0 and by < y0 + h and by + bh > y0


def ann_rle(seg, h: int, w: int) -> dict:
    """A COCO annotation's segmentation (polygons, uncompressed or compressed RLE) of an ``h`` x
    ``w`` image -> compressed RLE (counts as bytes)."""
    if isinstance(seg, list):  # polygons
        return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    if isinstance(seg["counts"], list):  # uncompressed RLE
        return mask_utils.frPyObjects(seg, h, w)
    return {"size": list(seg["size"]), "counts": seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"]}


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
