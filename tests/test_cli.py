"""A CliRunner test for every command and the README's documented examples."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from segpipe.cli import app

from conftest import REPO

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_help_lists_every_noun():
    r = invoke("--help")
    assert r.exit_code == 0
    for noun in ("run", "demo", "eval", "ensemble", "data", "models", "train", "audit", "submit", "status", "logs",
                 "stop", "jobs", "schedule", "ledger", "bench", "report", "viz", "pseudo-label", "experiment"):
        assert noun in r.output


def test_data_synth_writes_coco(tmp_path):
    r = invoke("data", "synth", "--out", tmp_path / "d", "--n", 3, "--seed", 5)
    assert r.exit_code == 0, r.output
    coco = json.loads((tmp_path / "d" / "annotations.json").read_text())
    assert len(coco["images"]) == 3 and len(list((tmp_path / "d" / "images").glob("*.jpg"))) == 3
    assert coco["info"]["spec"]["seed"] == 5


def test_data_synth_bad_value_exits_2(tmp_path):
    r = runner.invoke(app, ["data", "synth", "--out", str(tmp_path), "--n", "0"])
    assert r.exit_code == 2
    assert "n:" in r.output


def _bad_workflow(tmp_path, mutate):
    data = yaml.safe_load((REPO / "workflows" / "shapes.yaml").read_text())
    mutate(data)
    p = tmp_path / "wf.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d["source"].update(urii="x"), "source.urii"),
        (lambda d: d["models"][0].update(batch_size=0), "models.0.batch_size"),
        (lambda d: d.update(colour="blue"), "colour"),
        (lambda d: d["pipeline"].update(max_error_rate=3), "pipeline.max_error_rate"),
        (lambda d: d.pop("output"), "output"),
    ],
)
def test_run_bad_config_fails_fast_with_field(tmp_path, mutate, field):
    r = runner.invoke(app, ["run", str(_bad_workflow(tmp_path, mutate))])
    assert r.exit_code == 2
    assert field in r.output


def test_run_bad_override_fails_fast(tmp_path):
    r = runner.invoke(app, ["run", str(REPO / "workflows" / "shapes.yaml"), "--set", "models.0.concurrency=-1"])
    assert r.exit_code == 2 and "models.0.concurrency" in r.output
    r = runner.invoke(app, ["run", str(REPO / "workflows" / "shapes.yaml"), "--set", "nonsense"])
    assert r.exit_code == 2 and "dotted.key=value" in r.output


def test_run_missing_source_and_workflow(tmp_path, tiny_card):
    r = runner.invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 2 and "not found" in r.output
    r = runner.invoke(app, ["run", str(REPO / "workflows" / "shapes.yaml"), "--set", f"source.uri={tmp_path / 'absent'}",
                            "--set", f"output.uri={tmp_path / 'out'}", "--set", f"models.0.model={tiny_card}"])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_models_list_and_show():
    r = invoke("models", "list")
    assert r.exit_code == 0
    assert "maskrcnn-shapes@" in r.output
    r = invoke("models", "show", "maskrcnn-shapes")
    assert r.exit_code == 0
    assert "version: maskrcnn-shapes@" in r.output and "sha256" in r.output
    r = runner.invoke(app, ["models", "show", "no-such-model"])
    assert r.exit_code == 2 and "no zoo model" in r.output


def test_train_writes_a_loadable_card(tmp_path):
    from segpipe.modeling.zoo import load_adapter, sha256_file

    out = tmp_path / "model"
    r = invoke("train", "maskrcnn", "--domain", "shapes", "--iterations", 2, "--batch-size", 2, "--train-n", 4, "--val-n", 2,
               "--out", out, "--work-dir", tmp_path / "work", "--name", "maskrcnn-test", "--param", "box_detections_per_img=37")
    assert r.exit_code == 0, r.output
    card = yaml.safe_load((out / "card.yaml").read_text())
    assert card["params"]["box_detections_per_img"] == 37
    assert card["weights"]["sha256"] == sha256_file(out / "weights.safetensors")
    assert card["training"]["iterations"] == 2 and card["training"]["data"]["train"]["seed"] == 1000
    assert "seed=9999" in card["metrics"][0]["split"]
    adapter, loaded = load_adapter(str(out / "card.yaml"))
    assert loaded.version().startswith("maskrcnn-test@")


def test_train_pointrend_on_a_runs_predictions(demo_run, tmp_path):
    """The session's demo run (maskrcnn-shapes + spatialemb-shapes fused, 8 images of seed 4242)
    is the prior source of a refiner trained on the same 8 images: its fused predictions are
    matched to the truth and recorded in the card; a non-refiner and a run of other images are refused."""
    from conftest import TINY_POINTREND_PARAMS

    from segpipe.refine.priors import load_priors

    assert demo_run.exit_code == 0, demo_run.output
    priors, summary = load_priors(str(demo_run.run), str(demo_run.gt), log=lambda m: None)
    assert summary["images"] == 8 and summary["matched"] >= 0.8 * summary["instances"] and summary["mean_iou"] > 0.8
    assert summary["models"][0].startswith("maskrcnn-shapes@") and summary["ensemble"]["method"] == "soft"
    assert all(p.maps.shape == (2, 28, 28) and p.iou >= 0.5 for got in priors.values() for p in got.values())
    params = [x for k, v in TINY_POINTREND_PARAMS.items() for x in ("--param", f"{k}={json.dumps(v)}")]
    out = tmp_path / "refiner"
    r = invoke("train", "pointrend", "--domain", "shapes", "--iterations", 2, "--batch-size", 2, "--train-n", 8,
               "--train-seed", 4242, "--val-n", 2, "--priors", demo_run.run, "--out", out, "--work-dir", tmp_path / "work",
               "--name", "pointrend-test", *params, "--param", "prior_share=0.5")
    assert r.exit_code == 0, r.output
    card = yaml.safe_load((out / "card.yaml").read_text())
    assert card["training"]["data"]["priors"]["matched"] == summary["matched"] and card["params"]["prior_share"] == 0.5
    assert card["training"]["config"]["priors"] == str(demo_run.run)
    r = invoke("train", "maskrcnn", "--priors", demo_run.run, "--out", tmp_path / "m", "--work-dir", tmp_path / "w2")
    assert r.exit_code == 2 and "priors" in r.output
    r = invoke("train", "pointrend", "--val-run", demo_run.run, "--out", tmp_path / "m", "--work-dir", tmp_path / "w2")
    assert r.exit_code == 2 and "val_run" in r.output
    r = invoke("train", "scorer", "--out", tmp_path / "m", "--work-dir", tmp_path / "w2")
    assert r.exit_code == 2 and "--priors RUN" in r.output
    r = invoke("train", "pointrend", "--iterations", 1, "--train-n", 4, "--train-seed", 5, "--priors", demo_run.run,
               "--out", tmp_path / "p", "--work-dir", tmp_path / "w3", *params)
    assert r.exit_code == 2 and "labelled none of the images" in r.output, r.output
    # Same names, other pixels: the run's sha256 of each image must match the file's.
    import shutil

    images = tmp_path / "images"
    shutil.copytree(demo_run.gt.parent / "images", images)
    victim = sorted(images.glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="not a run over these images"):
        load_priors(str(demo_run.run), str(demo_run.gt), str(images))
    gt = json.loads(demo_run.gt.read_text())
    for im in gt["images"]:
        im["file_name"] = "elsewhere/" + im["file_name"]
    (tmp_path / "moved.json").write_text(json.dumps(gt))
    with pytest.raises(ValueError, match="labelled none of the images"):
        load_priors(str(demo_run.run), str(tmp_path / "moved.json"))


def test_train_scorer_on_a_run_and_refuse_with_it(demo_run, tmp_path):
    """An ensemble scorer learns from the demo run's fused instances (its own 8 images), and
    `segpipe ensemble` re-fuses the run with it: each fused row's confidence is the scorer's
    predicted IoU and rows come ranked by it; a scorer is refused where its models are not the run's."""
    from pycocotools.coco import COCO

    from segpipe.ensemble.replay import RunEnsemble
    from segpipe.ensemble.scorer import ensemble_features, load_scorer
    from segpipe.sinks.writer import read_committed
    from segpipe.train.scorer import ensemble_ap

    assert demo_run.exit_code == 0, demo_run.output
    out = tmp_path / "scorer"
    r = invoke("train", "scorer", "--domain", "shapes", "--iterations", 300, "--train-n", 8, "--train-seed", 4242,
               "--priors", demo_run.run, "--out", out, "--name", "scorer-test", "--param", "hidden=8")
    assert r.exit_code == 0, r.output
    card = yaml.safe_load((out / "card.yaml").read_text())
    assert card["builder"] == "scorer" and card["params"]["models"] == ["maskrcnn-shapes", "spatialemb-shapes"]
    assert card["training"]["data"]["priors"]["instances"] > 0 and card["metrics"] == []
    weights = load_scorer(str(out / "card.yaml"))
    # Its AP on the run it learned from (the card's val metric, computed the same way) is a valid COCO AP.
    run = RunEnsemble.of(str(demo_run.run))
    own, stats = ensemble_ap(run, str(demo_run.gt), str(demo_run.gt.parent / "images"), 100, weights)
    assert 0.0 < stats["AP"] <= 1.0 and 0.0 < own["AP"] <= 1.0
    refused = tmp_path / "refused"
    r = invoke("ensemble", demo_run.run, "--out", refused, "--set", f"ensemble.scorer={out / 'card.yaml'}",
               "--set", "ensemble.rank=confidence")
    assert r.exit_code == 0, r.output
    rows = read_committed(str(refused), "instances").to_pylist()
    manifest = json.loads((refused / "_segpipe" / "run.json").read_text())
    assert manifest["scorer"]["version"] == weights.version and rows
    by_image: dict = {}
    for row in rows:
        by_image.setdefault(row["image_id"], []).append(row)
        assert 0.0 < row["confidence"] < 1.0 and row["score"] == pytest.approx(row["confidence"])
    for image_rows in by_image.values():
        scores = [row["score"] for row in image_rows]
        assert scores == sorted(scores, reverse=True)
    assert len(COCO(str(refused / "coco" / "instances.json")).anns) == len(rows)
    # A scorer of other models: refused before any work.
    other = yaml.safe_load((out / "card.yaml").read_text())
    other["params"]["models"] = ["maskrcnn-shapes", "polarmask-shapes"]
    (out / "other.yaml").write_text(yaml.safe_dump(other))
    r = invoke("ensemble", demo_run.run, "--out", tmp_path / "x", "--set", f"ensemble.scorer={out / 'other.yaml'}")
    assert r.exit_code == 2 and "trained for the models" in r.output
    r = invoke("ensemble", demo_run.run, "--out", tmp_path / "y", "--set", "ensemble.scorer=maskrcnn-shapes")
    assert r.exit_code == 2 and "not an ensemble scorer" in r.output


