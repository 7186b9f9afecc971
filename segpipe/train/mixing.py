"""Training on a weighted mix of COCO files (labelled and pseudo-labelled).

A source of weight ``w`` and ``n`` images contributes ``n * floor(w)`` draws per epoch plus
``round(n * frac(w))`` more from a random subset, so an epoch's length is fixed (resumable by
iteration count) and an image of weight 2 is seen twice as often as one of weight 1. The order
of an epoch is a pure function of (seed, epoch).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from segpipe.data.coco import CocoInstances


def draws_per_epoch(n: int, weight: float) -> int:
    """How many items a source of ``n`` images and ``weight`` contributes to one epoch."""
    whole = math.floor(weight)
    return n * whole + int(round(n * (weight - whole)))


def epoch_order(sizes: list[int], weights: list[float], seed: int, epoch: int) -> np.ndarray:
    """One epoch of a weighted mix -> int64 [E, 3] rows (source, index in source, draw), shuffled.

    ``draw`` counts an image's earlier appearances in the epoch (0 for the first), so repeated
    draws of one image get different augmentations."""
    rng = np.random.default_rng([seed, epoch, 7919])
    rows = []
    for s, (n, w) in enumerate(zip(sizes, weights)):
        whole = math.floor(w)
        idx = [np.arange(n)] * whole
        extra = draws_per_epoch(n, w) - n * whole
        if extra:
            idx.append(np.sort(rng.choice(n, size=extra, replace=False)))
        for d, ix in enumerate(idx):
            rows.append(np.stack([np.full(len(ix), s), ix, np.full(len(ix), d)], 1))
    out = np.concatenate(rows) if rows else np.zeros((0, 3), np.int64)
    return out[rng.permutation(len(out))].astype(np.int64)


class MixedInstances(torch.utils.data.Dataset):
    """Several ``CocoInstances`` as one dataset indexed by flat keys ``(source * M + index) * D + draw``
    (M the largest source, D the largest draw count); ``keys(epoch)`` gives an epoch's order."""

    def __init__(self, parts: list[CocoInstances], weights: list[float], seed: int = 0):
        if len(parts) != len(weights) or not parts:
            raise ValueError(f"{len(parts)} sources for {len(weights)} weights")
        self.parts, self.weights, self.seed = parts, list(weights), seed
        self._m = max(len(p) for p in parts)
        self._d = max(math.ceil(w) for w in weights)

    @property
    def sizes(self) -> list[int]:
        return [len(p) for p in self.parts]

    def epoch_length(self) -> int:
        return sum(draws_per_epoch(n, w) for n, w in zip(self.sizes, self.weights))

    def set_epoch(self, epoch: int) -> None:
        for p in self.parts:
            p.set_epoch(epoch)

    def keys(self, epoch: int) -> list[int]:
        order = epoch_order(self.sizes, self.weights, self.seed, epoch)
        return [int((s * self._m + i) * self._d + d) for s, i, d in order]

    def __len__(self) -> int:
        return len(self.parts) * self._m * self._d  # the key space, not an epoch

    def __getitem__(self, key: int):
        rest, draw = divmod(int(key), self._d)
        s, i = divmod(rest, self._m)
        return self.parts[s].load(i, draw)
