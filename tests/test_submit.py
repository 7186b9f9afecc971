"""Cluster submission against a real Ray head started here (`ray start --head` with the job
server on loopback): a submitted job runs the demo workflow and its outputs appear; a failing job
reports failure with its error; status, logs, jobs and stop work on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from segpipe.config import load_workflow

from conftest import REPO, _free_port, node_ports, stop_node

CLI = [sys.executable, str(REPO / "cli.py")]


def test_bundle_carries_verified_cards_and_absolute_paths(tmp_path, tiny_card, shapes_data, monkeypatch):
    from segpipe.jobs import bundle, runtime_env

    monkeypatch.chdir(shapes_data)
    cfg = load_workflow(REPO / "workflows" / "demo.yaml", ["source.uri=images", "output.uri=out", "eval.gt=annotations.json"])
    entry, wd = bundle(cfg, tmp_path / "job", "r1")
    assert entry == "python -m segpipe.cli run workflow.yaml --run-id r1"
    data = yaml.safe_load((wd / "workflow.yaml").read_text())
    assert data["source"]["uri"] == str(shapes_data / "images") and data["output"]["uri"] == str(shapes_data / "out")
    assert data["pipeline"]["ray_address"] == "auto"
    for ref in [m["model"] for m in data["models"]] + [data["refine"]["model"]]:
        card = yaml.safe_load((wd / ref).read_text())
        assert (wd / ref).parent.joinpath(card["weights"]["file"]).is_file()
    env = runtime_env(wd, ship_code=True)
    assert env["working_dir"] == str(wd) and env["py_modules"][0].endswith("segpipe")
    assert "env_vars" not in env  # credentials never travel with a job


def test_bundle_refuses_tampered_weights(tmp_path, tiny_card):
    import shutil

    from segpipe.jobs import bundle
    from segpipe.modeling.zoo import WeightsError

    d = tmp_path / "m"
    shutil.copytree(tiny_card.parent, d)
    (d / "weights.safetensors").write_bytes(b"not the weights")
    cfg = load_workflow(REPO / "workflows" / "shapes.yaml", [f"models.0.model={d / 'card.yaml'}"])
    with pytest.raises(WeightsError, match="sha256"):
        bundle(cfg, tmp_path / "job", "r1")


def _env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}


@pytest.fixture(scope="module")
def head():
    """A Ray head with the dashboard / job server on 127.0.0.1; yields its http address."""
    env = _env()
    port, dash = _free_port(), _free_port()
    proc = subprocess.Popen(["ray", "start", "--head", "--block", "--disable-usage-stats", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             *node_ports()],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dash}"
    try:
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except Exception:  # noqa: BLE001 - not up yet
                if proc.poll() is not None or time.time() - t0 > 120:
                    pytest.fail("the Ray head's job server did not come up")
                time.sleep(1)
        yield url
    finally:
        stop_node(proc)


def _cli(*args, timeout=900):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=_env(), timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    from segpipe.data.synthetic import SynthSpec, write_dataset

    root = tmp_path_factory.mktemp("demo")
    write_dataset(SynthSpec(n=6, seed=4242), root)
    return root


@pytest.mark.slow
def test_submitted_demo_runs_and_its_outputs_appear(head, demo_data, tmp_path):
    out = tmp_path / "out"
    r = _cli("submit", REPO / "workflows" / "demo.yaml", "--address", head, "--run-id", "submitted-demo", "--wait",
             "--set", f"source.uri={demo_data / 'images'}", "--set", f"output.uri={out}",
             "--set", f"eval.gt={demo_data / 'annotations.json'}")
    assert r.returncode == 0, r.stdout + r.stderr
    job = r.stdout.splitlines()[0]
    assert job == "segpipe-submitted-demo"
    assert "run submitted-demo: complete" in r.stdout and f"job {job}: SUCCEEDED" in r.stdout
    manifest = json.loads((out / "_segpipe" / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["images"] == 6
    assert manifest["eval"]["AP"] > 0.3  # the bundled trained models, fused and refined
    assert (out / "coco" / "instances.json").is_file()
    st = _cli("status", job, "--address", head)
    assert st.returncode == 0 and "SUCCEEDED" in st.stdout
    logs = _cli("logs", job, "--address", head)
    assert "shard 0 committed" in logs.stdout
    listing = _cli("jobs", "--address", head)
    assert job in listing.stdout and "SUCCEEDED" in listing.stdout


@pytest.mark.slow
def test_failing_job_reports_failure_with_its_error(head, tmp_path):
    missing = tmp_path / "no-such-folder"
    r = _cli("submit", REPO / "workflows" / "shapes.yaml", "--address", head, "--run-id", "doomed", "--wait",
             "--set", f"source.uri={missing}", "--set", f"output.uri={tmp_path / 'out'}")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "segpipe-doomed: FAILED" in r.stdout
    assert f"source {str(missing)!r} does not exist" in r.stdout  # the job's own error, in its logs
    st = _cli("status", "segpipe-doomed", "--address", head)
    assert st.returncode == 1 and "FAILED" in st.stdout


@pytest.mark.slow
def test_stop_a_running_job(head, demo_data, tmp_path):
    r = _cli("submit", REPO / "workflows" / "demo.yaml", "--address", head, "--run-id", "to-stop",
             "--set", f"source.uri={demo_data / 'images'}", "--set", f"output.uri={tmp_path / 'out'}")
    assert r.returncode == 0 and r.stdout.strip() == "segpipe-to-stop", r.stdout + r.stderr
    s = _cli("stop", "segpipe-to-stop", "--address", head)
    assert s.returncode == 0 and "stopping" in s.stdout
    t0 = time.time()
    while time.time() - t0 < 120:
        st = _cli("status", "segpipe-to-stop", "--address", head)
        if "STOPPED" in st.stdout:
            break
        time.sleep(1)
    assert "STOPPED" in st.stdout and st.returncode == 1


def test_unknown_address_fails_with_a_clear_error(tmp_path):
    r = _cli("status", "segpipe-x", "--address", f"http://127.0.0.1:{_free_port()}", timeout=120)
    assert r.returncode == 1 and "error" in (r.stdout + r.stderr).lower()
