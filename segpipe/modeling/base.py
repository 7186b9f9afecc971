"""The model-adapter contract every method implements.

``preprocess(images) -> batch``: decoded RGB uint8 [H, W, 3] arrays to the model's input.
``forward(batch) -> raw``: the network, under ``torch.inference_mode``.
``postprocess(raw, batch) -> list[Instances]``: back to the original image frame, RLE masks.
Each step is separately testable; ``predict`` chains them.
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

    def __init__(self, *, network: torch.nn.Module, categories: list[dict], device: str = "cpu") -> None:
        self.network = network
        self.categories = categories
        self.category_ids = np.asarray([c["id"] for c in categories], np.int64)  # label k (1-based) -> ids[k-1]
        self.device = torch.device(device)

    @abstractmethod
    def preprocess(self, images: Sequence[np.ndarray]) -> Any: ...

    @abstractmethod
    def forward(self, batch: Any) -> Any: ...

    @abstractmethod
    def postprocess(self, raw: Any, batch: Any) -> list[Instances]: ...

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

    def predict(self, images: Sequence[np.ndarray], timings: dict[str, float] | None = None) -> list[Instances]:
        """``preprocess`` -> ``forward`` -> ``postprocess``. With ``timings``, adds each step's
        wall ms to ``timings['preprocess' | 'forward' | 'postprocess']`` (on a GPU, ``forward``
        waits for the device, so it is the network's own time) and the CPU ms this process spent
        in the forward, all its threads together, to ``timings['forward_cpu']``."""
        t0 = time.perf_counter()
        batch = self.preprocess(images)
        t1, c1 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            raw = self.forward(batch)
        if timings is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # only when timed: a sync stalls the stream
        t2, c2 = time.perf_counter(), time.process_time()
        out = self.postprocess(raw, batch)
        t3 = time.perf_counter()
        if timings is None:
            return out
        for k, v in (("preprocess", t1 - t0), ("forward", t2 - t1), ("postprocess", t3 - t2), ("forward_cpu", c2 - c1)):
            timings[k] = timings.get(k, 0.0) + v * 1000
        return out
