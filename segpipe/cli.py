"""The segpipe command line: one sub-app per noun, no pipeline logic, heavy imports lazy."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="segpipe: label image collections with instance masks, on Ray.", no_args_is_help=True, add_completion=False)
data_app = typer.Typer(help="Datasets: generate the synthetic shapes domain.", no_args_is_help=True)
models_app = typer.Typer(help="The model zoo: list, show and evaluate cards.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")

EXIT_CONFIG = 2


def _fail(message: str, code: int = EXIT_CONFIG) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _config_error(exc: Exception) -> str:
    """A pydantic ValidationError (or ValueError) as 'field.path: reason' lines."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        lines = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "(root)"
            lines.append(f"  {loc}: {e['msg']}")
        return "invalid config:\n" + "\n".join(lines)
    return f"invalid config: {exc}"


# --- data -----------------------------------------------------------------------------------


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="output folder (images/ + annotations.json)")],
    n: Annotated[int, typer.Option(help="number of images")] = 100,
    seed: Annotated[int, typer.Option(help="random seed (datasets are a pure function of it)")] = 0,
    size: Annotated[int, typer.Option(help="image height and width, pixels")] = 256,
    min_objects: Annotated[int, typer.Option(help="fewest objects per image")] = 3,
    max_objects: Annotated[int, typer.Option(help="most objects per image")] = 12,
    min_size: Annotated[float, typer.Option(help="smallest object diameter, pixels")] = 8.0,
    max_size: Annotated[Optional[float], typer.Option(help="largest object diameter (default: half the side)")] = None,
) -> None:
    """Write a synthetic COCO dataset of the shapes domain (large images with many small objects:
    e.g. --size 2048 --min-objects 150 --max-objects 250 --max-size 40)."""
    from pydantic import ValidationError

    from segpipe.data.synthetic import SynthSpec, write_dataset

    try:
        spec = SynthSpec(n=n, seed=seed, height=size, width=size, min_objects=min_objects, max_objects=max_objects,
                         min_size=min_size, max_size=max_size)
    except ValidationError as e:
        _fail(_config_error(e))
    path = write_dataset(spec, out)
    n_ann = len(json.loads(path.read_text())["annotations"])
    typer.echo(f"wrote {n} images, {n_ann} instances: {path}")


