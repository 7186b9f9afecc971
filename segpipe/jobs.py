"""Cluster submission through the Ray Jobs API: bundle a workflow, submit, follow, stop.

A submitted job carries what it needs in its runtime_env: a working_dir with the resolved
workflow and the zoo entries it names (cards and weights, verified here first), and, unless told
otherwise, this segpipe package (py_modules) so the cluster runs the submitter's code version.
Credentials never travel with a job: the cluster's nodes supply them (environment, AWS chain).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Callable

import yaml

from segpipe.config import WorkflowConfig

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _is_local(uri: str) -> bool:
    return "://" not in uri


def bundle(cfg: WorkflowConfig, dest: Path, run_id: str) -> tuple[str, Path]:
    """Write the job's working_dir under ``dest``: ``workflow.yaml`` (``cfg`` with models and the
    refiner pointing at bundled cards, local paths made absolute, ``pipeline.ray_address: auto``)
    and ``zoo/<name>/`` per card. Returns (entrypoint command, the working_dir)."""
    from segpipe.modeling.zoo import load_card, verified_weights, weights_path

    dest.mkdir(parents=True, exist_ok=True)
    data = cfg.model_dump(mode="json")
    refs = [("models", i, m["model"]) for i, m in enumerate(data["models"])]
    if data.get("refine"):
        refs.append(("refine", None, data["refine"]["model"]))
    for section, i, ref in refs:
        card, path = load_card(ref)
        verified_weights(card, path)
        folder = dest / "zoo" / card.name
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, folder / "card.yaml")
        w = weights_path(card, path)
        if Path(card.weights.file).is_absolute():
            raise ValueError(f"{section}: card {card.name} names absolute weights {w}; bundle a card with relative weights")
        (folder / card.weights.file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(w, folder / card.weights.file)
        target = data["models"][i] if section == "models" else data["refine"]
        target["model"] = f"zoo/{card.name}/card.yaml"
    for sec, key in (("source", "uri"), ("output", "uri"), ("eval", "gt")):
        v = data[sec].get(key)
        if v and _is_local(v):
            data[sec][key] = str(Path(v).expanduser().resolve())
    data["pipeline"]["ray_address"] = "auto"
    WorkflowConfig.model_validate(data)  # what the job will read must still be valid
    (dest / "workflow.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return f"python -m segpipe.cli run workflow.yaml --run-id {run_id}", dest


def runtime_env(working_dir: Path, ship_code: bool) -> dict:
    """The job's runtime_env: the bundle, and this segpipe package unless ``ship_code`` is False."""
    import segpipe

    env: dict = {"working_dir": str(working_dir)}
    if ship_code:
        env["py_modules"] = [str(Path(segpipe.__file__).resolve().parent)]
    return env


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit(cfg: WorkflowConfig, address: str, run_id: str, *, staging: Path, ship_code: bool = True,
           entrypoint_num_cpus: float | None = None, entrypoint_num_gpus: float | None = None,
           entrypoint_resources: dict[str, float] | None = None, agent_wait_s: float = 120.0) -> str:
    """Submit ``cfg`` as a Ray job named ``segpipe-<run_id>``; returns the job id. Waits up to
    ``agent_wait_s`` for the head's job agent when the cluster reports none available yet."""
    entrypoint, wd = bundle(cfg, staging, run_id)
    kwargs = {k: v for k, v in (("entrypoint_num_cpus", entrypoint_num_cpus), ("entrypoint_num_gpus", entrypoint_num_gpus),
                                ("entrypoint_resources", entrypoint_resources)) if v}
    c = client(address)
    t0 = time.time()
    while True:  # a head that has just started may not have its job agent yet
        try:
            return c.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(wd, ship_code),
                                submission_id=f"segpipe-{run_id}", metadata={"segpipe_run_id": run_id, "workflow": cfg.name},
                                **kwargs)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() - t0 > agent_wait_s:
                raise
            time.sleep(2.0)


def follow(address: str, job_id: str, emit: Callable[[str], None]) -> str:
    """Stream the job's logs to ``emit`` until it ends; returns its final status."""
    c = client(address)

    async def _tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            emit(chunk.rstrip("\n"))

    asyncio.run(_tail())
    return wait(address, job_id, timeout=60)


def wait(address: str, job_id: str, timeout: float = 3600, poll: float = 1.0) -> str:
    """Poll until the job reaches a terminal status (or ``timeout`` s); returns the status."""
    c = client(address)
    t0 = time.time()
    while True:
        s = c.get_job_status(job_id)
        status = str(getattr(s, "value", s))
        if status in TERMINAL or time.time() - t0 > timeout:
            return status
        time.sleep(poll)
