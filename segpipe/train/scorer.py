"""``segpipe train scorer``: the ensemble scorer learns each fused instance's mask IoU with the
truth from a run over the training images (``--priors RUN``), and is scored on a run over the
val images (``--val-run RUN``): the ensemble's AP ranked by the run's own confidence against
ranked by the scorer's predicted IoU."""

from __future__ import annotations

import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from pycocotools import mask as mu

from segpipe.config import MetricsRecord, ModelCard, ScorerParams, TrainConfig
from segpipe.ensemble.replay import ReplayError, RunEnsemble, fused_with_truth
from segpipe.ensemble.scorer import ScorerNet, ensemble_features, load_scorer, rescore
from segpipe.evaluation import evaluate, instances_to_results, load_gt
from segpipe.modeling.zoo import save_weights
from segpipe.train.domains import DomainData, prepare

Log = Callable[[str], None]


def best_iou(fused, gt_rles: list[dict]) -> np.ndarray:
    """Each fused instance's best mask IoU with a ground-truth instance (0 without one) -> [N]."""
    n = len(fused.instances)
    if n == 0 or not gt_rles:
        return np.zeros(n, np.float32)
    return np.asarray(mu.iou(fused.instances.masks, gt_rles, [0] * len(gt_rles)), np.float32).reshape(n, -1).max(1)


