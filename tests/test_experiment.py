"""segpipe experiment pseudo-label end to end on a tiny nuclei-layout folder: every step runs as a
real segpipe command (trainings, Ray labelling runs, pseudo-label sets), results.json adds up,
and a rerun resumes (nothing is redone)."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from typer.testing import CliRunner

from segpipe.cli import app
from segpipe.experiments.pseudo_label import ExperimentConfig

from conftest import REPO, TINY_EMBED_PARAMS, TINY_POLAR_PARAMS, mini_nuclei


def test_experiment_config_is_validated():
    base = {"teachers": ["polarmask", "spatialemb"], "student": "polarmask", "sweep": [{"name": "a"}]}
    ExperimentConfig.model_validate(base)
    with pytest.raises(ValueError, match="two families"):
        ExperimentConfig.model_validate(base | {"teachers": ["spatialemb", "discloss"]})  # both embedding
    with pytest.raises(ValueError, match="not an instance segmentation method"):
        ExperimentConfig.model_validate(base | {"teachers": ["polarmask", "pointrend"]})
    with pytest.raises(ValueError, match="distinct"):
        ExperimentConfig.model_validate(base | {"sweep": [{"name": "a"}, {"name": "a"}]})


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pseudo_label_experiment_runs_end_to_end_and_resumes(tmp_path):
    root = mini_nuclei(tmp_path, n_train=4, n_val=2)
    work = tmp_path / "exp"
    cfg = {
        "work_dir": str(work), "data": str(root), "labeled_fraction": 0.5, "split_seed": 1,
        "teachers": ["polarmask", "spatialemb"], "student": "polarmask", "iterations": 2, "jobs": 2,
        "params": {"polarmask": TINY_POLAR_PARAMS, "spatialemb": TINY_EMBED_PARAMS},
        "train_args": ["--batch-size", "2", "--crop", "64"],
        "run_overrides": ["pipeline.ray_num_cpus=2", "pipeline.progress=off"],
        "sweep": [{"name": "all", "keep": {"min_confidence": 0.0}, "weight": 0.5},
                  {"name": "none", "keep": {"min_score": 1.0}, "ignore": {"min_confidence": 0.0}}],
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(app, ["experiment", "pseudo-label", str(path)], catch_exceptions=False)
    assert r.exit_code == 0, r.output + "".join((p.name + ":\n" + p.read_text()[-3000:]) for p in (work / "logs").glob("*.log"))
    res = json.loads((work / "results.json").read_text())
    assert res["split"]["labeled"]["images"] == 2 and res["split"]["unlabeled"]["images"] == 2
    labelled = json.loads((work / "labeled.json").read_text())
    assert {im["file_name"] for im in labelled["images"]}.isdisjoint(
        {im["file_name"] for im in json.loads((work / "unlabeled.json").read_text())["images"]})
    assert set(res["teachers"]) == {"polarmask", "spatialemb"}
    assert res["labeled_only"]["AP"] == res["teachers"]["polarmask"]["AP"]
    assert res["ensemble"]["AP"] is not None and set(res["ensemble"]["per_model_in_run"]) == {
        "polarmask-nuclei-l50", "spatialemb-nuclei-l50"}
    assert [s["setting"] for s in res["students"]] == ["all", "none"]
    trained, skipped = res["students"]
    assert skipped["set"]["kept"] == 0 and skipped["skipped"] and "metrics" not in skipped  # nothing to learn from
    assert skipped["set"]["ignored"] == skipped["set"]["instances"] > 0  # its ignore rule reached the set
    assert skipped["ignore"]["min_confidence"] == 0.0 and trained["ignore"] is None and trained["weight"] == 0.5
    assert not (work / "models" / skipped["model"]).exists()
    for s in [trained]:
        card = yaml.safe_load((work / "models" / s["model"] / "card.yaml").read_text())
        files = [src["file"] for src in card["training"]["data"]["train"]]
        assert files == [str(work / "labeled.json"), str(work / "sets" / s["setting"] / "instances.json")]
        assert [src["weight"] for src in card["training"]["data"]["train"]] == [1.0, 0.5]
        assert s["vs_best_teacher"] == pytest.approx(s["metrics"]["AP"] - res["best_teacher"]["AP"], abs=1e-4)
        set_card = yaml.safe_load((work / "sets" / s["setting"] / "card.yaml").read_text())
        assert set_card["counts"] == s["set"] and set_card["counts"]["images_processed"] == 2
    assert trained["set"]["kept"] == trained["set"]["instances"] > 0
    truth = json.loads((root / "train.json").read_text())
    unl = {im["id"] for im in truth["images"] if im["file_name"] in
           {u["file_name"] for u in json.loads((work / "unlabeled.json").read_text())["images"]}}
    n_truth = sum(a["image_id"] in unl for a in truth["annotations"])
    q = trained["set_quality"]  # scored against the thrown-away labels
    assert q["truth"] == n_truth > 0 and q["kept"] == trained["set"]["instances_written"]
    assert 0 <= q["recall"] <= 1 and skipped["set_quality"]["kept"] == 0 and skipped["set_quality"]["recall"] == 0
    steps = set(res["steps"])
    assert {"polarmask-nuclei-l50", "spatialemb-nuclei-l50", "pseudo-run", "val-run", "set-all", "set-none"} <= steps
    assert "segpipe train polarmask --domain nuclei" in res["steps"]["polarmask-nuclei-l50"]["command"]
    # Rerun: everything is found done; only the summary is recomputed.
    r = CliRunner().invoke(app, ["experiment", "pseudo-label", str(path)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "trained (card exists)" in r.output and "labelled (run.json exists)" in r.output
    assert "segpipe train" not in r.output and "segpipe run" not in r.output and "segpipe pseudo-label" not in r.output
    again = json.loads((work / "results.json").read_text())
    assert again["students"] == res["students"] and again["teachers"] == res["teachers"]
