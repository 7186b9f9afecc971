"""OpenLineage run events (START, COMPLETE, FAIL) for a segpipe run.

Each event names the job (``provenance.openlineage.namespace`` / the workflow ``name``), the
input dataset (the source), the output datasets (the Parquet tables and the COCO export) and a
``segpipe`` run facet: the segpipe run id and version, the workflow sha256, every model version,
the refiner version, the ensemble and refine configuration and, once known, the counts.

Events go through the openlineage-python client with an explicit transport only: no
``openlineage.yml``, ``OPENLINEAGE_*`` variable or environment facet is read. Emitting never
fails a run: an error is logged (URL credentials redacted) and counted in ``errors``. Runs on the
driver only; nothing here is global.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

import attr
from openlineage.client import OpenLineageClient
from openlineage.client.client import OpenLineageConfig as ClientConfig
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (
    RunFacet,
    dataset_version_dataset,
    error_message_run,
    job_type_job,
    nominal_time_run,
    output_statistics_output_dataset,
    processing_engine_run,
    schema_dataset,
)
from openlineage.client.transport import Transport
from openlineage.client.transport.file import FileConfig, FileTransport
from openlineage.client.transport.http import HttpConfig, HttpTransport

import segpipe
from segpipe.config import OpenLineageConfig, WorkflowConfig

log = logging.getLogger(__name__)

REPO_URL = "https://github.com/segpipe/segpipe"  # segpipe's home: the producer and facet schema URIs derive from it
PRODUCER = f"{REPO_URL}/tree/v{segpipe.__version__}"
# The segpipe facet's JSON Schema is segpipe/provenance/SegpipeRunFacet.json, published with the code.
FACET_SCHEMA_URL = f"{REPO_URL}/raw/v{segpipe.__version__}/segpipe/provenance/SegpipeRunFacet.json#/$defs/SegpipeRunFacet"
RUN_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, REPO_URL)  # segpipe run id -> OpenLineage run UUID
OUTPUT_TABLES = ("instances", "predictions", "images", "errors")


@attr.define
class SegpipeRunFacet(RunFacet):
    """What produced a segpipe run's rows (schema: SegpipeRunFacet.json)."""

    runId: str  # noqa: N815
    segpipeVersion: str  # noqa: N815
    workflowSha256: str  # noqa: N815
    models: list[dict[str, str]] = attr.field(factory=list)
    refiner: dict[str, str] | None = attr.field(default=None)
    ensemble: dict[str, Any] | None = attr.field(default=None)
    refine: dict[str, Any] | None = attr.field(default=None)
    counts: dict[str, Any] | None = attr.field(default=None)

    @staticmethod
    def _get_schema() -> str:
        return FACET_SCHEMA_URL


class _ExplicitClient(OpenLineageClient):
    """An OpenLineageClient that uses only what it is given: its transport and the default client
    configuration. It reads no openlineage.yml, OPENLINEAGE_CONFIG, OPENLINEAGE__*, OPENLINEAGE_URL
    or OPENLINEAGE_DISABLED (and changes no environment variable), so the configuration cannot add
    environment variables, tags, filters or a git remote URL to an event."""

    def __init__(self, transport: Transport) -> None:
        self._explicit = ClientConfig()
        super().__init__(transport=transport)

    @property
    def config(self) -> ClientConfig:
        return self._explicit

    def _alias_env_vars(self) -> None:  # the base copies OPENLINEAGE_URL into os.environ
        return None

    def _resolve_transport(self, **kwargs: Any) -> Transport:
        return kwargs["transport"]


def run_uuid(run_id: str) -> str:
    """The OpenLineage run id (a UUID) of a segpipe run id: stable, so a resumed run keeps it."""
    return str(uuid.uuid5(RUN_NAMESPACE, run_id))


