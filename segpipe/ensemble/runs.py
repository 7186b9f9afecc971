"""A finished run's persisted raw predictions read back, shard by shard, as each image's model
outputs: what re-fusion (``refuse``) and replay (``replay``) both walk. Memory: one shard at a time.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Collection, Iterator, Sequence

import pyarrow as pa

from segpipe.config import EnsembleConfig
from segpipe.ensemble.fuse import Fused, ModelOutput, fuse_images
from segpipe.io.fs import read_parquet, resolve
from segpipe.sinks.tables import SCHEMAS, rows_to_instances
from segpipe.sinks.writer import read_markers

FUSE_BATCH = 8  # images per ``fuse_images`` call when a run is re-fused: shared cost, bounded memory


@dataclass
class ShardPredictions:
    """One committed shard: its image rows (every status), its raw ``predictions`` table as
    committed (cast to the declared schema), and each image's rows grouped by source."""

    shard: int
    images: list[dict]
    predictions: pa.Table
    _by_image: dict[int, dict[str, list[dict]]] = field(repr=False)

    def outputs(self, image: dict, models: Sequence[tuple[str, str]]) -> list[ModelOutput]:
        """``image`` (one of ``images``) as each of ``models`` ([(card name, version)], in the
        run's order) predicted it; a model that found nothing gives empty Instances."""
        rows = self._by_image.get(image["image_id"], {})
        return [ModelOutput(name=n, version=v, instances=rows_to_instances(rows.get(n, []), image["height"], image["width"]))
                for n, v in models]

    def fused(self, images: Sequence[dict], models: Sequence[tuple[str, str]], cfg: EnsembleConfig) -> Iterator[tuple[dict, Fused]]:
        """Each of ``images`` (ok rows of this shard) re-fused under ``cfg``: (image, Fused), in
        order, ``FUSE_BATCH`` images per ``fuse_images`` call."""
        for s in range(0, len(images), FUSE_BATCH):
            chunk = images[s:s + FUSE_BATCH]
            yield from zip(chunk, fuse_images([self.outputs(im, models) for im in chunk], cfg))


def shard_predictions(run_uri: str, shards: Collection[int] | None = None) -> Iterator[ShardPredictions]:
    """Every committed shard of ``run_uri`` (or only ``shards``), in shard order."""
    fs, root = resolve(run_uri)
    for shard, marker in sorted(read_markers(fs, root).items()):
        if shards is not None and shard not in shards:
            continue
        tables = {}
        for t in ("images", "predictions"):
            tables[t] = read_parquet(fs, f"{root}/{marker['tables'][t]}").cast(SCHEMAS[t])
        by_image: dict[int, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
        for r in tables["predictions"].to_pylist():
            by_image[r["image_id"]][r["source"]].append(r)
        yield ShardPredictions(shard=shard, images=tables["images"].to_pylist(), predictions=tables["predictions"],
                               _by_image=by_image)
