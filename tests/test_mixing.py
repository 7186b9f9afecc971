"""segpipe train on a weighted mix of COCO files: epoch order, the mixed dataset, the CLI and card."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import yaml
from typer.testing import CliRunner

from segpipe.cli import app
from segpipe.config import KeepRule, PseudoLabelConfig, TrainConfig, TrainSource
from segpipe.data.coco import CocoInstances
from segpipe.sinks.pseudo import write_pseudo_labels
from segpipe.train.mixing import MixedInstances, draws_per_epoch, epoch_order

from conftest import NUCLEI_SAMPLE, TINY_PARAMS, mini_nuclei


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_epoch_order_draws_each_source_as_often_as_its_weight_says():
    sizes, weights = [5, 8, 4], [1.0, 2.0, 0.5]
    order = epoch_order(sizes, weights, seed=3, epoch=0)
    assert len(order) == 5 + 16 + 2 == sum(draws_per_epoch(n, w) for n, w in zip(sizes, weights))
    per = Counter((int(s), int(i)) for s, i, _ in order)
    assert all(per[(0, i)] == 1 for i in range(5)) and all(per[(1, i)] == 2 for i in range(8))
    assert sum(per[(2, i)] for i in range(4)) == 2 and max(per[(2, i)] for i in range(4)) == 1
    assert sorted(int(d) for s, i, d in order if s == 1 and i == 0) == [0, 1]  # the repeat is another draw
    again = epoch_order(sizes, weights, seed=3, epoch=0)
    assert (order == again).all()  # a pure function of (seed, epoch): resumable
    other = [epoch_order(sizes, weights, seed=3, epoch=e) for e in range(1, 6)]
    assert any((o != order).any() for o in other)
    halves = {tuple(sorted(int(i) for s, i, _ in o if s == 2)) for o in [order, *other]}
    assert len(halves) > 1  # weight 0.5 draws another half of the source in other epochs
    assert draws_per_epoch(10, 1.3) == 13 and draws_per_epoch(10, 0.04) == 0


def test_mixed_instances_reads_every_key_from_its_own_source(shapes_data):
    a = CocoInstances(str(shapes_data / "annotations.json"), str(shapes_data / "images"), category_ids=[1, 2, 3, 4],
                      crop=64, flips=True, seed=1)
    b = CocoInstances(str(NUCLEI_SAMPLE / "annotations.json"), str(NUCLEI_SAMPLE / "images"), category_ids=[1],
                      crop=64, flips=True, seed=1)
    mix = MixedInstances([a, b], [1.0, 2.0], seed=1)
    keys = mix.keys(0)
    assert len(keys) == mix.epoch_length() == len(a) + 2 * len(b)
    seen = Counter()
    for key, (s, i, d) in zip(keys, epoch_order(mix.sizes, mix.weights, seed=1, epoch=0)):
        img, tgt = mix[key]
        want_img, want_tgt = (a, b)[s].load(int(i), int(d))
        assert torch.equal(img, want_img) and torch.equal(tgt["masks"], want_tgt["masks"])
        seen[int(s)] += 1
    assert seen == {0: len(a), 1: 2 * len(b)}
    first, second = b.load(0, 0)[0], b.load(0, 1)[0]
    assert not torch.equal(first, second)  # a second draw is another crop/flip of the image


def test_crowd_annotations_become_an_ignore_map_moved_with_the_crop_and_flips(tmp_path):
    """A crowd copy of instance k yields target ``ignore`` equal to instance k's mask, whatever the
    window, flips and turn; crowd annotations are not instances; images without any have no map."""
    doc = json.loads((NUCLEI_SAMPLE / "annotations.json").read_text())
    im0 = doc["images"][0]["id"]
    first = next(a for a in doc["annotations"] if a["image_id"] == im0)
    doc["annotations"].append(first | {"id": 10**6, "iscrowd": 1})
    (tmp_path / "a.json").write_text(json.dumps(doc))
    plain = CocoInstances(str(NUCLEI_SAMPLE / "annotations.json"), str(NUCLEI_SAMPLE / "images"), category_ids=[1])
    ds = CocoInstances(str(tmp_path / "a.json"), str(NUCLEI_SAMPLE / "images"), category_ids=[1])
    img, tgt = ds.load(0)
    assert len(tgt["masks"]) == len(plain.load(0)[1]["masks"]) and tgt["ignore"].dtype == torch.bool
    k = [a["id"] for a in ds.by_image[im0]].index(first["id"])
    assert torch.equal(tgt["ignore"], tgt["masks"][k].bool()) and tgt["ignore"].any()
    assert "ignore" not in ds.load(1)[1]
    ds = CocoInstances(str(tmp_path / "a.json"), str(NUCLEI_SAMPLE / "images"), category_ids=[1], crop=96, flips=True, seed=3)
    checked = 0
    for draw in range(12):
        img, tgt = ds.load(0, draw)
        if "ignore" in tgt and tgt["ignore"].sum() >= ds.min_visible_px:
            assert tgt["ignore"].shape == img.shape[1:]
            assert any(torch.equal(tgt["ignore"], m.bool()) for m in tgt["masks"])
            checked += 1
    assert checked >= 2


def test_train_source_parsing():
    assert TrainSource.parse("a/b.json@0.5") == {"ann": "a/b.json", "weight": 0.5}
    assert TrainSource.parse("s3://bucket/x.json") == {"ann": "s3://bucket/x.json"}
    assert TrainSource.parse("odd@name.json") == {"ann": "odd@name.json"}
    with pytest.raises(ValueError, match="sources.0.weight"):
        TrainConfig(sources=[TrainSource.parse("a.json@0")])
    with pytest.raises(ValueError, match="sources"):
        TrainConfig(method="scorer", priors="run", sources=[TrainSource(ann="a.json")])


def _pseudo_set(demo_run, out, min_confidence: float = 0.3):
    assert demo_run.exit_code == 0, demo_run.output
    return write_pseudo_labels(str(demo_run.run), PseudoLabelConfig(keep=KeepRule(min_confidence=min_confidence),
                                                                     ignore=KeepRule(min_confidence=0.05)),
                               out_uri=str(out))


@pytest.mark.timeout(600)
def test_train_on_labelled_and_pseudo_labelled_files_with_weights(demo_run, shapes_data, tmp_path):
    pseudo = _pseudo_set(demo_run, tmp_path / "pseudo")
    labelled = tmp_path / "labelled"  # a COCO file with images/ beside it (the corrupt files left out)
    (labelled / "images").mkdir(parents=True)
    doc = json.loads((shapes_data / "annotations.json").read_text())
    for im in doc["images"]:
        (labelled / "images" / im["file_name"]).write_bytes((shapes_data / "images" / im["file_name"]).read_bytes())
    (labelled / "train.json").write_text(json.dumps(doc))
    args = ["train", "maskrcnn", "--data", labelled / "train.json", "--data", f"{tmp_path / 'pseudo' / 'instances.json'}@0.5",
            "--batch-size", 2, "--val-n", 2, "--threads", 1, "--work-dir", tmp_path / "w",
            "--out", tmp_path / "card", "--name", "mixed"]
    args += [a for k, v in TINY_PARAMS.items() for a in ("--param", f"{k}={json.dumps(v)}")]
    r = invoke(*args, "--iterations", 2)
    assert r.exit_code == 0, r.output
    assert "weight 0.5" in r.output and f"{len(doc['images'])} images" in r.output
    assert f"{pseudo['counts']['ignore_regions_written']} ignore regions" in r.output and "does not honour" in r.output
    card = yaml.safe_load((tmp_path / "card" / "card.yaml").read_text())
    train = card["training"]["data"]["train"]
    assert [(s["file"].rsplit("/", 1)[-1], s["weight"]) for s in train] == [("train.json", 1.0), ("instances.json", 0.5)]
    assert train[1]["instances"] == pseudo["counts"]["instances_written"] and train[1]["sha256"] == pseudo["sha256"]
    assert train[1]["ignore_regions"] == {"count": pseudo["counts"]["ignore_regions_written"], "honoured": False}
    assert pseudo["counts"]["ignore_regions_written"] > 0 and "ignore_regions" not in train[0]
    assert train[1]["dataset_card"]["run_id"] == pseudo["run_id"] and train[1]["dataset_card"]["keep"]["min_confidence"] == 0.3
    assert "shapes val" in card["metrics"][0]["split"]  # validation stays the domain's
    assert not list((tmp_path / "w").glob("shapes-train-*"))  # the domain's training set is not generated
    assert [s["weight"] for s in card["training"]["config"]["sources"]] == [1.0, 0.5]
    # A rewritten pseudo-label set is other data: a checkpoint trained on the old one does not resume.
    from segpipe.train.loop import CheckpointMismatchError, train

    def cfg(iterations):
        return TrainConfig(method="maskrcnn", sources=card["training"]["config"]["sources"], iterations=iterations,
                           batch_size=2, val_n=2, threads=1, work_dir=str(tmp_path / "w2"), out=str(tmp_path / "c2"),
                           name="mixed", checkpoint_every=1, params=TINY_PARAMS)

    train(cfg(1), log=lambda m: None)
    _pseudo_set(demo_run, tmp_path / "pseudo", min_confidence=0.6)
    with pytest.raises(CheckpointMismatchError, match="sources"):
        train(cfg(2), log=lambda m: None)


def test_a_source_holding_validation_images_is_refused(tmp_path):
    root = mini_nuclei(tmp_path)
    r = invoke("train", "polarmask", "--domain", "nuclei", "--data", root, "--data", root / "val.json",
               "--iterations", 1, "--work-dir", tmp_path / "w", "--out", tmp_path / "c")
    assert r.exit_code == 2 and "validation images" in r.output
    r = invoke("train", "polarmask", "--domain", "nuclei", "--data", root, "--data", root / "a", "--work-dir", tmp_path / "w")
    assert r.exit_code == 2 and "one domain folder" in r.output
    r = invoke("train", "polarmask", "--domain", "nuclei", "--data", f"{root / 'train.json'}@-1", "--work-dir", tmp_path / "w")
    assert r.exit_code == 2 and "sources.0.weight" in r.output