def test_train_refuses_to_resume_a_checkpoint_of_another_recipe(tmp_path):
    """Same work dir and name, another architecture: resuming would write a card whose weights
    do not match its params, so training stops and says why; the same recipe resumes."""
    from segpipe.config import TrainConfig
    from segpipe.train.loop import CheckpointMismatchError, train

    def cfg(out, iterations, dets):
        return TrainConfig(method="maskrcnn", domain="shapes", iterations=iterations, batch_size=2, train_n=4, val_n=2,
                           work_dir=str(tmp_path / "work"), name="maskrcnn-ckpt", out=str(tmp_path / out),
                           checkpoint_every=1, params={"box_detections_per_img": dets})

    train(cfg("a", 1, 37), log=lambda m: None)
    with pytest.raises(CheckpointMismatchError, match="params.*--work-dir"):
        train(cfg("b", 1, 38), log=lambda m: None)
    assert not (tmp_path / "b" / "card.yaml").exists()
    lines: list[str] = []
    train(cfg("c", 2, 37), log=lines.append)  # the same recipe, more iterations: resumes
    assert any("resumed from" in ln and "iteration 1" in ln for ln in lines), lines
    # A checkpoint from before recipes were recorded cannot be shown to match --param overrides.
    ckpt = tmp_path / "work" / "maskrcnn-ckpt" / "ckpt.pt"
    state = torch.load(ckpt, weights_only=True)
    del state["recipe"]
    torch.save(state, ckpt)
    with pytest.raises(CheckpointMismatchError, match="records no recipe.*box_detections_per_img"):
        train(cfg("d", 3, 37), log=lambda m: None)


