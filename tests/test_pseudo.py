"""Pseudo-labels: the keep rule, the COCO set and dataset card written from a fused run, the CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from pycocotools.coco import COCO
from typer.testing import CliRunner

from segpipe.cli import app
from segpipe.config import KeepRule, PseudoLabelConfig, WorkflowConfig
from segpipe.sinks.pseudo import bin_label, keep_failures, rule_for, verdict, write_pseudo_labels
from segpipe.sinks.writer import read_committed


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


ROW = {"n_votes": 2, "agreement": 0.8, "confidence": 0.6, "score": 0.75, "category_name": "ellipse", "category_id": 1}


def test_keep_failures_names_every_criterion_a_row_fails():
    assert keep_failures(ROW, KeepRule()) == []
    assert keep_failures(ROW, KeepRule(min_votes=2, min_agreement=0.8, min_confidence=0.6, min_score=0.75)) == []  # inclusive
    assert keep_failures(ROW, KeepRule(min_votes=3)) == ["votes"]
    assert keep_failures(ROW, KeepRule(min_agreement=0.81)) == ["agreement"]
    assert keep_failures(ROW, KeepRule(min_confidence=0.61)) == ["confidence"]
    assert keep_failures(ROW, KeepRule(min_score=0.9)) == ["score"]
    assert keep_failures(ROW, KeepRule(min_votes=3, min_score=0.9)) == ["votes", "score"]
    single = ROW | {"n_votes": 1, "agreement": None, "confidence": 0.4}  # one member: no agreement
    assert keep_failures(single, KeepRule(min_agreement=0.01)) == ["agreement"]
    assert keep_failures(single, KeepRule(min_agreement=0.0, min_confidence=0.4)) == []
    assert keep_failures(single | {"confidence": None}, KeepRule(min_confidence=0.7)) == []  # falls back to the score


def test_per_class_rule_replaces_the_default_for_its_class_only():
    cfg = PseudoLabelConfig(keep=KeepRule(min_votes=2), per_class={"ring": KeepRule(min_confidence=0.9)})
    assert rule_for(cfg, "ring").min_votes == 1 and rule_for(cfg, "ring").min_confidence == 0.9
    assert rule_for(cfg, "ellipse") == cfg.keep and rule_for(cfg, None) == cfg.keep


def test_verdict_keeps_ignores_or_drops():
    cfg = PseudoLabelConfig(keep=KeepRule(min_votes=2, min_agreement=0.7), ignore=KeepRule(min_confidence=0.3))
    assert verdict(ROW, cfg) == ("kept", [])
    assert verdict(ROW | {"agreement": 0.6}, cfg) == ("ignored", ["agreement"])
    single = ROW | {"n_votes": 1, "agreement": None}
    assert verdict(single | {"confidence": 0.3}, cfg) == ("ignored", ["votes", "agreement"])  # inclusive
    assert verdict(single | {"confidence": 0.29}, cfg) == ("dropped", ["votes", "agreement"])
    assert verdict(single, PseudoLabelConfig(keep=cfg.keep))[0] == "dropped"  # no ignore rule: nothing is ignored


def test_bins_cover_zero_to_one():
    assert bin_label(0.0) == "0.0-0.1" and bin_label(0.35) == "0.3-0.4" and bin_label(1.0) == "0.9-1.0"
    assert bin_label(None) == "none"


def test_pseudo_label_config_is_validated():
    with pytest.raises(ValueError, match="out"):
        PseudoLabelConfig(out="../elsewhere")
    with pytest.raises(ValueError, match="out"):
        PseudoLabelConfig(out="instances")
    base = {"source": {"uri": "x"}, "models": [{"model": "maskrcnn-shapes"}], "output": {"uri": "y"}}
    with pytest.raises(ValueError, match="needs an ensemble"):
        WorkflowConfig.model_validate(base | {"pseudo_label": {}})


def _expected(run: Path, rule: KeepRule) -> dict[int, list[float]]:
    """Image id -> sorted scores of the fused rows that pass ``rule``, computed from the table's columns."""
    t = read_committed(str(run), "instances").to_pylist()
    out: dict[int, list[float]] = {}
    for r in t:
        conf = r["confidence"] if r["confidence"] is not None else r["score"]
        ok = ((r["n_votes"] or 1) >= rule.min_votes and (r["agreement"] or 0.0) >= rule.min_agreement
              and conf >= rule.min_confidence and r["score"] >= rule.min_score)
        if ok:
            out.setdefault(r["image_id"], []).append(round(r["score"], 5))
    return {k: sorted(v) for k, v in out.items()}


