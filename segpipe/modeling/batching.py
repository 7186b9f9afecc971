"""Batching of variable-size images for the fully convolutional methods."""

from __future__ import annotations

from typing import Sequence

import torch

from segpipe.ops.shapes import check_shape


def pad_batch(images: Sequence[torch.Tensor], multiple: int) -> torch.Tensor:
    """Float [3, H, W] images in [0, 1] -> normalised (x - 0.5) / 0.25 [B, 3, Hp, Wp], Hp and Wp
    the largest H and W rounded up to ``multiple``; images sit top-left and padding reads 0
    (mid-grey after normalisation, as in torchvision's detection transform)."""
    for im in images:
        check_shape(im, [3, "H", "W"], "image")
    hs = max(int(i.shape[1]) for i in images)
    ws = max(int(i.shape[2]) for i in images)
    hp, wp = -(-hs // multiple) * multiple, -(-ws // multiple) * multiple
    x = images[0].new_zeros((len(images), 3, hp, wp))
    for k, im in enumerate(images):
        x[k, :, : im.shape[1], : im.shape[2]] = (im - 0.5) / 0.25
    return x
