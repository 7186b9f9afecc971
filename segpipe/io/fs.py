"""Filesystem resolution through fsspec. Filesystems are created per call and passed in, never global."""

from __future__ import annotations

from typing import Any

import fsspec
from fsspec.core import url_to_fs


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
