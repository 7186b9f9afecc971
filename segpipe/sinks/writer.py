"""The run writer: per-shard staging and atomic publish, commit markers, the manifest last.

Layout under the output root::

    instances/shard-00000.parquet  predictions/...  images/...  errors/...   published tables
    _segpipe/shards/shard-00000.json                            commit marker (written last per shard)
    _segpipe/staging/<run_id>/shard-00000/<table>.parquet       in-flight writes
    coco/instances.json                                         COCO export
    _segpipe/run.json                                           run manifest (written last)

A table file without its marker is not part of the output: readers ignore it and a rerun with
the same run id overwrites it. Lifecycle: ``start`` -> ``write_shard``* -> ``finish`` | ``abort``.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Collection, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from segpipe.io.fs import read_parquet, resolve

TABLES = ("instances", "predictions", "images", "errors")


class OutputExistsError(RuntimeError):
    """The output already holds another run's committed data."""


class ResumeMismatchError(RuntimeError):
    """A run is resumed with other inputs or other result-shaping settings than it started with."""


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


class RunWriter:
    def __init__(self, output_uri: str, run_id: str, fs: fsspec.AbstractFileSystem | None = None,
                 storage_options: dict | None = None) -> None:
        self.fs, self.root = resolve(output_uri, fs, **(storage_options or {}))
        self.run_id = run_id

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def start(self, plan: dict | None = None) -> dict[int, dict]:
        """Prepare the output; returns this run's already committed shards (resume).

        ``plan`` (JSON-able: what fixes the rows, e.g. the input fingerprint and model versions) is
        written to ``_segpipe/plan.json`` on the first start; a resume must bring the same plan.
        Raises OutputExistsError when the output holds another run's shards, manifest or plan, and
        ResumeMismatchError when this run's recorded plan differs from ``plan``.
        """
        self.fs.makedirs(self.path("_segpipe", "shards"), exist_ok=True)
        markers = read_markers(self.fs, self.root)
        others = {m["run_id"] for m in markers.values()} - {self.run_id}
        prev_plan = None
        for name in ("run.json", "plan.json"):
            p = self.path("_segpipe", name)
            if self.fs.exists(p):
                doc = json.loads(self.fs.cat_file(p))
                others |= {doc.get("run_id")} - {self.run_id}
                prev_plan = doc if name == "plan.json" else prev_plan
        if others:
            raise OutputExistsError(
                f"output {self.root!r} already holds run {sorted(others)[0]!r}; choose another output.uri, "
                f"or pass --run-id {sorted(others)[0]} to resume that run"
            )
        if plan is not None:
            plan = json.loads(json.dumps({"run_id": self.run_id, **plan}, default=str))
            if prev_plan is None:
                self.write_json("_segpipe/plan.json", plan)
            elif prev_plan != plan:
                diff = sorted(k for k in set(plan) | set(prev_plan) if plan.get(k) != prev_plan.get(k))
                raise ResumeMismatchError(
                    f"run {self.run_id!r} started with other {', '.join(diff)} than now (see {self.path('_segpipe', 'plan.json')}); "
                    "resuming would mix results: restore them or start a new run id")
        _rm_tree(self.fs, self.path("_segpipe", "staging", self.run_id))
        return markers

    def write_shard(self, shard: int, tables: dict[str, pa.Table], summary: dict[str, Any]) -> dict:
        """Stage the given tables (names from TABLES), publish them, then write the shard's
        marker, which lists exactly the tables published. Returns the marker."""
        unknown = set(tables) - set(TABLES)
        if unknown:
            raise ValueError(f"unknown table(s) {sorted(unknown)}; expected some of {TABLES}")
        names = [t for t in TABLES if t in tables]
        name = shard_name(shard)
        stage = self.path("_segpipe", "staging", self.run_id, name)
        self.fs.makedirs(stage, exist_ok=True)
        for t in names:
            with self.fs.open(f"{stage}/{t}.parquet", "wb") as f:
                pq.write_table(tables[t], f)
        for t in names:
            self.fs.makedirs(self.path(t), exist_ok=True)
            self.fs.mv(f"{stage}/{t}.parquet", self.path(t, f"{name}.parquet"))
        marker = {"run_id": self.run_id, "shard": shard, "tables": {t: f"{t}/{name}.parquet" for t in names}, **summary}
        self.write_json(f"_segpipe/shards/{name}.json", marker)
        _rm_tree(self.fs, stage)
        return marker

    def write_json(self, relpath: str, obj: Any) -> None:
        """Write JSON atomically: a temporary sibling, then a rename."""
        final = self.path(relpath)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        parent = final.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        with self.fs.open(tmp, "wb") as f:
            f.write(json.dumps(obj, indent=1, default=str).encode())
        self.fs.mv(tmp, final)

    def finish(self, manifest: dict) -> None:
        """Write the run manifest (last) and drop the staging area."""
        self.abort()
        self.write_json("_segpipe/run.json", manifest)

    def abort(self) -> None:
        """Drop this run's staging area (and the staging folder itself once empty)."""
        _rm_tree(self.fs, self.path("_segpipe", "staging", self.run_id))
        parent = self.path("_segpipe", "staging")
        if self.fs.exists(parent) and not self.fs.ls(parent):
            self.fs.rmdir(parent)


def _rm_tree(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Remove ``path`` and everything under it if present (an object store drops an emptied
    prefix by itself, so it may be gone already)."""
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def read_markers(fs: fsspec.AbstractFileSystem, root: str) -> dict[int, dict]:
    """Committed shard markers under ``root`` -> {shard: marker}."""
    d = f"{root.rstrip('/')}/_segpipe/shards"
    if not fs.exists(d):
        return {}
    out = {}
    for p in sorted(fs.glob(f"{d}/shard-*.json")):
        m = json.loads(fs.cat_file(p))
        out[int(m["shard"])] = m
    return out


def read_committed(output_uri: str, table: str, fs: fsspec.AbstractFileSystem | None = None, *,
                   columns: Sequence[str] | None = None, shards: Collection[int] | None = None) -> pa.Table:
    """Concatenate one table over committed shards only (those whose marker lists it), cast to its declared schema.

    ``columns`` reads only those columns (in that order); ``shards`` only those shard numbers."""
    from segpipe.sinks.tables import SCHEMAS

    schema = SCHEMAS[table] if columns is None else pa.schema([SCHEMAS[table].field(c) for c in columns])
    fs, root = resolve(output_uri, fs)
    parts = []
    for shard, m in sorted(read_markers(fs, root).items()):
        if table not in m["tables"] or (shards is not None and shard not in shards):
            continue
        parts.append(read_parquet(fs, f"{root}/{m['tables'][table]}", columns).cast(schema))
    return pa.concat_tables(parts) if parts else schema.empty_table()


def read_manifest(run_uri: str, fs: fsspec.AbstractFileSystem | None = None) -> dict:
    """The run's ``_segpipe/run.json``; FileNotFoundError when the run has none (not finished)."""
    fs, root = resolve(run_uri, fs)
    path = f"{root}/_segpipe/run.json"
    if not fs.exists(path):
        raise FileNotFoundError(f"{run_uri} has no _segpipe/run.json: not a finished segpipe run")
    return json.loads(fs.cat_file(path))
