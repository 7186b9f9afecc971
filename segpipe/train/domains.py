"""Training domains: where a (method, domain) run gets its train and val COCO datasets."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import yaml

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
    sources: tuple = ()  # (Source, ...) when training on a mix of COCO files instead of train_ann


def nuclei_root(cfg: TrainConfig) -> str:
    """The nuclei data URI: ``cfg.data``, else $SEGPIPE_NUCLEI, else ../shared/data/nuclei beside the checkout."""
    return cfg.data or os.environ.get("SEGPIPE_NUCLEI") or str(REPO.parent / "shared" / "data" / "nuclei")


def prepare(cfg: TrainConfig, log: Log) -> DomainData:
    if cfg.domain == "shapes":
        data = _shapes(cfg, log)
    elif cfg.domain == "nuclei":
        data = _nuclei(cfg, log)
    else:
        raise ValueError(f"unknown domain {cfg.domain!r}")
    return _with_sources(data, cfg, log) if cfg.sources else data


class DataSourceError(ValueError):
    """A training source that cannot be trained on (overlaps validation, holds no images)."""


@dataclass(frozen=True)
class Source:
    """A resolved training source: annotation URI, image folder, weight."""

    ann: str
    images: str
    weight: float


def _with_sources(data: DomainData, cfg: TrainConfig, log: Log) -> DomainData:
    """The domain's validation with ``cfg.sources`` as the training set; refuses a source that
    shares an image with validation (by file name)."""
    val_names = {Path(im["file_name"]).name for im in read_json(data.val_ann)["images"]}
    sources, record = [], []
    for src in cfg.sources:
        doc = read_json(src.ann)
        images = src.images or f"{src.ann.rsplit('/', 1)[0] if '/' in src.ann else '.'}/images"
        names = {Path(im.get("segpipe_uri") or im["file_name"]).name for im in doc["images"]}
        shared = sorted(names & val_names) if cfg.domain == "nuclei" else []
        if shared:
            raise DataSourceError(f"{src.ann} holds {len(shared)} validation images (e.g. {shared[0]}): training on them would "
                             "make the card's val metrics meaningless")
        if not doc["images"]:
            raise DataSourceError(f"{src.ann} holds no images")
        n_ann = sum(1 for a in doc["annotations"] if not a.get("iscrowd", 0))
        n_crowd = len(doc["annotations"]) - n_ann
        sources.append(Source(ann=src.ann, images=images, weight=src.weight))
        rec = {"file": src.ann, "sha256": _digest(src.ann), "images": len(doc["images"]), "instances": n_ann,
               "weight": src.weight}
        if n_crowd:
            from segpipe.train.methods import METHODS

            honoured = METHODS[cfg.method].ignore_regions
            rec["ignore_regions"] = {"count": n_crowd, "honoured": honoured}
            log(f"source {src.ann}: {n_crowd} ignore regions (iscrowd): "
                + ("left out of the loss" if honoured else f"{cfg.method} does not honour them: they count as background"))
        card = _dataset_card(src.ann)
        if card:
            rec["dataset_card"] = card
        record.append(rec)
        log(f"source {src.ann}: {len(doc['images'])} images, {n_ann} instances, weight {src.weight}")
    return replace(data, train_ann=sources[0].ann, train_images=sources[0].images, sources=tuple(sources),
                   train_record={k: v for k, v in data.train_record.items() if k != "train"} | {"train": record})


def _digest(uri: str) -> str:
    fs, path = resolve(uri)
    return hashlib.sha256(fs.cat_file(path)).hexdigest()


def _dataset_card(ann_uri: str) -> dict | None:
    """What a pseudo-label set's ``card.yaml`` (beside the file) says of where it came from."""
    fs, path = resolve(ann_uri)
    card_path = f"{path.rsplit('/', 1)[0]}/card.yaml"
    if not fs.exists(card_path):
        return None
    card = yaml.safe_load(fs.cat_file(card_path)) or {}
    return {k: card[k] for k in ("name", "run_id", "models", "refiner", "keep", "counts") if k in card}


def _shapes(cfg: TrainConfig, log: Log) -> DomainData:
    work = Path(cfg.work_dir)
    dirs = []
    for split, n, seed in (("train", cfg.train_n, cfg.train_seed), ("val", cfg.val_n, cfg.val_seed)):
        d = work / f"shapes-{split}-seed{seed}-n{n}"
        if split == "train" and cfg.sources:  # trains on the sources instead: no training set to generate
            dirs.append(d)
            continue
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