def dataset(run: RunEnsemble, ann_uri: str, image_dir: str, models: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A run's fused instances over annotated images -> (features [N, F], best IoU with the truth [N])."""
    xs, ys = [], []
    for im in fused_with_truth(run, ann_uri, image_dir):
        xs.append(ensemble_features(im.fused, models))
        ys.append(best_iou(im.fused, im.gt_rles))
    return np.concatenate(xs), np.concatenate(ys)


def fit(net: ScorerNet, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, log: Log) -> None:
    """Adam on the squared error of sigmoid(logit) against the IoU, ``cfg.iterations`` batches of
    ``cfg.batch_size`` drawn by a generator seeded with ``cfg.seed``; warmup, then cosine decay."""
    from segpipe.train.loop import lr_at

    with torch.no_grad():
        net.mean.copy_(torch.from_numpy(x.mean(0)))
        net.std.copy_(torch.from_numpy(x.std(0) + 1e-3))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(net.mlp.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = None
    for it in range(cfg.iterations):
        for g in opt.param_groups:
            g["lr"] = lr_at(it, cfg)
        b = torch.randint(len(yt), (min(cfg.batch_size, len(yt)),), generator=gen)
        loss = torch.nn.functional.mse_loss(torch.sigmoid(net(xt[b])), yt[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lv = float(loss.detach())
        run = lv if run is None else 0.98 * run + 0.02 * lv
        if (it + 1) % 500 == 0 or it + 1 == cfg.iterations:
            log(f"it {it + 1}/{cfg.iterations} mse={run:.4f} lr={lr_at(it, cfg):.2e}")


def ensemble_ap(run: RunEnsemble, ann_uri: str, image_dir: str, max_dets: int, scorer) -> tuple[dict, dict]:
    """COCO mask AP of ``run``'s ensemble on the annotated images, from one replay of the run:
    (ranked as the run ranks, ranked by ``scorer``'s (``ScorerWeights``) predicted IoU)."""
    gt = load_gt(ann_uri)
    ids = {im["file_name"]: im["id"] for im in gt.dataset["images"]}
    own, scored, seen = [], [], []
    for im in fused_with_truth(run, ann_uri, image_dir):
        own += instances_to_results(ids[im.file_name], im.fused.instances)
        scored += instances_to_results(ids[im.file_name], rescore(im.fused, scorer, "confidence").instances)
        seen.append(ids[im.file_name])
    return evaluate(gt, own, image_ids=seen, max_dets=max_dets), evaluate(gt, scored, image_ids=seen, max_dets=max_dets)


def train_scorer(cfg: TrainConfig, log: Log = print, command: str | None = None) -> Path:
    """Train, save fp16 weights + card (metrics on ``cfg.val_run`` when given) -> the card path."""
    from segpipe.train.loop import _tee

    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.work_dir) / cfg.model_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train.log").unlink(missing_ok=True)  # the log of this training only
    log = _tee(log, run_dir / "train.log")
    data: DomainData = prepare(cfg, log)
    run = RunEnsemble.of(cfg.priors)
    models = [n for n, _ in run.models]
    params = ScorerParams.model_validate(cfg.params | {"models": models})
    t0 = time.time()
    x, y = dataset(run, data.train_ann, data.train_images, models)
    log(f"scorer: {len(y)} fused instances from {cfg.priors} (models {', '.join(v for _, v in run.models)}); "
        f"mean best IoU {y.mean():.3f}, {(y >= 0.5).mean():.1%} at 0.5 or more")
    net = ScorerNet(params)
    fit(net, x, y, cfg, log)
    wall = time.time() - t0
    out = Path(cfg.out or Path("models") / cfg.model_name)
    out.mkdir(parents=True, exist_ok=True)
    digest = save_weights(net, out / "weights.safetensors")
    card = ModelCard(
        name=cfg.model_name, family="ensemble scorer",
        paper="learned mask-IoU ranking in the spirit of Mask Scoring R-CNN, Huang, Huang, Gong, Huang, Wang, CVPR 2019 "
              "(arXiv:1903.00241), over the ensemble's evidence",
        builder="scorer", params=params.model_dump(mode="json"), categories=data.categories,
        input={"features": "segpipe.ensemble.scorer.ensemble_features"},
        weights={"file": "weights.safetensors", "sha256": digest, "format": "safetensors", "dtype": "float16"},
        training={"command": command or f"segpipe train scorer --domain {cfg.domain} --priors {cfg.priors}",
                  "data": data.train_record | {"priors": {"run": cfg.priors, "run_id": run.run_id,
                                                          "models": [v for _, v in run.models],
                                                          "ensemble": run.config.model_dump(mode="json"),
                                                          "instances": int(len(y)), "mean_best_iou": round(float(y.mean()), 4)}},
                  "seed": cfg.seed, "iterations": cfg.iterations, "batch_size": cfg.batch_size, "wall_time_s": round(wall, 1),
                  "hardware": f"{platform.machine()} CPU x{torch.get_num_threads()} threads, torch {torch.__version__}, "
                              f"python {sys.version.split()[0]}",
                  "config": cfg.model_dump(mode="json", exclude={"work_dir", "out"})},
    )
    (out / "card.yaml").write_text(yaml.safe_dump(card.model_dump(mode="json"), sort_keys=False))
    if cfg.val_run:
        val = RunEnsemble.of(cfg.val_run)
        if val.models != run.models:
            raise ReplayError(f"val run {cfg.val_run} ran {val.models}, the training run {run.models}: not the same ensemble")
        scorer = load_scorer(str(out / "card.yaml"))  # the weights as shipped (fp16)
        before, after = ensemble_ap(val, data.val_ann, data.val_images, data.max_dets, scorer)
        log(f"validation on {cfg.val_run}: ensemble AP {before['AP']:.3f} -> {after['AP']:.3f} with the scorer "
            f"(AP50 {before['AP50']:.3f} -> {after['AP50']:.3f}, AP75 {before['AP75']:.3f} -> {after['AP75']:.3f})")
        keys = ("AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax")
        rank = run.config.rank
        card.metrics = [MetricsRecord(split=f"{data.val_split}; run {val.run_id}, ensemble ranked by {rank}",
                                      command=f"segpipe eval --pred VAL_RUN --gt VAL_GT --max-dets {data.max_dets}",
                                      values={k: round(float(before[k]), 4) for k in keys} | {"maxDets": data.max_dets}),
                        MetricsRecord(split=f"{data.val_split}; run {val.run_id}, ensemble ranked by {card.name}",
                                      command=f"segpipe ensemble VAL_RUN --out OUT --set ensemble.scorer={out / 'card.yaml'} "
                                              f"--set ensemble.rank=confidence && segpipe eval --pred OUT --gt VAL_GT "
                                              f"--max-dets {data.max_dets}",
                                      values={k: round(float(after[k]), 4) for k in keys} | {"maxDets": data.max_dets})]
        card = ModelCard.model_validate(card.model_dump())
    log(f"wrote {out / 'card.yaml'} ({card.version()})")
    shutil.copyfile(run_dir / "train.log", out / "train.log")
    card.training.log = "train.log"
    (out / "card.yaml").write_text(yaml.safe_dump(card.model_dump(mode="json"), sort_keys=False))
    return out / "card.yaml"
