"""The training loop of every method: train on a domain, then write a zoo entry (fp16 safetensors + card.yaml)."""

from __future__ import annotations

import json

import math
import platform
import shlex
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import yaml

from segpipe.config import MetricsRecord, ModelCard, TilingConfig, TrainConfig
from segpipe.data.coco import CocoInstances, collate
from segpipe.evaluation import evaluate, load_gt, predict_dataset
from segpipe.modeling.zoo import save_weights
from segpipe.train.domains import DomainData, prepare
from segpipe.train.methods import METHODS
from segpipe.train.mixing import MixedInstances

Log = Callable[[str], None]


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 1% of ``lr``."""
    if it < cfg.warmup:
        return cfg.lr * (0.01 + 0.99 * it / max(cfg.warmup, 1))
    t = (it - cfg.warmup) / max(cfg.iterations - cfg.warmup, 1)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))


class CheckpointMismatchError(ValueError):
    """The work dir's checkpoint was trained under another recipe than the one asked for."""


def _recipe(cfg, params, data: DomainData | None = None, init: dict | None = None) -> str:
    """What fixes a checkpoint's weights (the data, the optimiser, the resolved architecture), as
    JSON: a checkpoint resumes only under the same recipe. The iteration count may grow. Mixed
    sources enter with their files' sha256, so a rewritten pseudo-label set does not resume."""
    keep = {"method", "domain", "data", "crop", "batch_size", "lr", "weight_decay", "warmup", "seed", "train_n",
            "train_seed"} | ({"priors", "prior_iou"} if cfg.priors else set())  # older checkpoints predate priors
    out = {**cfg.model_dump(mode="json", include=keep), "params": params.model_dump(mode="json")}
    if cfg.sources:  # older checkpoints predate sources
        out["sources"] = data.train_record["train"] if data else cfg.model_dump(mode="json")["sources"]
    if init:  # older checkpoints predate init
        out["init"] = init["weights_sha256"]
    return json.dumps(out, sort_keys=True)


