"""Incremental labeling around a run: plan from the dataset ledger, reuse cached predictions,
commit the run's ledger entries after its manifest.

A run of an incremental workflow writes to ``<output.uri>/runs/<run_id>`` like any run; its
inputs are only those the ledger says are new, changed, or missing a current model version.
Rows of a partially labeled input carry ``cached:<model>`` True and that model's cached
``pred:<model>`` bytes, which the model stage passes through.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone

from segpipe.config import WorkflowConfig
from segpipe.io.fs import resolve
from segpipe.io.listing import SourceFile
from segpipe.provenance import ledger


@dataclass
class IncrementalRun:
    root: str  # the dataset root (the workflow's output.uri)
    cfg: WorkflowConfig  # the run's config: output.uri = <root>/runs/<run_id>
    plan: ledger.Plan
    files: list[SourceFile]  # the inputs to label, re-sharded in listing order
    cached: dict[tuple[str, str], bytes]  # (uri, model) -> Instances.to_bytes() from an earlier run
    run_models: dict[str, list[str]]  # uri -> the models that run on it now

    def digest(self) -> str:
        """sha256 over what this run labels with which models (part of its resume plan)."""
        return hashlib.sha256(json.dumps(sorted(self.run_models.items())).encode()).hexdigest()


def ledger_uri(root: str) -> str:
    return f"{root.rstrip('/')}/_ledger"


def prepare(cfg: WorkflowConfig, run_id: str, files: list[SourceFile], models: list[tuple[str, str]]) -> IncrementalRun:
    """Plan this run from the ledger under ``cfg.output.uri`` and load the cached predictions the
    partially labeled inputs need. ``models``: (card name, version) in workflow order."""
    assert cfg.incremental is not None
    root = cfg.output.uri.rstrip("/")
    opts = cfg.output.storage.options(root)
    fs, lroot = resolve(ledger_uri(root), **opts)
    p = ledger.plan(files, models, ledger.read_rows(fs, lroot), retry_errors=cfg.incremental.retry_errors)
    size = cfg.source.shard_size
    todo = [dataclasses.replace(t.file, index=i, shard=i // size) for i, t in enumerate(p.todo)]
    run_cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"uri": f"{root}/runs/{run_id}"})})
    return IncrementalRun(root=root, cfg=run_cfg, plan=p, files=todo, cached=_load_cached(root, p, opts),
                          run_models={t.file.uri: t.run for t in p.todo})


def _load_cached(root: str, p: ledger.Plan, opts: dict) -> dict[tuple[str, str], bytes]:
    """The earlier runs' predictions that ``p`` reuses, as Instances bytes keyed by (uri, model)."""
    from segpipe.sinks.tables import rows_to_instances
    from segpipe.sinks.writer import read_committed

    wanted: dict[str, set[tuple[str, str]]] = defaultdict(set)  # run_id -> {(uri, model)}
    for t in p.todo:
        for model, run in t.cached.items():
            wanted[run].add((t.file.uri, model))
    out = {}
    for run, keys in wanted.items():
        run_uri = f"{root}/runs/{run}"
        fs, _ = resolve(run_uri, **opts)
        uris = {u for u, _ in keys}
        sizes = {r["uri"]: (r["height"], r["width"]) for r in read_committed(run_uri, "images", fs).to_pylist()
                 if r["uri"] in uris and r["status"] == "ok"}
        rows: dict[tuple[str, str], list] = defaultdict(list)
        for r in read_committed(run_uri, "predictions", fs).to_pylist():
            if (r["image_uri"], r["source"]) in keys:
                rows[(r["image_uri"], r["source"])].append(r)
        for uri, model in keys:
            if uri not in sizes:
                raise RuntimeError(f"ledger: run {run} labeled {uri} with {model}, but its committed images/ lacks it")
            out[(uri, model)] = rows_to_instances(rows.get((uri, model), []), *sizes[uri]).to_bytes()
    return out


def input_rows(inc: IncrementalRun, rows: list[dict], models: list[str]) -> list[dict]:
    """Add ``cached:<model>`` and ``pred:<model>`` to the listing rows (cached bytes or b'')."""
    for r in rows:
        runs = set(inc.run_models[r["uri"]])
        for m in models:
            hit = m not in runs
            r[f"cached:{m}"] = hit
            r[f"pred:{m}"] = inc.cached[(r["uri"], m)] if hit else b""
    return rows


def commit(inc: IncrementalRun, run_id: str, models: list[tuple[str, str]], manifest: dict, started: datetime) -> dict:
    """Record what this run labeled (from its committed images/) in the ledger, then the run's
    record. Returns the record."""
    from segpipe.sinks.writer import RunWriter, read_committed

    out_uri = inc.cfg.output.uri
    opts = inc.cfg.output.storage.options(out_uri)
    fs, _ = resolve(out_uri, **opts)
    version = dict(models)
    tags = {f.uri: (f.size, f.tag) for f in inc.files}
    rows, failed = [], 0
    for im in read_committed(out_uri, "images", fs).to_pylist():
        size, tag = tags[im["uri"]]
        failed += im["status"] != "ok"
        for m in inc.run_models[im["uri"]]:
            rows.append({"uri": im["uri"], "size": size, "tag": tag, "model": m, "model_version": version[m],
                         "run_id": run_id, "status": "ok" if im["status"] == "ok" else "error"})
    record = {
        "run_id": run_id, "status": manifest["status"], "started": started.isoformat(),
        "ended": datetime.now(timezone.utc).isoformat(), "output": out_uri,
        "models": [{"name": m, "version": v} for m, v in models],
        "counts": {**inc.plan.counts, "labeled": len({r["uri"] for r in rows}), "failed": failed,
                   "model_runs": len(rows)},
    }
    writer = RunWriter(ledger_uri(inc.root), run_id, storage_options=opts)
    ledger.commit(writer, rows, record)
    return record
