"""Compose and execute a workflow on Ray Data: list -> read+decode -> model actors -> sinks.

The driver consumes the stream and commits each shard as soon as all its rows have arrived, so
memory is bounded by the pipeline window plus one shard of predictions, not by the dataset.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from segpipe.config import ModelCard, WorkflowConfig
from segpipe.io.listing import SourceFile, as_rows, fingerprint, list_source

Progress = Callable[[str], None]


class SourceEmptyError(ValueError):
    """The source matched no files."""


class WorkflowError(ValueError):
    """The workflow is valid on its own but not with the cards it names (field path first)."""


class ErrorBudgetExceeded(RuntimeError):
    """More inputs failed than ``pipeline.max_error_rate`` allows; the run stops early."""


@dataclass
class RunResult:
    run_id: str
    output_uri: str
    status: str  # 'complete' or 'failed'
    counts: dict
    wall_s: float
    images_per_s: float
    stage_ms: dict
    eval: dict | None = None
    stage_cpu_ms: dict = field(default_factory=dict)  # process CPU ms of the models, ensemble and refine
    reason: str | None = None
    skipped_shards: list[int] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)  # progress.stage_table: per-stage account
    efficiency: dict | None = None
    pseudo: dict | None = None  # the pseudo-label set's dataset card (workflow pseudo_label)
    bounds: dict = field(default_factory=dict)  # per model that hit it: {"bound", "per", "images", "advice"} (``bound_account``)


@dataclass
class StreamStats:
    """What the driver measures while it drains the stream (ms summed over images)."""

    stage_ms: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    forward_ms: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    forward_cpu_ms: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    stage_cpu_ms: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # process CPU: models, ensemble, refine
    driver_wait_ms: float = 0.0  # blocked on the iterator for the next row
    first_row_s: float | None = None  # from the start of streaming to the first row
    exec_wall_s: float = 0.0  # from the start of streaming to the last row
    done: int = 0  # images committed so far
    at_bound: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # per model: images that reached its bound
    bound: dict[str, int] = field(default_factory=dict)  # per model: its instance bound, as the model stage reported it


NON_MODEL_STAGES = ("read", "decode", "ensemble", "refine", "write")


def post_model_overhead(stage_ms: dict[str, float]) -> tuple[float, float, float] | None:
    """(ensemble + refine ms, that / the models' ms, the models' ms) from a run's summed stage
    times, wall (``timings_ms``) or process CPU (``cpu_ms``) (keys: the non-model stages and one
    per model); None without an ensemble or refine."""
    post = sum(stage_ms.get(k, 0.0) for k in ("ensemble", "refine"))
    if not any(k in stage_ms for k in ("ensemble", "refine")):
        return None
    models = sum(v for k, v in stage_ms.items() if k not in NON_MODEL_STAGES)
    return post, (post / models if models > 0 else float("inf")), models


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


@dataclass
class _Model:
    ref: str
    card: ModelCard
    version: str


def _verified(ref: str) -> _Model:
    """Resolve a card and verify its weights on the driver: a bad zoo entry fails before Ray starts."""
    from segpipe.modeling.zoo import load_card, verified_weights

    card, path = load_card(ref)
    verified_weights(card, path)
    return _Model(ref=str(path), card=card, version=card.version())


def _load_refiner(cfg: WorkflowConfig) -> _Model | None:
    if cfg.refine is None:
        return None
    r = _verified(cfg.refine.model)
    if r.card.builder != "pointrend":
        raise WorkflowError(f"refine.model: {r.card.name} is a {r.card.builder} model, not a refiner (pointrend)")
    return r


def _load_scorer(cfg: WorkflowConfig, models: list[_Model]):
    """``ensemble.scorer``'s verified weights (``ScorerWeights``), or None; it must have been
    trained for exactly the workflow's models (its features are theirs)."""
    if cfg.ensemble is None or cfg.ensemble.scorer is None:
        return None
    from segpipe.ensemble.scorer import load_scorer

    s = _verified(cfg.ensemble.scorer)
    if s.card.builder != "scorer":
        raise WorkflowError(f"ensemble.scorer: {s.card.name} is a {s.card.builder} model, not an ensemble scorer")
    weights = load_scorer(s.ref)
    names = sorted(m.card.name for m in models)
    if sorted(weights.models) != names:
        raise WorkflowError(f"ensemble.scorer: {s.card.name} was trained for the models {sorted(weights.models)}, the "
                            f"workflow runs {names}")
    return weights


