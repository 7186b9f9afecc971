"""Re-fuse a finished run from its persisted raw predictions, without running any model.

Reads the run's committed ``predictions/`` (every model's instances with their box-frame soft
masks) and ``images/`` shard by shard (``runs.shard_predictions``), fuses the images (a few
per ``fuse.fuse_images`` call) under a new
``EnsembleConfig``, and writes a new output (``instances/`` from the ensemble, the same raw
``predictions/``, ``images/`` with updated counts, ``coco/instances.json``, ``_segpipe/run.json``)
that ``segpipe eval`` and ``segpipe ensemble`` read like any run. Memory: one shard of predictions at a time.
"""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import datetime, timezone

from segpipe.config import EnsembleConfig, OutputConfig, Strict
from segpipe.ensemble.runs import shard_predictions
from segpipe.ensemble.scorer import rescore
from segpipe.sinks.coco import write_coco
from segpipe.sinks.tables import ensemble_rows, to_table
from segpipe.sinks.writer import RunWriter, read_manifest


class RefuseError(ValueError):
    """A re-fusion that cannot run as asked (a scorer of other models)."""


class RefuseConfig(Strict):
    """What ``segpipe ensemble`` may change: the fusion and the output filters."""

    ensemble: EnsembleConfig
    output: OutputConfig


def refuse_run(run_uri: str, out_uri: str, cfg: EnsembleConfig, output: OutputConfig, *, run_id: str,
               progress=print) -> dict:
    """Fuse ``run_uri``'s raw predictions into ``out_uri``; returns the new manifest."""
    t0 = time.perf_counter()
    manifest = read_manifest(run_uri)
    models = [(m["name"], m["version"]) for m in manifest["models"]]
    cats = manifest["models"][0]["card"]["categories"]
    names = {int(c["id"]): c["name"] for c in cats}
    scorer = None
    if cfg.scorer is not None:
        from segpipe.ensemble.scorer import load_scorer

        try:
            scorer = load_scorer(cfg.scorer)
        except (ValueError, FileNotFoundError) as e:
            raise RefuseError(f"ensemble.scorer: {e}") from None
        if sorted(scorer.models) != sorted(n for n, _ in models):
            raise RefuseError(f"ensemble.scorer: {cfg.scorer} was trained for the models {sorted(scorer.models)}, the run "
                             f"has {sorted(n for n, _ in models)}")
    writer = RunWriter(out_uri, run_id, storage_options=output.storage.options(out_uri))
    writer.start()
    totals = defaultdict(int)
    fuse_ms = 0.0
    for sp in shard_predictions(run_uri):
        images = [dict(im, run_id=run_id) for im in sp.images]
        ok = [im for im in images if im["status"] == "ok"]
        out_rows = []
        t = time.perf_counter()
        for im, f in sp.fused(ok, models, cfg):
            if scorer is not None:
                f = rescore(f, scorer, cfg.rank)
            rows = ensemble_rows(f, run_id=run_id, image_id=im["image_id"], image_uri=im["uri"],
                                 category_names=names, min_score=output.min_score,
                                 min_confidence=output.min_confidence, min_votes=output.min_votes)
            out_rows.extend(rows)
            im["n_instances"] = len(rows)
        fuse_ms += (time.perf_counter() - t) * 1000
        counts = {"images": len(images), "ok": len(ok), "errors": len(images) - len(ok), "instances": len(out_rows)}
        writer.write_shard(sp.shard, {"instances": to_table("instances", out_rows), "predictions": sp.predictions,
                                      "images": to_table("images", images)}, {"counts": counts})
        for k, v in counts.items():
            totals[k] += v
        progress(f"shard {sp.shard}: {counts['ok']} images, {counts['instances']} fused instances")
    coco = write_coco(writer, cats) if output.coco else None
    new = {
        "run_id": run_id,
        "status": "complete",
        "kind": "ensemble re-fusion",
        "source_run": {"uri": run_uri, "run_id": manifest["run_id"]},
        "ended": datetime.now(timezone.utc).isoformat(),
        "wall_s": round(time.perf_counter() - t0, 3),
        "ensemble": cfg.model_dump(mode="json"),
        "scorer": {"name": cfg.scorer, "version": scorer.version} if scorer is not None else None,
        "output_filters": {"min_score": output.min_score, "min_confidence": output.min_confidence, "min_votes": output.min_votes},
        "models": manifest["models"],
        "counts": dict(totals),
        "timings_ms": {"ensemble": round(fuse_ms, 1)},
        "outputs": {"tables": ["instances", "predictions", "images"], "instances_source": "ensemble",
                    "coco": "coco/instances.json" if coco else None},
    }
    writer.finish(new)
    return new