def test_pseudo_set_holds_exactly_the_rows_that_pass_and_a_card_that_adds_up(demo_run, tmp_path):
    assert demo_run.exit_code == 0, demo_run.output
    rule = KeepRule(min_votes=2, min_confidence=0.5)
    card = write_pseudo_labels(str(demo_run.run), PseudoLabelConfig(keep=rule), out_uri=str(tmp_path / "set"))
    doc = json.loads((tmp_path / "set" / "instances.json").read_text())
    want = _expected(demo_run.run, rule)
    got: dict[int, list[float]] = {}
    for a in doc["annotations"]:
        got.setdefault(a["image_id"], []).append(a["score"])
        assert a["n_votes"] >= 2 and a["confidence"] >= 0.5 and a["iscrowd"] == 0
    assert {k: sorted(v) for k, v in got.items()} == want and want  # the same rows, and some
    assert sorted(im["id"] for im in doc["images"]) == sorted(want)  # images without a kept instance are left out
    assert all(Path(im["segpipe_uri"]).is_file() for im in doc["images"])
    total = len(read_committed(str(demo_run.run), "instances"))
    c = card["counts"]
    assert c["instances"] == total and c["kept"] == len(doc["annotations"]) == c["instances_written"]
    assert c["kept"] + c["dropped"] == total and c["images_processed"] == 8 == c["images_ok"] + c["images_failed"]
    assert c["images_written"] + c["images_dropped_empty"] == c["images_ok"]
    for name, bins in card["histograms"].items():  # every histogram counts every instance once
        assert sum(b["kept"] for b in bins.values()) == c["kept"], name
        assert sum(b["dropped"] for b in bins.values()) == c["dropped"], name
    votes = Counter(a["n_votes"] for a in doc["annotations"])
    assert {int(k): b["kept"] for k, b in card["histograms"]["n_votes"].items() if b["kept"]} == dict(votes)
    assert card["dropped_by"]["votes"] >= 1 and card["dropped_by"]["score"] == 0
    on_disk = yaml.safe_load((tmp_path / "set" / "card.yaml").read_text())
    assert on_disk["sha256"] == card["sha256"] and on_disk["keep"] == rule.model_dump(mode="json")
    assert [m["name"] for m in on_disk["models"]] == ["maskrcnn-shapes", "spatialemb-shapes"]
    assert on_disk["refiner"]["name"] == "pointrend-shapes" and on_disk["run_id"]
    import hashlib

    assert hashlib.sha256((tmp_path / "set" / "instances.json").read_bytes()).hexdigest() == card["sha256"]
    coco = COCO(str(tmp_path / "set" / "instances.json"))  # loadable by pycocotools, masks decodable
    assert len(coco.getAnnIds()) == c["kept"] and coco.annToMask(coco.loadAnns(coco.getAnnIds()[:1])[0]).sum() > 0


def test_ignore_rule_writes_unkept_but_plausible_instances_as_crowd_regions(demo_run, tmp_path):
    keep, ignore = KeepRule(min_votes=2, min_confidence=0.5), KeepRule(min_confidence=0.2)
    card = write_pseudo_labels(str(demo_run.run), PseudoLabelConfig(keep=keep, ignore=ignore, empty_images="keep"),
                               out_uri=str(tmp_path / "set"))
    doc = json.loads((tmp_path / "set" / "instances.json").read_text())
    kept, ignored = _expected(demo_run.run, keep), _expected(demo_run.run, ignore)
    for k, v in kept.items():  # ignored = passes the ignore rule, fails keep
        rest = list(ignored.get(k, []))
        for x in v:
            rest.remove(x)
        ignored[k] = rest
    ignored = {k: v for k, v in ignored.items() if v}
    got: dict[int, dict[int, list[float]]] = {0: {}, 1: {}}
    for a in doc["annotations"]:
        got[a["iscrowd"]].setdefault(a["image_id"], []).append(a["score"])
    assert {k: sorted(v) for k, v in got[0].items()} == kept and kept
    assert {k: sorted(v) for k, v in got[1].items()} == ignored and ignored
    c = card["counts"]
    assert c["kept"] + c["ignored"] + c["dropped"] == c["instances"]
    assert c["ignored"] == c["ignore_regions_written"] == sum(map(len, ignored.values()))  # every image written
    assert c["instances_written"] == c["kept"] and card["ignore"] == ignore.model_dump(mode="json")
    for name, bins in card["histograms"].items():
        for side in ("kept", "ignored", "dropped"):
            assert sum(b[side] for b in bins.values()) == c[side], (name, side)
    assert card["dropped_by"]["votes"] >= c["ignored"] - card["histograms"]["n_votes"].get("2", {}).get("ignored", 0)
    coco = COCO(str(tmp_path / "set" / "instances.json"))
    crowd = coco.loadAnns(coco.getAnnIds(iscrowd=True))
    assert len(crowd) == c["ignored"] and coco.annToMask(crowd[0]).sum() > 0
    # Images whose only instances are ignore regions are dropped with the others under empty_images: drop.
    dropped = write_pseudo_labels(str(demo_run.run), PseudoLabelConfig(keep=keep, ignore=ignore),
                                  out_uri=str(tmp_path / "drop"))["counts"]
    assert dropped["images_written"] == len(kept) and dropped["ignore_regions_written"] == sum(
        len(v) for k, v in ignored.items() if k in kept)