def dataset_id(uri: str) -> tuple[str, str]:
    """OpenLineage (namespace, name) of a URI, after the naming spec: ``s3://bucket/key`` ->
    ("s3://bucket", "key"); a local path or file:// URI -> ("file", absolute path). User info,
    query and fragment (credentials, signatures) are dropped."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return "file", os.path.abspath(url2pathname(parts.path))
    if len(scheme) <= 1:  # no scheme (or a Windows drive letter)
        return "file", os.path.abspath(uri)
    if scheme in ("s3a", "s3n"):
        scheme = "s3"
    return f"{scheme}://{parts.netloc.rsplit('@', 1)[-1]}", parts.path.strip("/") or "/"


def redact(text: str) -> str:
    """``text`` with the credentials of any ``scheme://user:password@host`` URL masked."""
    return re.sub(r"(\w+://)[^/\s@'\"]+@", r"\1***@", text)


def make_transport(ol: OpenLineageConfig, timeout: float = 5.0, retries: int = 2) -> Transport:
    """The client transport for ``ol``: HTTP POSTs to ``url``/``endpoint``, or JSON lines appended
    to ``file``."""
    if ol.url is not None:
        retry = {"total": retries, "connect": retries, "read": retries, "backoff_factor": 0.5,
                 "status_forcelist": [500, 502, 503, 504], "allowed_methods": ["HEAD", "POST"]}
        return HttpTransport(HttpConfig(url=ol.url, endpoint=ol.endpoint, timeout=timeout, retry=retry))
    path = Path(url2pathname(urlsplit(ol.file).path) if ol.file.startswith("file://") else ol.file).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # the first emit fails, is logged and counted
    return FileTransport(FileConfig(log_file_path=str(path), append=True))


def _schema_facet(table: str) -> schema_dataset.SchemaDatasetFacet | None:
    from segpipe.sinks.tables import SCHEMAS

    schema = SCHEMAS.get(table)
    if schema is None:
        return None
    fields = [schema_dataset.SchemaDatasetFacetFields(name=f.name, type=str(f.type), ordinal_position=i + 1)
              for i, f in enumerate(schema)]
    return schema_dataset.SchemaDatasetFacet(fields=fields, producer=PRODUCER)


