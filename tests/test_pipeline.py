"""End-to-end runs on a local Ray over a handful of images (real Ray Data, real Parquet, pycocotools)."""

from __future__ import annotations

from collections import Counter

import json

import pyarrow.parquet as pq
import pytest
from pycocotools.coco import COCO

from segpipe.config import load_workflow
from segpipe.pipeline.run import run_workflow
from segpipe.sinks.tables import SCHEMAS
from segpipe.sinks.writer import OutputExistsError, read_committed

from conftest import REPO

pytestmark = pytest.mark.slow


def _cfg(tiny_card, shapes_data, out, **extra):
    sets = [
        f"source.uri={shapes_data / 'images'}",
        f"output.uri={out}",
        f"models.0.model={tiny_card}",
        "source.shard_size=3",
        f"eval.gt={shapes_data / 'annotations.json'}",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_workflow(REPO / "workflows" / "shapes.yaml", sets)


@pytest.fixture(scope="module")
def first_run(ray_local, tiny_card, shapes_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    cfg = _cfg(tiny_card, shapes_data, out)
    result = run_workflow(cfg, run_id="test-run-1", progress=lambda m: None)
    return cfg, out, result


def test_outputs_exist_and_match_schemas(first_run):
    cfg, out, result = first_run
    assert result.status == "complete"
    for name, schema in SCHEMAS.items():
        files = sorted((out / name).glob("shard-*.parquet"))
        assert len(files) == 3, name  # 8 inputs / shard_size 3
        for f in files:
            assert pq.read_schema(f).equals(schema, check_metadata=False), f
    assert not (out / "_segpipe" / "staging").exists()


def test_every_input_accounted_for(first_run, shapes_data):
    _, out, result = first_run
    inputs = sorted(str(p) for p in (shapes_data / "images").iterdir())
    images = read_committed(str(out), "images").to_pylist()
    errors = read_committed(str(out), "errors").to_pylist()
    assert sorted(r["uri"] for r in images) == inputs
    ok = {r["uri"] for r in images if r["status"] == "ok"}
    bad = {r["uri"] for r in errors}
    assert ok.isdisjoint(bad) and ok | bad == set(inputs)
    assert result.counts == {**result.counts, "images": 8, "ok": 6, "errors": 2}


def test_bad_files_become_error_records(first_run, shapes_data):
    _, out, _ = first_run
    errors = {r["uri"].rsplit("/", 1)[-1]: r for r in read_committed(str(out), "errors").to_pylist()}
    assert set(errors) == {"corrupt.jpg", "notes.png"}
    assert errors["corrupt.jpg"]["stage"] == "decode"
    assert errors["corrupt.jpg"]["error_type"] in {"truncated", "corrupt", "unreadable"}
    assert errors["notes.png"]["error_type"] == "not_an_image"


def test_coco_loads_and_matches_tables(first_run):
    _, out, _ = first_run
    coco = COCO(str(out / "coco" / "instances.json"))
    inst = read_committed(str(out), "instances")
    assert len(coco.getImgIds()) == 6
    assert len(coco.getAnnIds()) == inst.num_rows
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"ellipse", "star", "ring", "cross"}
    for ann in coco.loadAnns(coco.getAnnIds()[:20]):
        m = coco.annToMask(ann)
        assert m.sum() == ann["area"] > 0


def test_rows_carry_model_version_and_manifest(first_run, tiny_card):
    from segpipe.config import ModelCard

    cfg, out, result = first_run
    version = ModelCard.from_yaml(tiny_card).version()
    inst = read_committed(str(out), "instances").to_pylist()
    assert inst, "an untrained model still proposes instances at threshold 0.05"
    assert {tuple(r["model_versions"]) for r in inst} == {(version,)}
    assert {r["run_id"] for r in inst} == {"test-run-1"}
    manifest = json.loads((out / "_segpipe" / "run.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["workflow"]["sha256"] == cfg.digest()
    assert manifest["models"][0]["version"] == version
    assert manifest["counts"]["images"] == 8 and manifest["shards"] == [0, 1, 2]
    for pkg in ("torch", "torchvision", "ray"):
        assert manifest["environment"]["packages"][pkg]
    assert manifest["eval"]["n_images"] == 6
    assert manifest["code"]["segpipe_version"]
    if (REPO / ".git").exists():
        assert len(manifest["code"]["git_commit"].split("+")[0]) == 40
    assert manifest["input"]["n_files"] == 8 and len(manifest["input"]["fingerprint"]) == 64


def test_rerun_same_id_resumes_and_other_id_refused(first_run, tiny_card, shapes_data):
    cfg, out, result = first_run
    before = read_committed(str(out), "instances").to_pylist()
    again = run_workflow(cfg, run_id="test-run-1", progress=lambda m: None)
    assert again.skipped_shards == [0, 1, 2]
    assert read_committed(str(out), "instances").to_pylist() == before
    with pytest.raises(OutputExistsError, match="test-run-1"):
        run_workflow(cfg, run_id="another-run", progress=lambda m: None)


# --- several models ----------------------------------------------------------------------------


def _two_model_cfg(tiny_card, polar_card, shapes_data, out, *extra):
    sets = [
        f"source.uri={shapes_data / 'images'}", f"output.uri={out}", "source.shard_size=4",
        f"models.0.model={tiny_card}", "output.min_score=0", "models.0.num_cpus=0.8",
        f"eval.gt={shapes_data / 'annotations.json'}", "pipeline.read_num_cpus=0.2", *extra,
    ]
    data = load_workflow(REPO / "workflows" / "shapes.yaml", sets).model_dump(mode="json")
    data["models"].append({"model": str(polar_card), "num_cpus": 0.8, "score_threshold": 0.0, "batch_size": 2})
    from segpipe.config import WorkflowConfig

    return WorkflowConfig.model_validate(data)


def test_two_models_fill_predictions_and_the_primary_fills_instances(ray_local, tiny_card, shapes_data, tmp_path):
    from conftest import make_polar_card

    polar = make_polar_card(tmp_path / "zoo" / "tiny-polarmask")
    out = tmp_path / "out"
    cfg = _two_model_cfg(tiny_card, polar, shapes_data, out, "output.primary=tiny-polarmask")
    result = run_workflow(cfg, run_id="two", progress=lambda m: None)
    assert result.status == "complete" and result.counts["ok"] == 6
    preds = read_committed(str(out), "predictions").to_pylist()
    inst = read_committed(str(out), "instances").to_pylist()
    by_source = {s: [r for r in preds if r["source"] == s] for s in {r["source"] for r in preds}}
    assert set(by_source) == {"tiny-maskrcnn", "tiny-polarmask"}
    assert all(len(v) > 0 for v in by_source.values())
    key = lambda r: (r["image_id"], r["mask_rle"], r["score"])  # noqa: E731
    assert sorted(map(key, inst)) == sorted(map(key, by_source["tiny-polarmask"]))
    images = read_committed(str(out), "images").to_pylist()
    assert sum(r["n_instances"] for r in images) == len(inst) == result.counts["instances"]
    assert set(result.eval["per_model"]) == {"tiny-maskrcnn", "tiny-polarmask"}
    assert result.eval["source"] == "tiny-polarmask"
    assert result.eval["per_model"]["tiny-polarmask"]["n_predictions"] == result.eval["n_predictions"]
    manifest = json.loads((out / "_segpipe" / "run.json").read_text())
    assert [m["name"] for m in manifest["models"]] == ["tiny-maskrcnn", "tiny-polarmask"]
    assert manifest["outputs"]["instances_source"] == "tiny-polarmask"
    coco = COCO(str(out / "coco" / "instances.json"))
    assert len(coco.anns) == len(inst)
    from typer.testing import CliRunner

    from segpipe.cli import app

    r = CliRunner().invoke(app, ["eval", "--pred", str(out), "--gt", str(shapes_data / "annotations.json"),
                                 "--model", "tiny-maskrcnn", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["n_predictions"] == result.eval["per_model"]["tiny-maskrcnn"]["n_predictions"]


def test_four_methods_run_side_by_side_one_actor_pool_each(ray_local, tiny_card, shapes_data, tmp_path):
    """Mask R-CNN, PolarMask, SpatialEmbeddings and the discriminative loss in one workflow. The
    discriminative-loss card is capped at one instance per image: the images that reached that
    bound are counted, warned about and recorded in the manifest."""
    from conftest import make_embed_card, make_polar_card

    from segpipe.config import WorkflowConfig

    cards = [make_polar_card(tmp_path / "zoo" / "tiny-polarmask"),
             make_embed_card(tmp_path / "zoo" / "tiny-spatialemb", "spatialemb"),
             make_embed_card(tmp_path / "zoo" / "tiny-discloss", "discloss", params={"max_instances": 1})]
    out = tmp_path / "out"
    data = _two_model_cfg(tiny_card, cards[0], shapes_data, out, "models.0.num_cpus=0.4").model_dump(mode="json")
    data["models"][1]["num_cpus"] = 0.4
    data["models"] += [{"model": str(c), "num_cpus": 0.4, "batch_size": 2} for c in cards[1:]]
    lines: list[str] = []
    result = run_workflow(WorkflowConfig.model_validate(data), run_id="four", progress=lines.append)
    assert result.status == "complete" and result.counts["ok"] == 6
    names = ["tiny-maskrcnn", "tiny-polarmask", "tiny-spatialemb", "tiny-discloss"]
    manifest = json.loads((out / "_segpipe" / "run.json").read_text())
    assert [m["name"] for m in manifest["models"]] == names
    assert [m["card"]["builder"] for m in manifest["models"]] == ["maskrcnn", "polarmask", "spatialemb", "discloss"]
    preds = read_committed(str(out), "predictions").to_pylist()
    counts = {n: sum(r["source"] == n for r in preds) for n in names}
    assert counts["tiny-spatialemb"] > 0 and counts["tiny-discloss"] > 0, counts
    assert set(result.eval["per_model"]) == set(names)
    for r in preds:
        if r["source"] in ("tiny-spatialemb", "tiny-discloss"):
            assert len(r["model_versions"]) == 1 and r["model_versions"][0].startswith(r["source"] + "@")
            assert r["area"] >= 4  # the cards' min_pixels
    capped = {r["image_id"] for r in preds if r["source"] == "tiny-discloss"}
    assert counts["tiny-discloss"] == len(capped)  # one instance per image at most
    assert result.bounds["tiny-discloss"]["bound"] == 1
    assert manifest["bounds"] == result.bounds
    from segpipe.modeling.zoo import load_adapter

    for name, card in zip(names, [tiny_card, *cards]):
        cap = load_adapter(str(card))[0].instance_bound
        per_image = Counter(r["image_id"] for r in preds if r["source"] == name)
        full = sum(n >= cap for n in per_image.values())
        got = result.bounds.get(name, {"images": 0, "bound": cap})
        assert got["bound"] == cap
        if name in ("tiny-spatialemb", "tiny-discloss"):  # no filtering after clustering: rows = raw instances
            assert got["images"] == full, (name, got, per_image)
        else:  # postprocess may drop empty masks after the cap
            assert full <= got["images"] <= 6, (name, got, per_image)
        if got["images"]:
            assert any(ln.startswith(f"warning: {name}: {got['images']} image(s) reached its bound of {cap} ") for ln in lines)
    assert result.bounds["tiny-discloss"]["images"] == len(capped) >= 1


def test_unknown_primary_and_mismatched_categories_fail_before_any_work(tiny_card, shapes_data, tmp_path):
    from conftest import make_polar_card

    from segpipe.pipeline.run import WorkflowError

    polar = make_polar_card(tmp_path / "zoo" / "p")
    with pytest.raises(WorkflowError, match="output.primary"):
        run_workflow(_two_model_cfg(tiny_card, polar, shapes_data, tmp_path / "o1", "output.primary=nope"), progress=lambda m: None)
    other = make_polar_card(tmp_path / "zoo" / "q", name="nuclei-like", categories=[{"id": 1, "name": "nucleus"}])
    with pytest.raises(WorkflowError, match="category set"):
        run_workflow(_two_model_cfg(tiny_card, other, shapes_data, tmp_path / "o2"), progress=lambda m: None)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def _scorer_card(folder, models: list[str]):
    """An untrained ensemble scorer card for ``models`` (random weights, a valid zoo entry)."""
    import torch
    import yaml

    from segpipe.config import ScorerParams
    from segpipe.ensemble.scorer import ScorerNet
    from segpipe.modeling.zoo import save_weights

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    params = ScorerParams(models=models, hidden=8)
    digest = save_weights(ScorerNet(params), folder / "weights.safetensors")
    card = {"name": "tiny-scorer", "family": "ensemble scorer", "paper": "test fixture", "builder": "scorer",
            "params": params.model_dump(), "categories": [{"id": 1, "name": "x"}],
            "weights": {"file": "weights.safetensors", "sha256": digest, "format": "safetensors", "dtype": "float16"}}
    (folder / "card.yaml").write_text(yaml.safe_dump(card))
    return folder / "card.yaml"


def test_ensemble_scorer_in_the_pipeline(ray_local, shapes_data, tmp_path):
    """With ensemble.scorer the fuse stage ranks the fused instances by the scorer's predicted IoU
    (its confidence), the manifest names its version, and a scorer of other models fails fast."""
    from segpipe.config import WorkflowConfig
    from segpipe.ensemble.scorer import load_scorer
    from segpipe.pipeline.run import WorkflowError

    card = _scorer_card(tmp_path / "scorer", ["maskrcnn-shapes", "polarmask-shapes"])
    out = tmp_path / "out"
    data = _two_model_cfg("maskrcnn-shapes", "polarmask-shapes", shapes_data, out).model_dump(mode="json")
    data["ensemble"] = {"method": "soft", "rank": "confidence", "scorer": str(card)}
    result = run_workflow(WorkflowConfig.model_validate(data), run_id="scored", progress=lambda m: None)
    assert result.status == "complete" and result.counts["ok"] == 6
    manifest = json.loads((out / "_segpipe" / "run.json").read_text())
    assert manifest["scorer"]["version"] == load_scorer(str(card)).version
    rows = read_committed(str(out), "instances").to_pylist()
    assert rows
    for r in rows:
        assert 0.0 < r["confidence"] < 1.0 and r["score"] == pytest.approx(r["confidence"])
    other = _scorer_card(tmp_path / "other", ["maskrcnn-shapes", "spatialemb-shapes"])
    data["ensemble"]["scorer"] = str(other)
    data["output"]["uri"] = str(tmp_path / "out2")
    with pytest.raises(WorkflowError, match="trained for the models"):
        run_workflow(WorkflowConfig.model_validate(data), progress=lambda m: None)
    assert not (tmp_path / "out2").exists()


def test_ensemble_of_two_zoo_models_fills_instances_with_fused_rows(ray_local, shapes_data, tmp_path):
    """maskrcnn-shapes + polarmask-shapes (real trained weights) fused in the pipeline."""
    from segpipe.config import WorkflowConfig

    out = tmp_path / "out"
    data = _two_model_cfg("maskrcnn-shapes", "polarmask-shapes", shapes_data, out).model_dump(mode="json")
    data["models"][1]["score_threshold"] = None
    data["ensemble"] = {"method": "soft"}
    result = run_workflow(WorkflowConfig.model_validate(data), run_id="ens", progress=lambda m: None)
    assert result.status == "complete" and result.counts["ok"] == 6 and result.counts["errors"] == 2
    preds = read_committed(str(out), "predictions").to_pylist()
    inst = read_committed(str(out), "instances").to_pylist()
    manifest = json.loads((out / "_segpipe" / "run.json").read_text())
    versions = {m["name"]: m["version"] for m in manifest["models"]}
    assert manifest["outputs"]["instances_source"] == "ensemble" and result.eval["source"] == "ensemble"
    assert set(result.eval["per_model"]) == {"maskrcnn-shapes", "polarmask-shapes"}
    assert inst and all(r["source"] == "ensemble" for r in inst)
    pred_scores = {(r["image_id"], r["source"], round(r["score"], 5)) for r in preds}
    assert max(r["n_votes"] for r in inst) == 2  # the two models agree on most shapes
    for r in inst:
        assert r["n_votes"] == len(r["members"]) and 1 <= r["n_votes"] <= 2
        assert r["model_versions"] == sorted({m["model_version"] for m in r["members"]})
        for m in r["members"]:
            assert versions[m["model"]] == m["model_version"] and 0.0 <= m["iou"] <= 1.0
            assert (r["image_id"], m["model"], round(m["score"], 5)) in pred_scores  # a member is a raw prediction
        if r["n_votes"] == 2:
            assert 0.5 <= r["agreement"] <= 1.0 and r["confidence"] == pytest.approx(r["score"] * r["agreement"], rel=1e-5)
        else:
            assert r["agreement"] is None and r["confidence"] == pytest.approx(r["score"], rel=1e-5)
            assert r["score"] <= 0.5 + 1e-6  # one of two equal-weight models: half its score
        assert len(r["soft_mask"]) == 28 * 28 * 2 and len(r["soft_box"]) == 4
    assert all(len(r["soft_mask"]) == 28 * 28 * 2 for r in preds)  # raw soft masks persisted for re-fusion
    images = read_committed(str(out), "images").to_pylist()
    assert sum(r["n_instances"] for r in images) == len(inst) == result.counts["instances"]
    coco = COCO(str(out / "coco" / "instances.json"))
    assert len(coco.anns) == len(inst)
    # Re-fusion from the persisted raw predictions, no model run: same settings, same rows.
    from typer.testing import CliRunner

    from segpipe.cli import app

    runner = CliRunner()
    same = tmp_path / "same"
    r = runner.invoke(app, ["ensemble", str(out), "--out", str(same)])
    assert r.exit_code == 0, r.output
    key = lambda r: (r["image_id"], r["mask_rle"], round(r["score"], 5), r["n_votes"])  # noqa: E731
    assert sorted(map(key, read_committed(str(same), "instances").to_pylist())) == sorted(map(key, inst))
    voted = tmp_path / "voted"
    r = runner.invoke(app, ["ensemble", str(out), "--out", str(voted), "--set", "ensemble.method=vote",
                            "--set", "output.min_votes=2", "--gt", str(shapes_data / "annotations.json")])
    assert r.exit_code == 0, r.output
    assert "AP" in r.output
    fused = read_committed(str(voted), "instances").to_pylist()
    assert fused and all(row["n_votes"] == 2 for row in fused)
    assert len(fused) == sum(row["n_votes"] == 2 for row in inst)
    assert json.loads((voted / "_segpipe" / "run.json").read_text())["ensemble"]["method"] == "vote"
    r = runner.invoke(app, ["ensemble", str(out), "--out", str(tmp_path / "bad"), "--set", "ensemble.quorum=2"])
    assert r.exit_code == 2 and "ensemble.quorum" in r.output
    r = runner.invoke(app, ["ensemble", str(out), "--set", "models.0.model=x"])
    assert r.exit_code == 2 and "only ensemble" in r.output
    # One comparison table: the ensemble and each model of the run, then the re-fused result.
    r = runner.invoke(app, ["eval", "--pred", str(out), "--pred", str(voted), "--gt", str(shapes_data / "annotations.json"),
                            "--each-model", "--boundary", "--json"])
    assert r.exit_code == 0, r.output
    table = json.loads(r.output)
    assert [t["result"] for t in table] == [f"{out}: ensemble", f"{out}: maskrcnn-shapes", f"{out}: polarmask-shapes",
                                            f"{voted}: ensemble", f"{voted}: maskrcnn-shapes", f"{voted}: polarmask-shapes"]
    assert table[0]["AP"] == pytest.approx(result.eval["AP"])
    assert table[1]["AP"] == pytest.approx(result.eval["per_model"]["maskrcnn-shapes"]["AP"])
    assert all(0.0 <= t["BoundaryAP"] <= t["AP"] + 1e-9 for t in table)  # min(mask, boundary IoU) never matches more
    text = runner.invoke(app, ["eval", "--pred", str(out), "--gt", str(shapes_data / "annotations.json"), "--each-model"])
    assert text.exit_code == 0 and "polarmask-shapes" in text.output and "BoundaryAP" not in text.output


def test_ensemble_then_refine_stage_marks_rows_and_provenance(ray_local, tiny_card, shapes_data, tmp_path):
    from conftest import make_pointrend_card, make_polar_card

    from segpipe.config import WorkflowConfig

    polar = make_polar_card(tmp_path / "zoo" / "tiny-polarmask")
    refiner = make_pointrend_card(tmp_path / "zoo" / "tiny-pointrend")
    out = tmp_path / "out"
    data = _two_model_cfg(tiny_card, polar, shapes_data, out).model_dump(mode="json")
    data["models"][0]["num_cpus"] = data["models"][1]["num_cpus"] = 0.5  # 2 CPUs: leave room for read and fuse tasks
    data["ensemble"] = {"method": "vote", "quorum": 0.5}
    data["refine"] = {"model": str(refiner), "num_cpus": 0.4, "batch_size": 2}
    result = run_workflow(WorkflowConfig.model_validate(data), run_id="refined", progress=lambda m: None)
    assert result.status == "complete" and result.counts["ok"] == 6 and result.counts["errors"] == 2
    manifest = json.loads((out / "_segpipe" / "run.json").read_text())
    version = manifest["refiner"]["version"]
    assert version.startswith("tiny-pointrend@") and manifest["outputs"]["refined_by"] == version
    assert "refine" in manifest["timings_ms"]
    from segpipe.pipeline.run import post_model_overhead

    post, frac, model_ms = post_model_overhead(manifest["timings_ms"])
    t = manifest["timings_ms"]
    assert post == pytest.approx(t["ensemble"] + t["refine"], abs=0.2) and model_ms > 0 and frac == pytest.approx(post / model_ms)
    # Process CPU per stage beside the wall times: the models, the fusion and the refiner each did work.
    cpu = manifest["cpu_ms"]
    assert set(cpu) == set(t) - {"read", "decode", "write"} and all(v > 0 for v in cpu.values())
    assert result.stage_cpu_ms == pytest.approx(cpu, abs=0.1)
    inst = read_committed(str(out), "instances").to_pylist()
    assert inst and all(r["refined_by"] == version and version in r["model_versions"] for r in inst)
    assert all(r["source"] == "ensemble" and r["area"] > 0 for r in inst)
    preds = read_committed(str(out), "predictions").to_pylist()
    assert all(r["refined_by"] is None for r in preds)  # raw predictions stay unrefined
    data["refine"] = {"model": str(polar)}  # not a refiner: refused before any work
    from segpipe.pipeline.run import WorkflowError

    with pytest.raises(WorkflowError, match="refine.model"):
        run_workflow(WorkflowConfig.model_validate(data | {"output": data["output"] | {"uri": str(tmp_path / "o2")}}),
                     progress=lambda m: None)


def test_actor_pools_that_starve_the_read_tasks_are_refused(ray_local, tiny_card, shapes_data, tmp_path):
    from segpipe.pipeline.run import WorkflowError

    cfg = _cfg(tiny_card, shapes_data, tmp_path / "out", **{"models.0.num_cpus": 2, "pipeline.read_num_cpus": 0.5})
    with pytest.raises(WorkflowError, match="num_cpus"):
        run_workflow(cfg, run_id="starved", progress=lambda m: None)


def test_post_model_overhead_sums_the_stages_after_the_models():
    from segpipe.pipeline.run import post_model_overhead

    assert post_model_overhead({"read": 5.0, "m1": 100.0, "write": 3.0}) is None
    assert post_model_overhead({"read": 5.0, "m1": 100.0, "m2": 300.0, "ensemble": 20.0, "refine": 20.0, "write": 1.0}) == (40.0, 0.1, 400.0)
    assert post_model_overhead({"m1": 50.0, "refine": 5.0}) == (5.0, 0.1, 50.0)
