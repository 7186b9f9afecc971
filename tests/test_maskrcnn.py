"""The Mask R-CNN adapter contract on an untrained tiny model: preprocess / forward / postprocess."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segpipe.config import MaskRCNNParams, ModelCard
from segpipe.modeling.registry import BUILDERS, get_builder, register
from segpipe.modeling.zoo import load_adapter
from segpipe.ops import masks as mask_ops
from segpipe.structures import SOFT_MASK_SIZE, Instances


@pytest.fixture(scope="module")
def adapter(tiny_card):
    a, _ = load_adapter(str(tiny_card))
    a.set_score_threshold(0.0)  # an untrained head scores low; keep everything
    return a


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (96, 128, 3), dtype=np.uint8), rng.integers(0, 255, (70, 50, 3), dtype=np.uint8)]


def test_preprocess_shapes_and_range(adapter):
    batch = adapter.preprocess(_images())
    assert [tuple(t.shape) for t in batch.tensors] == [(3, 96, 128), (3, 70, 50)]
    assert batch.sizes == [(96, 128), (70, 50)]
    assert all(t.dtype == torch.float32 and 0 <= t.min() and t.max() <= 1 for t in batch.tensors)


def test_preprocess_rejects_bad_images(adapter):
    with pytest.raises(ValueError, match=r"\[96, 128\]"):
        adapter.preprocess([np.zeros((96, 128), np.uint8)])
    with pytest.raises(TypeError, match="uint8"):
        adapter.preprocess([np.zeros((8, 8, 3), np.float32)])


def test_forward_returns_box_frame_soft_masks(adapter):
    batch = adapter.preprocess(_images())
    with torch.inference_mode():
        raw = adapter.forward(batch)
    assert len(raw) == 2
    for det, (h, w) in zip(raw, batch.sizes):
        n = det["boxes"].shape[0]
        assert det["boxes"].shape == (n, 4) and det["scores"].shape == (n,) and det["labels"].shape == (n,)
        assert det["mask_probs"].shape == (n, SOFT_MASK_SIZE, SOFT_MASK_SIZE)
        assert n <= 20  # box_detections_per_img of the tiny card
        if n:
            assert float(det["boxes"][:, 2].max()) <= w + 1e-3 and float(det["boxes"][:, 3].max()) <= h + 1e-3
            assert 0 <= float(det["mask_probs"].min()) and float(det["mask_probs"].max()) <= 1


def test_postprocess_returns_instances_contract(adapter):
    images = _images()
    out = adapter.predict(images)
    assert len(out) == 2
    total = 0
    for inst, img in zip(out, images):
        assert isinstance(inst, Instances)
        assert (inst.height, inst.width) == img.shape[:2]
        assert inst.boxes.dtype == np.float32 and inst.labels.dtype == np.int64
        assert set(inst.labels.tolist()) <= {1, 2, 3, 4}
        assert inst.mask_probs is not None and inst.mask_probs.dtype == np.float16
        # Each RLE stays inside its (pixel-centre) box.
        for rle, box in zip(inst.masks, inst.boxes):
            if mask_ops.area([rle])[0]:
                x, y, bw, bh = mask_ops.to_bbox([rle])[0]
                assert x >= np.floor(box[0]) and y >= np.floor(box[1])
                assert x + bw <= np.ceil(box[2]) and y + bh <= np.ceil(box[3])
        total += len(inst)
    assert total > 0, "with threshold 0 an untrained model still returns detections"


def test_forward_backward_trains(tiny_card):
    """One optimiser step on a synthetic scene runs and changes the weights."""
    from segpipe.data.synthetic import SynthSpec, render_scene
    from segpipe.modeling.maskrcnn import build_network

    card = ModelCard.from_yaml(tiny_card)
    net = build_network(params=MaskRCNNParams.model_validate(card.params), num_classes=4)
    net.train()
    scene = render_scene(SynthSpec(n=1, seed=1, height=64, width=64, min_objects=2, max_objects=3, min_size=10), 0)
    masks = torch.from_numpy(scene.masks.astype(np.uint8))
    ys = [torch.nonzero(m) for m in masks]
    boxes = torch.stack([torch.tensor([y[:, 1].min(), y[:, 0].min(), y[:, 1].max() + 1, y[:, 0].max() + 1]) for y in ys]).float()
    target = {"boxes": boxes, "labels": torch.from_numpy(scene.labels), "masks": masks}
    image = torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255
    losses = net([image], [target])
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
    before = [p.detach().clone() for p in net.parameters()]
    sum(losses.values()).backward()
    torch.optim.SGD(net.parameters(), lr=0.01).step()
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_registry():
    assert get_builder("maskrcnn") is BUILDERS["maskrcnn"]
    with pytest.raises(KeyError, match="unknown builder"):
        get_builder("no-such-method")
    with pytest.raises(KeyError, match="twice"):
        register("maskrcnn")(lambda card: None)
