"""The model-adapter contract every method implements.

``preprocess(images) -> batch``: decoded RGB uint8 [H, W, 3] arrays to the model's input.
``forward(batch) -> raw``: the network, under ``torch.inference_mode``.
``postprocess(raw, batch) -> list[Instances]``: back to the original image frame, RLE masks.
Each step is separately testable; ``predict`` chains them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np
import torch

from segpipe.structures import Instances


class ModelAdapter(ABC):
    """Wraps one network; holds no global state, so it is safe inside a Ray actor."""

    def __init__(self, *, network: torch.nn.Module, categories: list[dict], device: str = "cpu") -> None:
        self.network = network
        self.categories = categories
        self.device = torch.device(device)

    def to(self, device: str) -> "ModelAdapter":
        self.device = torch.device(device)
        self.network.to(self.device)
        return self

    def eval(self) -> "ModelAdapter":
        self.network.eval()
        return self

    @abstractmethod
    def preprocess(self, images: Sequence[np.ndarray]) -> Any: ...

    @abstractmethod
    def forward(self, batch: Any) -> Any: ...

    @abstractmethod
    def postprocess(self, raw: Any, batch: Any) -> list[Instances]: ...

    def predict(self, images: Sequence[np.ndarray]) -> list[Instances]:
        batch = self.preprocess(images)
        with torch.inference_mode():
            raw = self.forward(batch)
        return self.postprocess(raw, batch)
