"""S3 end to end against moto's HTTP server on loopback: the same run from S3 to S3 gives the same
rows as from local disk to local disk; credentials come from the environment only and never
reach outputs, logs or error records."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from segpipe.config import StorageConfig, load_workflow
from segpipe.sinks.writer import RunWriter, read_committed

from conftest import REPO, S3_KEY_ID, S3_SECRET, assert_sound, s3_env, s3_fs

CLI = [sys.executable, str(REPO / "cli.py")]


def test_storage_options_for_s3_only():
    st = StorageConfig(endpoint_url="http://127.0.0.1:9", region="eu-west-1")
    assert st.options("s3://b/p") == {"anon": False, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "eu-west-1"}}
    assert st.options("/local/dir") == {}
    assert StorageConfig(anonymous=True).options("s3://b") == {"anon": True}


@pytest.mark.parametrize("key", ["secret", "aws_secret_access_key", "key", "token"])
def test_credentials_in_a_workflow_are_refused_with_the_field(tmp_path, key):
    data = yaml.safe_load((REPO / "workflows" / "shapes.yaml").read_text())
    data["source"]["storage"] = {key: S3_SECRET}
    wf = tmp_path / "wf.yaml"
    wf.write_text(yaml.safe_dump(data))
    r = subprocess.run([*CLI, "run", str(wf)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "source.storage" in r.stdout + r.stderr and "environment" in r.stdout + r.stderr
    assert S3_SECRET not in r.stdout + r.stderr  # not even echoed back in the error


def _upload(fs, folder, prefix):
    for p in sorted(folder.iterdir()):
        fs.put_file(str(p), f"{prefix}/{p.name}")


def _run(args, env):
    r = subprocess.run([*CLI, "run", str(REPO / "workflows" / "shapes.yaml"), *args], capture_output=True, text=True,
                       env=env, timeout=600, cwd=REPO)
    return r


def _rows(tables: dict) -> tuple[list, list, list]:
    """Location-free rows: instances keyed by the image's relpath, images and errors likewise."""
    rel = {r["image_id"]: r["relpath"] for r in tables["images"]}
    inst = sorted((rel[r["image_id"]], r["source"], r["category_id"], round(r["score"], 5), r["mask_rle"], r["area"])
                  for r in tables["instances"])
    images = sorted((r["relpath"], r["status"], r["width"], r["height"], r["sha256"], r["size_bytes"], r["n_instances"], r["shard"])
                    for r in tables["images"])
    errors = sorted((rel[r["image_id"]], r["stage"], r["error_type"], r["message"]) for r in tables["errors"])
    return inst, images, errors


@pytest.fixture(scope="module")
def s3_and_local_runs(s3_server, tiny_card, shapes_data, tmp_path_factory):
    fs = s3_fs(s3_server)
    fs.mkdir("src")
    fs.mkdir("out")
    _upload(fs, shapes_data / "images", "src/data/images")
    common = [f"models.0.model={tiny_card}", "source.shard_size=3", "pipeline.ray_num_cpus=2", "pipeline.read_num_cpus=0.5"]
    s3_sets = ["source.uri=s3://src/data/images", f"source.storage.endpoint_url={s3_server}",
               "output.uri=s3://out/runs/r1", f"output.storage.endpoint_url={s3_server}", *common]
    env = s3_env()  # credentials only; the endpoint comes from the workflow
    r_s3 = _run([a for s in s3_sets for a in ("--set", s)] + ["--run-id", "s3-run"], env)
    out = tmp_path_factory.mktemp("local") / "out"
    local_sets = [f"source.uri={shapes_data / 'images'}", f"output.uri={out}", *common]
    r_local = _run([a for s in local_sets for a in ("--set", s)] + ["--run-id", "local-run"], s3_env())
    return fs, r_s3, r_local, out