def train_device(cfg: TrainConfig) -> torch.device:
    """``cfg.device`` resolved: auto = cuda when a GPU is present, else cpu."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda asked for, but torch sees no GPU")
    return torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")


def train(cfg: TrainConfig, log: Log = print, command: str | None = None) -> Path:
    """Train, validate, write weights + card; resumes from ``work_dir/<name>/ckpt.pt``. Returns the card path."""
    if cfg.method == "scorer":  # learns from a run's fused instances, not from images
        from segpipe.train.scorer import train_scorer

        return train_scorer(cfg, log, command)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    name = cfg.model_name
    out = Path(cfg.out or Path("models") / name)
    run_dir = Path(cfg.work_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    log = _tee(log, run_dir / "train.log")
    data = prepare(cfg, log)
    method = METHODS[cfg.method]
    params = method.params.model_validate(cfg.params)
    cat_ids = [c["id"] for c in data.categories]
    net = method.build(params=params, num_classes=len(cat_ids))
    init = None
    if cfg.init:
        from segpipe.train.warm import load_init

        init = load_init(net, cfg.init, method.builder)
        log(f"init from {init['card']}: {init['loaded']} tensors loaded, {len(init['fresh'])} fresh"
            + (f" ({', '.join(init['fresh'][:8])}{', ...' if len(init['fresh']) > 8 else ''})" if init["fresh"] else ""))
    device = train_device(cfg)
    net.to(device)
    priors = None
    if cfg.priors:
        from segpipe.refine.priors import load_priors

        priors, summary = load_priors(cfg.priors, data.train_ann, data.train_images, min_iou=cfg.prior_iou, log=log)
        data = replace(data, train_record=data.train_record | {"priors": summary})
    ds = _dataset(data, cfg, cat_ids, priors)
    log(f"{cfg.method} on {cfg.domain}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters, "
        f"{len(ds)} training images, crop {cfg.crop}, {cfg.iterations} iterations x batch {cfg.batch_size}")
    trained = [q for q in net.parameters() if q.requires_grad]  # all, unless the params freeze a part
    if len(trained) < len(list(net.parameters())):
        log(f"training {sum(q.numel() for q in trained) / 1e6:.3f} M of the parameters; the rest are frozen")
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = run_dir / "ckpt.pt"
    it, elapsed = 0, 0.0
    recipe = _recipe(cfg, params, data, init)
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True, map_location=device)
        if "recipe" in state and state["recipe"] != recipe:
            now, then = json.loads(recipe), json.loads(state["recipe"])
            diff = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
            raise CheckpointMismatchError(f"{ckpt} was trained with other {', '.join(diff)} than asked now: resuming it would "
                             "write a card whose weights do not match its recipe; use another --work-dir or --name")
        if "recipe" not in state and cfg.params:
            raise CheckpointMismatchError(f"{ckpt} records no recipe (it predates recipes), so it cannot be shown to match "
                                          f"--param {', '.join(sorted(cfg.params))}; use another --work-dir or --name")
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        it, elapsed = int(state["iteration"]), float(state["elapsed"])
        log(f"resumed from {ckpt} at iteration {it}")
    net.train()
    gen = torch.Generator().manual_seed(cfg.seed)
    mixed = isinstance(ds, MixedInstances)
    epoch_len = ds.epoch_length() if mixed else len(ds)
    per_epoch = epoch_len // cfg.batch_size  # full batches per epoch (drop_last)
    if per_epoch == 0:
        raise ValueError(f"{epoch_len} training images per epoch cannot fill one batch of {cfg.batch_size}")
    epoch = it // per_epoch
    t0 = time.time() - elapsed
    run_loss = None
    while it < cfg.iterations:
        ds.set_epoch(epoch)
        gen.manual_seed(cfg.seed * 100003 + epoch)
        if mixed:  # the weighted mix's own epoch order (a pure function of seed and epoch)
            loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, sampler=ds.keys(epoch), collate_fn=collate,
                                                 drop_last=True)
        else:
            loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate,
                                                 generator=gen, drop_last=True)
        skip = it - epoch * per_epoch  # batches of this epoch already done (resume)
        for bi, (images, targets) in enumerate(loader):
            if bi < skip:
                continue
            if it >= cfg.iterations:
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(it, cfg)
            if device.type != "cpu":
                images = [im.to(device, non_blocking=True) for im in images]
                targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            losses = net(list(images), list(targets))
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 10.0)
            opt.step()
            it += 1
            lv = float(loss.detach())
            run_loss = lv if run_loss is None else 0.95 * run_loss + 0.05 * lv
            if it % 50 == 0 or it == cfg.iterations:
                el = time.time() - t0
                eta = el / it * (cfg.iterations - it) if it else 0
                parts = " ".join(f"{k.replace('loss_', '')}={float(v.detach()):.3f}" for k, v in losses.items())
                log(f"it {it}/{cfg.iterations} loss={run_loss:.3f} ({parts}) lr={lr_at(it, cfg):.2e} {el:.0f}s eta {eta:.0f}s")
            if it % cfg.checkpoint_every == 0:
                torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "iteration": it, "elapsed": time.time() - t0,
                            "recipe": recipe}, ckpt)
        epoch += 1
    wall = time.time() - t0
    log(f"training done: {it} iterations in {wall:.0f}s")
    return write_entry(cfg, net, out, data, wall, log, command, init)


def _dataset(data: DomainData, cfg: TrainConfig, cat_ids: list[int], priors) -> CocoInstances | MixedInstances:
    """The training set: the domain's file, or the mix of ``data.sources`` (one file of weight 1
    trains exactly as the domain's file would)."""
    def one(ann: str, images: str) -> CocoInstances:
        return CocoInstances(ann, images, category_ids=cat_ids, flips=True, crop=cfg.crop, seed=cfg.seed, priors=priors)

    if not data.sources:
        return one(data.train_ann, data.train_images)
    if len(data.sources) == 1 and data.sources[0].weight == 1:
        return one(data.sources[0].ann, data.sources[0].images)
    return MixedInstances([one(s.ann, s.images) for s in data.sources], [s.weight for s in data.sources], seed=cfg.seed)


