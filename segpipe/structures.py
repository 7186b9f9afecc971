"""Instances: one image's predictions, the contract every model adapter returns.

Fields (N instances, equal length): ``boxes`` float32 [N, 4] xyxy pixels in the oriented image
frame; ``scores`` float32 [N] in [0, 1]; ``labels`` int64 [N] zoo category ids; ``masks`` N COCO
compressed RLEs of size (height, width); ``mask_probs`` optional float16 [N, S, S] (S = 28) soft
masks spanning each instance's box.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from segpipe.ops.shapes import check_shape

SOFT_MASK_SIZE = 28
MAGIC = b"SPI1"  # serialised Instances, format 1 (``Instances.to_bytes``)


@dataclass
class Instances:
    height: int
    width: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    masks: list[dict] = field(default_factory=list)
    mask_probs: np.ndarray | None = None

    def __post_init__(self) -> None:
        check_shape(self.boxes, ["N", 4], "boxes")
        n = self.boxes.shape[0]
        check_shape(self.scores, [n], "scores")
        check_shape(self.labels, [n], "labels")
        if self.boxes.dtype != np.float32 or self.scores.dtype != np.float32:
            raise TypeError(f"boxes/scores must be float32, got {self.boxes.dtype}/{self.scores.dtype}")
        if self.labels.dtype != np.int64:
            raise TypeError(f"labels must be int64, got {self.labels.dtype}")
        if len(self.masks) != n:
            raise ValueError(f"masks: expected {n} RLEs, got {len(self.masks)}")
        for rle in self.masks:
            if list(rle["size"]) != [self.height, self.width]:
                raise ValueError(f"mask size {rle['size']} != image size {[self.height, self.width]}")
        if self.mask_probs is not None:
            check_shape(self.mask_probs, [n, "S", "S"], "mask_probs")
            if self.mask_probs.dtype != np.float16:
                raise TypeError(f"mask_probs must be float16, got {self.mask_probs.dtype}")

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def select(self, index: Sequence[int] | np.ndarray) -> "Instances":
        """A new Instances holding the rows ``index`` (ints or a bool mask), in that order."""
        index = np.asarray(index)
        if index.size == 0 and index.dtype != bool:
            index = index.astype(np.int64)  # [] parses as float64, which numpy refuses as an index
        idx = np.atleast_1d(np.arange(len(self))[index])
        return Instances(
            height=self.height,
            width=self.width,
            boxes=self.boxes[idx],
            scores=self.scores[idx],
            labels=self.labels[idx],
            masks=[self.masks[i] for i in idx],
            mask_probs=None if self.mask_probs is None else self.mask_probs[idx],
        )

    def to_bytes(self) -> bytes:
        """Serialise without pickle, for passing between pipeline stages: ``MAGIC``, a uint32
        header length, a JSON header (height, width and each array's dtype and shape, numeric
        dtypes only) and the arrays' raw bytes in header order. RLE counts travel as one blob
        plus offsets."""
        counts = [r["counts"].encode("ascii") if isinstance(r["counts"], str) else r["counts"] for r in self.masks]
        arrays = {
            "boxes": np.ascontiguousarray(self.boxes),
            "scores": np.ascontiguousarray(self.scores),
            "labels": np.ascontiguousarray(self.labels),
            "rle_offsets": np.cumsum([0] + [len(c) for c in counts]).astype(np.int64),
            "rle_blob": np.frombuffer(b"".join(counts), dtype=np.uint8),
        }
        if self.mask_probs is not None:
            arrays["mask_probs"] = np.ascontiguousarray(self.mask_probs)
        header = json.dumps({"size": [int(self.height), int(self.width)],
                             "arrays": [[k, a.dtype.str, list(a.shape)] for k, a in arrays.items()]}).encode()
        return b"".join([MAGIC, struct.pack("<I", len(header)), header, *(a.tobytes() for a in arrays.values())])

    @classmethod
    def from_bytes(cls, data: bytes) -> "Instances":
        """Inverse of ``to_bytes``; refuses anything else (a non-numeric dtype, a short buffer)."""
        if data[:4] != MAGIC or len(data) < 8:
            raise ValueError("not serialised Instances (bad magic)")
        (n_header,) = struct.unpack_from("<I", data, 4)
        head = json.loads(data[8 : 8 + n_header])
        pos, arrays = 8 + n_header, {}
        for name, dtype, shape in head["arrays"]:
            dt = np.dtype(dtype)
            if dt.kind not in "biuf":
                raise ValueError(f"serialised Instances: array {name} has non-numeric dtype {dtype}")
            size = dt.itemsize * int(np.prod(shape, dtype=np.int64))
            if pos + size > len(data):
                raise ValueError(f"serialised Instances: array {name} runs past the end of the data")
            arrays[name] = np.frombuffer(data, dtype=dt, count=size // dt.itemsize, offset=pos).reshape(shape).copy()
            pos += size
        h, w = head["size"]
        blob, off = arrays["rle_blob"].tobytes(), arrays["rle_offsets"]
        masks = [{"size": [h, w], "counts": blob[off[i] : off[i + 1]].decode("ascii")} for i in range(len(off) - 1)]
        return cls(height=h, width=w, boxes=arrays["boxes"], scores=arrays["scores"], labels=arrays["labels"],
                   masks=masks, mask_probs=arrays.get("mask_probs"))
