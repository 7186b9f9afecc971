"""Audit a run output against its source: every input exactly once, nothing lost, nothing extra.

Reads only committed shards (the markers) and re-lists the source the manifest names (its
patterns and storage settings), so it answers from what is on disk now, not from the manifest's
own counts.
"""

from __future__ import annotations

from collections import Counter

from segpipe.config import WorkflowConfig
from segpipe.io.fs import resolve
from segpipe.io.listing import list_source
from segpipe.sinks.writer import TABLES, read_committed, read_manifest, read_markers


def audit_run(run_uri: str, fs=None) -> dict:
    """Counts of a run output (keys below). ``lost``, ``duplicates`` and ``extra`` are 0 for a
    sound run; ``uncommitted_files`` counts table files no marker lists (ignored by readers).

    inputs: files the source lists now; images / errors / instances: committed rows;
    lost: inputs with no images row; duplicates: images rows beyond one per input (and errors
    rows beyond one per errored image); extra: images rows for uris the source does not list.
    """
    manifest = read_manifest(run_uri, fs)
    cfg = WorkflowConfig.model_validate(manifest["workflow"]["config"])
    src = cfg.source
    files = list_source(src.uri, patterns=src.patterns, recursive=src.recursive, max_images=src.max_images,
                        shard_size=src.shard_size, storage_options=src.storage.options(src.uri))
    fs, root = resolve(run_uri, fs, **cfg.output.storage.options(run_uri))
    images = read_committed(run_uri, "images", fs).to_pylist()
    errors = read_committed(run_uri, "errors", fs).to_pylist()
    n_instances = read_committed(run_uri, "instances", fs).num_rows
    inputs = {f.uri for f in files}
    seen = Counter(r["uri"] for r in images)
    err_seen = Counter(r["uri"] for r in errors)
    errored = {r["uri"] for r in images if r["status"] != "ok"}
    listed = {p for t in TABLES for p in _table_files(fs, root, t)}
    committed = {f"{root}/{rel}" for m in read_markers(fs, root).values() for rel in m["tables"].values()}
    return {
        "run_id": manifest["run_id"],
        "status": manifest["status"],
        "inputs": len(inputs),
        "images": len(images),
        "ok": sum(r["status"] == "ok" for r in images),
        "errors": len(errors),
        "instances": n_instances,
        "lost": len(inputs - set(seen)),
        "duplicates": sum(n - 1 for n in seen.values()) + sum(n - 1 for n in err_seen.values()),
        "extra": len(set(seen) - inputs),
        "errors_without_image_row": len(set(err_seen) - errored),
        "uncommitted_files": len(listed - committed),
    }


def sound(audit: dict) -> bool:
    """True when nothing is lost, duplicated or extra, and errors/ matches the errored images."""
    return not (audit["lost"] or audit["duplicates"] or audit["extra"] or audit["errors_without_image_row"]
                or audit["errors"] != audit["images"] - audit["ok"])


def _table_files(fs, root: str, table: str) -> list[str]:
    d = f"{root}/{table}"
    return list(fs.glob(f"{d}/shard-*.parquet")) if fs.exists(d) else []