def _load_models(cfg: WorkflowConfig) -> list[_Model]:
    """Every model stage's card, verified (see ``_verified``); they must share one category set."""
    out = [_verified(m.model) for m in cfg.models]
    names = [m.card.name for m in out]
    if len(set(names)) != len(names):
        raise WorkflowError(f"models: two stages load cards with the same name ({names})")
    cats = [c.model_dump() for c in out[0].card.categories]
    for m in out[1:]:
        if [c.model_dump() for c in m.card.categories] != cats:
            raise WorkflowError(f"models: {m.card.name} predicts other categories than {out[0].card.name}; "
                             "models of one workflow must share a category set")
    return out


def _primary(cfg: WorkflowConfig, models: list[_Model]) -> _Model:
    """The model whose predictions fill instances/ without an ensemble (output.primary, default
    the first); with one, the model whose categories name the fused instances (the first)."""
    if cfg.output.primary in (None, "ensemble"):
        return models[0]
    for stage, m in zip(cfg.models, models):
        if cfg.output.primary in (m.card.name, stage.model):
            return m
    raise WorkflowError(f"output.primary: {cfg.output.primary!r} is none of the workflow's models "
                     f"({', '.join(m.card.name for m in models)})")


def _init_ray(cfg: WorkflowConfig) -> bool:
    """Start an embedded Ray unless one is already up (or connect to ``ray_address``). Returns True if started here."""
    import ray

    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False, ignore_reinit_error=True)
    if cfg.pipeline.ray_address:
        ray.init(address=cfg.pipeline.ray_address, **kwargs)
    else:
        ray.init(address="local", num_cpus=cfg.pipeline.ray_num_cpus, **kwargs)
    return True


