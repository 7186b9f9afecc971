"""Tiled prediction with a trained zoo model: on a 2 x 2 mosaic of shapes images, tiles without
overlap give exactly the quadrants' own predictions; with overlap, every mosaic object is still
found once; the stage tiles only when asked; the downscaled full-image pass maps back."""

from __future__ import annotations

import numpy as np
import pytest

from segpipe.config import TilingConfig
from segpipe.modeling.tiled import default_tile, needs_tiling, tiled_predict, upscale
from segpipe.modeling.zoo import load_adapter
from segpipe.ops import masks as mask_ops


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    from PIL import Image

    from segpipe.data.synthetic import SynthSpec, write_dataset

    root = tmp_path_factory.mktemp("mosaic")
    write_dataset(SynthSpec(n=4, seed=99), root)
    ims = [np.array(Image.open(p).convert("RGB")) for p in sorted((root / "images").glob("*.jpg"))]
    top, bottom = np.concatenate(ims[:2], 1), np.concatenate(ims[2:], 1)
    return ims, np.ascontiguousarray(np.concatenate([top, bottom], 0))


@pytest.fixture(scope="module")
def maskrcnn():
    adapter, card = load_adapter("maskrcnn-shapes")
    return adapter, card


def _keyed(inst):
    return sorted((m["counts"], round(float(s), 4)) for m, s in zip(inst.masks, inst.scores))


def test_default_tile_is_the_training_size(maskrcnn):
    _, card = maskrcnn
    assert default_tile(card) == 256


@pytest.mark.parametrize("mode, size, expect", [("off", 4000, False), ("on", 300, True), ("on", 256, False),
                                                 ("auto", 380, False), ("auto", 390, True)])
def test_needs_tiling(mode, size, expect):
    assert needs_tiling(size, 100, 256, TilingConfig(mode=mode)) is expect


def test_tiles_without_overlap_equal_the_quadrants_predictions(mosaic, maskrcnn):
    ims, big = mosaic
    adapter, _ = maskrcnn
    tiled = tiled_predict(adapter, big, 256, TilingConfig(mode="on", overlap=0.0), batch_size=4)
    from segpipe.ops.tiles import Tile, concat, shift

    parts = []
    for k, inst in enumerate(adapter.predict(ims)):
        y, x = divmod(k, 2)
        parts.append(shift(inst, Tile(256 * x, 256 * y, 256 * x + 256, 256 * y + 256, (0, 0, 0, 0)), 512, 512))
    assert len(tiled) > 10 and _keyed(tiled) == _keyed(concat(parts, 512, 512))


def test_overlapping_tiles_find_each_object_once(mosaic, maskrcnn):
    ims, big = mosaic
    adapter, _ = maskrcnn
    inst = tiled_predict(adapter, big, 256, TilingConfig(mode="on", overlap=0.25), batch_size=4)
    def dup_pairs(x):
        x = x.select(np.nonzero(x.scores >= 0.5)[0])
        iou = np.triu(mask_ops.iou(x.masks, x.masks), 1)
        same = x.labels[:, None] == x.labels[None, :]
        return int(((iou > 0.5) & same).sum()), int(((iou > 0.5) & ~same).sum()), len(x)

    same, cross, n = dup_pairs(inst)
    # No seam duplicate survives the merge; Mask R-CNN's own cross-class pairs (its NMS is per
    # class) are neither added nor removed by tiling.
    assert n >= 20 and same == 0
    assert cross == sum(dup_pairs(q)[1] for q in adapter.predict(ims))


def test_upscale_maps_a_downscaled_prediction_back(mosaic, maskrcnn):
    ims, _ = mosaic
    adapter, _ = maskrcnn
    small = adapter.predict([ims[0][::2, ::2].copy()])[0]
    big = upscale(small, 256, 256)
    assert (big.height, big.width) == (256, 256) and len(big) <= len(small)
    ratio = mask_ops.area(big.masks).sum() / max(mask_ops.area(small.masks).sum(), 1)
    assert 3.0 < ratio < 5.0  # areas grow by about 2 x 2


@pytest.mark.slow
def test_a_workflow_runs_tiled(ray_local, shapes_data, tmp_path):
    """tiling.mode=on with 128-pixel tiles on 256-pixel images: the run completes, masks are in
    the image frame, and the trained model still finds the objects (AP vs the ground truth)."""
    from segpipe.config import load_workflow
    from segpipe.pipeline.run import run_workflow
    from segpipe.sinks.writer import read_committed

    from conftest import REPO

    cfg = load_workflow(REPO / "workflows" / "shapes.yaml", [
        f"source.uri={shapes_data / 'images'}", f"output.uri={tmp_path / 'out'}", "tiling.mode=on", "tiling.tile=160",
        f"eval.gt={shapes_data / 'annotations.json'}"])
    res = run_workflow(cfg, run_id="tiled", progress=lambda m: None)
    assert res.status == "complete" and res.counts["ok"] == 6
    rows = read_committed(str(tmp_path / "out"), "instances").to_pylist()
    assert rows and {(r["mask_height"], r["mask_width"]) for r in rows} == {(256, 256)}
    assert res.eval["AP"] > 0.3


