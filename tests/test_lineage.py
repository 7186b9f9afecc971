"""OpenLineage run events: to an HTTP receiver on loopback and to a file, through the real client."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from openlineage.client.serde import Serde

from segpipe.config import load_workflow
from segpipe.provenance import lineage
from segpipe.provenance.lineage import LineageEmitter, RunState, dataset_id, emitter_for, run_uuid

REPO = Path(__file__).resolve().parents[1]

MODELS = [("maskrcnn-shapes", "maskrcnn-shapes@0123456789ab"), ("polarmask-shapes", "polarmask-shapes@ba9876543210"),
          ("spatialemb-shapes", "spatialemb-shapes@aaaaaaaaaaaa"), ("discloss-shapes", "discloss-shapes@bbbbbbbbbbbb")]
REFINER = ("pointrend-shapes", "pointrend-shapes@cccccccccccc")
COUNTS = {"images": 10, "ok": 9, "errors": 1, "instances": 42, "errors_by_type": {"DecodeError": 1}}


@contextmanager
def receiver(status: int = 201):
    """An OpenLineage HTTP backend on 127.0.0.1: records (path, JSON body) of every POST."""
    got: list[tuple[str, dict]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append((self.path, json.loads(body)))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", got
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workflow(tmp_path: Path, target: str, name: str = "shapes-ensemble.yaml", source: str | None = None,
             output: str | None = None):
    return load_workflow(REPO / "workflows" / name, [
        f"source.uri={source or tmp_path / 'images'}", f"output.uri={output or tmp_path / 'out'}",
        f"provenance.openlineage.{target}"])


def facet_schema() -> dict:
    """The segpipe-specific part of SegpipeRunFacet.json (the RunFacet base is OpenLineage's)."""
    schema = json.loads((Path(lineage.__file__).parent / "SegpipeRunFacet.json").read_text())
    return {"$defs": schema["$defs"], **schema["$defs"]["SegpipeRunFacet"]["allOf"][1]}


def test_http_start_complete(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    with receiver() as (url, got):
        cfg = workflow(tmp_path, f"url={url}")
        em = emitter_for(cfg, "20250101T000000Z-abc123", models=MODELS, refiner=REFINER)
        assert em.start() and em.complete({"counts": COUNTS, "input": {"fingerprint": "f" * 64}})
    assert em.errors == 0
    assert [p for p, _ in got] == ["/api/v1/lineage"] * 2
    start, done = (e for _, e in got)
    assert [start["eventType"], done["eventType"]] == ["START", "COMPLETE"]
    assert start["run"]["runId"] == done["run"]["runId"] == run_uuid("20250101T000000Z-abc123")
    assert str(uuid.UUID(done["run"]["runId"])) == done["run"]["runId"]
    assert done["job"]["namespace"] == "segpipe" and done["job"]["name"] == "shapes-ensemble"
    assert [(d["namespace"], d["name"]) for d in done["inputs"]] == [("file", str(tmp_path / "images"))]
    assert done["inputs"][0]["facets"]["version"]["datasetVersion"] == "f" * 64
    outputs = {o["name"]: o for o in done["outputs"]}
    assert {o["namespace"] for o in done["outputs"]} == {"file"}
    assert set(outputs) == {str(tmp_path / "out" / t) for t in ("instances", "predictions", "images", "errors")} | {
        str(tmp_path / "out" / "coco" / "instances.json")}
    instances = outputs[str(tmp_path / "out" / "instances")]
    assert instances["outputFacets"]["outputStatistics"]["rowCount"] == 42
    assert "mask_rle" in {f["name"] for f in instances["facets"]["schema"]["fields"]}

    facet = done["run"]["facets"]["segpipe"]
    assert facet["runId"] == "20250101T000000Z-abc123"
    assert facet["workflowSha256"] == cfg.digest()
    assert facet["models"] == [{"name": n, "version": v} for n, v in MODELS]
    assert facet["refiner"] == {"name": REFINER[0], "version": REFINER[1]}
    assert facet["ensemble"] == cfg.ensemble.model_dump(mode="json", exclude_none=True) and facet["ensemble"]["method"] == "soft"
    assert facet["refine"]["model"] == "pointrend-shapes"
    assert facet["counts"] == COUNTS and "counts" not in start["run"]["facets"]["segpipe"]
    jsonschema.validate(facet, facet_schema())
    assert done["run"]["facets"]["processing_engine"]["name"] == "Ray"
    assert done["run"]["facets"]["nominalTime"]["nominalStartTime"] == start["run"]["facets"]["nominalTime"]["nominalStartTime"]
    # the spec's required envelope fields, on the event and on every facet
    for event in (start, done):
        assert event["producer"] == lineage.PRODUCER and event["schemaURL"].startswith("https://openlineage.io/spec/")
        assert event["eventTime"]
        for f in event["run"]["facets"].values():
            assert f["_producer"] and f["_schemaURL"]
    assert facet["_producer"] == lineage.PRODUCER and facet["_schemaURL"] == lineage.FACET_SCHEMA_URL


def test_file_start_fail_appends_json_lines(tmp_path):
    target = tmp_path / "lineage" / "events.jsonl"  # its folder does not exist yet
    cfg = workflow(tmp_path, f"file={target}", name="shapes.yaml")
    em = LineageEmitter(cfg.provenance.openlineage, cfg, "run-1", models=MODELS[:1])
    assert em.start()
    assert em.fail("error rate 0.600 exceeds pipeline.max_error_rate=0.5", {"counts": COUNTS})
    other = LineageEmitter(cfg.provenance.openlineage, cfg, "run-2", models=MODELS[:1])
    assert other.start()  # a second run appends to the same file
    events = [json.loads(line) for line in target.read_text().splitlines()]
    assert [e["eventType"] for e in events] == ["START", "FAIL", "START"]
    assert events[0]["run"]["runId"] == events[1]["run"]["runId"] != events[2]["run"]["runId"]
    fail = events[1]
    assert fail["run"]["facets"]["errorMessage"]["message"] == "error rate 0.600 exceeds pipeline.max_error_rate=0.5"
    assert fail["run"]["facets"]["errorMessage"]["programmingLanguage"] == "python"
    assert fail["run"]["facets"]["segpipe"]["counts"] == COUNTS
    assert "errorMessage" not in events[0]["run"]["facets"]
    facet = fail["run"]["facets"]["segpipe"]
    assert "ensemble" not in facet and "refine" not in facet and "refiner" not in facet  # none in shapes.yaml
    assert fail["job"]["name"] == "shapes"
    assert em.errors == 0 and other.errors == 0


def test_backend_down_does_not_raise(tmp_path, caplog):
    cfg = workflow(tmp_path, f"url=http://user:s3cr3t@127.0.0.1:{closed_port()}", name="shapes.yaml")
    em = emitter_for(cfg, "run-down", models=MODELS[:1])
    with caplog.at_level(logging.WARNING, logger="segpipe.provenance.lineage"):
        assert em.start() is False
        assert em.fail("boom") is False
    assert em.errors == 2
    assert "OpenLineage START event for run run-down not emitted" in caplog.text
    assert "s3cr3t" not in caplog.text


def test_backend_error_status_is_counted(tmp_path):
    with receiver(status=400) as (url, got):
        cfg = workflow(tmp_path, f"url={url}", name="shapes.yaml")
        em = LineageEmitter(cfg.provenance.openlineage, cfg, "run-400", retries=0)
        assert em.start() is False
    assert em.errors == 1 and len(got) == 1


def test_s3_dataset_names(tmp_path):
    cfg = workflow(tmp_path, f"file={tmp_path / 'ol.jsonl'}", name="shapes.yaml",
                   source="s3://bucket/raw/images/", output="s3://out-bucket/labels/run1")
    event = json.loads(Serde.to_json(LineageEmitter(cfg.provenance.openlineage, cfg, "r").event(RunState.START)))
    assert [(d["namespace"], d["name"]) for d in event["inputs"]] == [("s3://bucket", "raw/images")]
    assert ("s3://out-bucket", "labels/run1/instances") in [(d["namespace"], d["name"]) for d in event["outputs"]]
    assert dataset_id("s3a://bucket/a/b") == ("s3://bucket", "a/b")
    assert dataset_id("s3://bucket") == ("s3://bucket", "/")
    assert dataset_id("file:///data/x") == ("file", "/data/x")
    assert dataset_id("rel/dir") == ("file", os.path.abspath("rel/dir"))
    assert dataset_id("gs://b/p/") == ("gs://b", "p")
    assert dataset_id("https://user:pw@host:8443/d/x?X-Amz-Signature=abc") == ("https://host:8443", "d/x")


def test_client_config_is_explicit_only(tmp_path, monkeypatch):
    """No openlineage.yml, OPENLINEAGE_* variable or environment facet reaches the events."""
    conf = tmp_path / "openlineage.yml"
    conf.write_text("transport: {type: console}\nfacets: {environment_variables: [SEGPIPE_TEST_SECRET]}\n"
                    "tags: {run: {leak: yes}}\n")
    monkeypatch.setenv("OPENLINEAGE_CONFIG", str(conf))
    monkeypatch.setenv("SEGPIPE_TEST_SECRET", "hunter2")
    monkeypatch.setenv("OPENLINEAGE_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("OPENLINEAGE_DISABLED", "true")
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__TYPE", "console")
    monkeypatch.chdir(tmp_path)  # an openlineage.yml in the working directory is not read either
    env_before = dict(os.environ)
    target = tmp_path / "events.jsonl"
    cfg = workflow(tmp_path, f"file={target}", name="shapes.yaml")
    em = LineageEmitter(cfg.provenance.openlineage, cfg, "run-env")
    assert em.start() and em.errors == 0
    text = target.read_text()
    assert "hunter2" not in text and "environmentVariables" not in text and "leak" not in text
    assert dict(os.environ) == env_before  # the client aliased no variable


def test_not_configured(tmp_path):
    cfg = load_workflow(REPO / "workflows" / "shapes.yaml", [f"source.uri={tmp_path}", f"output.uri={tmp_path / 'o'}"])
    assert emitter_for(cfg, "r") is None


@pytest.mark.slow
def test_a_run_emits_start_and_complete_to_a_file(ray_local, tiny_card, shapes_data, tmp_path):
    """Wired into run_workflow: a real run writes START then COMPLETE naming its model version."""
    from segpipe.config import ModelCard
    from segpipe.pipeline.run import run_workflow

    events = tmp_path / "lineage" / "events.jsonl"
    cfg = load_workflow(REPO / "workflows" / "shapes.yaml", [
        f"source.uri={shapes_data / 'images'}", f"output.uri={tmp_path / 'out'}", f"models.0.model={tiny_card}",
        f"provenance.openlineage.file={events}"])
    res = run_workflow(cfg, run_id="lineage-run", progress=lambda m: None)
    lines = [json.loads(x) for x in events.read_text().splitlines()]
    assert [e["eventType"] for e in lines] == ["START", "COMPLETE"]
    facet = lines[1]["run"]["facets"]["segpipe"]
    assert facet["runId"] == "lineage-run" and facet["counts"]["images"] == res.counts["images"]
    assert facet["models"] == [{"name": "tiny-maskrcnn", "version": ModelCard.from_yaml(tiny_card).version()}]