def run_workflow(cfg: WorkflowConfig, *, run_id: str | None = None, progress: Progress = print) -> RunResult:
    """Run ``cfg`` end to end; resumes when ``run_id`` names a run already in ``output.uri``."""
    import ray

    from segpipe.evaluation import evaluate_output
    from segpipe.provenance.manifest import code, environment
    from segpipe.sinks.coco import write_coco
    from segpipe.sinks.writer import RunWriter, read_markers

    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    run_id = run_id or new_run_id()
    models = _load_models(cfg)
    primary = _primary(cfg, models)
    refiner = _load_refiner(cfg)
    scorer = _load_scorer(cfg, models)
    if cfg.pseudo_label is not None:
        names = {c.name for c in primary.card.categories}
        unknown = sorted(set(cfg.pseudo_label.per_class) - names)
        if unknown:
            raise WorkflowError(f"pseudo_label.per_class: {unknown[0]!r} is not a category of the models "
                                f"({', '.join(sorted(names))})")
    src_opts = cfg.source.storage.options(cfg.source.uri)
    files = list_source(cfg.source.uri, patterns=cfg.source.patterns, recursive=cfg.source.recursive,
                        max_images=cfg.source.max_images, shard_size=cfg.source.shard_size, storage_options=src_opts)
    if not files:
        raise SourceEmptyError(f"source {cfg.source.uri!r} has no files matching {cfg.source.patterns}")
    inc = None
    if cfg.incremental is not None:
        from segpipe.pipeline import incremental

        inc = incremental.prepare(cfg, run_id, files, [(m.card.name, m.version) for m in models])
        cfg, files = inc.cfg, inc.files
        c = inc.plan.counts
        progress(f"incremental: {c['listed']} listed; {c['new']} new, {c['changed']} changed, {c['partial']} missing a "
                 f"model version, {c['retry']} retried, {c['skipped']} already labeled")
    writer = RunWriter(cfg.output.uri, run_id, storage_options=cfg.output.storage.options(cfg.output.uri))
    plan = _plan(cfg, files, models, refiner)
    if scorer is not None:
        plan["scorer"] = scorer.version
    if inc is not None:
        plan["incremental"] = inc.digest()
    committed = writer.start(plan)
    todo = [f for f in files if f.shard not in committed]
    expected: dict[int, int] = defaultdict(int)
    for f in todo:
        expected[f.shard] += 1
    n_shards = len({f.shard for f in files})
    if inc is not None and not files:
        progress(f"run {run_id}: nothing new to label")
    progress(f"run {run_id}: {len(files)} images in {n_shards} shards from {cfg.source.uri}"
             + (f" ({len(committed)} shards already committed, resuming)" if committed else ""))
    source = "ensemble" if cfg.ensemble is not None else primary.card.name
    progress("models: " + ", ".join(m.version for m in models) + (f" (instances/ from {source})" if len(models) > 1 else "")
             + (f", refined by {refiner.version}" if refiner else ""))

    from segpipe.provenance.lineage import emitter_for

    lineage = emitter_for(cfg, run_id, models=[(m.card.name, m.version) for m in models],
                          refiner=(refiner.card.name, refiner.version) if refiner else None, started=started)
    if lineage is not None:
        lineage.start()
    started_ray = _init_ray(cfg)
    try:
        resources = ray.cluster_resources()
        has_gpu = resources.get("GPU", 0) > 0
        cluster_cpus = float(resources.get("CPU", 0)) or None
        if cfg.pipeline.ray_address is None:
            _check_cpus(cfg, cluster_cpus or 0.0)
        device_kind = "cuda" if has_gpu else "cpu"
        stats = StreamStats()
        stage_ms = stats.stage_ms
        dropped = 0
        snapshot: dict = {}
        if todo:
            meter, reporter = _start_progress(cfg, models, refiner, len(todo), stats, progress)
            try:
                ds = _build_dataset(cfg, models, todo, has_gpu, refiner, source, inc, meter, scorer)
                dropped = _consume(cfg, ds, writer, run_id, models, primary, refiner, expected, stats, progress, t0,
                                   _totals(committed))
            finally:
                snapshot = reporter.stop() if reporter is not None else _snapshot(meter)
    except ErrorBudgetExceeded as e:
        writer.abort()
        stopped = str(e)
        progress(f"run {run_id}: stopping: {stopped}")
    except BaseException as e:
        writer.abort()
        if lineage is not None:
            lineage.fail(f"{type(e).__name__}: {e}")
        raise
    else:
        stopped = None
    finally:
        if started_ray:
            ray.shutdown()

    bounds = bound_account(stats, cfg.tiling.mode)
    for name, b in bounds.items():
        progress(f"warning: {name}: {b['images']} image(s) reached its bound of {b['bound']} instances per "
                 f"{b['per']}; objects past it are missing. {b['advice']}")
    markers = read_markers(writer.fs, writer.root)
    counts = _totals(markers)
    processed_now = sum(int(mk["counts"]["images"]) for s, mk in markers.items() if s not in committed)
    stages, efficiency = _stage_account(stats, snapshot, models, refiner, cfg, processed_now, cluster_cpus)
    cats = [c.model_dump() for c in primary.card.categories]
    coco_counts = write_coco(writer, cats) if cfg.output.coco else None
    wall = time.perf_counter() - t0
    error_rate = counts["errors"] / max(counts["images"], 1)
    status, reason = "complete", None
    if stopped:
        status, reason = "failed", stopped
    elif error_rate > cfg.pipeline.max_error_rate:
        status = "failed"
        reason = f"error rate {error_rate:.3f} exceeds pipeline.max_error_rate={cfg.pipeline.max_error_rate}"
    eval_stats = None
    if cfg.eval.gt and not stopped and counts["ok"]:
        from segpipe.data.coco import read_json

        gt = read_json(cfg.eval.gt)  # read once, scored once per table/model
        eval_stats = evaluate_output(cfg.output.uri, gt, max_dets=cfg.eval.max_dets, fs=writer.fs)
        eval_stats["source"] = source
        if len(models) > 1:
            eval_stats["per_model"] = {
                m.card.name: evaluate_output(cfg.output.uri, gt, max_dets=cfg.eval.max_dets, table="predictions",
                                             source=m.card.name, fs=writer.fs)
                for m in models
            }
    result = RunResult(
        run_id=run_id, output_uri=cfg.output.uri, status=status, counts=counts, wall_s=wall,
        images_per_s=processed_now / wall if wall > 0 else 0.0, stage_ms=dict(stage_ms), stage_cpu_ms=dict(stats.stage_cpu_ms),
        eval=eval_stats, reason=reason, skipped_shards=sorted(committed), stages=stages, efficiency=efficiency,
        bounds=bounds,
    )
    manifest = {
        "run_id": run_id,
        "status": status,
        "reason": reason,
        "started": started.isoformat(),
        "ended": datetime.now(timezone.utc).isoformat(),
        "wall_s": round(wall, 3),
        "workflow": {"config": cfg.model_dump(mode="json"), "sha256": cfg.digest()},
        "code": code(),
        "environment": environment(device_kind),
        "models": [{"name": m.card.name, "version": m.version, "card": m.card.model_dump(mode="json")} for m in models],
        "refiner": {"name": refiner.card.name, "version": refiner.version, "card": refiner.card.model_dump(mode="json")}
        if refiner else None,
        "scorer": {"name": cfg.ensemble.scorer, "version": scorer.version} if scorer is not None else None,
        "input": {"uri": cfg.source.uri, "n_files": len(files), "fingerprint": fingerprint(files), "n_shards": n_shards},
        "counts": counts,
        "timings_ms": {k: round(v, 1) for k, v in stage_ms.items()},
        "cpu_ms": {k: round(v, 1) for k, v in stats.stage_cpu_ms.items()},
        "stages": stages,
        "efficiency": efficiency,
        "images_per_s": round(result.images_per_s, 3),
        "shards": sorted(markers),
        "resumed_shards": sorted(committed),
        "duplicate_rows_dropped": dropped,
        "bounds": bounds,
        "outputs": {"tables": ["instances", "predictions", "images", "errors"], "instances_source": source,
                    "refined_by": refiner.version if refiner else None,
                    "coco": "coco/instances.json" if coco_counts else None},
        "eval": eval_stats,
    }
    if cfg.pseudo_label is not None and status == "complete":
        from segpipe.sinks.pseudo import write_pseudo_labels

        result.pseudo = write_pseudo_labels(cfg.output.uri, cfg.pseudo_label, manifest=manifest, fs=writer.fs)
        manifest["outputs"]["pseudo_labels"] = {"dir": cfg.pseudo_label.out, "sha256": result.pseudo["sha256"],
                                                "counts": result.pseudo["counts"]}
    writer.finish(manifest)
    if lineage is not None:
        lineage.complete(manifest) if status == "complete" else lineage.fail(reason or status, manifest)
    if inc is not None:
        from segpipe.pipeline.incremental import commit

        rec = commit(inc, run_id, [(m.card.name, m.version) for m in models], manifest, started)
        progress(f"ledger: run {run_id} labeled {rec['counts']['labeled']} inputs ({rec['counts']['model_runs']} model runs); "
                 f"{rec['counts']['skipped']} skipped as already labeled")
    return result


