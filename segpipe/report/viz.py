"""Overlay PNGs of one image of a run, on their own (``segpipe viz``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segpipe.report import overlay as ov
from segpipe.report.rundata import UnknownImageError, check_source, find_image, open_run, read_pixels, source_rows


@dataclass(frozen=True)
class Overlay:
    """One source's overlay of one image: RGB uint8 [h, w, 3] and what it shows."""

    image_id: int
    relpath: str
    source: str
    label: str
    n_instances: int
    pixels: np.ndarray

    def png(self) -> bytes:
        return ov.encode(self.pixels, "png")


def image_overlays(run_uri: str, image: str, source: str | None = None, *, max_side: int | None = None,
                   min_score: float = 0.0, labels: bool = True) -> list[Overlay]:
    """The overlays of image ``image`` (image_id or relpath) of the run at ``run_uri``.

    ``source``: the run's result (``ensemble`` or ``instances``; the default), a model name, or
    ``all`` (the result, then every model). Raises FileNotFoundError (no finished run),
    UnknownImageError (no such image, or it errored) and UnknownSourceError."""
    run = open_run(run_uri)
    im = find_image(run, image)
    wanted = run.sources() if source == "all" else [check_source(run, source or run.result_source)]
    if im["status"] != "ok":
        raise UnknownImageError(f"image {image!r} ({im['relpath']}) errored in this run: it has no instances "
                                "(see errors/ or the report)")
    pixels = read_pixels(run, im)
    by_source = source_rows(run, wanted, [im])
    out = []
    for s in wanted:
        rows = by_source[s][int(im["image_id"])]
        pic = ov.overlay(pixels, rows, max_side=max_side, min_score=min_score, labels=labels)
        out.append(Overlay(image_id=int(im["image_id"]), relpath=im["relpath"], source=s, label=run.source_label(s),
                           n_instances=sum(r["score"] >= min_score for r in rows), pixels=pic))
    return out
