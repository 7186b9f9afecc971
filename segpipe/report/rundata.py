"""Reading a finished run for the report and the overlays: manifest, images, rows, pixels.

A run is read through its committed tables only (``sinks.writer.read_committed``); an image's
rows are read from its own shard. A source names what an overlay shows: the run's result
(instances/: ``ensemble`` when fused, else ``instances``; refined when the run had a refiner) or
a model name (that model's raw predictions/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from segpipe.sinks.writer import read_committed, read_manifest

MASK_COLUMNS = ("image_id", "category_id", "category_name", "score", "mask_rle", "mask_height", "mask_width",
                "source", "n_votes", "agreement")
DEFAULT_MAX_PIXELS = 64_000_000


class UnknownImageError(LookupError):
    """No image of the run has that id or relpath."""


class UnknownSourceError(LookupError):
    """The run has no such source (``ensemble`` or one of its models)."""


@dataclass(frozen=True)
class Run:
    """A finished run: its URI, manifest and images/ rows (ok and errored)."""

    uri: str
    manifest: dict
    images: list[dict]

    @property
    def model_names(self) -> list[str]:
        return [m["name"] for m in self.manifest.get("models", [])]

    @property
    def instances_source(self) -> str:
        """What fills instances/: ``ensemble`` or the primary model's name."""
        outputs = self.manifest.get("outputs") or {}
        return outputs.get("instances_source") or (self.model_names[0] if self.model_names else "instances")

    @property
    def refined_by(self) -> str | None:
        return (self.manifest.get("outputs") or {}).get("refined_by")

    @property
    def is_ensemble(self) -> bool:
        return self.instances_source == "ensemble"

    @property
    def max_pixels(self) -> int:
        cfg = (self.manifest.get("workflow") or {}).get("config") or {}
        return int((cfg.get("decode") or {}).get("max_pixels", DEFAULT_MAX_PIXELS))

    def ok_images(self) -> list[dict]:
        return [im for im in self.images if im["status"] == "ok"]

    @property
    def result_source(self) -> str:
        """The source name of instances/: ``ensemble`` when fused, else ``instances``."""
        return "ensemble" if self.is_ensemble else "instances"

    def sources(self) -> list[str]:
        """Overlay sources: the run's result (instances/) first, then each model (predictions/)."""
        return [self.result_source] + self.model_names

    def source_label(self, source: str) -> str:
        """A caption for ``source``: the result says what it is and whether it was refined."""
        if source == self.result_source:
            what = "ensemble" if self.is_ensemble else f"instances/ ({self.instances_source})"
            refiner = (self.manifest.get("refiner") or {}).get("name") or self.refined_by
            return what + (f", refined by {refiner}" if refiner else "")
        return source


def open_run(run_uri: str) -> Run:
    """The run at ``run_uri``; FileNotFoundError when it has no manifest (not a finished run)."""
    manifest = read_manifest(run_uri)
    return Run(uri=run_uri, manifest=manifest, images=read_committed(run_uri, "images").to_pylist())


def find_image(run: Run, ref: str) -> dict:
    """The images/ row whose image_id (as text) or relpath is ``ref``; UnknownImageError otherwise."""
    for im in run.images:
        if str(im["image_id"]) == ref or im["relpath"] == ref:
            return im
    raise UnknownImageError(f"no image {ref!r} in run {run.manifest.get('run_id')} ({len(run.images)} images; "
                            "give an image_id from images/ or a relpath)")


def check_source(run: Run, source: str) -> str:
    """``source`` if the run has it; UnknownSourceError (naming the ones it has) otherwise."""
    if source not in run.sources():
        raise UnknownSourceError(f"no source {source!r} in run {run.manifest.get('run_id')}: expected one of "
                                 f"{', '.join(run.sources() + ['all'])}")
    return source


def source_rows(run: Run, sources: Sequence[str], images: Sequence[Mapping],
                columns: Sequence[str] = MASK_COLUMNS) -> dict[str, dict[int, list[dict]]]:
    """The rows of each of ``sources`` for ``images`` (images/ rows) -> {source: {image_id: rows}}.
    The result source reads instances/, the models predictions/ (once for all of them); only
    those images' shards are read."""
    for s in sources:
        check_source(run, s)
    ids = {int(im["image_id"]) for im in images}
    shards = {int(im["shard"]) for im in images}
    out: dict[str, dict[int, list[dict]]] = {s: {i: [] for i in ids} for s in sources}
    models = [s for s in sources if s != run.result_source]
    for table, wanted in (("instances", run.result_source in sources), ("predictions", bool(models))):
        if not wanted:
            continue
        for r in read_committed(run.uri, table, columns=columns, shards=shards).to_pylist():
            key = run.result_source if table == "instances" else r["source"]
            if int(r["image_id"]) in ids and key in out:
                out[key][int(r["image_id"])].append(r)
    return out


def read_pixels(run: Run, image: Mapping) -> np.ndarray:
    """An images/ row's picture, read through fsspec and decoded as the pipeline does -> RGB
    uint8 [H, W, 3] (EXIF-oriented)."""
    from segpipe.io.decode import decode_image
    from segpipe.io.fs import resolve

    fs, path = resolve(image["uri"])
    return decode_image(fs.cat_file(path), max_pixels=run.max_pixels)