def bound_account(stats: StreamStats, tiling_mode: str) -> dict[str, dict]:
    """Per model whose instance bound was reached in this invocation's images: the bound, what it
    applies to (``per``: an image, or with tiling an image or tile), how many images reached it,
    and what to do about it."""
    if tiling_mode == "off":
        per, advice = "image", "Tile crowded images (workflow tiling.mode: auto or on)."
    else:
        per, advice = "image or tile", "A smaller tiling.tile gives each tile fewer objects."
    return {name: {"bound": stats.bound[name], "per": per, "images": n, "advice": advice}
            for name, n in sorted(stats.at_bound.items()) if n}


def _start_progress(cfg: WorkflowConfig, models: list[_Model], refiner: _Model | None, total: int,
                    stats: StreamStats, progress: Progress):
    """The stage meter actor (zero CPUs) and, in ``lines`` mode, the thread that prints from it.
    ``bars`` hands live progress to Ray Data's operator bars (set in ``_build_dataset``)."""
    import sys

    import ray

    from segpipe.pipeline.progress import Reporter, StageMeter

    meter = ray.remote(num_cpus=0)(StageMeter).remote()
    if _progress_mode(cfg, sys.stdout) != "lines":
        return meter, None
    order = ["read", *[m.card.name for m in models]] + (["ensemble"] if cfg.ensemble is not None else []) \
        + (["refine"] if refiner is not None else [])
    reporter = Reporter(meter, order, total, cfg.pipeline.progress_interval_s, progress, lambda: stats.done)
    return meter, reporter.start()