@data_app.command("polar-bound")
def data_polar_bound(
    gt: Annotated[str, typer.Option(help="COCO ground truth json (path or URI)")],
    n_rays: Annotated[int, typer.Option(help="rays per polygon")] = 36,
    max_dets: Annotated[int, typer.Option()] = 100,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The mask AP ceiling of a polar representation: every ground-truth mask re-drawn as its
    n-ray polygon from the mass centre, scored against the ground truth."""
    from segpipe.evaluation import evaluate, format_table, load_gt, polar_bound_results

    if n_rays < 4:
        _fail("--n-rays: must be at least 4")
    g = load_gt(gt)
    stats = evaluate(g, polar_bound_results(g, n_rays), max_dets=max_dets)
    stats["n_rays"] = n_rays
    typer.echo(json.dumps(stats) if as_json else f"polar ceiling, {n_rays} rays\n" + format_table(stats))


# --- train ----------------------------------------------------------------------------------


def _is_coco_file(value: str) -> bool:
    """``--data`` names a COCO file (``.json``, optionally ``@WEIGHT``) rather than a domain folder."""
    return value.rpartition("@")[0].endswith(".json") or value.endswith(".json")


@app.command("train")
def train_cmd(
    method: Annotated[str, typer.Argument(help="maskrcnn | polarmask | spatialemb | discloss | rsis | pointrend | scorer")],
    domain: Annotated[str, typer.Option(help="shapes (generated) | nuclei (COCO file + images)")] = "shapes",
    data: Annotated[Optional[list[str]], typer.Option(help="a COCO training file A.json or A.json@WEIGHT (repeatable: "
                                                      "trains on the weighted mix instead of the domain's train set; "
                                                      "images at each record's segpipe_uri, else images/ beside the "
                                                      "file); or, for nuclei, the folder/URI with train.json, val.json, "
                                                      "images/")] = None,
    iterations: Annotated[Optional[int], typer.Option(help="optimizer steps (default: the recipe's)")] = None,
    batch_size: Annotated[Optional[int], typer.Option()] = None,
    lr: Annotated[Optional[float], typer.Option()] = None,
    crop: Annotated[Optional[int], typer.Option(help="random square crop side, pixels (default: the recipe's)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    train_n: Annotated[int, typer.Option(help="shapes: generated training images")] = 4000,
    train_seed: Annotated[int, typer.Option(help="shapes: training data seed")] = 1000,
    val_n: Annotated[int, typer.Option(help="shapes: generated validation images")] = 200,
    val_seed: Annotated[int, typer.Option(help="shapes: must differ from --train-seed")] = 9999,
    name: Annotated[Optional[str], typer.Option(help="zoo name (default <method>-<domain>)")] = None,
    out: Annotated[Optional[str], typer.Option(help="card folder (default models/<name>)")] = None,
    work_dir: Annotated[str, typer.Option(help="data, checkpoints, logs")] = "runs/train",
    threads: Annotated[Optional[int], typer.Option(help="torch threads")] = None,
    device: Annotated[str, typer.Option(help="auto (a GPU when one is present) | cpu | cuda")] = "auto",
    priors: Annotated[Optional[str], typer.Option(help="pointrend, scorer: a finished ensemble `segpipe run` over the "
                                                  "training images; the refiner learns from its fused masks, the scorer "
                                                  "from its fused instances' IoU with the truth")] = None,
    prior_iou: Annotated[float, typer.Option(help="pointrend --priors: mask IoU a prediction needs with the truth")] = 0.5,
    val_run: Annotated[Optional[str], typer.Option(help="scorer: a finished run of the same models over the val images "
                                                   "(the card's metrics: the ensemble's AP with and without the scorer)")] = None,
    refine_base: Annotated[Optional[str], typer.Option(help="pointrend: the zoo model whose val predictions score the "
                                                       "refiner's card (default maskrcnn-<domain>)")] = None,
    init: Annotated[Optional[str], typer.Option(help="fine-tune: a zoo name or card path of the same method whose "
                                                "matching weights start the training (the card records it)")] = None,
    param: Annotated[Optional[list[str]], typer.Option("--param", help="architecture override KEY=VALUE (YAML value) on "
                                                       "top of the recipe's params, e.g. --param channels=[8,16,32]; "
                                                       "repeatable")] = None,
) -> None:
    """Train one method on one domain and write its zoo entry; a card's command reproduces it."""
    from pydantic import ValidationError

    from segpipe.config import TrainConfig, TrainSource, apply_overrides
    from segpipe.train.loop import shell_command, train

    try:
        params = apply_overrides({}, list(param or []), flag="--param")
    except ValueError as e:
        _fail(str(e))
    roots = [d for d in data or [] if not _is_coco_file(d)]
    if len(roots) > 1:
        _fail(f"--data: one domain folder at most, got {', '.join(roots)}")
    try:
        sources = [TrainSource.parse(d) for d in data or [] if _is_coco_file(d)]
        cfg = TrainConfig(
            method=method, domain=domain, data=roots[0] if roots else None, sources=sources, iterations=iterations, batch_size=batch_size, lr=lr, crop=crop,
            seed=seed, train_n=train_n, train_seed=train_seed, val_n=val_n, val_seed=val_seed, name=name, out=out,
            work_dir=work_dir, threads=threads, device=device, params=params, priors=priors, prior_iou=prior_iou, refine_base=refine_base,
            val_run=val_run, init=init,
        )
        from segpipe.train.methods import METHODS

        METHODS[cfg.method].params.model_validate(cfg.params)  # a bad --param fails here, before any work
        if cfg.init:
            from segpipe.train.warm import init_card

            init_card(cfg.init, METHODS[cfg.method].builder)
    except (ValidationError, ValueError) as e:
        _fail(_config_error(e))
    except FileNotFoundError as e:
        _fail(f"init: {e}")
    from segpipe.ensemble.replay import ReplayError
    from segpipe.train.domains import DataSourceError
    from segpipe.train.loop import CheckpointMismatchError

    try:
        card = train(cfg, log=lambda m: typer.echo(m), command=shell_command(sys.argv[1:]))
    except (FileNotFoundError, CheckpointMismatchError, ReplayError, DataSourceError) as e:
        _fail(str(e))
    typer.echo(f"card: {card}")


# --- run / demo -----------------------------------------------------------------------------


def _load_workflow_or_exit(workflow: Path, overrides: list[str]):
    from pydantic import ValidationError

    from segpipe.config import load_workflow

    if not workflow.is_file():
        _fail(f"workflow file {workflow} not found")
    try:
        return load_workflow(workflow, overrides)
    except (ValidationError, ValueError) as e:
        _fail(_config_error(e))


def _pseudo_line(card: dict, where: str) -> str:
    c = card["counts"]
    ignored = f", {c['ignored']} as ignore regions" if "ignored" in c else ""
    return (f"pseudo-labels: kept {c['kept']} of {c['instances']} instances{ignored}; {c['images_written']} of {c['images_processed']} "
            f"images written ({c['images_dropped_empty']} with none kept, {c['images_failed']} failed) -> "
            f"{where}/instances.json + card.yaml")


def _print_summary(result, out_uri: str) -> None:
    c = result.counts
    typer.echo("")
    typer.echo(f"run {result.run_id}: {result.status}" + (f" ({result.reason})" if result.reason else ""))
    typer.echo(f"  outputs:   {out_uri}  (instances/, predictions/, images/, errors/, coco/instances.json, _segpipe/run.json)")
    typer.echo(f"  images:    {c['images']} ({c['ok']} ok, {c['errors']} errored"
               + (": " + ", ".join(f"{k}={v}" for k, v in sorted(c["errors_by_type"].items())) if c["errors_by_type"] else "") + ")")
    typer.echo(f"  instances: {c['instances']}")
    for name, b in result.bounds.items():
        typer.echo(f"  bound:     {name} reached its bound of {b['bound']} instances per {b['per']} on {b['images']} "
                   f"image(s): objects past it are missing. {b['advice']}")
    typer.echo(f"  speed:     {result.images_per_s:.2f} images/s over {result.wall_s:.1f}s wall (Ray start included)")
    if result.stages:
        from segpipe.pipeline.progress import format_stage_table

        typer.echo("  stages (busy = summed over workers; util = busy / (streaming wall x workers)):")
        typer.echo(format_stage_table(result.stages, result.efficiency))
    if result.stage_ms:
        from segpipe.pipeline.run import post_model_overhead

        over, cpu = post_model_overhead(result.stage_ms), post_model_overhead(result.stage_cpu_ms)
        if over is not None:
            typer.echo(f"  ensemble + refine: {over[0]:.0f} ms = {100 * over[1]:.1f}% of the models' {over[2]:.0f} ms (wall)"
                       + (f"; CPU {cpu[0]:.0f} ms = {100 * cpu[1]:.1f}% of the models' {cpu[2]:.0f} ms" if cpu else ""))
    if result.pseudo:
        typer.echo("  " + _pseudo_line(result.pseudo, f"{out_uri.rstrip('/')}/{result.pseudo['name']}"))
    if result.eval:
        from segpipe.evaluation import format_table

        typer.echo(f"  mask AP vs ground truth (instances/, from {result.eval.get('source')}): "
                   + format_table(result.eval).replace("\n", "\n  "))
        for name, st in (result.eval.get("per_model") or {}).items():
            typer.echo(f"  {name}: AP={st['AP']:.3f} AP50={st['AP50']:.3f} AP75={st['AP75']:.3f} ARmax={st['ARmax']:.3f}")


def _execute(cfg, run_id: Optional[str]) -> None:
    from segpipe.modeling.zoo import WeightsError
    from segpipe.pipeline.run import SourceEmptyError, WorkflowError, run_workflow
    from segpipe.sinks.writer import OutputExistsError, ResumeMismatchError

    try:
        result = run_workflow(cfg, run_id=run_id, progress=lambda m: typer.echo(m))
    except (SourceEmptyError, FileNotFoundError, OutputExistsError, ResumeMismatchError, WeightsError) as e:
        _fail(str(e))
    except WorkflowError as e:
        _fail(f"invalid config: {e}")
    _print_summary(result, result.output_uri)
    if result.status != "complete":
        raise typer.Exit(1)


@app.command("run")
def run_cmd(
    workflow: Annotated[Path, typer.Argument(help="workflow YAML (see workflows/)")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a field: dotted.key=value (repeatable)")] = None,
    run_id: Annotated[Optional[str], typer.Option(help="resume this run (committed shards are skipped)")] = None,
) -> None:
    """Run a workflow on a local embedded Ray (or pipeline.ray_address).

    Example: segpipe run workflows/shapes.yaml --set source.uri=/data/imgs --set output.uri=/data/out
    """
    cfg = _load_workflow_or_exit(workflow, set_ or [])
    _execute(cfg, run_id)


DEMO_WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "demo.yaml"


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option(help="folder for the demo data and outputs")] = Path("segpipe-demo"),
    n: Annotated[int, typer.Option(help="synthetic images to label")] = 32,
    seed: Annotated[int, typer.Option(help="seed of the demo images (never used in training)")] = 4242,
) -> None:
    """Generate synthetic shapes, label them on a local Ray with two bundled models fused and refined
    (workflows/demo.yaml), score the result."""
    from segpipe.data.synthetic import SynthSpec, ensure_dataset
    from segpipe.pipeline.run import new_run_id

    data = out / "data"
    ann = ensure_dataset(SynthSpec(n=n, seed=seed), data, log=typer.echo)
    run_id = new_run_id()
    overrides = [f"source.uri={data / 'images'}", f"output.uri={out / 'runs' / run_id}", f"eval.gt={ann}"]
    cfg = _load_workflow_or_exit(DEMO_WORKFLOW, overrides)
    _execute(cfg, run_id)


