"""Instances: one image's predictions, the contract every model adapter returns.

Fields (N instances, equal length): ``boxes`` float32 [N, 4] xyxy pixels in the oriented image
frame; ``scores`` float32 [N] in [0, 1]; ``labels`` int64 [N] zoo category ids; ``masks`` N COCO
compressed RLEs of size (height, width); ``mask_probs`` optional float16 [N, S, S] (S = 28) soft
masks spanning each instance's box.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from segpipe.ops.shapes import check_shape

SOFT_MASK_SIZE = 28


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
        """Serialise without pickle (an npz of plain arrays), for passing between pipeline stages."""
        counts = [r["counts"].encode("ascii") if isinstance(r["counts"], str) else r["counts"] for r in self.masks]
        offsets = np.cumsum([0] + [len(c) for c in counts]).astype(np.int64)
        arrays = {
            "size": np.asarray([self.height, self.width], np.int64),
            "boxes": self.boxes,
            "scores": self.scores,
            "labels": self.labels,
            "rle_blob": np.frombuffer(b"".join(counts), dtype=np.uint8),
            "rle_offsets": offsets,
        }
        if self.mask_probs is not None:
            arrays["mask_probs"] = self.mask_probs
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Instances":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            h, w = (int(v) for v in z["size"])
            blob = z["rle_blob"].tobytes()
            off = z["rle_offsets"]
            masks = [{"size": [h, w], "counts": blob[off[i] : off[i + 1]].decode("ascii")} for i in range(len(off) - 1)]
            return cls(
                height=h,
                width=w,
                boxes=z["boxes"],
                scores=z["scores"],
                labels=z["labels"],
                masks=masks,
                mask_probs=z["mask_probs"] if "mask_probs" in z.files else None,
            )
