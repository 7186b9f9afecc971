"""Pseudo-labels: a run's fused instances kept by the models' agreement, written as a COCO
training set (``instances.json``) with a dataset card (``card.yaml``) beside it.

``keep_failures`` is the pure rule; ``write_pseudo_labels`` streams a run's committed shards
(one shard's rows in memory at a time) through it. The set's images carry ``segpipe_uri`` so
``segpipe train --data SET/instances.json`` reads them wherever the run's source lives.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from datetime import datetime, timezone

import fsspec
import yaml

from segpipe.config import KeepRule, PseudoLabelConfig
from segpipe.io.fs import read_parquet, resolve
from segpipe.sinks.writer import read_manifest, read_markers

BINS = 10  # histogram bins over [0, 1]
CRITERIA = ("votes", "agreement", "confidence", "score")


def keep_failures(row: dict, rule: KeepRule) -> list[str]:
    """The criteria of ``rule`` that a fused instance row fails (empty: keep it).

    ``row`` has n_votes (int), agreement (float or None: one member), confidence and score."""
    out = []
    if int(row.get("n_votes") or 1) < rule.min_votes:
        out.append("votes")
    if float(row.get("agreement") or 0.0) < rule.min_agreement:
        out.append("agreement")
    conf = row.get("confidence")
    if float(conf if conf is not None else row["score"]) < rule.min_confidence:
        out.append("confidence")
    if float(row["score"]) < rule.min_score:
        out.append("score")
    return out


def rule_for(cfg: PseudoLabelConfig, category_name: str | None) -> KeepRule:
    return cfg.per_class.get(category_name or "", cfg.keep)


def verdict(row: dict, cfg: PseudoLabelConfig) -> tuple[str, list[str]]:
    """('kept' | 'ignored' | 'dropped', the keep criteria the row fails). 'ignored': not kept but
    passing ``cfg.ignore`` (written as an ignore region)."""
    fails = keep_failures(row, rule_for(cfg, row.get("category_name")))
    if not fails:
        return "kept", fails
    if cfg.ignore is not None and not keep_failures(row, cfg.ignore):
        return "ignored", fails
    return "dropped", fails


def bin_label(value: float | None) -> str:
    """The histogram bin of a value in [0, 1] ('0.3-0.4'; 'none' for a missing value)."""
    if value is None:
        return "none"
    k = min(int(float(value) * BINS), BINS - 1)
    return f"{k / BINS:.1f}-{(k + 1) / BINS:.1f}"


class _Tally:
    """Kept/dropped (and ignored, with an ignore rule) histograms by class, votes, agreement,
    confidence and score."""

    def __init__(self, sides: tuple[str, ...] = ("kept", "dropped")) -> None:
        self.sides = sides
        self.hist: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
        self.failed: Counter = Counter()

    def add(self, row: dict, side: str, failures: list[str]) -> None:
        conf = row.get("confidence")
        for name, key in (("class", row.get("category_name") or str(row["category_id"])),
                          ("n_votes", str(int(row.get("n_votes") or 1))),
                          ("agreement", bin_label(row.get("agreement"))),
                          ("confidence", bin_label(conf if conf is not None else row["score"])),
                          ("score", bin_label(row["score"]))):
            self.hist[name][key][side] += 1
        self.failed.update(failures)

    def as_dict(self) -> dict:
        return {name: {k: {side: c[side] for side in self.sides} for k, c in sorted(bins.items())}
                for name, bins in self.hist.items()}


def write_pseudo_labels(run_uri: str, cfg: PseudoLabelConfig, *, out_uri: str | None = None, manifest: dict | None = None,
                        fs: fsspec.AbstractFileSystem | None = None) -> dict:
    """Filter a run's committed fused instances by ``cfg`` into ``out_uri`` (default
    ``run_uri``/``cfg.out``): instances.json (COCO; kept instances with their score, n_votes,
    agreement, confidence; with ``cfg.ignore``, the ignored ones too, as iscrowd 1) and card.yaml
    (where from, thresholds, counts, histograms); both
    written to temporary names and moved into place. ``manifest``: the run's manifest (read
    from the run when not given). Returns the card as a dict."""
    fs, root = resolve(run_uri, fs)
    manifest = manifest if manifest is not None else read_manifest(run_uri, fs)
    if out_uri is None:
        out_fs, out_root = fs, f"{root}/{cfg.out}"
    else:
        out_fs, out_root = resolve(out_uri)
    out_fs.makedirs(out_root, exist_ok=True)
    ann_path, card_path = f"{out_root}/instances.json", f"{out_root}/card.yaml"
    markers = read_markers(fs, root)
    tally = _Tally(("kept", "ignored", "dropped") if cfg.ignore is not None else ("kept", "dropped"))
    counts = Counter()
    categories: dict[int, str] = {}
    digest = hashlib.sha256()
    written: set[int] = set()
    with out_fs.open(f"{ann_path}.tmp", "wb") as f:

        def put(chunk: bytes) -> None:
            f.write(chunk)
            digest.update(chunk)

        info = {"description": f"segpipe pseudo-labels of run {manifest.get('run_id')}", "run_id": manifest.get("run_id")}
        put(b'{"info": ' + json.dumps(info).encode() + b', "images": [')
        for images, by_image in _shards(fs, root, markers):  # pass 1: filter, tally, write the images
            for im in images:
                counts["images_processed"] += 1
                if im["status"] != "ok":
                    counts["images_failed"] += 1
                    continue
                counts["images_ok"] += 1
                n_kept = 0
                for r in by_image.get(im["image_id"], []):
                    categories.setdefault(int(r["category_id"]), r.get("category_name") or str(r["category_id"]))
                    side, fails = verdict(r, cfg)
                    tally.add(r, side, fails)
                    counts["instances"] += 1
                    counts[side] += 1
                    n_kept += side == "kept"
                if not n_kept and cfg.empty_images == "drop":
                    counts["images_dropped_empty"] += 1
                    continue
                rec = {"id": im["image_id"], "file_name": im["relpath"], "width": im["width"], "height": im["height"],
                       "segpipe_uri": im["uri"]}
                put((b", " if written else b"") + json.dumps(rec).encode())
                written.add(im["image_id"])
        put(b'], "annotations": [')
        n_ann = n_ignore = 0
        for _, by_image in _shards(fs, root, markers):  # pass 2: the kept (and ignored) instances of the written images
            for image_id in sorted(set(by_image) & written):
                for r in by_image[image_id]:
                    side, _ = verdict(r, cfg)
                    if side != "dropped":
                        n_ann += 1
                        n_ignore += side == "ignored"
                        put((b", " if n_ann > 1 else b"") + json.dumps(_annotation(n_ann, r, side == "ignored")).encode())
        cats = run_categories(manifest) or [{"id": k, "name": v} for k, v in sorted(categories.items())]
        put(b'], "categories": ' + json.dumps(cats).encode() + b"}")
    counts["images_written"], counts["instances_written"] = len(written), n_ann - n_ignore
    counts["ignore_regions_written"] = n_ignore
    out_fs.mv(f"{ann_path}.tmp", ann_path)
    card = {
        "kind": "pseudo-labels",
        "name": out_root.rstrip("/").rsplit("/", 1)[-1],
        "created": datetime.now(timezone.utc).isoformat(),
        "file": "instances.json",
        "sha256": digest.hexdigest(),
        "run": run_uri,
        "run_id": manifest.get("run_id"),
        "workflow_sha256": (manifest.get("workflow") or {}).get("sha256"),
        "models": [{"name": m["name"], "version": m["version"]} for m in manifest.get("models", [])],
        "ensemble": ((manifest.get("workflow") or {}).get("config") or {}).get("ensemble"),
        "refiner": {k: manifest["refiner"][k] for k in ("name", "version")} if manifest.get("refiner") else None,
        "scorer": manifest.get("scorer"),
        "keep": cfg.keep.model_dump(mode="json"),
        "per_class": {k: v.model_dump(mode="json") for k, v in cfg.per_class.items()},
        "empty_images": cfg.empty_images,
        "ignore": cfg.ignore.model_dump(mode="json") if cfg.ignore is not None else None,
        "counts": {k: int(counts[k]) for k in ("images_processed", "images_ok", "images_failed", "images_dropped_empty",
                                                 "images_written", "instances", *tally.sides, "instances_written",
                                                 *(("ignore_regions_written",) if cfg.ignore is not None else ()))},
        # the keep criteria failed by the instances not kept (ignored or dropped); an instance may fail several
        "dropped_by": {c: int(tally.failed[c]) for c in CRITERIA},
        "histograms": tally.as_dict(),
    }
    with out_fs.open(f"{card_path}.tmp", "w") as f:
        f.write(yaml.safe_dump(card, sort_keys=False))
    out_fs.mv(f"{card_path}.tmp", card_path)
    return card


def _shards(fs, root: str, markers: dict):
    """Each committed shard's (image rows, {image_id: instance rows}), in shard order."""
    for _, mk in sorted(markers.items()):
        images = read_parquet(fs, f"{root}/{mk['tables']['images']}").to_pylist()
        rows = read_parquet(fs, f"{root}/{mk['tables']['instances']}", _COLUMNS).to_pylist()
        by_image = defaultdict(list)
        for r in rows:
            by_image[r["image_id"]].append(r)
        yield images, by_image


_COLUMNS = ["image_id", "category_id", "category_name", "score", "bbox", "area", "mask_rle", "mask_height", "mask_width",
            "n_votes", "agreement", "confidence"]


def run_categories(manifest: dict) -> list[dict]:
    """The category set of the run's models (the first model's card)."""
    models = manifest.get("models") or []
    cats = ((models[0].get("card") or {}).get("categories") if models else None) or []
    return [{"id": c["id"], "name": c["name"]} for c in cats]


def _annotation(ann_id: int, r: dict, ignore: bool = False) -> dict:
    return {
        "id": ann_id,
        "image_id": r["image_id"],
        "category_id": r["category_id"],
        "segmentation": {"size": [r["mask_height"], r["mask_width"]], "counts": r["mask_rle"]},
        "area": r["area"],
        "bbox": [round(float(v), 2) for v in r["bbox"]],
        "iscrowd": int(ignore),
        "score": round(float(r["score"]), 5),
        "n_votes": int(r.get("n_votes") or 1),
        "agreement": None if r.get("agreement") is None else round(float(r["agreement"]), 4),
        "confidence": None if r.get("confidence") is None else round(float(r["confidence"]), 4),
    }