def write_entry(cfg: TrainConfig, net: torch.nn.Module, out: Path, data: DomainData, wall: float, log: Log, command: str | None,
                init: dict | None = None) -> Path:
    """Save fp16 weights, validate the saved (fp16-rounded) weights, write the card."""
    out.mkdir(parents=True, exist_ok=True)
    log_file = Path(cfg.work_dir) / cfg.model_name / "train.log"
    if log_file.is_file():
        shutil.copyfile(log_file, out / "train.log")
    wfile = out / "weights.safetensors"
    digest = save_weights(net, wfile)
    method = METHODS[cfg.method]
    augment = "random h/v flips and 90-degree rotations" + (f", random {cfg.crop}x{cfg.crop} crops" if cfg.crop else "")
    card = ModelCard(
        name=cfg.model_name,
        family=method.family,
        paper=method.paper,
        builder=method.builder,
        params=method.params.model_validate(cfg.params).model_dump(mode="json"),
        categories=data.categories,
        input={"color": "RGB", "dtype": "uint8", "range": [0, 255]},
        weights={"file": wfile.name, "sha256": digest, "format": "safetensors", "dtype": "float16"},
        training={
            "command": command or f"segpipe train {cfg.method} --domain {cfg.domain}",
            "data": data.train_record | {"augmentation": augment},
            "seed": cfg.seed,
            "iterations": cfg.iterations,
            "batch_size": cfg.batch_size,
            "wall_time_s": round(wall, 1),
            "hardware": _hardware(cfg),
            "log": "train.log" if (out / "train.log").is_file() else None,
            "config": cfg.model_dump(mode="json", exclude={"work_dir", "out"}),
            "init": init,
        },
        limits=method.limits(method.params.model_validate(cfg.params)) if method.limits else [],
        license="Apache-2.0",
    )
    # Validate the weights exactly as shipped (fp16 round trip).
    (out / "card.yaml").write_text(yaml.safe_dump(card.model_dump(mode="json"), sort_keys=False))
    from segpipe.modeling.zoo import load_adapter

    adapter, _ = load_adapter(str(out / "card.yaml"), device=str(train_device(cfg)))
    gt = load_gt(data.val_ann)
    t = time.time()
    if cfg.method == "pointrend":
        card.metrics = _refiner_metrics(cfg, adapter, gt, data, log)
    else:
        tiling, command = None, data.eval_command
        if cfg.val_tiling != "off":
            from segpipe.modeling.tiled import default_tile

            tiling = TilingConfig(mode=cfg.val_tiling, tile=default_tile(card))
            command += f" --tiling {cfg.val_tiling}"
        stats = evaluate(gt, predict_dataset(adapter, gt, data.val_images, tiling=tiling), max_dets=data.max_dets)
        log(f"validation ({time.time() - t:.0f}s): AP={stats['AP']:.3f} AP50={stats['AP50']:.3f} AP75={stats['AP75']:.3f}")
        card.metrics = [MetricsRecord(split=data.val_split, command=command, values=_values(stats, data.max_dets))]
    card = ModelCard.model_validate(card.model_dump())
    (out / "card.yaml").write_text(yaml.safe_dump(card.model_dump(mode="json"), sort_keys=False))
    log(f"wrote {out / 'card.yaml'} ({card.version()})")
    return out / "card.yaml"


def _hardware(cfg: TrainConfig) -> str:
    dev = train_device(cfg)
    gpu = f"{torch.cuda.get_device_name(dev)} GPU + " if dev.type == "cuda" else ""
    return (f"{gpu}{platform.machine()} CPU x{torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"python {sys.version.split()[0]}")


def _values(stats: dict, max_dets: int) -> dict:
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax", "BoundaryAP", "BoundaryAP50", "BoundaryAP75"]
    return ({k: round(float(stats[k]), 4) for k in keys if k in stats}
            | {f"AP[{k}]": round(v, 4) for k, v in stats["per_category"].items()} | {"maxDets": max_dets})


def _refiner_metrics(cfg: TrainConfig, refiner, gt, data: DomainData, log: Log) -> list[MetricsRecord]:
    """A refiner's card metrics: its base model's val predictions scored before and after it."""
    from segpipe.evaluation import evaluate_refiner
    from segpipe.modeling.zoo import load_adapter

    base_name = cfg.refine_base or f"maskrcnn-{cfg.domain}"
    base, base_card = load_adapter(base_name)
    t = time.time()
    before, after = evaluate_refiner(refiner, base, gt, data.val_images, max_dets=data.max_dets)
    log(f"validation ({time.time() - t:.0f}s) on {base_card.version()}: AP {before['AP']:.3f} -> {after['AP']:.3f}, "
        f"AP75 {before['AP75']:.3f} -> {after['AP75']:.3f}, Boundary AP {before['BoundaryAP']:.3f} -> {after['BoundaryAP']:.3f}")
    command = data.eval_command.replace(f"models eval {cfg.model_name}", f"models eval {cfg.model_name} --base {base_name}")
    return [MetricsRecord(split=f"{data.val_split}; {base_card.version()} unrefined", command=command,
                          values=_values(before, data.max_dets)),
            MetricsRecord(split=f"{data.val_split}; {base_card.version()} refined", command=command,
                          values=_values(after, data.max_dets))]


def _tee(log: Log, path: Path) -> Log:
    """A logger that also appends each line to ``path``."""

    def both(message: str) -> None:
        log(message)
        with open(path, "a") as f:
            f.write(message + "\n")

    return both


def shell_command(argv: list[str]) -> str:
    return "segpipe " + " ".join(shlex.quote(a) for a in argv)
