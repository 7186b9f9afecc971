"""segpipe.config: workflow validation, --set overrides, digests, model cards, TrainConfig."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from segpipe.config import (
    ModelCard,
    TrainConfig,
    WorkflowConfig,
    apply_overrides,
    load_workflow,
)

REPO = Path(__file__).resolve().parents[1]

BASE: dict = {
    "name": "t",
    "source": {"uri": "data/images"},
    "models": [{"model": "maskrcnn-shapes", "batch_size": 4}],
    "output": {"uri": "runs/out"},
}


def base() -> dict:
    return copy.deepcopy(BASE)


def error_locs(err: ValidationError) -> list[tuple]:
    return [e["loc"] for e in err.errors()]


# --- WorkflowConfig ------------------------------------------------------------------------------


def test_minimal_workflow_defaults():
    cfg = WorkflowConfig.model_validate(base())
    assert cfg.source.uri == "data/images"
    assert cfg.source.shard_size == 64
    assert cfg.models[0].num_gpus == "auto"
    assert cfg.pipeline.max_error_rate == 1.0
    assert cfg.output.coco is True


def test_unknown_top_level_key():
    data = base() | {"sourse": {"uri": "x"}}
    with pytest.raises(ValidationError) as err:
        WorkflowConfig.model_validate(data)
    assert ("sourse",) in error_locs(err.value)
    assert err.value.errors()[0]["type"] == "extra_forbidden"


@pytest.mark.parametrize(
    "path, loc",
    [
        (("source", "urii"), ("source", "urii")),
        (("output", "cocoo"), ("output", "cocoo")),
        (("pipeline", "max_errors"), ("pipeline", "max_errors")),
        (("models", 0, "gpus"), ("models", 0, "gpus")),
    ],
)
def test_unknown_nested_key_reports_field_path(path, loc):
    data = base()
    node = data
    for p in path[:-1]:
        node = node.setdefault(p, {}) if isinstance(p, str) else node[p]
    node[path[-1]] = 1
    with pytest.raises(ValidationError) as err:
        WorkflowConfig.model_validate(data)
    errors = err.value.errors()
    assert [e["loc"] for e in errors] == [loc]
    assert errors[0]["type"] == "extra_forbidden"


@pytest.mark.parametrize(
    "path, value, loc",
    [
        (("models", 0, "batch_size"), 0, ("models", 0, "batch_size")),
        (("models", 0, "concurrency"), 0, ("models", 0, "concurrency")),
        (("models", 0, "num_cpus"), 0, ("models", 0, "num_cpus")),
        (("models", 0, "score_threshold"), 1.5, ("models", 0, "score_threshold")),
        (("pipeline", "max_error_rate"), 2, ("pipeline", "max_error_rate")),
        (("pipeline", "max_error_rate"), -0.1, ("pipeline", "max_error_rate")),
        (("source", "shard_size"), 0, ("source", "shard_size")),
        (("source", "max_images"), 0, ("source", "max_images")),
        (("output", "min_score"), 2, ("output", "min_score")),
        (("decode", "max_pixels"), 0, ("decode", "max_pixels")),
    ],
)
def test_bad_values(path, value, loc):
    data = base()
    node = data
    for p in path[:-1]:
        node = node.setdefault(p, {}) if isinstance(p, str) else node[p]
    node[path[-1]] = value
    with pytest.raises(ValidationError) as err:
        WorkflowConfig.model_validate(data)
    assert loc in error_locs(err.value)


def test_num_gpus_accepts_auto_and_numbers_but_not_negative_or_text():
    for ok in ("auto", 0, 0.5, 1):
        data = base()
        data["models"][0]["num_gpus"] = ok
        WorkflowConfig.model_validate(data)
    for bad in (-1, "all"):
        data = base()
        data["models"][0]["num_gpus"] = bad
        with pytest.raises(ValidationError):
            WorkflowConfig.model_validate(data)


@pytest.mark.parametrize("missing", ["source", "models", "output"])
def test_required_sections(missing):
    data = base()
    del data[missing]
    with pytest.raises(ValidationError) as err:
        WorkflowConfig.model_validate(data)
    assert (missing,) in error_locs(err.value)


def test_models_must_not_be_empty():
    data = base()
    data["models"] = []
    with pytest.raises(ValidationError) as err:
        WorkflowConfig.model_validate(data)
    assert ("models",) in error_locs(err.value)


def test_several_models_are_allowed_but_each_once():
    data = base()
    data["models"].append({"model": "other"})
    cfg = WorkflowConfig.model_validate(data)
    assert [m.model for m in cfg.models][-1] == "other"
    data["models"].append({"model": "other"})
    with pytest.raises(ValidationError, match="each model may appear once"):
        WorkflowConfig.model_validate(data)


def test_digest_stable_and_content_sensitive():
    a = WorkflowConfig.model_validate(base())
    b = WorkflowConfig.model_validate(base())
    assert re.fullmatch(r"[0-9a-f]{64}", a.digest())
    assert a.digest() == b.digest()
    assert a.digest() == a.digest()
    # Key order in the source does not matter.
    reordered = dict(reversed(list(base().items())))
    assert WorkflowConfig.model_validate(reordered).digest() == a.digest()
    # Spelling out a default resolves to the same config.
    explicit = base()
    explicit["source"]["shard_size"] = 64
    assert WorkflowConfig.model_validate(explicit).digest() == a.digest()
    # Any change of content changes it.
    for path, value in [(("models", 0, "batch_size"), 8), (("name",), "u"), (("output", "uri"), "runs/other")]:
        data = base()
        node = data
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
        assert WorkflowConfig.model_validate(data).digest() != a.digest()


# --- apply_overrides ----------------------------------------------------------------------------


def test_overrides_dotted_keys():
    data = apply_overrides(base(), ["source.uri=/tmp/imgs", "output.coco=false"])
    assert data["source"]["uri"] == "/tmp/imgs"
    assert data["output"]["coco"] is False


def test_overrides_create_missing_sections():
    data = apply_overrides(base(), ["pipeline.max_error_rate=0.25", "eval.gt=gt.json"])
    assert data["pipeline"] == {"max_error_rate": 0.25}
    assert data["eval"] == {"gt": "gt.json"}
    assert WorkflowConfig.model_validate(data).pipeline.max_error_rate == 0.25


def test_overrides_list_index():
    data = apply_overrides(base(), ["models.0.batch_size=8", "models.0.num_gpus=0"])
    assert data["models"][0]["batch_size"] == 8
    assert data["models"][0]["num_gpus"] == 0
    assert data["models"][0]["model"] == "maskrcnn-shapes"  # siblings kept
    assert WorkflowConfig.model_validate(data).models[0].batch_size == 8


def test_overrides_replace_list_element_and_whole_list():
    data = apply_overrides(base(), ["source.patterns=['*.png', '*.tif']", "source.patterns.1='*.bmp'"])
    assert data["source"]["patterns"] == ["*.png", "*.bmp"]


@pytest.mark.parametrize("item", ["source.patterns.0=*.png", "source.uri=*x", "name=[unclosed"])
def test_overrides_invalid_yaml_value_is_a_value_error(item):
    # The CLI reports ValueError / ValidationError; a raw yaml error would escape as a traceback.
    with pytest.raises(ValueError, match="not valid YAML"):
        apply_overrides(base(), [item])


@pytest.mark.parametrize(
    "raw, value",
    [
        ("8", 8),
        ("0.5", 0.5),
        ("true", True),
        ("null", None),
        ("auto", "auto"),
        ("'8'", "8"),
        ("[1, 2]", [1, 2]),
        ("{a: 1}", {"a": 1}),
        ("", ""),
        ("a=b", "a=b"),  # only the first '=' splits
        ("s3://bucket/prefix", "s3://bucket/prefix"),
    ],
)
def test_overrides_yaml_typed_values(raw, value):
    data = apply_overrides({}, [f"x.y={raw}"])
    assert data["x"]["y"] == value
    assert type(data["x"]["y"]) is type(value)


def test_overrides_in_place_and_in_order():
    data = base()
    out = apply_overrides(data, ["name=a", "name=b"])
    assert out is data
    assert data["name"] == "b"


@pytest.mark.parametrize("item", ["source.uri", "", "models.0.batch_size 8"])
def test_overrides_malformed_no_equals(item):
    with pytest.raises(ValueError, match="dotted.key=value"):
        apply_overrides(base(), [item])


@pytest.mark.parametrize("item", ["source..uri=x", ".uri=x", "source.=x", "=x"])
def test_overrides_empty_segment(item):
    with pytest.raises(ValueError, match="empty key segment"):
        apply_overrides(base(), [item])


@pytest.mark.parametrize(
    "item", ["models.1.batch_size=8", "models.x.batch_size=8", "models.-1.batch_size=8", "source.patterns.9=x"]
)
def test_overrides_bad_list_index(item):
    data = base()
    data["source"]["patterns"] = ["*.png"]
    with pytest.raises(ValueError, match="not an index"):
        apply_overrides(data, [item])


def test_overrides_then_validation_catches_bad_values():
    data = apply_overrides(base(), ["models.0.batch_size=0"])
    with pytest.raises(ValidationError) as err:
        WorkflowConfig.model_validate(data)
    assert ("models", 0, "batch_size") in error_locs(err.value)


# --- load_workflow ------------------------------------------------------------------------------


def test_load_workflow(tmp_path):
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(base()))
    cfg = load_workflow(path)
    assert isinstance(cfg, WorkflowConfig)
    assert cfg.models[0].model == "maskrcnn-shapes"
    assert cfg.digest() == WorkflowConfig.model_validate(base()).digest()


def test_load_workflow_with_overrides(tmp_path):
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(base()))
    cfg = load_workflow(str(path), ["models.0.batch_size=16", "source.uri=s3://b/p"])
    assert cfg.models[0].batch_size == 16
    assert cfg.source.uri == "s3://b/p"
    # The file itself is untouched.
    assert yaml.safe_load(path.read_text()) == base()


def test_load_workflow_unknown_key_in_file(tmp_path):
    data = base()
    data["source"]["urii"] = "x"
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValidationError) as err:
        load_workflow(path)
    assert ("source", "urii") in error_locs(err.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "3\n"])
def test_load_workflow_not_a_mapping(tmp_path, text):
    path = tmp_path / "wf.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="must be a mapping"):
        load_workflow(path)


def test_load_workflow_malformed_yaml_is_a_value_error(tmp_path):
    path = tmp_path / "wf.yaml"
    path.write_text("source: {uri: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_workflow(path)


def test_load_workflow_empty_file_is_a_validation_error(tmp_path):
    path = tmp_path / "wf.yaml"
    path.write_text("")
    with pytest.raises(ValidationError):
        load_workflow(path)


@pytest.mark.parametrize("path", sorted((REPO / "workflows").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_workflows_validate(path):
    assert isinstance(load_workflow(path), WorkflowConfig)


# --- ModelCard ----------------------------------------------------------------------------------

SHA_A = "a" * 64
SHA_B = "0123456789abcdef" * 4


def card_data(**changes) -> dict:
    data = {
        "name": "maskrcnn-shapes",
        "family": "maskrcnn",
        "paper": "He et al., Mask R-CNN, ICCV 2017",
        "builder": "maskrcnn",
        "params": {"fpn_channels": 64},
        "categories": [{"id": 1, "name": "ellipse"}, {"id": 2, "name": "star"}],
        "weights": {"file": "model.safetensors", "sha256": SHA_A},
    }
    data.update(changes)
    return data


def test_card_valid_and_version_format():
    card = ModelCard.model_validate(card_data())
    v = card.version()
    assert re.fullmatch(r"maskrcnn-shapes@[0-9a-f]{12}", v)
    assert ModelCard.model_validate(card_data()).version() == v  # stable


def test_card_version_changes_with_weights_and_params():
    v = ModelCard.model_validate(card_data()).version()
    other_weights = card_data(weights={"file": "model.safetensors", "sha256": SHA_B})
    assert ModelCard.model_validate(other_weights).version() != v
    assert ModelCard.model_validate(card_data(params={"fpn_channels": 32})).version() != v
    assert ModelCard.model_validate(card_data(categories=[{"id": 1, "name": "ellipse"}])).version() != v
    # The weights file name is not part of the version, only its content digest.
    renamed = card_data(weights={"file": "elsewhere.safetensors", "sha256": SHA_A})
    assert ModelCard.model_validate(renamed).version() == v
    # Nor are the limits: they are documentation.
    assert ModelCard.model_validate(card_data(limits=["At most 100 instances per image."])).version() == v


@pytest.mark.parametrize(
    "sha",
    ["a" * 63, "a" * 65, "A" * 64, "g" * 64, "", "sha256:" + "a" * 64],
)
def test_card_bad_sha256(sha):
    with pytest.raises(ValidationError) as err:
        ModelCard.model_validate(card_data(weights={"file": "w.safetensors", "sha256": sha}))
    assert ("weights", "sha256") in error_locs(err.value)


def test_card_unknown_keys():
    with pytest.raises(ValidationError) as err:
        ModelCard.model_validate(card_data(weight={"file": "x", "sha256": SHA_A}))
    assert ("weight",) in error_locs(err.value)
    with pytest.raises(ValidationError) as err:
        ModelCard.model_validate(card_data(weights={"file": "x", "sha256": SHA_A, "url": "https://x"}))
    assert ("weights", "url") in error_locs(err.value)


def test_card_rejects_pickle_formats_and_bad_names():
    with pytest.raises(ValidationError) as err:
        ModelCard.model_validate(card_data(weights={"file": "x.pt", "sha256": SHA_A, "format": "pickle"}))
    assert ("weights", "format") in error_locs(err.value)
    for name in ("MaskRCNN", "-x", "a b", ""):
        with pytest.raises(ValidationError):
            ModelCard.model_validate(card_data(name=name))
    with pytest.raises(ValidationError):
        ModelCard.model_validate(card_data(categories=[]))
    with pytest.raises(ValidationError):
        ModelCard.model_validate(card_data(categories=[{"id": 0, "name": "bg"}]))


def test_card_from_yaml(tmp_path):
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(card_data()))
    card = ModelCard.from_yaml(path)
    assert card.version() == ModelCard.model_validate(card_data()).version()


# --- TrainConfig --------------------------------------------------------------------------------


def test_train_config_defaults():
    cfg = TrainConfig()
    assert cfg.val_seed != cfg.train_seed
    assert cfg.model_name == "maskrcnn-shapes"
    assert TrainConfig(name="mine").model_name == "mine"


def test_train_config_rejects_equal_seeds():
    with pytest.raises(ValidationError, match="val_seed must differ"):
        TrainConfig(train_seed=5, val_seed=5)


@pytest.mark.parametrize("field, value", [("iterations", 0), ("lr", 0), ("method", "yolo"), ("bogus", 1)])
def test_train_config_bad_values(field, value):
    with pytest.raises(ValidationError) as err:
        TrainConfig.model_validate({field: value})
    assert (field,) in error_locs(err.value)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.yaml")), ids=lambda p: p.name)
def test_every_bundled_workflow_validates_and_names_zoo_models(path):
    from segpipe.modeling.zoo import list_cards

    cfg = load_workflow(path)
    assert {m.model for m in cfg.models} <= set(list_cards())
    if cfg.output.primary is not None:
        assert cfg.output.primary in {m.model for m in cfg.models}
    if path.name == "nuclei-demo.yaml":  # runnable as is from the checkout's root
        root = path.parents[1]
        assert (root / cfg.source.uri).is_dir() and (root / cfg.eval.gt).is_file() and cfg.eval.max_dets == 1000
