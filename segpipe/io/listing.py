"""Listing a source into a deterministic, sharded list of input files."""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import asdict, dataclass

import fsspec

from segpipe.io.fs import resolve, to_uri


@dataclass(frozen=True)
class SourceFile:
    """One input: its URI, a stable 63-bit ``image_id`` derived from the URI, its path relative to
    the source root, its size (bytes), a change tag (etag or mtime) and its shard."""

    uri: str
    image_id: int
    relpath: str
    size: int
    tag: str
    index: int
    shard: int


def image_id_for(uri: str) -> int:
    """A stable positive int64 id for an input URI (COCO needs integer image ids)."""
    return int(hashlib.sha256(uri.encode()).hexdigest()[:15], 16)


def list_source(uri: str, *, patterns: list[str], recursive: bool = True, max_images: int | None = None,
                shard_size: int = 64, fs: fsspec.AbstractFileSystem | None = None,
                storage_options: dict | None = None) -> list[SourceFile]:
    """List files under ``uri`` whose names match any of ``patterns`` (case-insensitive), sorted by
    path, cut to ``max_images``, with shard = position // ``shard_size``. Raises FileNotFoundError
    when the source does not exist. ``storage_options`` go to fsspec (see StorageConfig.options)."""
    fs, root = resolve(uri, fs, **(storage_options or {}))
    if not fs.exists(root):
        raise FileNotFoundError(f"source {uri!r} does not exist")
    if fs.isfile(root):
        entries = {root: fs.info(root)}
        base = root.rsplit("/", 1)[0]
    else:
        entries = fs.find(root, maxdepth=None if recursive else 1, detail=True)
        base = root.rstrip("/")
    pats = [p.lower() for p in patterns]
    paths = sorted(p for p, info in entries.items() if _is_file(fs, p, info) and _matches(p, pats))
    if max_images is not None:
        paths = paths[:max_images]
    out = []
    for i, p in enumerate(paths):
        info = entries[p]
        file_uri = to_uri(fs, p)
        tag = str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or "")
        out.append(
            SourceFile(
                uri=file_uri,
                image_id=image_id_for(file_uri),
                relpath=p[len(base) + 1 :] if p.startswith(base + "/") else p.rsplit("/", 1)[-1],
                size=int(info.get("size") or 0),
                tag=tag,
                index=i,
                shard=i // shard_size,
            )
        )
    return out


def _is_file(fs: fsspec.AbstractFileSystem, path: str, info: dict) -> bool:
    """A regular file, or (local disks) a symbolic link to one: fsspec lists links as type
    "other", and a folder of links to a dataset elsewhere is a common way to select images."""
    if info.get("type") == "file":
        return True
    return bool(info.get("islink")) and fs.isfile(path)


def _matches(path: str, patterns: list[str]) -> bool:
    name = path.rsplit("/", 1)[-1].lower()
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def fingerprint(files: list[SourceFile]) -> str:
    """sha256 over (uri, size, tag) of every input, in order: changes when any input changes."""
    h = hashlib.sha256()
    for f in files:
        h.update(json.dumps([f.uri, f.size, f.tag]).encode())
        h.update(b"\n")
    return h.hexdigest()


def as_rows(files: list[SourceFile]) -> list[dict]:
    return [asdict(f) for f in files]