@pytest.mark.parametrize("param, why", [("box_detections_per_img=0", "box_detections_per_img"), ("nosuch=1", "nosuch"),
                                        ("nokey", "--param")])
def test_train_rejects_a_bad_param_before_any_work(tmp_path, param, why):
    r = runner.invoke(app, ["train", "maskrcnn", "--param", param, "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and why in r.output
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("init, why", [("rsis-shapes", "init: rsis-shapes is a rsis model; training maskrcnn cannot"),
                                       ("no-such-model", "init: no zoo model 'no-such-model'")])
def test_train_rejects_a_bad_init_before_any_work(tmp_path, init, why):
    r = runner.invoke(app, ["train", "maskrcnn", "--init", init, "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and why in r.output
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("args, why", [(["--param", "train_only=classifier"], "init: --param train_only=classifier trains one part"),
                                       (["--param", "train_only=classifier", "--param", "classify=pixels", "--init", "rsis-shapes"],
                                        "train_only: classifier needs the instance classifier")])
def test_train_only_a_part_needs_an_init_and_that_part(tmp_path, args, why):
    r = runner.invoke(app, ["train", "rsis", *args, "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and why in r.output
    assert not (tmp_path / "work").exists()


def test_train_rejects_val_seed_equal_train_seed(tmp_path):
    r = runner.invoke(app, ["train", "maskrcnn", "--train-seed", "3", "--val-seed", "3", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "val_seed" in r.output


def test_tampered_weights_are_refused(tmp_path, tiny_card):
    import shutil

    from segpipe.modeling.zoo import WeightsError, load_adapter

    d = tmp_path / "m"
    shutil.copytree(tiny_card.parent, d)
    w = d / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-1] + b"\x00")
    with pytest.raises(WeightsError) as e:
        load_adapter(str(d / "card.yaml"))
    card = yaml.safe_load((d / "card.yaml").read_text())
    from segpipe.modeling.zoo import sha256_file

    assert str(w) in str(e.value) and card["weights"]["sha256"] in str(e.value) and sha256_file(w) in str(e.value)
    # The run refuses it on the driver, before Ray starts, with the same message.
    r = invoke("run", REPO / "workflows" / "shapes.yaml", "--set", f"models.0.model={d / 'card.yaml'}",
               "--set", f"output.uri={tmp_path / 'out'}", "--set", f"source.uri={tmp_path}")
    assert r.exit_code == 2 and sha256_file(w) in r.output.replace("\n", "")


def test_pickled_weights_are_never_unpickled(tmp_path, tiny_card):
    """A pickle in place of the safetensors file, with a card that carries its sha256, is refused
    without being unpickled (the payload would create a file)."""
    import pickle
    import shutil

    from segpipe.modeling.zoo import WeightsError, load_adapter, sha256_file

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    d = tmp_path / "m"
    shutil.copytree(tiny_card.parent, d)
    w = d / "weights.safetensors"
    w.write_bytes(pickle.dumps(Payload()))
    card = yaml.safe_load((d / "card.yaml").read_text())
    card["weights"]["sha256"] = sha256_file(w)
    (d / "card.yaml").write_text(yaml.safe_dump(card))
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_adapter(str(d / "card.yaml"))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_run_then_eval_json(ray_local, tiny_card, shapes_data, tmp_path):
    out = tmp_path / "out"
    r = invoke("run", REPO / "workflows" / "shapes.yaml", "--set", f"source.uri={shapes_data / 'images'}",
               "--set", f"output.uri={out}", "--set", f"models.0.model={tiny_card}")
    assert r.exit_code == 0, r.output
    assert "6 ok, 2 errored" in r.output and str(out) in r.output
    r = invoke("eval", "--pred", out, "--gt", shapes_data / "annotations.json", "--max-dets", 50, "--json")
    assert r.exit_code == 0, r.output
    stats = json.loads(r.output)
    assert stats["max_dets"] == 50 and stats["n_images"] == 6
    assert set(stats["per_category"]) == {"ellipse", "star", "ring", "cross"}
    r = invoke("eval", "--pred", out, "--gt", shapes_data / "annotations.json")
    assert r.exit_code == 0 and "AP50=" in r.output and "AP[ring]" in r.output
    # The same output again under a new run id is refused, with the way to resume.
    r = runner.invoke(app, ["run", str(REPO / "workflows" / "shapes.yaml"), "--set", f"source.uri={shapes_data / 'images'}",
                            "--set", f"output.uri={out}", "--set", f"models.0.model={tiny_card}"])
    assert r.exit_code == 2 and "--run-id" in r.output


@pytest.mark.slow
def test_demo_runs_bundled_model(demo_run):
    r = demo_run  # `segpipe demo --n 8`, run once per session (conftest)
    assert r.exit_code == 0, r.output
    assert "8 ok, 0 errored" in r.output
    assert "mask AP vs ground truth" in r.output and "images/s" in r.output
    (manifest,) = (r.root / "runs").glob("*/_segpipe/run.json")
    run = json.loads(manifest.read_text())
    assert run["status"] == "complete" and run["models"][0]["version"].startswith("maskrcnn-shapes@")
    # The bundled model measures AP 0.617 on 200 val images; 8 unseen demo images stay well above 0.4.
    assert run["eval"]["AP"] > 0.4, run["eval"]


# Measured through `segpipe run workflows/nuclei.yaml` on the 7 sample images: maskrcnn-nuclei
# 0.482, polarmask-nuclei 0.449, spatialemb-nuclei 0.415, discloss-nuclei 0.276
# (nuclei val, 69 images: 0.538, 0.508, 0.466, 0.370).
NUCLEI_MIN_AP = {"maskrcnn-nuclei": 0.40, "polarmask-nuclei": 0.35, "spatialemb-nuclei": 0.35, "discloss-nuclei": 0.22}


@pytest.mark.slow
def test_nuclei_workflow_labels_a_folder_with_the_four_models(ray_local, tmp_path):
    """The documented command: segpipe run workflows/nuclei.yaml --set source.uri=DIR (here the
    bundled val sample, scored against its masks); one actor pool per method."""
    sample = REPO / "workflows" / "samples" / "nuclei"
    out = tmp_path / "out"
    r = invoke("run", REPO / "workflows" / "nuclei.yaml", "--set", f"source.uri={sample / 'images'}",
               "--set", f"output.uri={out}", "--set", f"eval.gt={sample / 'annotations.json'}")
    assert r.exit_code == 0, r.output
    assert "7 ok, 0 errored" in r.output
    run = json.loads((out / "_segpipe" / "run.json").read_text())
    assert [m["name"] for m in run["models"]] == list(NUCLEI_MIN_AP)
    per = run["eval"]["per_model"]
    assert run["eval"]["max_dets"] == 1000
    # Bundled models on 7 unseen val images (cards: nuclei val AP in models/*/card.yaml).
    for name, floor in NUCLEI_MIN_AP.items():
        assert per[name]["AP"] > floor, (name, per)
    from segpipe.sinks.writer import read_committed

    images = {r["relpath"]: r for r in read_committed(str(out), "images").to_pylist()}
    assert images["20b20ab049372d18.png"]["n_instances"] > 200  # 289 nuclei in the ground truth
    preds = read_committed(str(out), "predictions").to_pylist()
    assert {p["source"] for p in preds} == set(NUCLEI_MIN_AP)
