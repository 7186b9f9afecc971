"""The dataset ledger of incremental labeling: which input (uri, size, tag) each model version
has labeled, in which run. One answer to "what has been labeled by which model versions".

Layout under ``<dataset root>/_ledger``::

    labeled/<run_id>.parquet   one row per (input, model version) a run labeled (LEDGER schema)
    runs/<run_id>.json         the run's record, written last: its entries count only once it exists

Planning (``plan``) is a pure function of the listing, the current model versions and the
ledger rows.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from segpipe.io.fs import read_parquet
from segpipe.io.listing import SourceFile

LEDGER = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("tag", pa.string(), nullable=False),  # etag or mtime at listing time
        pa.field("model", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # 'ok' or 'error'
    ]
)


@dataclass
class Todo:
    """One input to label: the models to run on it and, for the others, the run whose cached
    predictions to reuse ({model: run_id})."""

    file: SourceFile
    run: list[str]
    cached: dict[str, str] = field(default_factory=dict)
    kind: str = "new"  # new | changed | partial | retry


@dataclass
class Plan:
    todo: list[Todo]
    skipped: int  # unchanged inputs every current model version has labeled (or that failed, without retry)
    counts: dict[str, int]  # listed, new, changed, partial, retry, skipped


def plan(files: list[SourceFile], models: list[tuple[str, str]], rows: list[dict], *, retry_errors: bool = False) -> Plan:
    """What to label now. ``models``: (name, version) in workflow order; ``rows``: committed
    ledger rows. An input is skipped when, for its current (uri, size, tag), every model version
    has an 'ok' row, or an 'error' row (unless ``retry_errors``). Otherwise it runs the models
    without an 'ok' row; the others' predictions come from the run named in their row."""
    by_key: dict[tuple, dict[tuple[str, str], dict]] = defaultdict(dict)
    seen_uris = set()
    for r in rows:
        seen_uris.add(r["uri"])
        prev = by_key[(r["uri"], int(r["size"]), str(r["tag"]))].get((r["model"], r["model_version"]))
        if prev is None or prev["status"] != "ok":  # an ok row wins over an error row (a later retry)
            by_key[(r["uri"], int(r["size"]), str(r["tag"]))][(r["model"], r["model_version"])] = r
    todo, counts = [], defaultdict(int)
    counts["listed"] = len(files)
    for f in files:
        done = by_key.get((f.uri, int(f.size), str(f.tag)), {})
        ok = {m: done[(m, v)]["run_id"] for m, v in models if done.get((m, v), {}).get("status") == "ok"}
        failed = [m for m, v in models if done.get((m, v), {}).get("status") == "error"]
        if (failed and not retry_errors) or len(ok) == len(models):
            counts["skipped"] += 1
            continue
        kind = ("retry" if failed else "partial" if ok else "changed" if f.uri in seen_uris else "new")
        counts[kind] += 1
        todo.append(Todo(file=f, run=[m for m, _ in models if m not in ok], cached=ok, kind=kind))
    return Plan(todo=todo, skipped=counts["skipped"], counts={k: counts.get(k, 0) for k in
                                                              ("listed", "new", "changed", "partial", "retry", "skipped")})


def read_rows(fs: fsspec.AbstractFileSystem, root: str) -> list[dict]:
    """Ledger rows of the runs that have a record (committed), as dicts."""
    rec_dir, lab_dir = f"{root}/runs", f"{root}/labeled"
    if not fs.exists(rec_dir):
        return []
    out = []
    for rec in sorted(fs.glob(f"{rec_dir}/*.json")):
        run_id = rec.rsplit("/", 1)[-1][: -len(".json")]
        path = f"{lab_dir}/{run_id}.parquet"
        if fs.exists(path):
            out.extend(read_parquet(fs, path).cast(LEDGER).to_pylist())
    return out


def read_records(fs: fsspec.AbstractFileSystem, root: str) -> list[dict]:
    """The committed run records, oldest first."""
    d = f"{root}/runs"
    if not fs.exists(d):
        return []
    recs = [json.loads(fs.cat_file(p)) for p in fs.glob(f"{d}/*.json")]
    return sorted(recs, key=lambda r: (r.get("started") or "", r["run_id"]))


def commit(writer, rows: list[dict], record: dict) -> None:
    """Write a run's ledger rows, then its record (the commit point). ``writer`` is a RunWriter
    rooted at the ledger folder (its atomic write_json and filesystem are reused)."""
    path = writer.path("labeled", f"{record['run_id']}.parquet")
    writer.fs.makedirs(writer.path("labeled"), exist_ok=True)
    tmp = f"{path}.tmp"
    with writer.fs.open(tmp, "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=LEDGER), f)
    writer.fs.mv(tmp, path)
    writer.write_json(f"runs/{record['run_id']}.json", record)


def summary(rows: list[dict]) -> dict[str, dict[str, int]]:
    """{'model@version': {'ok': n, 'error': n}} over distinct (uri, size, tag) inputs."""
    out: dict[str, dict[str, set]] = defaultdict(lambda: {"ok": set(), "error": set()})
    for r in rows:
        out[f"{r['model']}@{r['model_version']}"][r["status"]].add((r["uri"], r["size"], r["tag"]))
    return {k: {s: len(v) for s, v in d.items()} for k, d in sorted(out.items())}
