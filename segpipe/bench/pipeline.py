"""`segpipe bench pipeline`: a hand-written sequential loop vs segpipe's pipeline on the same
images and models, and the pipeline at 1 vs 2 actors per stage.

The sequential loop is what a user without segpipe would write: for each file, read the bytes,
decode them with Pillow, run every model, fuse and refine when the workflow does, and write one
JSON per image. It uses the same zoo adapters and the same fusion and refinement functions, in
one process, with torch's default threads.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from segpipe.config import WorkflowConfig


def _decode(data: bytes) -> np.ndarray:
    import io

    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def sequential(cfg: WorkflowConfig, files: list[Path], out_dir: Path) -> dict:
    """Run ``cfg``'s models (+ ensemble, refine) over ``files`` in a plain loop, writing
    ``out_dir/<stem>.json``. Returns wall_s, first_s (to the first image's JSON), images, and
    stage_ms / forward_ms summed per stage (read, decode, each model, ensemble, refine, write)."""
    import torch

    from segpipe.ensemble.fuse import ModelOutput, fuse_image
    from segpipe.modeling.tiled import default_tile, needs_tiling, tiled_predict
    from segpipe.modeling.zoo import load_adapter

    t0 = time.perf_counter()
    models = []
    for stage in cfg.models:
        adapter, card = load_adapter(stage.model)
        if stage.score_threshold is not None:
            adapter.set_score_threshold(stage.score_threshold)
        models.append((adapter, card, stage, cfg.tiling.tile or default_tile(card)))
    refiner = load_adapter(cfg.refine.model)[0] if cfg.refine is not None else None
    out_dir.mkdir(parents=True, exist_ok=True)
    stage_ms: dict[str, float] = defaultdict(float)
    forward_ms: dict[str, float] = defaultdict(float)
    forward_cpu_ms: dict[str, float] = defaultdict(float)
    first_s = None

    def lap(name: str, t: float) -> float:
        now = time.perf_counter()
        stage_ms[name] += (now - t) * 1000
        return now

    for path in files:
        t = time.perf_counter()
        data = Path(path).read_bytes()
        t = lap("read", t)
        image = _decode(data)
        t = lap("decode", t)
        outs = []
        for adapter, card, stage, tile in models:
            steps: dict[str, float] = {}
            if needs_tiling(image.shape[0], image.shape[1], tile, cfg.tiling):
                inst = tiled_predict(adapter, image, tile, cfg.tiling, stage.batch_size, steps)
            else:
                inst = adapter.predict([image], steps)[0]
            forward_ms[card.name] += steps.get("forward", 0.0)
            forward_cpu_ms[card.name] += steps.get("forward_cpu", 0.0)
            outs.append(ModelOutput(name=card.name, version=card.version(), instances=inst))
            t = lap(card.name, t)
        final, spread = outs[0].instances, None
        if cfg.ensemble is not None:
            fused = fuse_image(outs, cfg.ensemble)
            final, spread = fused.instances, fused.spread
            t = lap("ensemble", t)
        if refiner is not None:
            final = refiner.refine(image, final, spread, cfg.refine.min_score)
            t = lap("refine", t)
        doc = {"file": str(path), "height": final.height, "width": final.width,
               "models": {o.name: _json_instances(o.instances) for o in outs}, "instances": _json_instances(final)}
        (out_dir / f"{Path(path).stem}.json").write_text(json.dumps(doc))
        lap("write", t)
        if first_s is None:
            first_s = time.perf_counter() - t0
    wall = time.perf_counter() - t0
    return {"mode": "sequential", "images": len(files), "wall_s": wall, "first_s": first_s,
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "stage_ms": dict(stage_ms),
            "forward_ms": dict(forward_ms), "forward_cpu_ms": dict(forward_cpu_ms)}


def _json_instances(inst) -> list[dict]:
    return [{"bbox": [float(v) for v in inst.boxes[i]], "score": float(inst.scores[i]), "label": int(inst.labels[i]),
             "rle": inst.masks[i]["counts"].decode() if isinstance(inst.masks[i]["counts"], bytes) else inst.masks[i]["counts"]}
            for i in range(len(inst))]


def scaled(cfg: WorkflowConfig, actors: int, has_gpu: bool, cpus: float | None) -> WorkflowConfig:
    """``cfg`` with ``actors`` actors in every model and refine pool, each holding ``cpus`` CPUs
    (None keeps the workflow's) and, with a GPU, an equal share of one GPU."""
    data = cfg.model_dump(mode="json")
    pools = [*data["models"], *([data["refine"]] if data.get("refine") else [])]
    for p in pools:
        p["concurrency"] = actors
        if cpus is not None:
            p["num_cpus"] = cpus
        p["num_gpus"] = math.floor(1e4 / (len(pools) * actors)) / 1e4 if has_gpu else 0  # down: they must fit
    return WorkflowConfig.model_validate(data)


def pipelined(cfg: WorkflowConfig, out_uri: str) -> dict:
    """One segpipe run of ``cfg`` into ``out_uri`` (a fresh folder); its wall time and stage account."""
    from segpipe.pipeline.run import new_run_id, run_workflow

    data = cfg.model_dump(mode="json")
    data["output"]["uri"] = out_uri
    data["pipeline"]["progress"] = "off"
    run = WorkflowConfig.model_validate(data)
    t0 = time.perf_counter()
    res = run_workflow(run, run_id=new_run_id(), progress=lambda m: None)
    wall = time.perf_counter() - t0
    if res.status != "complete":
        raise RuntimeError(f"pipeline run {res.run_id} ended {res.status}: {res.reason}")
    eff = res.efficiency or {}
    stream = eff.get("wall_s") or 0.0
    return {"mode": "pipeline", "images": res.counts["images"], "wall_s": wall,
            "first_s": wall - stream + (eff.get("startup_s") or 0.0), "stage_ms": res.stage_ms,
            "forward_ms": {r["name"]: r["forward_ms"] for r in res.stages if r["forward_ms"] is not None},
            "forward_cpu_ms": {r["name"]: r["forward_cpu_ms"] for r in res.stages if r["forward_cpu_ms"] is not None},
            "cpus": eff.get("cpus"), "stages": res.stages, "account": eff, "run_id": res.run_id}


def summarize(r: dict) -> dict:
    """Add images/s (end to end, and after the first result), efficiency = summed model forward
    wall time / wall, and CPU efficiency = the forwards' CPU time / (wall x CPUs): the share of
    the machine that went into model forward passes (forward wall time also counts waiting for
    a core when processes outnumber cores; CPU time does not)."""
    n, wall, first = r["images"], r["wall_s"], r["first_s"] or 0.0
    fwd = sum(r["forward_ms"].values()) / 1000
    cpu = sum(r["forward_cpu_ms"].values()) / 1000
    r.update(images_per_s=n / wall, steady_images_per_s=(n - 1) / (wall - first) if n > 1 and wall > first else None,
             model_forward_s=fwd, efficiency=fwd / wall, model_forward_cpu_s=cpu,
             cpu_efficiency=cpu / (wall * r["cpus"]) if r.get("cpus") else None)
    return r


def run(workflow: Path, data: Path, *, n: int | None, actors: list[int], cpus: float | None, overrides: list[str],
        log=print) -> dict:
    """Sequential loop, then the pipeline at each actor count, all on the first ``n`` images
    (sorted) of ``data`` (a folder of images, or a COCO folder with images/)."""
    import torch

    from segpipe.config import load_workflow
    from segpipe.io.listing import list_source
    from segpipe.provenance.manifest import code, environment

    src = data / "images" if (data / "images").is_dir() else data
    cfg = load_workflow(workflow, [*overrides, f"source.uri={src}", *([f"source.max_images={n}"] if n else [])])
    files = [Path(f.uri.removeprefix("file://")) for f in list_source(cfg.source.uri, patterns=cfg.source.patterns,
                                                                   recursive=cfg.source.recursive,
                                                                   max_images=cfg.source.max_images)]
    has_gpu = torch.cuda.is_available()
    res = {"workflow": str(workflow), "data": str(src), "images": len(files), "machine": _machine(has_gpu),
           "code": code(), "packages": environment("cuda" if has_gpu else "cpu")["packages"], "runs": []}
    with tempfile.TemporaryDirectory(prefix="segpipe-bench-") as tmp:
        log(f"sequential loop over {len(files)} images ...")
        seq = summarize(sequential(cfg, files, Path(tmp) / "sequential"))
        res["runs"].append(seq)
        log(f"  {seq['wall_s']:.1f}s, {seq['images_per_s']:.2f} images/s")
        for k in actors:
            log(f"pipeline, {k} actor(s) per stage ...")
            p = summarize(pipelined(scaled(cfg, k, has_gpu, cpus), str(Path(tmp) / f"pipeline-{k}")))
            p["actors_per_stage"] = k
            p["ratio_vs_sequential"] = p["images_per_s"] / seq["images_per_s"]
            res["runs"].append(p)
            log(f"  {p['wall_s']:.1f}s, {p['images_per_s']:.2f} images/s ({p['ratio_vs_sequential']:.2f}x)")
    return res


def _machine(has_gpu: bool) -> dict:
    import platform

    out = {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor() or platform.machine()}
    try:
        out["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    if has_gpu:
        import torch

        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def table(res: dict) -> str:
    """The comparison as a short Markdown table, then each run's stage times (s, summed)."""
    lines = ["| run | wall s | first result s | images/s | steady images/s | ratio vs sequential | model forward s | "
             "efficiency | forward CPU core-s | CPU efficiency |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["runs"]:
        name = "sequential loop" if r["mode"] == "sequential" else f"pipeline, {r['actors_per_stage']} actor(s)/stage"
        steady = f"{r['steady_images_per_s']:.2f}" if r.get("steady_images_per_s") else "-"
        ratio = f"{r['ratio_vs_sequential']:.2f}" if "ratio_vs_sequential" in r else "1"
        lines.append(f"| {name} | {r['wall_s']:.1f} | {r['first_s'] or 0:.1f} | {r['images_per_s']:.2f} | {steady} | "
                     f"{ratio} | {r['model_forward_s']:.1f} | {r['efficiency']:.2f} | {r['model_forward_cpu_s']:.1f} | "
                     f"{r['cpu_efficiency'] if r['cpu_efficiency'] is not None else float('nan'):.2f} |")
    stages = list(dict.fromkeys(k for r in res["runs"] for k in r["stage_ms"]))
    lines += ["", "| stage (summed s) | " + " | ".join(
        "sequential" if r["mode"] == "sequential" else f"pipeline x{r['actors_per_stage']}" for r in res["runs"]) + " |",
        "| --- |" + " --- |" * len(res["runs"])]
    for s in stages:
        lines.append(f"| {s} | " + " | ".join(f"{r['stage_ms'].get(s, 0.0) / 1000:.2f}" for r in res["runs"]) + " |")
    for r in res["runs"]:
        if r["mode"] != "pipeline":
            continue
        util = ", ".join(f"{s['name']} {s.get('utilization_joint', s['utilization']):.2f}"
                         for s in r["stages"] if s["utilization"] is not None and s["name"] != "decode")
        a = r["account"]
        lines.append(f"\npipeline x{r['actors_per_stage']}: first row after {a['startup_s']:.1f}s of {a['wall_s']:.1f}s "
                     f"streaming; the driver waited {a['driver_wait_ms'] / 1000:.1f}s for rows; utilization "
                     f"(busy / (streaming wall x workers)): {util}; bottleneck {a['bottleneck']}")
    return "\n".join(lines)
