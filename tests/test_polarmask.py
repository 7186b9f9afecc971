"""PolarMask on an untrained tiny network: training step, inference contract, adapter, zoo cards."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml

from segpipe.config import PolarMaskParams
from segpipe.modeling.polarmask import PolarMaskAdapter, build_network, polar_iou_loss
from segpipe.modeling.zoo import DEFAULT_ZOO, WeightsError, list_cards, load_adapter, load_card, save_weights
from segpipe.ops import masks as mask_ops
from segpipe.ops import polar
from segpipe.structures import SOFT_MASK_SIZE, Instances

TINY = {"backbone_channels": [8, 16, 16, 16], "fpn_channels": 16, "tower_convs": 1, "n_rays": 12,
        "levels": [0, 1, 2], "size_ranges": [16.0, 32.0]}


def _target(h=64, w=80):
    masks = np.zeros((2, h, w), np.uint8)
    masks[0, 10:30, 10:26] = 1
    yy, xx = np.mgrid[:h, :w]
    masks[1] = ((xx - 55) ** 2 + (yy - 40) ** 2 <= 12**2)
    return {"masks": torch.from_numpy(masks), "labels": torch.tensor([1, 2])}


def test_polar_iou_loss_golden():
    d = torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    assert polar_iou_loss(d, d).item() == pytest.approx(0.0, abs=1e-6)
    # sum max = 4 + 2 + 2 + 2 = 10, sum min = 2 + 1 + 2 + 2 = 7
    assert polar_iou_loss(torch.tensor([[4.0, 1.0, 2.0, 2.0]]), d).item() == pytest.approx(np.log(10 / 7), rel=1e-5)


def test_training_step_gives_finite_losses_and_gradients():
    torch.manual_seed(0)
    net = build_network(params=PolarMaskParams.model_validate(TINY), num_classes=2).train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 50, 40)]
    targets = [_target(), {"masks": torch.zeros((0, 50, 40), dtype=torch.uint8), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = net(images, targets)
    assert set(losses) == {"loss_cls", "loss_centerness", "loss_polar_iou"}
    assert all(torch.isfinite(v) and v.item() > 0 for v in losses.values())
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    for name in ("head.rays.weight", "head.cls_logits.weight", "head.centerness.weight", "backbone.stem.0.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


def test_ignore_regions_leave_their_negatives_out_of_the_class_loss():
    """The class loss gets no gradient from negative locations inside an ignore region, the same
    gradient everywhere else, and positives inside one still count."""
    torch.manual_seed(0)
    net = build_network(params=PolarMaskParams.model_validate(TINY), num_classes=2).train()
    img = torch.rand(3, 64, 80)
    feats = net.backbone(img[None])
    outs = [tuple(t.detach().requires_grad_() for t in o) for o in net.head([feats[k] for k in net.keys], net.strides)]
    tgt = _target()
    ignore = torch.zeros(64, 80, dtype=torch.bool)
    ignore[:, :40] = True  # the left half, over the square instance (x 10..25)
    grads = []
    for t in (tgt, tgt | {"ignore": ignore}):
        for o in outs:
            o[0].grad = None
        net.loss(outs, [t])["loss_cls"].backward()
        grads.append(torch.cat([o[0].grad.flatten(2) for o in outs], 2)[0].abs().sum(0))  # [L]
    shapes = [(int(o[0].shape[2]), int(o[0].shape[3])) for o in outs]
    ign = torch.from_numpy(polar.ignored_locations(ignore.numpy(), shapes, net.strides))
    pt = polar.polar_targets(tgt["masks"].numpy(), tgt["labels"].numpy(), shapes, net.strides,
                             size_ranges=net.params.size_ranges, center_radius=net.params.center_radius, n_rays=12)
    pos = torch.from_numpy(pt.labels > 0)
    assert ign.any() and (ign & pos).any() and (~ign).any()
    assert (grads[1][ign & ~pos] == 0).all() and (grads[0][ign & ~pos] > 0).all()
    assert torch.allclose(grads[1][~ign | pos], grads[0][~ign | pos])


def test_a_few_steps_fit_one_image():
    """The head can learn: ten Adam steps on one image lower the total loss."""
    torch.manual_seed(0)
    net = build_network(params=PolarMaskParams.model_validate(TINY), num_classes=2).train()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    img, tgt = [torch.rand(3, 64, 80)], [_target()]
    first = None
    for _ in range(10):
        loss = sum(net(img, tgt).values())
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sum(net(img, tgt).values()).item() < first


def test_training_mode_needs_targets():
    net = build_network(params=PolarMaskParams.model_validate(TINY), num_classes=1).train()
    with pytest.raises(ValueError, match="targets"):
        net([torch.rand(3, 32, 32)])


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(1)
    net = build_network(params=PolarMaskParams.model_validate(TINY | {"score_thresh": 0.0, "detections_per_img": 50}), num_classes=2)
    return PolarMaskAdapter(network=net, categories=[{"id": 7, "name": "a"}, {"id": 9, "name": "b"}]).eval()


def test_inference_contract(adapter):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (70, 90, 3), dtype=np.uint8), rng.integers(0, 255, (33, 47, 3), dtype=np.uint8)]
    batch = adapter.preprocess(imgs)
    with torch.inference_mode():
        raw = adapter.forward(batch)
    assert len(raw) == 2
    for r in raw:
        n = len(r["scores"])
        assert 0 < n <= 50
        assert r["boxes"].shape == (n, 4) and r["polygons"].shape == (n, 12, 2)
    out = adapter.postprocess(raw, batch)
    for inst, (h, w) in zip(out, [(70, 90), (33, 47)]):
        assert isinstance(inst, Instances) and (inst.height, inst.width) == (h, w)
        assert len(inst) > 0
        assert set(np.unique(inst.labels)) <= {7, 9}
        assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
        assert inst.mask_probs.shape == (len(inst), SOFT_MASK_SIZE, SOFT_MASK_SIZE) and inst.mask_probs.dtype == np.float16
        assert all(m["size"] == [h, w] for m in inst.masks)
        assert (mask_ops.area(inst.masks) > 0).all()  # empty polygons are dropped
        b = inst.boxes
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 1] >= 0).all() and (b[:, 3] <= h).all()
        # the mask lies in its box (rasterisation may add at most one pixel at the border)
        mb = mask_ops.to_bbox(inst.masks)
        assert (mb[:, 0] >= np.floor(b[:, 0]) - 1).all() and (mb[:, 0] + mb[:, 2] <= np.ceil(b[:, 2]) + 1).all()


def test_score_threshold_filters(adapter):
    img = [np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)]
    adapter.set_score_threshold(1.0)
    try:
        assert len(adapter.predict(img)[0]) == 0
    finally:
        adapter.set_score_threshold(0.0)
    assert len(adapter.predict(img)[0]) > 0


def test_preprocess_rejects_bad_images(adapter):
    with pytest.raises(ValueError):
        adapter.preprocess([np.zeros((10, 10), np.uint8)])
    with pytest.raises(TypeError):
        adapter.preprocess([np.zeros((10, 10, 3), np.float32)])


def test_card_round_trip_and_tampered_weights(tmp_path):
    torch.manual_seed(0)
    params = PolarMaskParams.model_validate(TINY)
    net = build_network(params=params, num_classes=1)
    folder = tmp_path / "tiny-polar"
    folder.mkdir()
    digest = save_weights(net, folder / "weights.safetensors")
    card = {"name": "tiny-polar", "family": "single-shot polar", "paper": "PolarMask (test fixture)", "builder": "polarmask",
            "params": params.model_dump(mode="json"), "categories": [{"id": 1, "name": "nucleus"}],
            "weights": {"file": "weights.safetensors", "sha256": digest, "format": "safetensors", "dtype": "float16"}}
    (folder / "card.yaml").write_text(yaml.safe_dump(card))
    a, c = load_adapter(str(folder / "card.yaml"))
    assert isinstance(a, PolarMaskAdapter) and c.builder == "polarmask"
    data = bytearray((folder / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="does not match"):
        load_adapter(str(folder / "card.yaml"))


@pytest.mark.parametrize("name", list_cards())
def test_every_zoo_card_loads_verified_and_refuses_a_tampered_copy(name, tmp_path):
    card, path = load_card(name)
    adapter, _ = load_adapter(name)
    assert adapter.network.training is False
    copy = tmp_path / name
    shutil.copytree(path.parent, copy)
    w = copy / card.weights.file
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="does not match"):
        load_adapter(str(copy / "card.yaml"))
    assert path.parent.parent == DEFAULT_ZOO
    from segpipe.train.methods import METHODS

    spec = METHODS[card.builder]
    if spec.limits is not None:  # the card's words match its params and the adapter enforces that bound
        assert card.limits == spec.limits(spec.params.model_validate(card.params))
        assert card.limits[0].startswith(f"At most {adapter.instance_bound} instances per image")
