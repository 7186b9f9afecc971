"""The run manifest (``_segpipe/run.json``): what produced every output row.

It records the run (id, times, status), the resolved config and its hash, the code (segpipe
version, git commit when available), the environment, every model card and version, the input
listing's fingerprint, counts and timings. Building it reads state; it never changes a result.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import segpipe


def git_commit(path: Path | None = None) -> str | None:
    """The checkout's HEAD commit (with '+dirty' when modified), or None outside a git checkout."""
    root = path or Path(segpipe.__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def environment(device_kind: str) -> dict:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages": {p: _version(p) for p in ("torch", "torchvision", "ray", "pyarrow", "pycocotools", "numpy", "pillow", "fsspec")},
        "device": device_kind,
    }


def code() -> dict:
    return {"segpipe_version": segpipe.__version__, "git_commit": git_commit()}