@app.command("ensemble")
def ensemble_cmd(
    run_dir: Annotated[str, typer.Argument(help="a finished run's output folder (or URI)")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="ensemble.<field>=value or output.<min_score|"
                                                      "min_confidence|min_votes|coco>=value (repeatable)")] = None,
    out: Annotated[Optional[str], typer.Option(help="new output folder (default RUN_DIR/ensembles/<id>)")] = None,
    gt: Annotated[Optional[Path], typer.Option(help="COCO ground truth json: score the fused result")] = None,
    max_dets: Annotated[int, typer.Option(help="pycocotools maxDets with --gt")] = 100,
) -> None:
    """Re-fuse a run's raw per-model predictions under new ensemble settings; no model runs.

    Starts from the run's own ensemble settings (or the defaults). Example:
    segpipe ensemble runs/x --set ensemble.method=vote --set ensemble.quorum=0.6 --gt val.json
    """
    from pydantic import ValidationError

    from segpipe.config import apply_overrides
    from segpipe.ensemble.refuse import RefuseConfig, RefuseError, refuse_run
    from segpipe.sinks.writer import read_manifest
    from segpipe.pipeline.run import new_run_id

    try:
        manifest = read_manifest(run_dir)
    except FileNotFoundError as e:
        _fail(str(e))
    wf = (manifest.get("workflow") or {}).get("config") or {  # a re-fused output records its settings directly
        "ensemble": manifest.get("ensemble"), "output": manifest.get("output_filters", {})}
    run_id = new_run_id()
    out = out or f"{run_dir.rstrip('/')}/ensembles/{run_id}"
    filters = {k: wf["output"][k] for k in ("min_score", "min_confidence", "min_votes", "coco") if k in wf["output"]}
    data = {"ensemble": wf.get("ensemble") or {}, "output": filters | {"uri": out}}
    try:
        bad = [o for o in set_ or [] if not o.split("=", 1)[0].startswith(("ensemble.", "output."))]
        if bad:
            raise ValueError(f"--set {bad[0]!r}: only ensemble.* and output.* fields can be changed here")
        apply_overrides(data, set_ or [])
        rc = RefuseConfig.model_validate(data)
    except (ValidationError, ValueError) as e:
        _fail(_config_error(e))
    try:
        new = refuse_run(run_dir, out, rc.ensemble, rc.output, run_id=run_id, progress=lambda m: typer.echo(m))
    except RefuseError as e:
        _fail(str(e))
    c = new["counts"]
    typer.echo(f"ensemble {run_id}: {c.get('ok', 0)} images, {c.get('instances', 0)} instances -> {out} "
               f"({new['timings_ms']['ensemble']:.0f} ms fusing)")
    if gt is not None:
        from segpipe.evaluation import evaluate_output, format_table

        typer.echo(format_table(evaluate_output(out, gt, max_dets=max_dets)))


@app.command("pseudo-label")
def pseudo_label_cmd(
    run_dir: Annotated[str, typer.Argument(help="a finished ensemble run's output folder (or URI)")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="keep.<min_votes|min_agreement|min_confidence|"
                                                      "min_score>=V, per_class.<name>.<field>=V, empty_images=drop|keep, "
                                                      "ignore.<field>=V (ignore regions; ignore=null: none) "
                                                      "(repeatable)")] = None,
    out: Annotated[Optional[str], typer.Option(help="folder for instances.json + card.yaml (default RUN_DIR/<out>, "
                                               "out being the run's pseudo_label.out or 'pseudo')")] = None,
) -> None:
    """Write a finished run's fused instances that pass the keep-thresholds as a COCO training
    set with a dataset card; no model runs. Starts from the run's own pseudo_label settings.
    Example: segpipe pseudo-label runs/x --set keep.min_votes=2 --set keep.min_confidence=0.5 --out sets/v2c50
    """
    from pydantic import ValidationError

    from segpipe.config import PseudoLabelConfig, apply_overrides
    from segpipe.sinks.pseudo import run_categories, write_pseudo_labels
    from segpipe.sinks.writer import read_manifest

    try:
        manifest = read_manifest(run_dir)
    except FileNotFoundError as e:
        _fail(str(e))
    wf = (manifest.get("workflow") or {}).get("config") or {}
    if not wf.get("ensemble"):
        _fail(f"{run_dir} is not an ensemble run: pseudo-labels are kept by the models' agreement")
    try:
        data = dict(wf.get("pseudo_label") or {})
        apply_overrides(data, set_ or [])
        cfg = PseudoLabelConfig.model_validate(data)
        names = {c["name"] for c in run_categories(manifest)}
        unknown = sorted(set(cfg.per_class) - names)
        if unknown:
            raise ValueError(f"per_class: {unknown[0]!r} is not a category of the run's models ({', '.join(sorted(names))})")
    except (ValidationError, ValueError) as e:
        _fail(_config_error(e))
    card = write_pseudo_labels(run_dir, cfg, out_uri=out, manifest=manifest)
    typer.echo(_pseudo_line(card, out or f"{run_dir.rstrip('/')}/{cfg.out}"))


