"""Named-dimension shape checks for public boundaries."""

from __future__ import annotations

from typing import Sequence


def check_shape(array, dims: Sequence[str | int], name: str = "array") -> None:
    """Raise ValueError unless ``array.shape`` matches ``dims``.

    ``dims`` holds letters (any size, equal letters must agree) and ints (that exact size),
    e.g. ``["N", 4]`` or ``["N", "H", "W"]``.
    """
    shape = tuple(array.shape)
    if len(shape) != len(dims):
        raise ValueError(f"{name}: expected shape {list(dims)}, got {list(shape)}")
    bound: dict[str, int] = {}
    for size, dim in zip(shape, dims):
        if isinstance(dim, int):
            if size != dim:
                raise ValueError(f"{name}: expected shape {list(dims)}, got {list(shape)}")
        elif bound.setdefault(dim, size) != size:
            raise ValueError(f"{name}: dimension {dim} disagrees in shape {list(shape)} (expected {list(dims)})")
