"""segpipe train: deterministic for a fixed seed and thread count, across epoch boundaries."""

from __future__ import annotations

import pytest

from segpipe.config import TrainConfig
from segpipe.modeling.zoo import sha256_file
from segpipe.train.loop import lr_at, train

from conftest import TINY_PARAMS


@pytest.mark.timeout(300)
def test_two_runs_give_identical_weights(tmp_path):
    # 10 images in batches of 4: 2 full batches per epoch, so 5 iterations cross two epoch boundaries.
    digests = []
    for k in ("a", "b"):
        cfg = TrainConfig(iterations=5, batch_size=4, train_n=10, val_n=2, warmup=2, work_dir=str(tmp_path / "work"),
                          out=str(tmp_path / k), name="tiny", params=TINY_PARAMS, threads=1)
        card = train(cfg, log=lambda m: None)
        digests.append(sha256_file(card.parent / "weights.safetensors"))
        (tmp_path / "work" / "tiny" / "ckpt.pt").unlink(missing_ok=True)  # b must train from scratch, not resume
    assert digests[0] == digests[1]


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(iterations=100, warmup=10, lr=1.0)
    assert lr_at(0, cfg) == pytest.approx(0.01)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_at(100, cfg) == pytest.approx(0.01)
    assert all(lr_at(i, cfg) >= lr_at(i + 1, cfg) for i in range(10, 100))


def test_train_device_resolves_auto_and_refuses_a_missing_gpu():
    import torch

    from segpipe.train.loop import train_device

    assert train_device(TrainConfig(device="cpu")).type == "cpu"
    assert train_device(TrainConfig()).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no GPU"):
            train_device(TrainConfig(device="cuda"))
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="tpu")


@pytest.mark.timeout(300)
def test_init_starts_from_a_card_and_the_new_card_records_it(tmp_path):
    import torch
    from safetensors.torch import load_file

    from segpipe.config import ModelCard

    common = dict(batch_size=4, train_n=10, val_n=2, warmup=0, work_dir=str(tmp_path / "work"), params=TINY_PARAMS, threads=1)
    base = train(TrainConfig(iterations=3, out=str(tmp_path / "a"), name="tiny", **common), log=lambda m: None)
    logs: list[str] = []
    card = train(TrainConfig(iterations=1, lr=1e-12, out=str(tmp_path / "b"), name="tiny-ft", init=str(base), **common),
                 log=logs.append)
    a, b = load_file(str(base.parent / "weights.safetensors")), load_file(str(card.parent / "weights.safetensors"))
    learnt = [k for k in a if "running_" not in k and "num_batches" not in k]
    assert learnt and all(torch.equal(a[k], b[k]) for k in learnt)  # one step at lr 1e-12: the init's weights
    rec = ModelCard.from_yaml(card).training
    assert rec.init["card"] == ModelCard.from_yaml(base).version() and rec.init["fresh"] == [] and rec.init["loaded"] == len(a)
    assert rec.config["init"] == str(base)
    assert any(line.startswith(f"init from {rec.init['card']}: {len(a)} tensors loaded, 0 fresh") for line in logs)
    with pytest.raises(ValueError, match="init: .* is a maskrcnn model"):
        train(TrainConfig(method="polarmask", iterations=1, out=str(tmp_path / "c"), name="tiny-c", init=str(base),
                          **{k: v for k, v in common.items() if k != "params"}), log=lambda m: None)


def test_train_only_classifier_changes_only_the_classifier_and_the_card_says_so(tmp_path):
    import torch
    from safetensors.torch import load_file

    from segpipe.config import ModelCard

    from conftest import TINY_RSIS_PARAMS

    params = TINY_RSIS_PARAMS | {"classify": "instances", "class_crop": 8, "class_channels": [4]}
    common = dict(method="rsis", batch_size=2, train_n=6, val_n=2, warmup=0, crop=48, work_dir=str(tmp_path / "work"), threads=1)
    base = train(TrainConfig(iterations=2, out=str(tmp_path / "a"), name="tiny", params=params, **common), log=lambda m: None)
    logs: list[str] = []
    card = train(TrainConfig(iterations=3, lr=1e-2, out=str(tmp_path / "b"), name="tiny-cls", init=str(base),
                             params=params | {"train_only": "classifier"}, **common), log=logs.append)
    a, b = load_file(str(base.parent / "weights.safetensors")), load_file(str(card.parent / "weights.safetensors"))
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith("classifier.") for k in changed)  # frozen: weights and batch-norm statistics
    assert "classifier.fc.weight" in changed
    assert any(line.startswith("training 0.") and "the rest are frozen" in line for line in logs)
    rec = ModelCard.from_yaml(card)
    assert rec.params["train_only"] == "classifier" and rec.training.init["card"] == ModelCard.from_yaml(base).version()
    assert len(rec.limits) == 1 and rec.limits[0].startswith(f"At most {params['max_steps']} instances per image "
                                                            "(params.max_steps")  # the card says what the bound does
    with pytest.raises(ValueError, match="init: --param train_only=classifier"):
        TrainConfig(params=params | {"train_only": "classifier"}, **common)

