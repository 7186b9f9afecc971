"""The model-adapter contract every method implements.

``preprocess(images) -> batch``: decoded RGB uint8 [H, W, 3] arrays to the model's input.
``forward(batch) -> raw``: the network, under ``torch.inference_mode``.
``postprocess(raw, batch) -> list[Instances]``: back to the original image frame, RLE masks.
Each step is separately testable; ``predict`` chains them.

Every method caps the instances it returns per image (``instance_bound``, set from the card by
``segpipe.modeling.zoo.load_adapter``); ``reached_bound(raw)`` says which images of a forward
reached the cap, so that objects past it may be missing (tile crowded images).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np
import torch

from segpipe.ops.shapes import check_shape
from segpipe.structures import Instances


class NetworkHolder:
    """Holds ``self.network`` on ``self.device``; ``to`` and ``eval`` return self."""

    network: torch.nn.Module
    device: torch.device

    def to(self, device: str):
        self.device = torch.device(device)
        self.network.to(self.device)
        return self

    def eval(self):
        self.network.eval()
        return self


class ModelAdapter(NetworkHolder, ABC):
    """Wraps one network; holds no global state, so it is safe inside a Ray actor."""

    def __init__(self, *, network: torch.nn.Module, categories: list[dict], device: str = "cpu",
                 instance_bound: int | None = None) -> None:
        self.network = network
        self.categories = categories
        self.category_ids = np.asarray([c["id"] for c in categories], np.int64)  # label k (1-based) -> ids[k-1]
        self.device = torch.device(device)
        self.instance_bound = instance_bound  # the most instances per image (None: not known)

    @abstractmethod
    def preprocess(self, images: Sequence[np.ndarray]) -> Any: ...

    @abstractmethod
    def forward(self, batch: Any) -> Any: ...

    @abstractmethod
    def postprocess(self, raw: Any, batch: Any) -> list[Instances]: ...

    def raw_counts(self, raw: Any) -> list[int] | None:
        """How many instances ``forward`` produced per image, before any score filtering in
        ``postprocess``; None when the adapter cannot tell."""
        return None

    def reached_bound(self, raw: Any) -> list[bool]:
        """Per image of ``raw``: whether its instance count reached ``instance_bound`` (objects
        past the cap are then missing). False throughout without a bound or counts."""
        counts = self.raw_counts(raw)
        if self.instance_bound is None or counts is None:
            return [False] * len(raw)
        return [c >= self.instance_bound for c in counts]

    @staticmethod
    def to_tensors(images: Sequence[np.ndarray]) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """RGB uint8 [H, W, 3] arrays -> (float [3, H, W] tensors in [0, 1], their (H, W))."""
        tensors, sizes = [], []
        for img in images:
            check_shape(img, ["H", "W", 3], "image")
            if img.dtype != np.uint8:
                raise TypeError(f"image must be uint8 RGB, got {img.dtype}")
            arr = np.ascontiguousarray(img) if img.flags.writeable else img.copy()  # torch needs writable memory
            tensors.append(torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0))
            sizes.append((int(img.shape[0]), int(img.shape[1])))
        return tensors, sizes

    def predict(self, images: Sequence[np.ndarray], timings: dict[str, float] | None = None,
                at_bound: list[bool] | None = None) -> list[Instances]:
        """``preprocess`` -> ``forward`` -> ``postprocess``. With ``timings``, adds each step's
        wall ms to ``timings['preprocess' | 'forward' | 'postprocess']`` (on a GPU, ``forward``
        waits for the device, so it is the network's own time) and the CPU ms this process spent
        in the forward, all its threads together, to ``timings['forward_cpu']``. With
        ``at_bound``, appends ``reached_bound`` of each image."""
        t0 = time.perf_counter()
        batch = self.preprocess(images)
        t1, c1 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            raw = self.forward(batch)
        if timings is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # only when timed: a sync stalls the stream
        t2, c2 = time.perf_counter(), time.process_time()
        if at_bound is not None:
            at_bound.extend(self.reached_bound(raw))
        out = self.postprocess(raw, batch)
        t3 = time.perf_counter()
        if timings is None:
            return out
        for k, v in (("preprocess", t1 - t0), ("forward", t2 - t1), ("postprocess", t3 - t2), ("forward_cpu", c2 - c1)):
            timings[k] = timings.get(k, 0.0) + v * 1000
        return out
