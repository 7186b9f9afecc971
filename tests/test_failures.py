"""Failures of the engine: a model actor's worker process killed mid-run, and the worker node of a
2-node Ray cluster (two ``ray start`` on this machine) stopped mid-run. Each run completes with
every input exactly once and the instances of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segpipe.sinks.writer import read_committed, read_manifest

from conftest import REPO, _free_port, assert_sound, committed_shards, node_ports, stop_node, wait_for_commits

pytestmark = pytest.mark.slow

CLI = [sys.executable, str(REPO / "cli.py")]
N_IMAGES = 24


def _env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from segpipe.data.synthetic import SynthSpec, write_dataset

    root = tmp_path_factory.mktemp("many")
    write_dataset(SynthSpec(n=N_IMAGES, seed=31, height=128, width=128), root)
    (root / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return root / "images"


def _cmd(card, images, out, run_id, *extra):
    sets = [f"source.uri={images}", f"output.uri={out}", f"models.0.model={card}", "source.shard_size=4",
            "models.0.batch_size=2", "pipeline.read_batch_size=2", *extra]
    return [*CLI, "run", str(REPO / "workflows" / "shapes.yaml"), *[a for s in sets for a in ("--set", s)], "--run-id", run_id]


def _processes() -> list[tuple[int, int, int, str]]:
    """(pid, ppid, pgid, args) of every process."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,pgid=,args="], capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) == 4:
            rows.append((int(parts[0]), int(parts[1]), int(parts[2]), parts[3]))
    return rows


def _descendants(root: int) -> set[int]:
    procs = _processes()
    found, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp, _, _ in procs if pp in frontier} - found
        found |= frontier
    return found


def _tables(out: Path) -> dict:
    return {t: read_committed(str(out), t).to_pylist() for t in ("images", "errors", "instances")}


def _key(r: dict) -> tuple:
    return (r["image_id"], r["category_id"], r["mask_rle"], round(r["score"], 4))


def _check_exactly_once(out: Path, images: Path, reference: dict, label: str) -> None:
    got = _tables(out)
    inputs = sorted(str(p) for p in images.iterdir())
    assert sorted(r["uri"] for r in got["images"]) == inputs
    assert [r["uri"].rsplit("/", 1)[-1] for r in got["errors"]] == ["broken.jpg"]
    assert sorted(map(_key, got["instances"])) == sorted(map(_key, reference["instances"]))
    assert read_manifest(str(out))["status"] == "complete"
    assert_sound(label, str(out))


@pytest.fixture(scope="module")
def reference(tiny_card, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    r = subprocess.run(_cmd(tiny_card, images, out, "ref", "pipeline.ray_num_cpus=2"), cwd=REPO, capture_output=True,
                       text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stdout + r.stderr
    return _tables(out)


def _fault_mid_run(cmd, out: Path, fault) -> tuple[int, str]:
    """Run ``cmd``; once a shard is committed, call ``fault(driver_pid)``; wait for the run.
    Returns (shards committed at the fault, the run's output); asserts the run succeeded."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_commits(proc, out, 1)
        fault(proc.pid)
        at = committed_shards(out)
        log, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log
    assert at < -(-(N_IMAGES + 1) // 4), "the fault came after the last commit: it tested nothing"
    return at, log


def _kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_model_actor_killed_mid_run(reference, tiny_card, images, tmp_path):
    out = tmp_path / "out"

    def kill_actor(driver: int) -> None:
        mine = _descendants(driver)
        actors = [p for p, _, _, args in _processes() if p in mine and "MapBatches(ModelStage)" in args]
        assert actors, "no model actor process found under the driver"
        _kill(actors[:1])

    at, _ = _fault_mid_run(_cmd(tiny_card, images, out, "actor-kill", "pipeline.ray_num_cpus=2"), out, kill_actor)
    _check_exactly_once(out, images, reference, f"model actor SIGKILL after {at} of 7 shards")


def _ray_start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """``ray start --block`` in its own process group (so the node can be stopped as a whole),
    its output in ``log``."""
    with open(log, "wb") as f:
        return subprocess.Popen(["ray", "start", "--block", "--disable-usage-stats", *args], env=env, start_new_session=True,
                                stdout=f, stderr=subprocess.STDOUT)


def _wait_nodes(address: str, n: int, env: dict, node: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Wait until ``ray status`` lists ``n`` nodes; fail with the starting node's output if it
    exits or the time runs out."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        r = subprocess.run(["ray", "status", f"--address={address}"], capture_output=True, text=True, env=env)
        if r.returncode == 0 and r.stdout.count(" node_") >= n:
            return
        if node.poll() is not None:
            break
        time.sleep(1)
    pytest.fail(f"the cluster at {address} did not reach {n} nodes (ray start rc {node.poll()}):\n"
                + log.read_text(errors="replace")[-3000:])


@pytest.fixture
def two_nodes(tmp_path):
    """A head (2 CPUs) and a worker node (2 CPUs, label segpipe-role=model) on this machine, both
    offering the custom resource segpipe_model."""
    env = _env()
    port = _free_port()
    address = f"127.0.0.1:{port}"
    # Both nodes offer the custom resource segpipe_model (nodes allowed to host models); only the
    # worker carries the label the workflow prefers.
    res = '--resources={"segpipe_model": 4}'
    logs = tmp_path / "head.log", tmp_path / "worker.log"
    head = _ray_start(["--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false", res, *node_ports()], env, logs[0])
    worker = None
    try:
        _wait_nodes(address, 1, env, head, logs[0])
        worker = _ray_start([f"--address={address}", "--num-cpus=2", "--labels=segpipe-role=model", res, *node_ports()], env,
                            logs[1])
        _wait_nodes(address, 2, env, worker, logs[1])
        yield address, worker
    finally:
        for node in (worker, head):
            if node is not None and node.poll() is None:
                stop_node(node)


def test_worker_node_stopped_mid_run_completes_on_the_head(reference, tiny_card, images, tmp_path, two_nodes):
    address, worker = two_nodes
    out = tmp_path / "out"

    def stop_node(driver: int) -> None:
        node = _descendants(worker.pid) | {worker.pid}
        assert [p for p, _, _, a in _processes() if "MapBatches(ModelStage)" in a and p in node], \
            "the model actor did not land on the labelled worker node"
        _kill(node)  # the whole node: ray start, its raylet, its workers, the model actor

    cmd = _cmd(tiny_card, images, out, "node-loss", f"pipeline.ray_address={address}",
               "models.0.node_labels={segpipe-role: model}", "models.0.resources={segpipe_model: 1}")
    at, _ = _fault_mid_run(cmd, out, stop_node)
    _check_exactly_once(out, images, reference, f"worker node SIGKILL after {at} of 7 shards")