def test_an_image_reaches_the_bound_when_any_of_its_tiles_does():
    from segpipe.structures import Instances

    class Crowded:
        """A stand-in model that finds nothing and says a tile reached its bound when it holds bright pixels."""

        instance_bound = 1

        def reached_bound(self, raw):
            return raw

        def predict(self, images, at_bound=None):
            if at_bound is not None:
                at_bound.extend(bool(im.max() > 0) for im in images)
            return [Instances(height=im.shape[0], width=im.shape[1]) for im in images]

    img = np.zeros((256, 256, 3), np.uint8)
    flags: list[bool] = []
    tiled_predict(Crowded(), img, 128, TilingConfig(mode="on"), batch_size=2, at_bound=flags)
    img[250:, 250:] = 255  # only the bottom-right tile sees it
    tiled_predict(Crowded(), img, 128, TilingConfig(mode="on"), batch_size=2, at_bound=flags)
    tiled_predict(Crowded(), img, 128, TilingConfig(mode="on", full_image=True), batch_size=2, at_bound=flags)
    img[:] = 0
    img[0, 0] = 255  # in the corner tile and the downscaled full-image pass
    tiled_predict(Crowded(), img, 128, TilingConfig(mode="on", full_image=True), batch_size=2, at_bound=flags)
    assert flags == [False, True, True, True]


def test_full_image_pass_adds_objects_larger_than_a_tile(mosaic, maskrcnn):
    """One object spanning four 128-pixel tiles is only cut pieces for the tiles; the downscaled
    whole-image pass sees it whole and its copy is merged in."""
    from segpipe.structures import Instances

    class Disc:
        """A stand-in model with a fixed answer: one disc of radius 0.4 x the image, score 0.9."""

        def predict(self, images):
            out = []
            for im in images:
                h, w = im.shape[:2]
                yy, xx = np.mgrid[0:h, 0:w]
                m = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= (0.4 * min(h, w)) ** 2)[None]
                rles = mask_ops.encode(m.astype(np.uint8))
                x, y, bw, bh = mask_ops.to_bbox(rles)[0]
                out.append(Instances(height=h, width=w, boxes=np.array([[x, y, x + bw, y + bh]], np.float32),
                                     scores=np.array([0.9], np.float32), labels=np.array([1]), masks=rles,
                                     mask_probs=np.ones((1, 28, 28), np.float16)))
            return out

    img = np.zeros((256, 256, 3), np.uint8)
    flags: list[bool] = []
    tiled_predict(Disc(), img, 128, TilingConfig(mode="on"), batch_size=4, at_bound=flags)
    assert flags == [False]  # a model that cannot tell never reports the bound
    with_full = tiled_predict(Disc(), img, 128, TilingConfig(mode="on", overlap=0.25, full_image=True,
                                                              full_image_min_size=0.5), batch_size=4)
    big = with_full.select(np.nonzero(mask_ops.area(with_full.masks) > 0.3 * 256 * 256)[0])
    assert len(big) == 1  # the image-sized disc, found once, whole


def test_models_eval_tiles_the_images_it_is_asked_to(mosaic, maskrcnn, tmp_path):
    """``segpipe models eval --tiling on``: predict_dataset runs a mosaic larger than the tile
    through tiled_predict, exactly as the pipeline stage does, and leaves a tile-sized image whole."""
    import json

    from PIL import Image

    from segpipe.evaluation import instances_to_results, load_gt, predict_dataset

    ims, big = mosaic
    adapter, _ = maskrcnn
    (tmp_path / "images").mkdir()
    Image.fromarray(big).save(tmp_path / "images" / "big.png")
    Image.fromarray(ims[0]).save(tmp_path / "images" / "small.png")
    doc = {"images": [{"id": 1, "file_name": "big.png", "height": big.shape[0], "width": big.shape[1]},
                      {"id": 2, "file_name": "small.png", "height": 256, "width": 256}],
           "annotations": [], "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3, 4)]}
    (tmp_path / "gt.json").write_text(json.dumps(doc))
    gt = load_gt(tmp_path / "gt.json")
    cfg = TilingConfig(mode="on", overlap=0.0, tile=256)
    got = predict_dataset(adapter, gt, tmp_path / "images", tiling=cfg)
    want = instances_to_results(1, tiled_predict(adapter, big, 256, cfg, 4)) + instances_to_results(2, adapter.predict([ims[0]])[0])
    key = lambda r: (r["image_id"], r["segmentation"]["counts"], round(r["score"], 4))  # noqa: E731
    assert sorted(map(key, got)) == sorted(map(key, want))
    whole = predict_dataset(adapter, gt, tmp_path / "images")
    assert sorted(map(key, whole)) != sorted(map(key, got))  # untiled, the mosaic gives other predictions
    bound = adapter.instance_bound
    flags: list[bool] = []
    predict_dataset(adapter, gt, tmp_path / "images", tiling=cfg, at_bound=flags)
    assert bound == 100 and flags == [False, False]  # the card's box_detections_per_img: no image has that many
    try:
        adapter.instance_bound = 1  # every image with a detection is "at the bound" now
        predict_dataset(adapter, gt, tmp_path / "images", tiling=cfg, at_bound=flags)
    finally:
        adapter.instance_bound = bound
    assert flags == [False, False, True, True]