def _progress_mode(cfg: WorkflowConfig, stream) -> str:
    mode = cfg.pipeline.progress
    if mode == "auto":
        return "bars" if getattr(stream, "isatty", lambda: False)() else "lines"
    return mode


def _snapshot(meter) -> dict:
    import ray

    try:
        return ray.get(meter.snapshot.remote(), timeout=10)
    except Exception:  # noqa: BLE001 - the account falls back to the configured pool sizes
        return {}


def _stage_account(stats: StreamStats, snapshot: dict, models: list[_Model], refiner: _Model | None,
                   cfg: WorkflowConfig, images: int, cpus: float | None) -> tuple[list[dict], dict | None]:
    """progress.stage_table over this run's stream: actor stages count their pool's size, task
    stages the workers the meter saw."""
    from segpipe.pipeline.progress import stage_table

    if not images:
        return [], None
    active = {k: v["workers"] for k, v in snapshot.items()}
    workers, kinds = dict(active), {"write": "driver"}
    for stage, m in zip(cfg.models, models):
        kinds[m.card.name] = "actor"
        workers[m.card.name] = stage.concurrency
    if refiner is not None:
        kinds["refine"] = "actor"
        workers["refine"] = cfg.refine.concurrency
    return stage_table(dict(stats.stage_ms), dict(stats.forward_ms), [m.card.name for m in models], images,
                       stats.exec_wall_s, workers, kinds, stats.driver_wait_ms, stats.first_row_s, active,
                       forward_cpu_ms=dict(stats.forward_cpu_ms), cpus=cpus)


def _plan(cfg: WorkflowConfig, files: list[SourceFile], models: list[_Model], refiner: _Model | None) -> dict:
    """What fixes a run's rows: its inputs and their sharding, the model and refiner versions, and
    the settings that shape predictions and filter rows. A resume must bring the same."""
    return {
        "input": {"uri": cfg.source.uri, "n_files": len(files), "fingerprint": fingerprint(files),
                  "shard_size": cfg.source.shard_size},
        "models": [[m.version, s.score_threshold] for m, s in zip(models, cfg.models)],
        "refiner": refiner.version if refiner else None,
        "decode": cfg.decode.model_dump(mode="json"),
        "tiling": cfg.tiling.model_dump(mode="json"),
        "ensemble": cfg.ensemble.model_dump(mode="json") if cfg.ensemble else None,
        "output": cfg.output.model_dump(mode="json", include={"primary", "min_score", "min_confidence", "min_votes"}),
    }


def _totals(markers: dict[int, dict]) -> dict:
    keys = ("images", "ok", "errors", "instances")
    out = {k: sum(int(m["counts"][k]) for m in markers.values()) for k in keys}
    by_type: dict[str, int] = defaultdict(int)
    for m in markers.values():
        for k, v in m["counts"].get("errors_by_type", {}).items():
            by_type[k] += v
    out["errors_by_type"] = dict(by_type)
    return out