experiment_app = typer.Typer(help="Reproducible experiments that chain several segpipe commands.", no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")


@experiment_app.command("pseudo-label")
def experiment_pseudo_label_cmd(
    config: Annotated[Path, typer.Argument(help="experiment YAML (workflows/experiments/pseudo-label.yaml)")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a field: dotted.key=value (repeatable)")] = None,
) -> None:
    """Split train.json into labelled + unlabelled, train teachers on the labelled part, pseudo-label
    the rest with their ensemble, train a student per keep-threshold setting, score all on val.

    Resumable: rerun the same command and finished steps are skipped. Results: WORK_DIR/results.json.
    """
    from pydantic import ValidationError

    from segpipe.experiments.pseudo_label import Experiment, ExperimentError, load_experiment

    if not config.is_file():
        _fail(f"experiment file {config} not found")
    try:
        cfg = load_experiment(config, set_ or [])
    except (ValidationError, ValueError) as e:
        _fail(_config_error(e))
    try:
        results = Experiment(cfg, log=lambda m: typer.echo(m)).run()
    except (ExperimentError, FileNotFoundError) as e:
        _fail(str(e), code=1)
    typer.echo(format_experiment(results))


def format_experiment(r: dict) -> str:
    """The experiment's val table (AP, maxDets 1000)."""
    lines = [f"{'model':44s} {'AP':>7s} {'AP75':>7s}"]
    for m, v in r["teachers"].items():
        lines.append(f"{'teacher ' + v['version']:44s} {v['AP']:7.4f} {v.get('AP75', float('nan')):7.4f}")
    lines.append(f"{'ensemble of the teachers':44s} {r['ensemble']['AP']:7.4f} {r['ensemble']['AP75']:7.4f}")
    for s in r["students"]:
        if "metrics" in s:
            m = s["metrics"]
            lines.append(f"{'student ' + s['setting'] + ' (' + str(s['set']['instances_written']) + ' pseudo)':44s} "
                         f"{m['AP']:7.4f} {m.get('AP75', float('nan')):7.4f}  vs best teacher {s['vs_best_teacher']:+.4f}"
                         + (f", vs labelled-only {s['vs_labeled_only']:+.4f}" if "vs_labeled_only" in s else ""))
    return "\n".join(lines)


@app.command("audit")
def audit_cmd(
    run_dir: Annotated[str, typer.Argument(help="a run's output folder or URI")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Check a run against its source: every input exactly once in images/ (errored ones also in
    errors/), nothing lost, nothing duplicated, nothing extra. Exit 1 when it is not sound."""
    import json

    from segpipe.provenance.audit import audit_run, sound
    from segpipe.sinks.writer import read_manifest

    try:
        read_manifest(run_dir)
    except FileNotFoundError as e:
        _fail(str(e))
    a = audit_run(run_dir)
    ok = sound(a)
    if as_json:
        typer.echo(json.dumps(a | {"sound": ok}))
    else:
        typer.echo(f"run {a['run_id']} ({a['status']}): inputs {a['inputs']}, images {a['images']} ({a['ok']} ok), "
                   f"errors {a['errors']}, instances {a['instances']} | lost {a['lost']}, duplicates {a['duplicates']}, "
                   f"extra {a['extra']}, uncommitted files {a['uncommitted_files']} -> {'sound' if ok else 'NOT SOUND'}")
    if not ok:
        raise typer.Exit(1)


@app.command("ledger")
def ledger_cmd(
    root: Annotated[str, typer.Argument(help="an incremental workflow's output.uri (the dataset root)")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """What has been labeled by which model versions: the dataset ledger's runs (new, changed,
    skipped, failed) and, per model version, the inputs it labeled."""
    import json

    from segpipe.io.fs import resolve
    from segpipe.pipeline.incremental import ledger_uri
    from segpipe.provenance import ledger

    fs, lroot = resolve(ledger_uri(root))
    records = ledger.read_records(fs, lroot)
    if not records:
        _fail(f"{root} has no ledger (no committed incremental run)", code=1)
    per_version = ledger.summary(ledger.read_rows(fs, lroot))
    if as_json:
        typer.echo(json.dumps({"runs": records, "model_versions": per_version}))
        return
    for r in records:
        c = r["counts"]
        typer.echo(f"{r['run_id']} {r['status']}: listed {c['listed']}, new {c['new']}, changed {c['changed']}, "
                   f"missing a version {c['partial']}, retried {c['retry']}, skipped {c['skipped']}, failed {c['failed']}")
    for k, v in per_version.items():
        typer.echo(f"{k}: {v.get('ok', 0)} inputs labeled, {v.get('error', 0)} failed")


@app.command("schedule")
def schedule_cmd(
    workflow: Annotated[Path, typer.Argument(help="workflow YAML (an incremental one labels only what is new)")],
    every: Annotated[Optional[str], typer.Option(help="interval: 90s, 15m, 1h, 1d")] = None,
    cron: Annotated[Optional[str], typer.Option(help="5-field cron expression (UTC), e.g. '0 * * * *'")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a field: dotted.key=value (repeatable)")] = None,
    max_runs: Annotated[Optional[int], typer.Option(help="stop after this many runs (default: run until interrupted)")] = None,
    print_: Annotated[Optional[str], typer.Option("--print", help="print the equivalent 'cron' (crontab line) or "
                                                  "'kubernetes' (CronJob) instead of running")] = None,
    address: Annotated[str, typer.Option(help="--print kubernetes: the Ray job server the CronJob submits to")] =
        "http://segpipe-gpu-head-svc:8265",
    image: Annotated[str, typer.Option(help="--print kubernetes: the segpipe image")] = "ghcr.io/segpipe/segpipe:0.1.0-cpu",
) -> None:
    """Run a workflow periodically in the foreground (each run a new run id), or print the
    equivalent crontab entry / Kubernetes CronJob. Example: segpipe schedule wf.yaml --every 1h"""
    import time as _time
    from datetime import datetime, timedelta, timezone

    from segpipe import schedule
    from segpipe.pipeline.run import new_run_id, run_workflow

    cfg = _load_workflow_or_exit(workflow, set_ or [])
    if (every is None) == (cron is None):
        _fail("give exactly one of --every or --cron")
    try:
        period = schedule.parse_every(every) if every else None
        expr = cron if cron else None
        if cron:
            schedule.Cron(cron)
        if print_ is not None:
            expr = expr or schedule.every_as_cron(period)
    except ValueError as e:
        _fail(str(e))
    if print_ is not None:
        sets = list(set_ or [])
        if print_ == "cron":
            typer.echo(schedule.crontab_line(expr, str(workflow.resolve()), sets, cwd=str(Path.cwd()),
                                             log=str(Path.cwd() / f"segpipe-{cfg.name}.log")))
        elif print_ == "kubernetes":
            wf = f"/opt/segpipe/workflows/{workflow.name}"
            typer.echo(schedule.kubernetes_cronjob(expr, wf, sets, name=f"segpipe-{cfg.name}", image=image, address=address),
                       nl=False)
        else:
            _fail(f"--print {print_!r}: expected cron or kubernetes")
        return
    n = 0
    next_at = datetime.now(timezone.utc)
    while max_runs is None or n < max_runs:
        wait = (next_at - datetime.now(timezone.utc)).total_seconds()
        if wait > 0:
            _time.sleep(wait)
        run_id = new_run_id()
        typer.echo(f"schedule: run {n + 1} ({run_id}) at {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
        try:
            result = run_workflow(cfg, run_id=run_id, progress=lambda m: typer.echo(m))
            typer.echo(f"schedule: run {run_id} {result.status}, {result.counts['images']} images")
        except Exception as e:  # noqa: BLE001 - one failed run must not stop the schedule
            typer.echo(f"schedule: run {run_id} failed: {type(e).__name__}: {e}")
        n += 1
        now = datetime.now(timezone.utc)
        if period:
            next_at = next_at + timedelta(seconds=period)
            while next_at <= now:  # a run longer than the period skips the missed ticks
                next_at = next_at + timedelta(seconds=period)
        else:
            next_at = schedule.Cron(expr).next_after(now.replace(tzinfo=None)).replace(tzinfo=timezone.utc)
        if max_runs is None or n < max_runs:
            typer.echo(f"schedule: next run at {next_at.isoformat(timespec='seconds')}")


bench_app = typer.Typer(help="benchmarks: measured figures, printed as a table and written as JSON", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("tiling")
def bench_tiling(
    data: Annotated[Path, typer.Option(help="a COCO folder (annotations.json + images/) of large images")],
    model: Annotated[list[str], typer.Option(help="zoo model (repeatable)")],
    overlap: Annotated[float, typer.Option(help="tile overlap ratio")] = 0.25,
    max_images: Annotated[Optional[int], typer.Option(help="use the first N images")] = None,
    native: Annotated[bool, typer.Option("--native/--no-native", help="also run each image whole at full resolution")] = True,
    out: Annotated[Optional[Path], typer.Option(help="write the results JSON here")] = None,
) -> None:
    """Mask AP (all, small) of tiled vs downscaled vs native inference, and the seam IoU of
    objects crossing tile edges. Example: segpipe data synth --out big --n 8 --size 1536
    --min-objects 120 --max-objects 200 --max-size 40 && segpipe bench tiling --data big --model maskrcnn-shapes"""
    from segpipe.bench import tiling

    res = tiling.run(model, data, overlap=overlap, max_images=max_images, native=native, log=typer.echo)
    typer.echo(tiling.table(res))
    if out:
        out.write_text(json.dumps(res, indent=1))


@bench_app.command("tiling-memory")
def bench_tiling_memory(
    size: Annotated[int, typer.Option(help="image side, pixels")] = 8000,
    instances: Annotated[int, typer.Option(help="objects in the image")] = 2000,
    tile: Annotated[int, typer.Option(help="tile side (no --model)")] = 512,
    model: Annotated[Optional[str], typer.Option(help="run this zoo model over a size x size mosaic of --data's "
                                                 "images instead of merging synthetic predictions")] = None,
    data: Annotated[Optional[Path], typer.Option(help="with --model: a COCO folder whose images make the mosaic")] = None,
    out: Annotated[Optional[Path], typer.Option(help="write the results JSON here")] = None,
) -> None:
    """Peak memory and time of a huge image: tiling and merging synthetic predictions of many
    instances (no model), or a zoo model run tiled over a mosaic (--model, --data)."""
    from segpipe.bench import tiling

    if model is not None:
        if data is None:
            _fail("--model needs --data (the images that make the mosaic)")
        res = tiling.model_memory(model, data, size=size)
    else:
        res = tiling.merge_memory(size=size, n_instances=instances, tile=tile)
    typer.echo(json.dumps(res))
    if out:
        out.write_text(json.dumps(res, indent=1))


@bench_app.command("pipeline")
def bench_pipeline(
    data: Annotated[Path, typer.Option(help="a folder of images (or a COCO folder with images/)")],
    workflow: Annotated[Path, typer.Option(help="the workflow whose models, ensemble and refiner both sides run")] = DEMO_WORKFLOW,
    n: Annotated[Optional[int], typer.Option(help="use the first N images (sorted)")] = None,
    actors: Annotated[list[int], typer.Option(help="actors per model/refine stage (repeatable)")] = [1, 2],
    cpus: Annotated[Optional[float], typer.Option(help="num_cpus of every actor in the pipeline runs (default: the "
                                                   "workflow's; lower it so 2 actors per stage fit)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="workflow override (repeatable)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="write the results JSON here")] = None,
) -> None:
    """A hand-written sequential loop vs segpipe's pipeline on the same images and models: wall
    time, images/s, their ratio, efficiency (model forward / wall), time per stage, where the
    pipeline waits; the pipeline at each --actors count. Example: segpipe data synth --out
    bench-data --n 200 --seed 5 && segpipe bench pipeline --data bench-data --cpus 0.25"""
    from segpipe.bench import pipeline

    if not data.is_dir():
        _fail(f"--data {data}: not a folder")
    _load_workflow_or_exit(workflow, [*(set_ or []), f"source.uri={data}"])  # a bad --set fails before any work
    res = pipeline.run(workflow, data, n=n, actors=actors, cpus=cpus, overrides=set_ or [], log=typer.echo)
    typer.echo(pipeline.table(res))
    if out:
        out.write_text(json.dumps(res, indent=1))


@bench_app.command("memory")
def bench_memory(
    counts: Annotated[list[int], typer.Option("--count", help="images per run (repeatable)")] = [1000, 10000],
    model: Annotated[str, typer.Option(help="zoo model of the runs")] = "spatialemb-shapes",
    size: Annotated[int, typer.Option(help="image side, pixels")] = 96,
    data: Annotated[Path, typer.Option(help="folder for the generated images (reused)")] = Path("segpipe-bench-memory"),
    interval: Annotated[float, typer.Option(help="seconds between memory samples")] = 0.5,
    out: Annotated[Optional[Path], typer.Option(help="write the results JSON here")] = None,
) -> None:
    """Peak memory of a run (driver and every Ray process) over each --count of small images: a
    streaming pipeline's peak does not grow with the count."""
    from segpipe.bench import memory

    res = memory.run(sorted(counts), model=model, size=size, data=data, interval_s=interval, log=typer.echo)
    typer.echo(memory.table(res))
    if out:
        out.write_text(json.dumps(res, indent=1))


# --- cluster jobs ----------------------------------------------------------------------------

AddressOpt = Annotated[str, typer.Option(envvar="RAY_ADDRESS", help="Ray dashboard / job server, e.g. http://HOST:8265 "
                                           "(default $RAY_ADDRESS)")]


def _job_client_call(fn, *args):
    """Run a Jobs API call; a connection or unknown-job error exits 1 with its message."""
    try:
        return fn(*args)
    except (ConnectionError, RuntimeError, ValueError) as e:
        _fail(f"{type(e).__name__}: {e}", code=1)


@app.command("submit")
def submit_cmd(
    workflow: Annotated[Path, typer.Argument(help="workflow YAML (see workflows/)")],
    address: AddressOpt,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a field: dotted.key=value (repeatable)")] = None,
    run_id: Annotated[Optional[str], typer.Option(help="run id (default: a new one); an existing run's id resumes it")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow the logs until the job ends; exit with its status")] = False,
    ship_code: Annotated[bool, typer.Option("--ship-code/--no-ship-code", help="send this segpipe package with the "
                                            "job (default) or use the one installed on the cluster")] = True,
    entrypoint_num_cpus: Annotated[Optional[float], typer.Option(help="CPUs reserved for the job's driver")] = None,
    entrypoint_num_gpus: Annotated[Optional[float], typer.Option(help="GPUs reserved for the job's driver")] = None,
    entrypoint_resource: Annotated[Optional[list[str]], typer.Option(help="NAME=AMOUNT custom resource for the "
                                                                      "driver (repeatable)")] = None,
) -> None:
    """Submit a workflow to a Ray cluster as a job (Ray Jobs API) and print its id.

    The job carries the resolved workflow, the zoo entries it names and (by default) this segpipe
    package; local paths are made absolute (the cluster must see them: use s3:// URIs for a
    remote cluster). Example: segpipe submit workflows/demo.yaml --address http://head:8265 --wait
    """
    import tempfile

    from segpipe import jobs
    from segpipe.modeling.zoo import WeightsError
    from segpipe.pipeline.run import new_run_id

    cfg = _load_workflow_or_exit(workflow, set_ or [])
    resources = {}
    for item in entrypoint_resource or []:
        name, _, amount = item.partition("=")
        try:
            resources[name] = float(amount)
        except ValueError:
            _fail(f"--entrypoint-resource {item!r}: expected NAME=AMOUNT")
    run_id = run_id or new_run_id()
    with tempfile.TemporaryDirectory(prefix="segpipe-job-") as staging:
        try:
            job_id = jobs.submit(cfg, address, run_id, staging=Path(staging), ship_code=ship_code,
                                 entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=entrypoint_num_gpus,
                                 entrypoint_resources=resources or None)
        except (FileNotFoundError, WeightsError, ValueError) as e:
            _fail(str(e))
        except (ConnectionError, RuntimeError) as e:
            _fail(f"could not submit to {address}: {type(e).__name__}: {e}", code=1)
    typer.echo(job_id)
    if wait:
        status = jobs.follow(address, job_id, typer.echo)
        info = jobs.client(address).get_job_info(job_id)
        typer.echo(f"job {job_id}: {status}" + (f" ({info.message})" if status != "SUCCEEDED" and info.message else ""))
        if status != "SUCCEEDED":
            raise typer.Exit(1)


@app.command("status")
def status_cmd(job_id: Annotated[str, typer.Argument(help="job id (segpipe-<run id>)")], address: AddressOpt) -> None:
    """A job's status and message; exit 0 when it succeeded or is still running, 1 when it failed or was stopped."""
    from segpipe import jobs

    info = _job_client_call(jobs.client(address).get_job_info, job_id)
    status = str(getattr(info.status, "value", info.status))
    typer.echo(f"{job_id}: {status}" + (f" ({info.message})" if info.message else ""))
    if status in ("FAILED", "STOPPED"):
        raise typer.Exit(1)


@app.command("logs")
def logs_cmd(
    job_id: Annotated[str, typer.Argument(help="job id")],
    address: AddressOpt,
    follow: Annotated[bool, typer.Option("--follow", help="stream until the job ends")] = False,
) -> None:
    """A job's logs (driver output)."""
    from segpipe import jobs

    if follow:
        _job_client_call(jobs.follow, address, job_id, typer.echo)
    else:
        typer.echo(_job_client_call(jobs.client(address).get_job_logs, job_id), nl=False)


@app.command("stop")
def stop_cmd(job_id: Annotated[str, typer.Argument(help="job id")], address: AddressOpt) -> None:
    """Stop a running job (its committed shards stay; resubmitting with the same --run-id resumes)."""
    from segpipe import jobs

    stopped = _job_client_call(jobs.client(address).stop_job, job_id)
    typer.echo(f"{job_id}: {'stopping' if stopped else 'not running'}")


@app.command("jobs")
def jobs_cmd(address: AddressOpt) -> None:
    """The cluster's jobs: id, status, start time, entrypoint."""
    from datetime import datetime, timezone

    from segpipe import jobs

    for j in sorted(_job_client_call(jobs.client(address).list_jobs), key=lambda j: j.start_time or 0):
        started = datetime.fromtimestamp((j.start_time or 0) / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        typer.echo(f"{j.submission_id or j.job_id}\t{getattr(j.status, 'value', j.status)}\t{started}\t{j.entrypoint}")


# --- eval ------------------------------------------------------------------------------------


@app.command("eval")
def eval_cmd(
    pred: Annotated[list[str], typer.Option(help="a run's output folder or URI (repeat to compare several)")],
    gt: Annotated[Path, typer.Option(help="COCO ground truth json")],
    max_dets: Annotated[int, typer.Option(help="detections per image considered (pycocotools maxDets)")] = 100,
    model: Annotated[Optional[str], typer.Option(help="score this model's raw predictions/ instead of instances/")] = None,
    each_model: Annotated[bool, typer.Option("--each-model", help="also score every model's raw predictions/")] = False,
    boundary: Annotated[bool, typer.Option("--boundary", help="add Boundary AP (Cheng et al., CVPR 2021)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (one object, or a list when comparing)")] = False,
) -> None:
    """COCO segm AP, AP50, AP75 and AP per category of a run (pycocotools is the oracle).

    With several --pred or --each-model, one comparison table: each result set on one line.
    """
    from segpipe.sinks.writer import read_manifest
    from segpipe.evaluation import compare_table, evaluate_output, format_table, load_gt

    if not gt.is_file():
        _fail(f"ground truth {gt} not found")
    gt_coco = load_gt(gt).dataset  # read once, scored once per result set
    rows: list[tuple[str, dict]] = []
    try:
        for p in pred:
            tag = f"{p}: " if len(pred) > 1 else ""
            if model:
                rows.append((f"{tag}{model}", evaluate_output(p, gt_coco, max_dets=max_dets, table="predictions",
                                                              source=model, boundary=boundary)))
                continue
            try:
                man = read_manifest(p)
            except FileNotFoundError:
                man = {}
            source = (man.get("outputs") or {}).get("instances_source", "instances")
            rows.append((f"{tag}{source}", evaluate_output(p, gt_coco, max_dets=max_dets, boundary=boundary)))
            if each_model:
                for m in man.get("models", []):
                    rows.append((f"{tag}{m['name']}", evaluate_output(p, gt_coco, max_dets=max_dets, table="predictions",
                                                                      source=m["name"], boundary=boundary)))
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if len(rows) == 1:
        typer.echo(json.dumps(rows[0][1]) if as_json else format_table(rows[0][1]))
    else:
        typer.echo(json.dumps([{"result": n, **st} for n, st in rows]) if as_json else compare_table(rows))


# --- models ----------------------------------------------------------------------------------


@models_app.command("list")
def models_list() -> None:
    """Every zoo card: name, version, family, metrics."""
    from segpipe.modeling.zoo import list_cards, load_card

    for name in list_cards():
        card, _ = load_card(name)
        scored = [m for m in card.metrics if "AP" in m.values]
        if not scored:
            ap = "no metrics"
        elif len(scored) == 2 and card.builder in ("pointrend", "scorer"):  # a base result, then with this model
            ap = f"AP={scored[0].values['AP']:.3f} -> {scored[1].values['AP']:.3f} ({scored[0].split.split(':')[0]})"
        else:
            ap = f"AP={scored[0].values['AP']:.3f} ({scored[0].split.split(':')[0]})"
        typer.echo(f"{card.version():<32} {card.family:<10} {ap}")


@models_app.command("show")
def models_show(name: Annotated[str, typer.Argument(help="zoo name or card path")]) -> None:
    """A card in full, with its version."""
    import yaml

    from segpipe.modeling.zoo import load_card

    try:
        card, path = load_card(name)
    except FileNotFoundError as e:
        _fail(str(e))
    typer.echo(f"# {path}\nversion: {card.version()}")
    typer.echo(yaml.safe_dump(card.model_dump(mode="json"), sort_keys=False))


@models_app.command("eval")
def models_eval(
    name: Annotated[str, typer.Argument(help="zoo name or card path")],
    gt: Annotated[str, typer.Option(help="COCO ground truth json (path or URI)")],
    images: Annotated[Optional[str], typer.Option(help="image folder or URI (default: images/ beside the json)")] = None,
    max_dets: Annotated[int, typer.Option()] = 100,
    base: Annotated[Optional[str], typer.Option(help="refiner cards: the model whose predictions it refines "
                                                "(default: the one it was validated on)")] = None,
    boundary: Annotated[bool, typer.Option("--boundary", help="add Boundary AP (always on for refiners)")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    tiling: Annotated[str, typer.Option(help="off | auto | on: sliding-window inference (as a workflow's tiling.mode)")] = "off",
    tile: Annotated[Optional[int], typer.Option(help="tile side, pixels (default: the model's training crop or image size)")] = None,
) -> None:
    """Evaluate one zoo model in-process on a COCO dataset (no Ray). A refiner (pointrend card)
    is scored on its base model's predictions, before and after refinement."""
    from pydantic import ValidationError

    from segpipe.config import TilingConfig
    from segpipe.modeling.tiled import default_tile

    try:
        tiling_cfg = TilingConfig(mode=tiling, tile=tile)
    except ValidationError as e:
        _fail(f"--tiling/--tile: {e.errors()[0]['msg']}")
    from segpipe.evaluation import compare_table, evaluate, evaluate_refiner, format_table, load_gt, predict_dataset
    from segpipe.modeling.zoo import load_adapter

    adapter, card = load_adapter(name)
    g = load_gt(gt)
    image_dir = images or (gt.rsplit("/", 1)[0] + "/images" if "/" in gt else "images")
    if card.builder == "pointrend":
        base_ref = base or ((card.training.config or {}) if card.training else {}).get("refine_base")
        if not base_ref:
            _fail("a refiner needs --base: the model whose predictions it refines")
        base_adapter, base_card = load_adapter(base_ref)
        before, after = evaluate_refiner(adapter, base_adapter, g, image_dir, max_dets=max_dets,
                                         progress=lambda m: typer.echo(m, err=True))
        rows = [(base_card.version(), before), (f"{base_card.version()} + {card.version()}", after)]
        typer.echo(json.dumps([{"result": n, **st} for n, st in rows]) if as_json else compare_table(rows))
        return
    tiling_cfg = None if tiling_cfg.mode == "off" else tiling_cfg.model_copy(update={"tile": tile or default_tile(card)})
    at_bound: list[bool] = []
    preds = predict_dataset(adapter, g, image_dir, progress=lambda m: typer.echo(m, err=True),  # stdout stays JSON
                            tiling=tiling_cfg, at_bound=at_bound)
    stats = evaluate(g, preds, max_dets=max_dets, boundary=boundary)
    stats["model"] = card.version()
    stats["instance_bound"], stats["images_at_bound"] = adapter.instance_bound, sum(at_bound)
    stats["bound_unit"] = "image" if tiling_cfg is None else "tile"
    typer.echo(json.dumps(stats) if as_json else f"{card.version()}\n" + format_table(stats))


# --- report / viz ----------------------------------------------------------------------------


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


@app.command("report")
def report_cmd(
    run_dir: Annotated[str, typer.Argument(help="a finished run's output folder (or URI)")],
    gt: Annotated[Optional[str], typer.Option(help="COCO ground truth json (path or URI): AP tables per model, "
                                              "for the unrefined ensemble and for instances/")] = None,
    out: Annotated[Optional[Path], typer.Option(help="HTML file to write (default RUN_DIR/report.html for a local "
                                                "run, ./report-<run id>.html otherwise)")] = None,
    sample: Annotated[int, typer.Option(help="gallery: images sampled evenly from the run", min=0)] = 12,
    review: Annotated[int, typer.Option(help="gallery: images of highest model disagreement (ensembles)", min=0)] = 12,
    max_side: Annotated[int, typer.Option(help="gallery: longest side of an overlay, pixels", min=16)] = 448,
    min_score: Annotated[float, typer.Option(help="gallery: draw instances scoring at least this", min=0.0, max=1.0)] = 0.3,
    max_dets: Annotated[Optional[int], typer.Option(help="pycocotools maxDets with --gt (default: the workflow's "
                                                    "eval.max_dets, else 100)", min=1)] = None,
) -> None:
    """Write a run's self-contained HTML report: summary and provenance, counts and errors,
    throughput per stage, AP tables (--gt), a gallery of overlays with the review queue (the
    images where the models disagree most) and score / agreement histograms.

    Example: segpipe report segpipe-demo/runs/RUN_ID --gt segpipe-demo/data/annotations.json
    """
    from segpipe.report.build import build_report

    try:
        page = build_report(run_dir, gt, n_sample=sample, n_review=review, max_side=max_side, min_score=min_score,
                            max_dets=max_dets, progress=lambda m: typer.echo(m))
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if out is None:
        from segpipe.sinks.writer import read_manifest

        out = (Path(run_dir.removeprefix("file://")) / "report.html" if _is_local(run_dir)
               else Path(f"report-{read_manifest(run_dir)['run_id']}.html"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    typer.echo(f"report: {out} ({len(page.encode()) / 1e6:.1f} MB)")


@app.command("viz")
def viz_cmd(
    run_dir: Annotated[str, typer.Argument(help="a finished run's output folder (or URI)")],
    image: Annotated[str, typer.Option(help="the image: its image_id (images/) or its relpath")],
    source: Annotated[Optional[str], typer.Option(help="ensemble (or instances, for a run without one): the run's "
                                                  "instances/; a model name: its raw predictions/; all: each of them "
                                                  "(default: instances/)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="a .png file (one source), or a folder for "
                                                "<relpath stem>-<source>.png (default RUN_DIR/viz for a local run, "
                                                "else the current folder)")] = None,
    max_side: Annotated[Optional[int], typer.Option(help="downscale to this longest side, pixels (default: full size)",
                                                    min=16)] = None,
    min_score: Annotated[float, typer.Option(help="draw instances scoring at least this", min=0.0, max=1.0)] = 0.0,
    labels: Annotated[bool, typer.Option("--labels/--no-labels", help="write category and score by each instance")] = True,
) -> None:
    """Write overlay PNGs of one image: its masks in translucent colours with contours.

    Example: segpipe viz segpipe-demo/runs/RUN_ID --image 4242_000003.jpg --source all
    """
    from segpipe.report.rundata import UnknownImageError, UnknownSourceError
    from segpipe.report.viz import image_overlays

    try:
        overlays = image_overlays(run_dir, image, source, max_side=max_side, min_score=min_score, labels=labels)
    except (FileNotFoundError, UnknownImageError, UnknownSourceError) as e:
        _fail(str(e))
    if out is not None and out.suffix.lower() == ".png":
        if len(overlays) > 1:
            _fail(f"--out {out}: --source all writes several PNGs: give a folder")
        paths = [out]
    else:
        folder = out or (Path(run_dir.removeprefix("file://")) / "viz" if _is_local(run_dir) else Path("."))
        paths = [folder / f"{Path(o.relpath).stem}-{o.source}.png" for o in overlays]
    for o, path in zip(overlays, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(o.png())
        typer.echo(f"{path}: {o.label}, {o.n_instances} instances, {o.pixels.shape[1]}x{o.pixels.shape[0]}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