def test_empty_images_are_dropped_or_kept_as_asked(demo_run, tmp_path):
    strict = KeepRule(min_score=1.0)  # nothing passes
    card = write_pseudo_labels(str(demo_run.run), PseudoLabelConfig(keep=strict), out_uri=str(tmp_path / "a"))
    assert card["counts"]["kept"] == 0 and card["counts"]["images_written"] == 0
    card = write_pseudo_labels(str(demo_run.run), PseudoLabelConfig(keep=strict, empty_images="keep"),
                               out_uri=str(tmp_path / "b"))
    assert card["counts"]["images_written"] == card["counts"]["images_ok"] == 8
    assert json.loads((tmp_path / "b" / "instances.json").read_text())["annotations"] == []


def test_pseudo_label_cli_rethresholds_a_run_and_refuses_bad_settings(demo_run, tmp_path):
    r = invoke("pseudo-label", demo_run.run, "--out", tmp_path / "s", "--set", "keep.min_confidence=0.5",
               "--set", "per_class.ellipse.min_votes=2")
    assert r.exit_code == 0, r.output
    card = yaml.safe_load((tmp_path / "s" / "card.yaml").read_text())
    assert card["keep"]["min_confidence"] == 0.5 and card["per_class"]["ellipse"]["min_votes"] == 2
    assert f"kept {card['counts']['kept']} of {card['counts']['instances']}" in r.output
    r = invoke("pseudo-label", demo_run.run, "--out", tmp_path / "i", "--set", "keep.min_votes=2",
               "--set", "ignore.min_confidence=0.2")
    assert r.exit_code == 0, r.output
    card = yaml.safe_load((tmp_path / "i" / "card.yaml").read_text())
    assert card["ignore"]["min_confidence"] == 0.2 and f"{card['counts']['ignored']} as ignore regions" in r.output
    r = invoke("pseudo-label", demo_run.run, "--out", tmp_path / "t", "--set", "per_class.cat.min_votes=2")
    assert r.exit_code == 2 and "'cat' is not a category" in r.output
    r = invoke("pseudo-label", demo_run.run, "--out", tmp_path / "t", "--set", "keep.min_agreement=2")
    assert r.exit_code == 2 and "keep.min_agreement" in r.output
    assert not (tmp_path / "t").exists()
    r = invoke("pseudo-label", tmp_path / "absent")
    assert r.exit_code == 2 and "run.json" in r.output


@pytest.mark.slow
def test_pseudo_label_workflow_writes_its_set_and_card_with_the_run(ray_local, tmp_path):
    """The documented command on two of the bundled unlabelled-to-it nuclei images."""
    from conftest import NUCLEI_SAMPLE, REPO

    out = tmp_path / "out"
    r = invoke("run", REPO / "workflows" / "pseudo-label.yaml", "--set", f"source.uri={NUCLEI_SAMPLE / 'images'}",
               "--set", "source.max_images=2", "--set", f"output.uri={out}")
    assert r.exit_code == 0, r.output
    card = yaml.safe_load((out / "pseudo" / "card.yaml").read_text())
    assert f"pseudo-labels: kept {card['counts']['kept']} of {card['counts']['instances']}" in r.output
    assert card["counts"]["images_processed"] == 2 and card["counts"]["kept"] > 20  # nuclei images hold many
    assert [m["name"] for m in card["models"]] == ["maskrcnn-nuclei", "polarmask-nuclei", "spatialemb-nuclei",
                                                    "discloss-nuclei"]
    assert card["refiner"]["name"] == "pointrend-nuclei" and card["keep"]["min_votes"] == 2
    doc = json.loads((out / "pseudo" / "instances.json").read_text())
    assert len(doc["annotations"]) == card["counts"]["kept"]
    assert min(a["n_votes"] for a in doc["annotations"]) >= 2 and min(a["agreement"] for a in doc["annotations"]) >= 0.7
    manifest = json.loads((out / "_segpipe" / "run.json").read_text())
    assert manifest["outputs"]["pseudo_labels"]["sha256"] == card["sha256"]
    assert card["run_id"] == manifest["run_id"]
