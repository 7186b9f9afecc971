"""Training domains: where a (method, domain) run gets its train and val COCO datasets."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from segpipe.config import TrainConfig
from segpipe.data.coco import read_json
from segpipe.data.synthetic import CATEGORIES, SynthSpec, write_dataset
from segpipe.io.fs import resolve

Log = Callable[[str], None]
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class DomainData:
    """Train/val annotation files and image folders (URIs), the categories, and how to describe them."""

    train_ann: str
    train_images: str
    val_ann: str
    val_images: str
    categories: list[dict]  # [{"id", "name"}], the model's label order
    max_dets: int  # evaluation maxDets
    train_record: dict = field(default_factory=dict)  # for the card's training.data
    val_split: str = ""  # for the card's metrics.split
    eval_command: str = ""  # reproduces the card's metrics


def nuclei_root(cfg: TrainConfig) -> str:
    """The nuclei data URI: ``cfg.data``, else $SEGPIPE_NUCLEI, else ../shared/data/nuclei beside the checkout."""
    return cfg.data or os.environ.get("SEGPIPE_NUCLEI") or str(REPO.parent / "shared" / "data" / "nuclei")


def prepare(cfg: TrainConfig, log: Log) -> DomainData:
    if cfg.domain == "shapes":
        return _shapes(cfg, log)
    if cfg.domain == "nuclei":
        return _nuclei(cfg, log)
    raise ValueError(f"unknown domain {cfg.domain!r}")


def _shapes(cfg: TrainConfig, log: Log) -> DomainData:
    work = Path(cfg.work_dir)
    dirs = []
    for split, n, seed in (("train", cfg.train_n, cfg.train_seed), ("val", cfg.val_n, cfg.val_seed)):
        d = work / f"shapes-{split}-seed{seed}-n{n}"
        if not (d / "annotations.json").is_file():
            log(f"generating shapes {split}: n={n} seed={seed} -> {d}")
            write_dataset(SynthSpec(n=n, seed=seed), d)
        dirs.append(d)
    return DomainData(
        train_ann=str(dirs[0] / "annotations.json"), train_images=str(dirs[0] / "images"),
        val_ann=str(dirs[1] / "annotations.json"), val_images=str(dirs[1] / "images"),
        categories=[{"id": c["id"], "name": c["name"]} for c in CATEGORIES],
        max_dets=100,
        train_record={"generator": "segpipe.data.synthetic", "train": SynthSpec(n=cfg.train_n, seed=cfg.train_seed).model_dump(mode="json")},
        val_split=f"shapes val: segpipe.data.synthetic n={cfg.val_n} seed={cfg.val_seed} (seed never used in training)",
        eval_command=f"segpipe data synth --out VAL --n {cfg.val_n} --seed {cfg.val_seed} && "
                     f"segpipe models eval {cfg.model_name} --gt VAL/annotations.json",
    )


def _nuclei(cfg: TrainConfig, log: Log) -> DomainData:
    root = nuclei_root(cfg).rstrip("/")
    fs, path = resolve(root)
    missing = [n for n in ("train.json", "val.json", "images") if not fs.exists(f"{path}/{n}")]
    if missing:
        raise FileNotFoundError(f"nuclei data at {root} lacks {', '.join(missing)} (set --data or $SEGPIPE_NUCLEI)")
    train = read_json(f"{root}/train.json")
    val = read_json(f"{root}/val.json")
    log(f"nuclei: {root}: train {len(train['images'])} images / {len(train['annotations'])} instances, "
        f"val {len(val['images'])} / {len(val['annotations'])}")
    return DomainData(
        train_ann=f"{root}/train.json", train_images=f"{root}/images",
        val_ann=f"{root}/val.json", val_images=f"{root}/images",
        categories=[{"id": c["id"], "name": c["name"]} for c in train["categories"]],
        max_dets=1000,
        train_record={
            "dataset": "nuclei: 2018 Data Science Bowl stage-1 train (BBBC038v1, CC0), community-fixed masks",
            "train": f"train.json: {len(train['images'])} images, {len(train['annotations'])} instances",
        },
        val_split=f"nuclei val: val.json, {len(val['images'])} images, {len(val['annotations'])} instances (disjoint from train)",
        eval_command=f"segpipe models eval {cfg.model_name} --gt DATA/val.json --images DATA/images --max-dets 1000",
    )