def _check_cpus(cfg: WorkflowConfig, available: float) -> None:
    """On an embedded Ray, actor pools hold their CPUs for the whole run: if they leave no room
    for a read task or a fusion task, the stream would wait forever. Fail instead."""
    pools = sum(m.num_cpus * m.concurrency for m in cfg.models)
    if cfg.refine is not None:
        pools += cfg.refine.num_cpus * cfg.refine.concurrency
    task = max(cfg.pipeline.read_num_cpus, cfg.pipeline.ensemble_num_cpus if cfg.ensemble is not None else 0.0)
    if pools + task > available + 1e-9:
        raise WorkflowError(f"models.*.num_cpus: the actor pools hold {pools:g} CPUs and a read or fuse task needs "
                            f"{task:g} more, but this Ray has {available:g}; lower num_cpus or concurrency")


def _gpus(setting, has_gpu: bool) -> float:
    return (1.0 if has_gpu else 0.0) if setting == "auto" else float(setting)


def _build_dataset(cfg: WorkflowConfig, models: list[_Model], todo: list[SourceFile], has_gpu: bool,
                   refiner: _Model | None, source: str, inc=None, meter=None, scorer=None):
    import ray

    from segpipe.pipeline.stages import ModelStage, RefineStage, fuse_batch, read_decode

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    import sys

    bars = _progress_mode(cfg, sys.stdout) == "bars"  # else segpipe prints its own per-stage lines
    ctx.enable_progress_bars = bars
    ctx.enable_operator_progress_bars = bars
    ctx.enable_rich_progress_bars, ctx.use_ray_tqdm = bars, not bars  # Ray Data's rich per-operator UI
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # full Ray Data logs stay in the session log dir
    rows = as_rows(todo)
    if inc is not None:
        from segpipe.pipeline.incremental import input_rows

        rows = input_rows(inc, rows, [m.card.name for m in models])
    # About one read batch per block, so decoding spreads over tasks and a block never holds many images.
    n_blocks = max(1, min(-(-len(rows) // cfg.pipeline.read_batch_size), 5000))
    ds = ray.data.from_items(rows, override_num_blocks=n_blocks)
    ds = ds.map_batches(
        read_decode,
        fn_kwargs={"max_pixels": cfg.decode.max_pixels, "max_bytes": cfg.decode.max_bytes,
                   "storage_options": cfg.source.storage.options(cfg.source.uri), "meter": meter},
        batch_size=cfg.pipeline.read_batch_size,
        num_cpus=cfg.pipeline.read_num_cpus,
        batch_format="numpy",
    )
    for k, (stage_cfg, m) in enumerate(zip(cfg.models, models)):
        n_gpus = _gpus(stage_cfg.num_gpus, has_gpu)
        ds = ds.map_batches(
            ModelStage,
            fn_constructor_kwargs={
                "model_ref": m.ref,
                "model_name": m.card.name,
                "use_gpu": n_gpus > 0,
                "num_threads": int(stage_cfg.num_cpus),
                "score_threshold": stage_cfg.score_threshold,
                "keep_image": k < len(models) - 1 or refiner is not None,  # the refiner reads the image
                "tiling": cfg.tiling.model_dump(mode="json"),
                "batch_size": stage_cfg.batch_size,
                "meter": meter,
            },
            compute=ray.data.ActorPoolStrategy(size=stage_cfg.concurrency),
            batch_size=stage_cfg.batch_size,
            num_cpus=stage_cfg.num_cpus,
            num_gpus=n_gpus,
            batch_format="numpy",
            **stage_cfg.placement(),
        )
    if cfg.ensemble is not None:
        ds = ds.map_batches(
            fuse_batch,
            fn_kwargs={"models": [[m.card.name, m.version] for m in models], "config": cfg.ensemble.model_dump(mode="json"),
                       "meter": meter, "scorer": scorer},
            batch_size=cfg.pipeline.read_batch_size,
            num_cpus=cfg.pipeline.ensemble_num_cpus,
            batch_format="numpy",
        )
    if refiner is not None:
        rc = cfg.refine
        n_gpus = _gpus(rc.num_gpus, has_gpu)
        ds = ds.map_batches(
            RefineStage,
            fn_constructor_kwargs={"model_ref": refiner.ref, "source": source, "use_gpu": n_gpus > 0,
                                   "num_threads": int(rc.num_cpus), "meter": meter, "min_score": rc.min_score},
            compute=ray.data.ActorPoolStrategy(size=rc.concurrency),
            batch_size=rc.batch_size,
            num_cpus=rc.num_cpus,
            num_gpus=n_gpus,
            batch_format="numpy",
        )
    return ds


def _consume(cfg, ds, writer, run_id, models, primary, refiner, expected, stats: StreamStats, progress, t0,
             before: dict) -> int:
    """Drain the stream; commit each shard when its last row arrives. Every model's instances go
    to predictions/; instances/ gets the ensemble's (with ``cfg.ensemble``) or the primary model's,
    filtered by the output thresholds. ``before``: the totals of shards committed earlier (resume).

    Raises ErrorBudgetExceeded once at least ``pipeline.error_budget_min_images`` images are
    committed and more than ``pipeline.max_error_rate`` of them failed. Returns how many rows
    arrived twice (from a retried task) and were dropped."""
    from segpipe.ensemble.fuse import decode_fused
    from segpipe.sinks.tables import ensemble_rows, instance_rows, to_table
    from segpipe.structures import Instances

    names = {c.id: c.name for c in primary.card.categories}
    stage_ms, forward_ms = stats.stage_ms, stats.forward_ms
    pending: dict[int, dict[str, list]] = defaultdict(lambda: {"instances": [], "predictions": [], "images": [], "errors": []})
    seen: dict[int, set[int]] = defaultdict(set)  # image ids received per open shard
    closed: set[int] = set()
    dropped = 0
    total = sum(expected.values())
    done = 0
    n_images, n_errors = int(before["images"]), int(before["errors"])
    t_stream = time.perf_counter()
    rows_iter = iter(ds.iter_rows())
    while True:
        tw = time.perf_counter()
        row = next(rows_iter, None)
        now = time.perf_counter()
        stats.driver_wait_ms += (now - tw) * 1000
        stats.exec_wall_s = now - t_stream
        if row is None:
            break
        if stats.first_row_s is None:
            stats.first_row_s = now - t_stream
        shard = int(row["shard"])
        if shard in closed or int(row["image_id"]) in seen[shard]:
            dropped += 1  # a retried task delivered a row twice: keep the first
            continue
        seen[shard].add(int(row["image_id"]))
        tables = pending[shard]
        ok = not row["error_type"]
        n_inst = 0
        stage_ms["read"] += float(row["ms:read"])
        stage_ms["decode"] += float(row["ms:decode"])
        for m in models:
            stage_ms[m.card.name] += float(row[f"ms:{m.card.name}"])
            forward_ms[m.card.name] += float(row[f"fwd:{m.card.name}"])
            stats.forward_cpu_ms[m.card.name] += float(row[f"cpu:{m.card.name}"])
            stats.stage_cpu_ms[m.card.name] += float(row[f"cpu_ms:{m.card.name}"])
            cap = int(row.get(f"bound:{m.card.name}", 0))
            if cap:
                stats.at_bound[m.card.name] += 1
                stats.bound[m.card.name] = cap
        if cfg.ensemble is not None:
            stage_ms["ensemble"] += float(row["ms:ensemble"])
            stats.stage_cpu_ms["ensemble"] += float(row["cpu_ms:ensemble"])
        if refiner is not None:
            stage_ms["refine"] += float(row["ms:refine"])
            stats.stage_cpu_ms["refine"] += float(row["cpu_ms:refine"])
        if ok:
            for m in models:
                cached = bool(row.get(f"cached:{m.card.name}", False))  # an earlier run's: in its predictions/
                if cached and not (m is primary and cfg.ensemble is None):
                    continue
                inst = Instances.from_bytes(row[f"pred:{m.card.name}"])
                rows = instance_rows(inst, run_id=run_id, image_id=int(row["image_id"]), image_uri=row["uri"],
                                     model=m.card.name, model_version=m.version, category_names=names,
                                     min_score=cfg.output.min_score)
                if not cached:
                    tables["predictions"].extend(rows)
                if m is primary and cfg.ensemble is None:
                    if refiner is not None:
                        rows = instance_rows(Instances.from_bytes(row["pred:refined"]), run_id=run_id, image_id=int(row["image_id"]),
                                             image_uri=row["uri"], model=m.card.name, model_version=m.version,
                                             category_names=names, min_score=cfg.output.min_score)
                    kept = [r for r in rows if r["confidence"] >= cfg.output.min_confidence]
                    tables["instances"].extend(kept)
                    n_inst = len(kept)
            if cfg.ensemble is not None:
                # Refined: the refined instances with the fused members, votes and IoUs (those to
                # the fused mask before refinement); the unrefined fused bytes are not decoded.
                refined = Instances.from_bytes(row["pred:refined"]) if refiner is not None else None
                fused = decode_fused(row["pred:ensemble"], row["meta:ensemble"], refined)
                rows = ensemble_rows(fused, run_id=run_id, image_id=int(row["image_id"]), image_uri=row["uri"],
                                     category_names=names, min_score=cfg.output.min_score,
                                     min_confidence=cfg.output.min_confidence, min_votes=cfg.output.min_votes)
                tables["instances"].extend(rows)
                n_inst = len(rows)
            if refiner is not None:
                for r in tables["instances"][len(tables["instances"]) - n_inst:]:
                    r["refined_by"] = refiner.version
                    r["model_versions"] = sorted(set(r["model_versions"]) | {refiner.version})
        else:
            tables["errors"].append({"run_id": run_id, "image_id": int(row["image_id"]), "uri": row["uri"],
                                     "stage": row["error_stage"], "error_type": row["error_type"], "message": row["error_message"]})
        tables["images"].append({
            "run_id": run_id, "image_id": int(row["image_id"]), "uri": row["uri"], "relpath": row["relpath"],
            "width": int(row["width"]) if ok else None, "height": int(row["height"]) if ok else None,
            "sha256": row["sha256"] or None, "size_bytes": int(row["size"]), "source_tag": row["tag"],
            "status": "ok" if ok else "error", "n_instances": n_inst, "shard": shard,
        })
        if len(seen[shard]) == expected[shard]:
            t = pending.pop(shard)
            closed.add(shard)
            del seen[shard]
            errs = defaultdict(int)
            for e in t["errors"]:
                errs[e["error_type"]] += 1
            counts = {"images": len(t["images"]), "ok": len(t["images"]) - len(t["errors"]), "errors": len(t["errors"]),
                      "instances": len(t["instances"]), "errors_by_type": dict(errs)}
            tw = time.perf_counter()
            writer.write_shard(shard, {k: to_table(k, v) for k, v in t.items()}, {"counts": counts})
            stage_ms["write"] += (time.perf_counter() - tw) * 1000
            done += counts["images"]
            stats.done = done
            el = time.perf_counter() - t0
            rate = done / el if el > 0 else 0.0
            eta = (total - done) / rate if rate > 0 else 0.0
            progress(f"[{done}/{total}] shard {shard} committed: {counts['ok']} ok, {counts['errors']} errors, "
                     f"{counts['instances']} instances | {rate:.1f} img/s, ETA {eta:.0f}s")
            n_images += counts["images"]
            n_errors += counts["errors"]
            budget = cfg.pipeline.max_error_rate
            if n_images >= cfg.pipeline.error_budget_min_images and n_errors > budget * n_images and done < total:
                raise ErrorBudgetExceeded(f"{n_errors} of {n_images} images failed ({n_errors / n_images:.3f}), over "
                                          f"pipeline.max_error_rate={budget}; stopped early, committed shards are kept "
                                          f"(rerun with --run-id {run_id} to go on)")
    if pending:
        raise RuntimeError(f"stream ended with incomplete shards {sorted(pending)}")
    return dropped
