"""Crash safety: the driver is killed with SIGKILL at several points of a local run; rerunning
with the same run id completes it, and every input appears exactly once in images/ (and errors/
for the bad ones), with the instances of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from segpipe.sinks.writer import read_committed, read_manifest

from conftest import REPO, assert_sound, committed_shards, wait_for_commits

pytestmark = pytest.mark.slow

CLI = [sys.executable, str(REPO / "cli.py")]


def _cmd(tiny_card, shapes_data, out, run_id):
    sets = [f"source.uri={shapes_data / 'images'}", f"output.uri={out}", f"models.0.model={tiny_card}",
            "source.shard_size=1", "models.0.batch_size=2", "pipeline.read_batch_size=2", "pipeline.ray_num_cpus=2"]
    return [*CLI, "run", str(REPO / "workflows" / "shapes.yaml"), *[a for s in sets for a in ("--set", s)], "--run-id", run_id]


def _kill_after(cmd, out: Path, n_markers: int, timeout: float = 300) -> int:
    """Start ``cmd``, SIGKILL it as soon as ``n_markers`` shards are committed (before the
    manifest when it can); returns the number of markers present at the kill."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_commits(proc, out, n_markers, timeout)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    return committed_shards(out)


def _tables(out: Path) -> dict:
    return {t: read_committed(str(out), t).to_pylist() for t in ("images", "errors", "instances", "predictions")}


def _key(r: dict) -> tuple:
    return (r["image_id"], r["category_id"], r["mask_rle"], r["area"], round(r["score"], 4))


@pytest.fixture(scope="module")
def reference(tiny_card, shapes_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    r = subprocess.run(_cmd(tiny_card, shapes_data, out, "ref"), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return _tables(out)


@pytest.mark.parametrize("kill_at", [1, 4, 8])
def test_sigkill_then_resume_gives_every_input_exactly_once(reference, tiny_card, shapes_data, tmp_path, kill_at):
    out = tmp_path / "out"
    cmd = _cmd(tiny_card, shapes_data, out, "crashy")
    committed = _kill_after(cmd, out, kill_at)
    assert committed >= kill_at
    if committed < 8:
        with pytest.raises(FileNotFoundError):
            read_manifest(str(out))  # the manifest is written last: not there yet
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = read_manifest(str(out))
    assert manifest["status"] == "complete" and manifest["shards"] == list(range(8))
    assert len(manifest["resumed_shards"]) == committed or committed == 8
    got = _tables(out)
    inputs = sorted(str(p) for p in (shapes_data / "images").iterdir())
    assert sorted(r["uri"] for r in got["images"]) == inputs  # each input exactly once
    assert sorted(r["uri"] for r in got["errors"]) == sorted(r["uri"] for r in reference["errors"])
    assert len(got["errors"]) == 2
    for t in ("instances", "predictions"):
        assert sorted(map(_key, got[t])) == sorted(map(_key, reference[t])), t
    assert not (out / "_segpipe" / "staging").exists()
    a = assert_sound(f"driver SIGKILL after {committed} of 8 shards, then resume", str(out))
    assert (a["inputs"], a["images"], a["errors"]) == (8, 8, 2)


def test_audit_catches_a_duplicate_and_a_loss(reference, tiny_card, shapes_data, tmp_path):
    """The auditor itself can fail: a shard committed twice under two numbers is a duplicate, a
    removed marker is a loss (and its table files become uncommitted)."""
    import json
    import shutil

    from segpipe.provenance.audit import audit_run, sound

    out = tmp_path / "out"
    r = subprocess.run(_cmd(tiny_card, shapes_data, out, "audited"), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sound(audit_run(str(out)))
    marker = json.loads((out / "_segpipe" / "shards" / "shard-00000.json").read_text())
    for t, rel in marker["tables"].items():
        shutil.copy(out / rel, out / t / "shard-00099.parquet")
    marker.update(shard=99, tables={t: f"{t}/shard-00099.parquet" for t in marker["tables"]})
    (out / "_segpipe" / "shards" / "shard-00099.json").write_text(json.dumps(marker))
    a = audit_run(str(out))
    assert a["duplicates"] == 1 and not sound(a)
    cli = subprocess.run([*CLI, "audit", str(out)], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 1 and "NOT SOUND" in cli.stdout
    (out / "_segpipe" / "shards" / "shard-00099.json").unlink()
    (out / "_segpipe" / "shards" / "shard-00001.json").unlink()
    a = audit_run(str(out))
    assert a["duplicates"] == 0 and a["lost"] == 1 and a["uncommitted_files"] == 8 and not sound(a)
