"""The nuclei domain: real microscopy data read through fsspec, random crops, training end to end.

Reads ../shared/data/nuclei (or $SEGPIPE_NUCLEI); every test that needs it skips with the reason
when it is absent. The bundled sample (workflows/samples/nuclei) is always present.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from segpipe.cli import app
from segpipe.config import TrainConfig
from segpipe.data.coco import CocoInstances
from segpipe.train.domains import nuclei_root
from segpipe.train.loop import train

from conftest import REPO, TINY_EMBED_PARAMS, TINY_PARAMS, TINY_POINTREND_PARAMS, TINY_POLAR_PARAMS, TINY_RSIS_PARAMS
from conftest import mini_nuclei as _mini_nuclei

SAMPLE = REPO / "workflows" / "samples" / "nuclei"


@pytest.fixture(scope="module")
def nuclei() -> Path:
    root = Path(nuclei_root(TrainConfig(domain="nuclei")))
    if not (root / "val.json").is_file():
        pytest.skip(f"nuclei data not found at {root} (set $SEGPIPE_NUCLEI to the folder with train.json, val.json, images/)")
    return root


def test_sample_is_a_consistent_coco_subset_of_val(nuclei):
    sample = json.loads((SAMPLE / "annotations.json").read_text())
    val = json.loads((nuclei / "val.json").read_text())
    val_ids = {im["id"]: im["file_name"] for im in val["images"]}
    assert all(val_ids.get(im["id"]) == im["file_name"] for im in sample["images"])
    ids = {im["id"] for im in sample["images"]}
    assert [a for a in val["annotations"] if a["image_id"] in ids] == sample["annotations"]
    assert sorted(p.name for p in (SAMPLE / "images").iterdir()) == sorted(im["file_name"] for im in sample["images"])
    assert sum(p.stat().st_size for p in (SAMPLE / "images").iterdir()) <= 2 * 1024 * 1024


def test_crops_flips_and_determinism():
    ds = CocoInstances(str(SAMPLE / "annotations.json"), str(SAMPLE / "images"), category_ids=[1], crop=128, flips=True, seed=3)
    big = max(range(len(ds.images)), key=lambda i: len(ds.by_image[ds.images[i]["id"]]))  # 1272x603, 289 nuclei
    for epoch in range(20):  # 70% of this image is empty background: find a window with nuclei
        ds.set_epoch(epoch)
        img, tgt = ds[big]
        if len(tgt["labels"]):
            break
    n = len(tgt["labels"])
    assert img.shape == (3, 128, 128) and tgt["masks"].shape == (n, 128, 128) and n > 0
    assert (tgt["masks"].flatten(1).sum(1) >= 4).all()  # slivers cut by the crop are dropped
    b = tgt["boxes"]
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= 128).all() and (b[:, 0] < b[:, 2]).all() and (b[:, 1] < b[:, 3]).all()
    again, tgt2 = ds[big]
    assert torch.equal(img, again) and torch.equal(tgt["masks"], tgt2["masks"])
    ds.set_epoch(epoch + 1)
    other, _ = ds[big]
    assert not torch.equal(img, other)  # another epoch, another window


def test_crop_larger_than_the_image_pads():
    ds = CocoInstances(str(SAMPLE / "annotations.json"), str(SAMPLE / "images"), category_ids=[1], crop=300)
    small = next(i for i, im in enumerate(ds.images) if im["width"] == 256)
    img, tgt = ds[small]
    assert img.shape == (3, 300, 300)
    assert img[:, 256:, :].abs().sum() == 0 and img[:, :, 256:].abs().sum() == 0
    full = CocoInstances(str(SAMPLE / "annotations.json"), str(SAMPLE / "images"), category_ids=[1])
    assert len(tgt["labels"]) == len(full[small][1]["labels"])  # the whole image is inside the window


@pytest.mark.parametrize("method, params", [("polarmask", TINY_POLAR_PARAMS), ("maskrcnn", TINY_PARAMS | {"resize": False}),
                                            ("spatialemb", TINY_EMBED_PARAMS), ("discloss", TINY_EMBED_PARAMS),
                                            ("rsis", TINY_RSIS_PARAMS), ("pointrend", TINY_POINTREND_PARAMS)])
def test_train_on_nuclei_from_a_uri_writes_a_card(tmp_path, method, params):
    root = _mini_nuclei(tmp_path)
    cfg = TrainConfig(method=method, domain="nuclei", data=root.as_uri(), iterations=2, batch_size=2, crop=64, warmup=1,
                      work_dir=str(tmp_path / "work"), out=str(tmp_path / "card"), name="tiny", params=params, threads=1)
    card_path = train(cfg, log=lambda m: None)
    import yaml

    card = yaml.safe_load(card_path.read_text())
    assert card["builder"] == method and card["categories"] == [{"id": 1, "name": "nucleus"}]
    assert card["metrics"][0]["values"]["maxDets"] == 1000
    assert "nuclei val" in card["metrics"][0]["split"] and "--max-dets 1000" in card["metrics"][0]["command"]
    assert "256" not in card["training"]["data"]["augmentation"] and "64x64 crops" in card["training"]["data"]["augmentation"]
    # RSIS's bounded step count: the nuclei recipe scores it tiled at its training crop, and says so.
    assert ("--tiling on" in card["metrics"][0]["command"]) == (method == "rsis")
    assert card["training"]["config"]["val_tiling"] == ("on" if method == "rsis" else "off")
    if method == "pointrend":  # scored on its base model's val predictions, before and after, with Boundary AP
        assert [m["split"].rsplit(" ", 1)[-1] for m in card["metrics"]] == ["unrefined", "refined"]
        assert "maskrcnn-nuclei@" in card["metrics"][1]["split"] and "--base maskrcnn-nuclei" in card["metrics"][1]["command"]
        assert all("BoundaryAP" in m["values"] for m in card["metrics"])


def test_nuclei_recipe_defaults_and_overrides():
    cfg = TrainConfig(method="maskrcnn", domain="nuclei")
    assert cfg.crop == 256 and cfg.params["resize"] is False and cfg.params["box_detections_per_img"] >= 400
    assert TrainConfig(method="maskrcnn", domain="nuclei", params={"box_detections_per_img": 500}).params["resize"] is False
    assert TrainConfig(method="polarmask", domain="nuclei", iterations=7).iterations == 7
    from segpipe.config import PolarMaskParams

    assert PolarMaskParams().detections_per_img >= 400 and PolarMaskParams().pre_nms_top_n >= 400


def test_missing_nuclei_data_fails_clearly(tmp_path):
    r = CliRunner().invoke(app, ["train", "polarmask", "--domain", "nuclei", "--data", str(tmp_path / "absent"),
                                 "--work-dir", str(tmp_path / "w")])
    assert r.exit_code == 2, r.output
    assert "train.json" in r.output and "--data" in r.output


def test_unknown_method_or_domain_is_a_config_error(tmp_path):
    r = CliRunner().invoke(app, ["train", "yolo"])
    assert r.exit_code == 2 and "method" in r.output
    r = CliRunner().invoke(app, ["train", "polarmask", "--domain", "cats"])
    assert r.exit_code == 2 and "domain" in r.output


def test_models_eval_reads_uris(tmp_path):
    from conftest import make_polar_card

    card = make_polar_card(tmp_path / "p", categories=[{"id": 1, "name": "nucleus"}])
    r = CliRunner().invoke(app, ["models", "eval", str(card), "--gt", (SAMPLE / "annotations.json").as_uri(),
                                 "--max-dets", "1000", "--json"])
    assert r.exit_code == 0, r.output
    stats = json.loads(r.stdout)  # progress lines go to stderr
    assert stats["n_images"] == 7 and stats["max_dets"] == 1000 and 0 <= stats["AP"] <= 1
    assert np.isfinite(stats["AP"])
    for bad, field in ((["--tiling", "sideways"], "--tiling"), (["--tiling", "on", "--tile", "8"], "--tile")):
        r = CliRunner().invoke(app, ["models", "eval", str(card), "--gt", str(SAMPLE / "annotations.json"), *bad])
        assert r.exit_code == 2 and field in r.output, r.output
