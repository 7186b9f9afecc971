"""segpipe.evaluation: COCO segm metrics through pycocotools, remapping by file name, run outputs."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import contextlib
import io

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from segpipe.data.synthetic import CATEGORIES, SynthSpec, write_dataset
from segpipe.evaluation import STAT_NAMES, evaluate, evaluate_output, format_table, instances_to_results, load_gt, remap_to_gt
from segpipe.io.listing import image_id_for
from segpipe.ops import masks as mask_ops
from segpipe.sinks.tables import instance_rows, to_table
from segpipe.sinks.writer import RunWriter
from segpipe.structures import Instances

NAMES = {c["id"]: c["name"] for c in CATEGORIES}


@pytest.fixture(scope="module")
def gt_path(tmp_path_factory) -> Path:
    return write_dataset(SynthSpec(n=4, seed=3), tmp_path_factory.mktemp("gt"))


@pytest.fixture(scope="module")
def gt(gt_path):
    return load_gt(gt_path)


def perfect_results(gt, anns=None) -> list[dict]:
    anns = gt.dataset["annotations"] if anns is None else anns
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": dict(a["segmentation"]), "score": 1.0}
            for a in anns]


def noisy_results(gt, seed: int = 0) -> list[dict]:
    """Imperfect predictions: shifted or eroded GT masks with random scores, plus false positives."""
    rng = np.random.default_rng(seed)
    out = []
    for k, a in enumerate(gt.dataset["annotations"]):
        m = gt.annToMask(a)
        if k % 3 == 1:
            m = np.roll(m, shift=int(rng.integers(1, 4)), axis=int(rng.integers(0, 2)))
        elif k % 3 == 2:
            m = m & np.roll(m, 1, axis=0) & np.roll(m, 1, axis=1)  # erode a little
        if k % 5 == 4 or m.sum() == 0:
            continue  # a miss
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        out.append({"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": rle,
                    "score": float(rng.uniform(0.05, 1.0))})
        if k % 4 == 0:  # a false positive: right mask, wrong category
            out.append({"image_id": a["image_id"], "category_id": a["category_id"] % len(CATEGORIES) + 1,
                        "segmentation": rle, "score": float(rng.uniform(0.05, 1.0))})
    return out


def pycocotools_stats(gt, results, max_dets: list[int]) -> np.ndarray:
    """The oracle: COCOeval + summarize with its standard usage."""
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes([dict(r) for r in results]), iouType="segm")
        ev.params.maxDets = max_dets
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_gt_is_nontrivial(gt):
    per_img = Counter(a["image_id"] for a in gt.dataset["annotations"])
    assert len(gt.getImgIds()) == 4
    assert max(per_img.values()) >= 2  # several instances per image somewhere (needed below)
    assert len({a["category_id"] for a in gt.dataset["annotations"]}) >= 2


def test_perfect_results_score_one(gt):
    stats = evaluate(gt, perfect_results(gt))
    assert stats["AP"] == pytest.approx(1.0, abs=1e-6)
    assert stats["AP50"] == pytest.approx(1.0, abs=1e-6)
    assert stats["AP75"] == pytest.approx(1.0, abs=1e-6)
    assert stats["ARmax"] == pytest.approx(1.0, abs=1e-6)
    present = {NAMES[a["category_id"]] for a in gt.dataset["annotations"]}
    assert set(stats["per_category"]) == set(NAMES.values())
    for name, ap in stats["per_category"].items():
        if name in present:
            assert ap == pytest.approx(1.0, abs=1e-6), name
        else:
            assert ap == -1.0, name
    assert stats["n_images"] == 4
    assert stats["n_predictions"] == len(gt.dataset["annotations"])
    assert stats["max_dets"] == 100


def test_perfect_results_through_instances_to_results(gt):
    """The adapter path: dense GT masks -> Instances -> result dicts -> AP 1."""
    results = []
    for img_id in gt.getImgIds():
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[img_id]))
        if not anns:
            continue
        dense = np.stack([gt.annToMask(a) for a in anns])
        inst = Instances(
            height=dense.shape[1], width=dense.shape[2],
            boxes=np.zeros((len(anns), 4), np.float32),
            scores=np.linspace(1.0, 0.5, len(anns)).astype(np.float32),
            labels=np.asarray([a["category_id"] for a in anns], np.int64),
            masks=mask_ops.encode(dense),
        )
        results.extend(instances_to_results(img_id, inst))
    assert evaluate(gt, results)["AP"] == pytest.approx(1.0, abs=1e-6)


def test_no_results_gives_zero(gt):
    stats = evaluate(gt, [])
    assert stats["AP"] == 0.0
    assert stats["ARmax"] == 0.0
    assert stats["n_predictions"] == 0


def test_wrong_category_gives_zero(gt):
    res = perfect_results(gt)
    for r in res:
        r["category_id"] = r["category_id"] % len(CATEGORIES) + 1
    assert evaluate(gt, res)["AP"] < 0.05


def test_half_the_instances_halves_recall(gt):
    anns = gt.dataset["annotations"]
    kept = anns[::2]
    stats = evaluate(gt, perfect_results(gt, kept))
    # Exact predictions match at every IoU threshold, so recall per category is kept/total,
    # and ARmax is its mean over the categories present.
    total = Counter(a["category_id"] for a in anns)
    hit = Counter(a["category_id"] for a in kept)
    expected = float(np.mean([hit[c] / total[c] for c in total]))
    assert stats["ARmax"] == pytest.approx(expected, abs=1e-6)
    assert 0.3 < stats["ARmax"] < 0.7
    assert stats["AP"] < 0.8


def test_matches_pycocotools_summarize(gt):
    res = noisy_results(gt)
    stats = evaluate(gt, res)
    oracle = pycocotools_stats(gt, res, [1, 10, 100])
    assert 0.2 < stats["AP"] < 0.95  # a non-degenerate case
    for name, want in zip(STAT_NAMES, oracle):
        assert stats[name] == pytest.approx(float(want), abs=1e-9), name


def test_max_dets_other_than_100(gt):
    """AP at max_dets=20 is defined (pycocotools' summarize hard-codes 100 for it) and, with fewer
    than 20 detections per image and category, equals AP at 100; the other stats match the oracle."""
    res = noisy_results(gt)
    per = Counter((r["image_id"], r["category_id"]) for r in res)
    assert max(per.values()) <= 20
    s20, s100 = evaluate(gt, res, max_dets=20), evaluate(gt, res, max_dets=100)
    assert s20["max_dets"] == 20
    assert s20["AP"] == pytest.approx(s100["AP"], abs=1e-9)
    assert s20["per_category"] == pytest.approx(s100["per_category"], abs=1e-9)
    oracle = pycocotools_stats(gt, res, [1, 10, 20])
    for name, want in list(zip(STAT_NAMES, oracle))[1:]:  # [0] is summarize's maxDets=100 quirk
        assert s20[name] == pytest.approx(float(want), abs=1e-9), name


def test_max_dets_respected(gt):
    stats = evaluate(gt, perfect_results(gt), max_dets=1)
    assert stats["max_dets"] == 1
    # One detection per (image, category): recall = images holding the category / its instances.
    imgs = defaultdict(set)
    total = Counter()
    for a in gt.dataset["annotations"]:
        imgs[a["category_id"]].add(a["image_id"])
        total[a["category_id"]] += 1
    expected = float(np.mean([len(imgs[c]) / total[c] for c in total]))
    assert expected < 1.0
    assert stats["ARmax"] == pytest.approx(expected, abs=1e-6)
    assert stats["ARmax"] == pytest.approx(stats["AR1"], abs=1e-9)
    assert evaluate(gt, perfect_results(gt), max_dets=100)["ARmax"] == pytest.approx(1.0, abs=1e-6)


def test_image_ids_subset(gt):
    first = min(gt.getImgIds())
    res = [r for r in perfect_results(gt) if r["image_id"] == first]
    stats = evaluate(gt, res, image_ids=[first])
    assert stats["n_images"] == 1
    assert stats["AP"] == pytest.approx(1.0, abs=1e-6)
    # Scored on all images, the same results miss the other images' instances.
    assert evaluate(gt, res)["ARmax"] < 1.0


def test_remap_to_gt_by_file_name(gt):
    gt_images = sorted(gt.dataset["images"], key=lambda im: im["id"])
    pred_images, pred_anns = [], []
    for k, im in enumerate(gt_images[:3]):
        pid = 10_000 + k
        pred_images.append({"id": pid, "file_name": f"some/folder/{im['file_name']}"})  # matched by name
        for a in gt.loadAnns(gt.getAnnIds(imgIds=[im["id"]])):
            pred_anns.append({"image_id": pid, "category_id": a["category_id"], "segmentation": a["segmentation"], "score": 0.7})
    pred_images.append({"id": 99_999, "file_name": "unknown.jpg"})
    pred_anns.append({"image_id": 99_999, "category_id": 1, "segmentation": pred_anns[0]["segmentation"], "score": 0.9})
    results, ids = remap_to_gt(gt, {"images": pred_images, "annotations": pred_anns})
    assert ids == sorted(im["id"] for im in gt_images[:3])
    assert len(results) == len(pred_anns) - 1
    assert all(r["image_id"] in ids for r in results)
    want = Counter((a["image_id"], a["category_id"]) for a in gt.dataset["annotations"] if a["image_id"] in ids)
    assert Counter((r["image_id"], r["category_id"]) for r in results) == want
    assert all(r["score"] == 0.7 for r in results)
    stats = evaluate(gt, results, image_ids=ids)
    assert stats["AP"] == pytest.approx(1.0, abs=1e-6)


def test_remap_to_gt_default_score():
    gt = load_gt({"images": [{"id": 5, "file_name": "a.jpg", "height": 4, "width": 4}], "annotations": [],
                  "categories": [{"id": 1, "name": "x"}]})
    results, ids = remap_to_gt(gt, {"images": [{"id": 1, "file_name": "a.jpg"}],
                                    "annotations": [{"image_id": 1, "category_id": 1, "segmentation": {}}]})
    assert ids == [5] and results[0]["image_id"] == 5 and results[0]["score"] == 1.0


def test_format_table(gt):
    stats = evaluate(gt, perfect_results(gt), max_dets=50)
    text = format_table(stats)
    assert "AP50" in text and "ARmax" in text
    assert "maxDets=50" in text
    for c in CATEGORIES:
        assert c["name"] in text
    assert "AP=1.000" in text
    assert "bound" not in text
    stats |= {"instance_bound": 100, "images_at_bound": 3}
    assert f"3 of {stats['n_images']} images reached the model's bound of 100 instances per image" in format_table(stats)
    assert "images had a tile that reached" in format_table(stats | {"bound_unit": "tile"})


def _write_output(out: Path, gt, image_ids: list[int], run_id: str = "eval-run", shards: int = 2) -> None:
    """A run output whose ok images carry the GT file names as relpath and the GT masks as instances."""
    w = RunWriter(str(out), run_id)
    w.start()
    per_shard: dict[int, dict[str, list]] = defaultdict(lambda: {"instances": [], "images": [], "errors": []})
    for k, gid in enumerate(image_ids):
        shard = k % shards
        info = gt.imgs[gid]
        uri = f"/input/{info['file_name']}"
        iid = image_id_for(uri)  # not the GT id: evaluate_output must match by file name
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[gid]))
        dense = np.stack([gt.annToMask(a) for a in anns]) if anns else np.zeros((0, info["height"], info["width"]), np.uint8)
        inst = Instances(height=info["height"], width=info["width"], boxes=np.zeros((len(anns), 4), np.float32),
                         scores=np.ones(len(anns), np.float32), labels=np.asarray([a["category_id"] for a in anns], np.int64),
                         masks=mask_ops.encode(dense))
        rows = instance_rows(inst, run_id=run_id, image_id=iid, image_uri=uri, model="oracle", model_version="oracle@0",
                             category_names=NAMES)
        t = per_shard[shard]
        t["instances"].extend(rows)
        t["images"].append({"run_id": run_id, "image_id": iid, "uri": uri, "relpath": info["file_name"],
                            "width": info["width"], "height": info["height"], "sha256": None, "size_bytes": 1,
                            "source_tag": "", "status": "ok", "n_instances": len(rows), "shard": shard})
    # An error image that is also not in the GT.
    bad = "/input/broken.jpg"
    per_shard[0]["images"].append({"run_id": run_id, "image_id": image_id_for(bad), "uri": bad, "relpath": "broken.jpg",
                                   "width": None, "height": None, "sha256": None, "size_bytes": 0, "source_tag": "",
                                   "status": "error", "n_instances": 0, "shard": 0})
    per_shard[0]["errors"].append({"run_id": run_id, "image_id": image_id_for(bad), "uri": bad, "stage": "decode",
                                   "error_type": "empty_file", "message": "empty"})
    for shard, t in sorted(per_shard.items()):
        w.write_shard(shard, {k: to_table(k, v) for k, v in t.items()}, {})
    w.finish({"run_id": run_id, "status": "complete"})


def test_evaluate_output_perfect(tmp_path: Path, gt, gt_path):
    out = tmp_path / "out"
    _write_output(out, gt, sorted(gt.getImgIds()))
    stats = evaluate_output(str(out), gt_path)
    assert stats["AP"] == pytest.approx(1.0, abs=1e-6)
    assert stats["n_images"] == 4 and stats["n_gt_images"] == 4
    assert stats["n_predictions"] == len(gt.dataset["annotations"])


def test_evaluate_output_partial_run(tmp_path: Path, gt, gt_path):
    out = tmp_path / "out"
    ids = sorted(gt.getImgIds())[:2]
    _write_output(out, gt, ids, shards=1)
    stats = evaluate_output(str(out), gt_path)
    assert stats["n_images"] == 2 and stats["n_gt_images"] == 4
    assert stats["AP"] == pytest.approx(1.0, abs=1e-6)  # only processed images are scored


def test_evaluate_output_no_match_raises(tmp_path: Path, gt_path):
    out = tmp_path / "out"
    other = load_gt({"images": [{"id": 1, "file_name": "zzz.jpg", "height": 8, "width": 8}], "annotations": [],
                     "categories": CATEGORIES})
    _write_output(out, other, [1], shards=1)
    with pytest.raises(ValueError, match="no image"):
        evaluate_output(str(out), gt_path)


# --- the polar ceiling ----------------------------------------------------------------------------


def _two_shape_gt() -> dict:
    yy, xx = np.mgrid[:64, :128]
    disk = ((xx + 0.5 - 32) ** 2 + (yy + 0.5 - 32) ** 2 <= 20**2)
    r2 = (xx + 0.5 - 96) ** 2 + (yy + 0.5 - 32) ** 2
    ring = (r2 <= 20**2) & (r2 >= 12**2)  # a hole no polygon from the centre can keep
    anns = []
    for k, (m, cat) in enumerate(((disk, 1), (ring, 3))):
        rle = mask_ops.encode(m[None].astype(np.uint8))[0]
        anns.append({"id": k + 1, "image_id": 1, "category_id": cat, "segmentation": rle, "area": int(m.sum()),
                     "bbox": [float(v) for v in mask_ops.to_bbox([rle])[0]], "iscrowd": 0})
    return {"images": [{"id": 1, "file_name": "a.png", "height": 64, "width": 128}], "annotations": anns,
            "categories": [{"id": c["id"], "name": c["name"]} for c in CATEGORIES]}


def test_polar_bound_keeps_convex_shapes_and_loses_holes():
    from segpipe.evaluation import polar_bound_results

    g = load_gt(_two_shape_gt())
    res = polar_bound_results(g, n_rays=36)
    assert [r["category_id"] for r in res] == [1, 3] and all(r["score"] == 1.0 for r in res)
    ious = [mask_ops.iou([r["segmentation"]], [g.anns[k + 1]["segmentation"]])[0, 0] for k, r in enumerate(res)]
    assert ious[0] > 0.95  # the disk
    assert ious[1] < 0.7  # the ring's polygon fills its hole: (20^2 - 12^2) / 20^2 = 0.64
    stats = evaluate(g, res)
    assert stats["per_category"]["ellipse"] > 0.9
    assert stats["per_category"]["ring"] == pytest.approx(0.3)  # IoU ~0.64 passes only the thresholds .50, .55, .60


def test_polar_bound_cli(tmp_path):
    import json

    from typer.testing import CliRunner

    from segpipe.cli import app

    p = tmp_path / "gt.json"
    p.write_text(json.dumps(_two_shape_gt(), default=lambda o: o.decode() if isinstance(o, bytes) else o))
    r = CliRunner().invoke(app, ["data", "polar-bound", "--gt", str(p), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["n_rays"] == 36
    r = CliRunner().invoke(app, ["data", "polar-bound", "--gt", str(p), "--n-rays", "2"])
    assert r.exit_code == 2 and "--n-rays" in r.output


# --- Boundary AP ------------------------------------------------------------------------------


def test_boundary_band_of_a_square_and_of_one_touching_the_image_border():
    from segpipe.evaluation import boundary_dilation, boundary_rle

    assert boundary_dilation(100, 100) == 3 and boundary_dilation(10, 10) == 1  # 2% of the diagonal, at least 1
    m = np.zeros((1, 60, 50), np.uint8)
    m[0, 10:30, 5:25] = 1
    band = mask_ops.decode([boundary_rle(mask_ops.encode(m)[0], 2)])[0]
    want = m[0].copy()
    want[12:28, 7:23] = 0
    np.testing.assert_array_equal(band, want)  # 20^2 - 16^2 = 144 pixels
    m[:] = 0
    m[0, 0:20, 0:10] = 1  # on the top-left corner: the image border is background
    band = mask_ops.decode([boundary_rle(mask_ops.encode(m)[0], 1)])[0]
    assert band[0, :10].all() and band[:20, 0].all() and not band[1:19, 1:9].any()


def test_boundary_ap_is_stricter_than_mask_ap_on_a_one_pixel_error():
    """GT 40x40 square in a 100x100 image (band 3 px); prediction 1 px larger all round: mask IoU
    1600 / 1764 = 0.907, boundary IoU 304 / 608 = 0.5 -> a match only at the 0.5 threshold."""
    from segpipe.evaluation import evaluate

    g = np.zeros((1, 100, 100), np.uint8)
    g[0, 30:70, 30:70] = 1
    p = np.zeros((1, 100, 100), np.uint8)
    p[0, 29:71, 29:71] = 1
    rle = mask_ops.encode(g)[0]
    gt = load_gt({"images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.png"}],
                  "categories": [{"id": 1, "name": "sq"}],
                  "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": rle, "area": 1600,
                                   "bbox": [30, 30, 40, 40], "iscrowd": 0}]})
    res = [{"image_id": 1, "category_id": 1, "segmentation": mask_ops.encode(p)[0], "score": 0.9}]
    st = evaluate(gt, res, boundary=True)
    assert st["AP"] == pytest.approx(0.9) and st["AP75"] == pytest.approx(1.0)
    assert st["BoundaryAP50"] == pytest.approx(1.0) and st["BoundaryAP75"] == pytest.approx(0.0)
    assert st["BoundaryAP"] == pytest.approx(0.1)
    exact = evaluate(gt, [dict(res[0], segmentation=rle)], boundary=True)
    assert exact["BoundaryAP"] == pytest.approx(1.0) and "BoundaryAP" not in evaluate(gt, res)