class LineageEmitter:
    """Emits one segpipe run's OpenLineage events. ``models`` and ``refiner`` are (card name,
    model version) pairs; ``output_uri`` (default ``cfg.output.uri``) is where this run's tables
    are. ``errors`` counts the events that could not be emitted."""

    def __init__(self, ol: OpenLineageConfig, cfg: WorkflowConfig, run_id: str, *,
                 models: Sequence[tuple[str, str]] = (), refiner: tuple[str, str] | None = None,
                 output_uri: str | None = None, started: datetime | None = None,
                 timeout: float = 5.0, retries: int = 2) -> None:
        self.ol = ol
        self.cfg = cfg
        self.run_id = run_id
        self.run_uuid = run_uuid(run_id)
        self.models = [{"name": n, "version": v} for n, v in models]
        self.refiner = {"name": refiner[0], "version": refiner[1]} if refiner else None
        self.output_uri = (output_uri or cfg.output.uri).rstrip("/")
        self.started = started or datetime.now(timezone.utc)
        self.errors = 0
        self.client = _ExplicitClient(make_transport(ol, timeout=timeout, retries=retries))

    # --- the three events --------------------------------------------------------------

    def start(self) -> bool:
        """Emit START. True when it was emitted."""
        return self._emit(RunState.START)

    def complete(self, manifest: dict) -> bool:
        """Emit COMPLETE with the manifest's counts, then close the transport."""
        return self._emit(RunState.COMPLETE, manifest=manifest, close=True)

    def fail(self, reason: str, manifest: dict | None = None) -> bool:
        """Emit FAIL with ``reason`` as the error message (and the counts when a manifest is
        given), then close the transport."""
        error = error_message_run.ErrorMessageRunFacet(message=reason, programmingLanguage="python", producer=PRODUCER)
        return self._emit(RunState.FAIL, manifest=manifest, extra={"errorMessage": error}, close=True)

    # --- building -------------------------------------------------------------------------

    def event(self, state: RunState, manifest: dict | None = None, extra: dict[str, RunFacet] | None = None) -> RunEvent:
        """The RunEvent for ``state`` (pure: builds, sends nothing)."""
        cfg = self.cfg
        segpipe_facet = SegpipeRunFacet(
            runId=self.run_id, segpipeVersion=segpipe.__version__, workflowSha256=cfg.digest(),
            models=list(self.models), refiner=self.refiner,
            # None fields are left out, as OpenLineage's serialiser drops nulls anyway
            ensemble=cfg.ensemble.model_dump(mode="json", exclude_none=True) if cfg.ensemble else None,
            refine=cfg.refine.model_dump(mode="json", exclude_none=True) if cfg.refine else None,
            counts=(manifest or {}).get("counts"), producer=PRODUCER)
        facets: dict[str, RunFacet] = {
            "segpipe": segpipe_facet,
            "nominalTime": nominal_time_run.NominalTimeRunFacet(nominalStartTime=self.started.isoformat(),
                                                                producer=PRODUCER),
            "processing_engine": processing_engine_run.ProcessingEngineRunFacet(
                version=_version("ray") or "unknown", name="Ray", openlineageAdapterVersion=segpipe.__version__,
                producer=PRODUCER),
            **(extra or {}),
        }
        job_facets = {"jobType": job_type_job.JobTypeJobFacet(processingType="BATCH", integration="SEGPIPE",
                                                              jobType="JOB", producer=PRODUCER)}
        return RunEvent(
            eventType=state,
            eventTime=datetime.now(timezone.utc).isoformat(),
            run=Run(runId=self.run_uuid, facets=facets),
            job=Job(namespace=self.ol.namespace, name=cfg.name, facets=job_facets),
            inputs=[self._input(manifest)],
            outputs=self._outputs(manifest),
            producer=PRODUCER,
        )

    def _input(self, manifest: dict | None) -> InputDataset:
        ns, name = dataset_id(self.cfg.source.uri)
        facets = {}
        fp = ((manifest or {}).get("input") or {}).get("fingerprint")
        if fp:
            facets["version"] = dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=fp, producer=PRODUCER)
        return InputDataset(namespace=ns, name=name, facets=facets)

    def _outputs(self, manifest: dict | None) -> list[OutputDataset]:
        counts = (manifest or {}).get("counts") or {}
        rows = {"instances": counts.get("instances"), "images": counts.get("images"), "errors": counts.get("errors")}
        out = []
        for table in OUTPUT_TABLES:
            ns, name = dataset_id(f"{self.output_uri}/{table}")
            facets = {"schema": _schema_facet(table)}
            stats = {}
            if rows.get(table) is not None:
                stats["outputStatistics"] = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
                    rowCount=int(rows[table]), producer=PRODUCER)
            out.append(OutputDataset(namespace=ns, name=name, facets=facets, outputFacets=stats))
        if self.cfg.output.coco:
            ns, name = dataset_id(f"{self.output_uri}/coco/instances.json")
            out.append(OutputDataset(namespace=ns, name=name))
        return out

    # --- sending ----------------------------------------------------------------------------

    def _emit(self, state: RunState, manifest: dict | None = None, extra: dict[str, RunFacet] | None = None,
              close: bool = False) -> bool:
        try:
            self.client.emit(self.event(state, manifest, extra))
            return True
        except Exception as e:  # a lineage backend never fails a labeling run
            self.errors += 1
            log.warning("OpenLineage %s event for run %s not emitted: %s: %s", state.value, self.run_id,
                        type(e).__name__, redact(str(e)))
            return False
        finally:
            if close:
                self.close()

    def close(self) -> None:
        """Release the transport (an HTTP session); a later event opens it again."""
        try:
            self.client.close()
        except Exception as e:  # noqa: BLE001
            log.warning("OpenLineage transport did not close: %s", redact(str(e)))


def emitter_for(cfg: WorkflowConfig, run_id: str, **kwargs: Any) -> LineageEmitter | None:
    """The run's emitter when ``provenance.openlineage`` is set, else None (kwargs: LineageEmitter's)."""
    ol = cfg.provenance.openlineage
    return LineageEmitter(ol, cfg, run_id, **kwargs) if ol is not None else None


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None