@pytest.mark.slow
def test_s3_to_s3_gives_the_rows_of_local_to_local(s3_and_local_runs, s3_server, monkeypatch):
    fs, r_s3, r_local, out = s3_and_local_runs
    assert r_s3.returncode == r_local.returncode == 0, (r_s3.stdout + r_s3.stderr)[-3000:]
    s3 = {t: read_committed("s3://out/runs/r1", t, fs=fs).to_pylist() for t in ("instances", "images", "errors")}
    local = {t: read_committed(str(out), t).to_pylist() for t in ("instances", "images", "errors")}
    assert len(s3["images"]) == 8 and len(s3["errors"]) == 2 and s3["instances"]
    assert _rows(s3) == _rows(local)
    assert all(r["uri"].startswith("s3://src/data/images/") for r in s3["images"])
    assert {r["run_id"] for r in s3["instances"]} == {"s3-run"}
    for k, v in s3_env().items():  # the auditor re-lists the S3 source with the standard AWS chain
        monkeypatch.setenv(k, v)
    assert_sound("S3 source -> S3 output", "s3://out/runs/r1", fs)
    assert_sound("local source -> local output", str(out))


@pytest.mark.slow
def test_s3_output_is_committed_shards_and_manifest_only(s3_and_local_runs):
    fs, r_s3, _, _ = s3_and_local_runs
    keys = sorted(fs.find("out/runs/r1"))
    assert not [k for k in keys if "/staging/" in k or ".tmp" in k]
    assert sorted(k.rsplit("/", 1)[-1] for k in keys if "/_segpipe/shards/" in k) == [f"shard-0000{i}.json" for i in range(3)]
    for t in ("instances", "predictions", "images", "errors"):
        assert sorted(k.rsplit("/", 1)[-1] for k in keys if f"/{t}/" in k) == [f"shard-0000{i}.parquet" for i in range(3)]
    man = json.loads(fs.cat_file("out/runs/r1/_segpipe/run.json"))
    assert man["status"] == "complete" and man["shards"] == [0, 1, 2]
    coco = json.loads(fs.cat_file("out/runs/r1/coco/instances.json"))
    assert len(coco["images"]) == 6


@pytest.mark.slow
def test_readers_on_s3_skip_unmarked_tables_and_resume_skips_committed(s3_and_local_runs, s3_server, shapes_data, tiny_card):
    fs, *_ = s3_and_local_runs
    before = read_committed("s3://out/runs/r1", "instances", fs=fs).num_rows
    # A table file without its marker (a crash between publish and marker) is not read.
    with fs.open("out/runs/r1/instances/shard-00007.parquet", "wb") as f:
        with fs.open("out/runs/r1/instances/shard-00000.parquet", "rb") as g:
            pq.write_table(pq.read_table(g), f)
    assert read_committed("s3://out/runs/r1", "instances", fs=fs).num_rows == before
    fs.rm("out/runs/r1/instances/shard-00007.parquet")
    # Rerunning the same run id resumes: every shard is committed, nothing runs, nothing is added.
    cfg = load_workflow(REPO / "workflows" / "shapes.yaml", [
        "source.uri=s3://src/data/images", f"source.storage.endpoint_url={s3_server}", "output.uri=s3://out/runs/r1",
        f"output.storage.endpoint_url={s3_server}", f"models.0.model={tiny_card}", "source.shard_size=3"])
    w = RunWriter(cfg.output.uri, "s3-run", storage_options=cfg.output.storage.options(cfg.output.uri) | {"key": S3_KEY_ID, "secret": S3_SECRET})
    assert sorted(w.start()) == [0, 1, 2]
    # segpipe eval reads the S3 output through the standard AWS chain (endpoint from the environment).
    r = subprocess.run([*CLI, "eval", "--pred", "s3://out/runs/r1", "--gt", str(shapes_data / "annotations.json"), "--json"],
                       capture_output=True, text=True, env=s3_env(s3_server), timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["n_images"] == 6


@pytest.mark.slow
def test_credentials_never_reach_outputs_logs_or_error_records(s3_and_local_runs):
    fs, r_s3, r_local, out = s3_and_local_runs
    secrets = [S3_SECRET.encode(), S3_KEY_ID.encode()]
    logs = (r_s3.stdout + r_s3.stderr + r_local.stdout + r_local.stderr).encode()
    assert logs and not any(s in logs for s in secrets)
    keys = fs.find("out/runs/r1")
    assert len(keys) > 10
    for k in keys:
        data = fs.cat_file(k)
        assert not any(s in data for s in secrets), k
    for p in out.rglob("*"):
        if p.is_file():
            assert not any(s in p.read_bytes() for s in secrets), p
    errors = read_committed("s3://out/runs/r1", "errors", fs=fs).to_pylist()
    assert errors and not any(S3_SECRET in json.dumps(e) for e in errors)
