"""Filesystem resolution through fsspec. Filesystems are created per call and passed in, never global."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import fsspec
from fsspec.core import url_to_fs

if TYPE_CHECKING:
    import pyarrow as pa


def resolve(uri: str, fs: fsspec.AbstractFileSystem | None = None, **options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """``uri`` (a local path, file://, s3://, ...) -> (filesystem, path within it, no trailing '/').

    With ``fs`` given, that filesystem is used and only the path is derived."""
    if fs is not None:
        return fs, fs._strip_protocol(uri).rstrip("/") or "/"
    fs, path = url_to_fs(uri, **options)
    return fs, path.rstrip("/") or "/"


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A filesystem path back to a URI that ``resolve`` understands (local paths stay absolute paths)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return fs.unstrip_protocol(path)


def read_parquet(fs: fsspec.AbstractFileSystem, path: str, columns: Sequence[str] | None = None) -> "pa.Table":
    """The Parquet file ``path`` on ``fs`` (optionally only ``columns``, in that order) as a table.

    Its bytes are read on the calling thread and copied into Arrow-owned memory before Arrow
    parses them. Handed a Python file object, Arrow reads it from its own IO threads into
    buffers that hold Python objects, and the last of them can be released on such a thread
    after ``read_table`` has returned. If that happens while the interpreter shuts down, the
    thread cannot take the GIL, is unwound through C++ and the process aborts ("terminate called
    without an active exception", exit 134), after all its work is done: seen about once in 60
    runs of ``segpipe pseudo-label`` on a loaded machine, with the core dump's thread in
    ``arrow::py::PyBuffer::~PyBuffer`` under ``ReadRangeCache``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        raw = f.read()
    out = pa.BufferOutputStream()
    out.write(raw)
    del raw
    return pq.read_table(pa.BufferReader(out.getvalue()), columns=None if columns is None else list(columns))
