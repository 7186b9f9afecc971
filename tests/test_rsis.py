"""RSIS: Hungarian matching, the set loss, the stop rule, tiny networks and the adapter contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from segpipe.config import RSISParams
from segpipe.modeling import rsis
from segpipe.modeling.zoo import load_adapter, save_weights

from conftest import TINY_RSIS_PARAMS as TINY, assert_training_reduces_loss, check_loss_backward, check_nonoverlapping_output
INST = {"classify": "instances", "class_crop": 8, "class_channels": [4]}
POINT = {"point": True, "point_width": 6}
PYRAMID = POINT | {"point_head": "pyramid"}


# --- matching and the set loss -------------------------------------------------------------


def test_hungarian_match_finds_the_optimum_where_greedy_fails():
    cost = np.array([[4.0, 1.0, 3.0],
                     [2.0, 0.0, 5.0],
                     [3.0, 2.0, 2.0]])
    # Greedy takes (1, 1) = 0 first and ends at 0 + 3 + 3 = 6; the optimum is 1 + 2 + 2 = 5.
    rows, cols = rsis.hungarian_match(cost)
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [1, 0, 2]
    assert cost[rows, cols].sum() == 5.0


def test_hungarian_match_rectangular_uses_every_prediction_once():
    cost = np.array([[0.9, 0.1, 0.8],
                     [0.2, 0.3, 0.05]])  # 2 predictions, 3 instances
    rows, cols = rsis.hungarian_match(cost)
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 2]


def test_soft_iou_known_values():
    probs = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    masks = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    iou = rsis.soft_iou(probs, masks)
    torch.testing.assert_close(iou, torch.tensor([[1.0, 0.0], [1.0 / 3.0, 1.0 / 3.0]]))


def _scene():
    masks = torch.zeros((3, 8, 8), dtype=torch.bool)
    masks[0, :3, :3] = True
    masks[1, 5:, 5:] = True
    masks[2, :2, 5:] = True
    return masks, torch.tensor([2, 1, 2])


def test_rsis_loss_is_zero_for_a_perfect_permuted_sequence():
    masks, labels = _scene()
    order = [2, 0, 1]  # the net emits the instances in another order: matching must not care
    logits = torch.full((4, 8, 8), -30.0)
    for t, k in enumerate(order):
        logits[t][masks[k]] = 30.0
    classes = torch.full((4, 2), -30.0)
    for t, k in enumerate(order):
        classes[t, int(labels[k]) - 1] = 30.0
    stop = torch.tensor([-30.0, -30.0, -30.0, 30.0])  # three objects, then stop
    out = rsis.rsis_loss(logits, classes, stop, masks, labels)
    assert float(out["mask"]) < 1e-6 and float(out["class"]) < 1e-6 and float(out["stop"]) < 1e-6
    assert float(out["bce"]) < 1e-6


def test_rsis_loss_penalises_a_missing_instance_a_wrong_class_and_a_late_stop():
    masks, labels = _scene()
    logits = torch.full((4, 8, 8), -30.0)
    logits[0][masks[0]] = 30.0
    logits[1][masks[1]] = 30.0  # instance 2 is never drawn
    classes = torch.zeros((4, 2))
    classes[:, 0] = 30.0  # always class 1: wrong for instances 0 and 2
    stop = torch.full((4,), -30.0)  # never stops
    out = rsis.rsis_loss(logits, classes, stop, masks, labels)
    assert float(out["mask"]) == pytest.approx(1.0 / 3.0, abs=1e-4)  # one of three matched pairs has IoU 0
    assert float(out["class"]) == pytest.approx(2.0 / 3.0 * 30.0, rel=1e-3)  # two wrong by a 30-logit margin
    assert float(out["stop"]) == pytest.approx(30.0 / 4.0, rel=1e-3)  # the last step should have said stop
    missed = int(masks[2].sum())  # its pixels cost 30 nats each, over 3 pairs x 64 pixels
    assert float(out["bce"]) == pytest.approx(missed * 30.0 / (3 * 64), rel=1e-3)


def test_rsis_loss_without_instances_only_asks_to_stop():
    out = rsis.rsis_loss(torch.zeros((1, 4, 4), requires_grad=True), None, torch.tensor([0.0]),
                         torch.zeros((0, 4, 4), dtype=torch.bool), torch.zeros(0, dtype=torch.int64))
    assert out["mask"].requires_grad
    out = {k: v.detach() for k, v in out.items()}
    assert float(out["mask"]) == 0.0 and float(out["class"]) == 0.0 and float(out["bce"]) == 0.0
    assert float(out["stop"]) == pytest.approx(np.log(2.0), abs=1e-6)


def _two_rows():
    """Two 2x8 bars, the lower one listed first: bool [2, 8, 8]."""
    masks = torch.zeros((2, 8, 8), dtype=torch.bool)
    masks[0, 5:7, :] = True  # lower
    masks[1, 1:3, :] = True  # upper
    return masks


def test_order_ranks_sort_by_centroid_row_then_column():
    masks = torch.zeros((3, 8, 8), dtype=torch.bool)
    masks[0, 5:7, 0:2] = True
    masks[1, 1:3, 4:6] = True
    masks[2, 1:3, 0:2] = True  # same row as 1, further left
    assert rsis.order_ranks(masks).tolist() == [2, 1, 0]
    assert rsis.order_ranks(torch.zeros((0, 4, 4), dtype=torch.bool)).tolist() == []


def test_order_prior_breaks_a_tie_towards_the_top_object():
    masks, labels = _two_rows(), torch.tensor([1, 1])
    logits = torch.full((3, 8, 8), -30.0)
    logits[:2, 1:3, :] = 0.0  # both steps: half-sure over both bars -> equal soft IoU with each
    logits[:2, 5:7, :] = 0.0
    stop = torch.tensor([-30.0, -30.0, 30.0])
    ptr = torch.zeros((3, 4, 4))
    ptr[0, 0:2, :] = 10.0  # step 0 points at the upper bar (pooled to 4 x 4: rows 0..1)
    ptr[1, 2:4, :] = 10.0  # step 1 at the lower one
    with_prior = rsis.rsis_loss(logits, None, stop, masks, labels, ptr, order_prior=0.5)
    swapped = ptr[[1, 0, 2]]
    assert float(with_prior["pointer"]) < float(rsis.rsis_loss(logits, None, stop, masks, labels, swapped, order_prior=0.5)["pointer"])
    # Without the prior the tie goes to the listing order (step 0 -> the lower bar): the pointers miss.
    assert float(rsis.rsis_loss(logits, None, stop, masks, labels, ptr)["pointer"]) > 5.0
    # The pointer loss of a step pointing exactly at its matched object is the entropy of the target.
    assert float(with_prior["pointer"]) == pytest.approx(np.log(8.0), abs=1e-3)


# --- the stop rule -------------------------------------------------------------------------------


def test_stop_targets_and_the_stop_rule():
    assert rsis.stop_targets(5, 2).tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert rsis.stop_targets(3, 7).tolist() == [0.0, 0.0, 0.0]  # past the bound: never told to stop
    assert rsis.steps_before_stop([0.1, 0.4, 0.5, 0.2], 0.5) == 2  # reaching the threshold stops
    assert rsis.steps_before_stop([0.1, 0.4], 0.5) == 2  # never stopped: every step counts
    assert rsis.steps_before_stop([0.9], 0.5) == 0


def _tiny(extra=None, num_classes=2, seed=0):
    torch.manual_seed(seed)
    return rsis.build_network(params=RSISParams.model_validate(TINY | (extra or {})), num_classes=num_classes)


def _count_steps(net, images) -> int:
    calls = []
    hook = net.stop_head.register_forward_hook(lambda *a: calls.append(1))
    net.eval()
    out = net(images)
    hook.remove()
    return len(calls), out


@pytest.mark.parametrize("stop_bias, steps", [(20.0, 1), (-20.0, 6)])
def test_inference_stops_on_the_stop_score_or_at_the_bound(stop_bias, steps):
    net = _tiny()
    with torch.no_grad():
        net.stop_head.bias.fill_(stop_bias)
        net.stop_head.weight.zero_()
    image = torch.rand(3, 24, 40)
    n, out = _count_steps(net, [image])
    assert n == steps
    if stop_bias > 0:
        assert out == [[]]
    assert len(out[0]) <= net.params.max_steps
    exhausted: list[bool] = []
    net.infer([image, image], exhausted)
    assert exhausted == [stop_bias < 0] * 2  # only the decoder that never stopped ran out of steps


def test_inference_drops_repeats_and_never_overlaps():
    net = _tiny()
    with torch.no_grad():
        net.stop_head.bias.fill_(-20.0)
        net.stop_head.weight.zero_()
        net.refine[-1].bias.fill_(20.0)  # every step paints the whole image
        net.refine[-1].weight.zero_()
    _, out = _count_steps(net, [torch.rand(3, 24, 40)])
    assert len(out[0]) == 1 and len(out[0][0].ys) == 24 * 40  # steps 2.. repeat step 1 and are dropped


@pytest.mark.parametrize("fg_bias, steps, found", [(-20.0, 1, 0), (20.0, 2, 1)])
def test_the_stop_head_reads_the_foreground_left_uncovered(fg_bias, steps, found):
    """Stop = sigmoid(20 - 40 x max uncovered foreground): with no foreground the first step
    stops; with all foreground the first step paints everything, the canvas covers it, and the
    second step stops."""
    net = _tiny()
    n_pooled = sum(net.params.lstm_channels)
    with torch.no_grad():
        net.fg_head[-1].weight.zero_()
        net.fg_head[-1].bias.fill_(fg_bias)
        net.stop_head.weight.zero_()
        net.stop_head.weight[0, n_pooled] = -40.0  # the max of the uncovered foreground
        net.stop_head.bias.fill_(20.0)
        net.refine[-1].weight.zero_()
        net.refine[-1].bias.fill_(20.0)
    n, out = _count_steps(net, [torch.rand(3, 24, 40)])
    assert n == steps and len(out[0]) == found


# --- tiny networks --------------------------------------------------------------------------------


def _targets():
    rng = np.random.default_rng(1)
    masks, labels = _scene()
    big = torch.zeros((3, 32, 40), dtype=torch.uint8)
    big[:, :8, :8] = masks.to(torch.uint8)
    big[1, 20:30, 25:38] = 1
    images = [torch.from_numpy(rng.uniform(size=(3, 32, 40)).astype(np.float32)) for _ in range(2)]
    empty = {"masks": torch.zeros((0, 32, 40), dtype=torch.uint8), "labels": torch.zeros(0, dtype=torch.int64)}
    return images, [{"masks": big, "labels": labels}, empty]


@pytest.mark.parametrize("extra, keys", [(None, {"loss_mask", "loss_bce", "loss_fg", "loss_stop", "loss_step_class"}),
                                         (INST, {"loss_mask", "loss_bce", "loss_fg", "loss_stop", "loss_class"}),
                                         ({"feed_canvas": False}, {"loss_mask", "loss_bce", "loss_fg", "loss_stop", "loss_step_class"}),
                                         ({"foreground": False}, {"loss_mask", "loss_bce", "loss_stop", "loss_step_class"}),
                                         ({"pointer": True, "order_prior": 0.5},
                                          {"loss_mask", "loss_bce", "loss_fg", "loss_pointer", "loss_stop", "loss_step_class"}),
                                         ({"pointer": True, "guided": True},
                                          {"loss_mask", "loss_bce", "loss_fg", "loss_pointer", "loss_stop", "loss_step_class"}),
                                         (POINT, {"loss_mask", "loss_bce", "loss_fg", "loss_heat", "loss_stop", "loss_step_class"}),
                                         (POINT | INST, {"loss_mask", "loss_bce", "loss_fg", "loss_heat", "loss_stop", "loss_class"}),
                                         (PYRAMID, {"loss_mask", "loss_bce", "loss_fg", "loss_heat", "loss_stop", "loss_step_class"})])
def test_tiny_rsis_forward_backward(extra, keys):
    net = _tiny(extra).train()
    images, targets = _targets()
    assert any(g is not None for g in check_loss_backward(net, images, targets, keys))
    assert net.stop_head.weight.grad.abs().sum() > 0
    if net.pyramid_head is not None:
        head = net.pyramid_head
        assert float(net.point_heads.heat_head[-1].weight.grad.abs().sum()) > 0
        assert all(float(m.weight.grad.abs().sum()) > 0 for m in (head.out, head.film, head.first))
        assert not hasattr(net.point_heads, "mask_out")  # the flat head is not built
    elif net.point_heads is not None:
        heads = net.point_heads
        assert all(float(m[-1].weight.grad.abs().sum()) > 0 for m in (heads.heat_head, heads.mask_out))
        assert float(heads.film.weight.grad.abs().sum()) > 0
    else:
        assert net.refine[-1].weight.grad.abs().sum() > 0
    if net.pointer_head is not None:
        assert net.pointer_head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="targets"):
        net(images)


def test_interior_cells_lie_inside_the_object_even_for_a_ring():
    from segpipe.modeling.rsis import interior_cells

    m = torch.zeros((2, 32, 32), dtype=torch.bool)
    m[0, 4:12, 20:28] = True  # a square: its centre
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    r = ((yy - 16) ** 2 + (xx - 16) ** 2).float().sqrt()
    m[1] = (r >= 8) & (r <= 13)  # a ring: the centroid (its hole) is not in it
    px = interior_cells(m, (32, 32))  # one cell per pixel: the interior pixel itself
    for j in range(2):
        assert bool(m[j].flatten()[px[j]])  # inside the object (the ring's centroid would be in its hole)
    y, x = divmod(int(px[0]), 32)
    assert 7 <= y <= 8 and 23 <= x <= 24  # the square's centre
    assert abs(float(r.flatten()[px[1]]) - 10.5) <= 1.0  # mid-ring
    cells = interior_cells(m, (4, 4))  # 8-pixel cells: the cell holding that pixel
    assert int(cells[0]) == (y // 8) * 4 + x // 8


def test_set_pointer_loss_rewards_any_remaining_object():
    from segpipe.modeling.rsis import set_pointer_loss

    logits = torch.full((4, 4), -10.0)
    logits[0, 0] = logits[3, 3] = 10.0  # half the mass on each of two cells
    both = set_pointer_loss(logits, torch.tensor([0, 15]))
    one = set_pointer_loss(logits, torch.tensor([15]))
    other = set_pointer_loss(logits, torch.tensor([5]))
    assert float(both) < 1e-3 and abs(float(one) - np.log(2)) < 1e-3 and float(other) > 15


def test_guided_training_feeds_the_pointer_choice_and_infers_with_its_argmax():
    net = _tiny({"pointer": True, "guided": True}).train()
    images, targets = _targets()
    assert_training_reduces_loss(net, images, targets)
    net.eval()
    with torch.no_grad():
        net.stop_head.bias.fill_(-20.0)
        out = net(images)
    assert len(out) == 2 and all(len(c) <= net.params.max_steps for c in out)
    with pytest.raises(ValueError, match="guided"):
        RSISParams.model_validate(TINY | {"guided": True})


def test_a_few_rsis_steps_reduce_the_loss():
    assert_training_reduces_loss(_tiny().train(), *_targets())


def test_single_class_rsis_has_no_class_head():
    net = _tiny(num_classes=1)
    assert net.class_head is None and net.classifier is None
    assert _tiny(INST, num_classes=1).classifier is None


def test_params_reject_more_lstm_levels_than_encoder_levels():
    with pytest.raises(ValueError, match="lstm_channels"):
        RSISParams(channels=[8, 16], lstm_channels=[16, 8, 4])


@pytest.mark.parametrize("extra", [None, INST, POINT, PYRAMID])
def test_rsis_adapter_contract(tmp_path, extra):
    from segpipe.train.methods import METHODS

    spec = METHODS["rsis"]
    cats = [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]
    p = RSISParams.model_validate(TINY | (extra or {}))
    net = _tiny(extra)
    with torch.no_grad():  # untrained weights would stop at once; make every step draw something
        net.stop_head.bias.fill_(-20.0)
    digest = save_weights(net, tmp_path / "weights.safetensors")
    card = {"name": "tiny-rsis", "family": spec.family, "paper": "rsis (test fixture)", "builder": "rsis",
            "params": p.model_dump(mode="json"), "categories": cats,
            "weights": {"file": "weights.safetensors", "sha256": digest, "format": "safetensors", "dtype": "float16"}}
    (tmp_path / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    adapter, _ = load_adapter(str(tmp_path / "card.yaml"))
    adapter.network.params = adapter.network.params.model_copy(update={"mask_thresh": 0.3})
    out = check_nonoverlapping_output(adapter, {3, 7}, min_area=p.min_pixels)
    assert all(len(inst) <= p.max_steps for inst in out)
    assert adapter.instance_bound == p.max_steps
    flags: list[bool] = []
    adapter.predict([np.zeros((24, 40, 3), np.uint8)] * 2, at_bound=flags)
    if not p.point:  # (the point variant also stops when its masks leave no cell to point at)
        assert flags == [True, True]  # the stop head never fires: every image runs into the bound
    assert len(flags) == 2
    with torch.no_grad():
        adapter.network.stop_head.bias.fill_(20.0)
    flags = []
    adapter.predict([np.zeros((24, 40, 3), np.uint8)], at_bound=flags)
    assert flags == [False]


# --- the point variant ---------------------------------------------------------------------------


def _ring_and_square():
    m = np.zeros((2, 32, 32), dtype=bool)
    m[0, 4:12, 20:28] = True
    yy, xx = np.mgrid[:32, :32]
    r = np.sqrt((yy - 16) ** 2 + (xx - 16) ** 2)
    m[1] = (r >= 8) & (r <= 13)
    return m, r


def test_interior_points_radii_and_cores():
    from segpipe.modeling.rsis_point import interior_points, sample_points

    m, r = _ring_and_square()
    pts, radii, cores = interior_points(np.concatenate([m, np.zeros((1, 32, 32), bool)]))
    assert tuple(pts[0]) in {(7.0, 23.0), (7.0, 24.0), (8.0, 23.0), (8.0, 24.0)}  # the square's centre
    assert radii[0] == 4.0  # 4 pixels to the background from the middle of an 8-wide square
    assert m[1][int(pts[1, 0]), int(pts[1, 1])] and abs(r[int(pts[1, 0]), int(pts[1, 1])] - 10.5) <= 1.0  # on the ring
    assert radii[2] == 0 and cores[2].size == 0  # an empty instance
    for j in range(2):  # every core pixel lies in the object, away from its border
        assert m[j].flat[cores[j]].all() and 0 < cores[j].size < m[j].sum()
    fed = sample_points(pts, cores, 32, np.random.default_rng(0), jitter=True)
    for j in range(2):
        assert int(fed[j, 0]) * 32 + int(fed[j, 1]) in set(cores[j].tolist())
    assert np.array_equal(sample_points(pts, cores, 32, np.random.default_rng(0), jitter=False), pts)


def test_heat_targets_peak_at_each_point_and_fall_off():
    from segpipe.modeling.rsis_point import cell_of, heat_targets

    pts = torch.tensor([[5.0, 9.0], [20.0, 2.0]])
    t = heat_targets(pts, torch.tensor([2.0, 8.0]), (8, 8), 4)
    assert t.shape == (2, 8, 8) and float(t.min()) >= 0 and float(t.max()) == 1.0
    cells = cell_of(pts, 4, (8, 8))
    assert cells.tolist() == [1 * 8 + 2, 5 * 8 + 0]
    for j in range(2):
        flat = t[j].flatten()
        assert float(flat[cells[j]]) == 1.0 and int((flat == 1.0).sum()) == 1  # one positive per object
    # The larger object's peak is wider: its neighbour two cells away keeps more of the peak.
    assert float(t[1, 5, 2]) > float(t[0, 1, 4])
    assert heat_targets(torch.zeros((0, 2)), torch.zeros(0), (3, 5), 4).shape == (0, 3, 5)


def test_focal_heat_loss_prefers_the_peaks():
    from segpipe.modeling.rsis_point import focal_heat_loss

    target = torch.zeros((6, 6))
    target[2, 3] = 1.0
    target[1, 3] = 0.6  # near the peak: penalty-reduced
    good = torch.full((6, 6), -8.0)
    good[2, 3] = 8.0
    flat = torch.zeros((6, 6))
    assert float(focal_heat_loss(good, target)) < 0.01 < float(focal_heat_loss(flat, target))
    near = good.clone()
    near[1, 3] = 2.0
    far = good.clone()
    far[5, 0] = 2.0
    assert float(focal_heat_loss(near, target)) < float(focal_heat_loss(far, target))  # firing beside the peak costs less
    # Without any peak the loss only asks for silence, summed (divided by 1).
    assert float(focal_heat_loss(torch.full((6, 6), -8.0), torch.zeros((6, 6)))) < 1e-4


def test_relative_coords_and_sample_at():
    from segpipe.modeling.rsis_point import cell_centre, relative_coords, sample_at

    pts = torch.tensor([[4.5, 10.5]])
    rc = relative_coords(pts, (8, 8), 2, 4.0)  # stride-2 cell (2, 5) is centred on (4.5, 10.5)
    assert rc.shape == (1, 3, 8, 8)
    assert float(rc[0, 0, 2, 5]) == 0.0 and float(rc[0, 1, 2, 5]) == 0.0 and float(rc[0, 2, 2, 5]) == 1.0
    assert float(rc[0, 0, 4, 5]) == pytest.approx(1.0) and float(rc[0, 1, 2, 3]) == pytest.approx(-1.0)
    assert float(rc[0, 2].max()) == 1.0 and float(rc[0, 2, 0, 0]) < 0.01
    feats = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8)
    assert float(sample_at(feats, pts, 2)[0, 0]) == pytest.approx(2 * 8 + 5)  # the value of that cell
    assert cell_centre(torch.tensor([2 * 8 + 5]), 2, 8).tolist() == [[4.5, 10.5]]


def test_point_training_reduces_the_loss_and_needs_the_canvas():
    net = _tiny(POINT).train()
    assert_training_reduces_loss(net, *_targets())
    for bad in ({"feed_canvas": False}, {"pointer": True}, {"point_stride": 8}):
        with pytest.raises(ValueError, match="point"):
            RSISParams.model_validate(TINY | POINT | bad)


def test_pyramid_head_levels_shapes_and_point_conditioning():
    net = _tiny(PYRAMID).eval()
    head = net.pyramid_head
    assert head.strides == [4, 2]  # TINY: 3 encoder levels, the finest LSTM level at stride 4
    x = torch.rand(1, 3, 32, 48)
    enc = net.encode_point(x)
    decs, side = enc[4], torch.zeros((1, 2, 16, 24))
    hidden = torch.rand(1, 4, 8, 12)
    with torch.no_grad():
        a = head(decs, hidden, side, torch.tensor([[5.0, 5.0]]))
        b = head(decs, hidden, side, torch.tensor([[25.0, 40.0]]))
        a2 = head(decs, hidden, side, torch.tensor([[5.0, 5.0]]))
    assert a.shape == (1, 16, 24)
    assert torch.equal(a, a2) and not torch.allclose(a, b)  # the mask follows the point
    flat = sum(p.numel() for n, p in _tiny(POINT).named_parameters() if n.startswith("point_heads."))
    assert sum(p.numel() for p in net.point_heads.parameters()) < flat  # only the heat head is left there


def test_init_loads_matching_tensors_and_names_the_fresh_ones(tmp_path):
    """A flat-head point card starts a pyramid-head network: everything but the mask head loads."""
    from safetensors.torch import load_file

    from segpipe.modeling.zoo import WeightsError
    from segpipe.train.warm import load_init

    src = _tiny(POINT, seed=3)
    digest = save_weights(src, tmp_path / "weights.safetensors")
    card = {"name": "tiny-flat", "family": "recurrent", "paper": "rsis (test fixture)", "builder": "rsis",
            "params": RSISParams.model_validate(TINY | POINT).model_dump(mode="json"),
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
            "weights": {"file": "weights.safetensors", "sha256": digest, "format": "safetensors", "dtype": "float16"}}
    (tmp_path / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    net = _tiny(PYRAMID, seed=4)
    fresh_before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("pyramid_head.")}
    rec = load_init(net, str(tmp_path / "card.yaml"), "rsis")
    assert rec["card"].startswith("tiny-flat@") and rec["weights_sha256"] == digest
    assert rec["fresh"] and all(k.startswith("pyramid_head.") for k in rec["fresh"])
    assert set(rec["fresh"]) == set(fresh_before)
    assert rec["unused"] and all(k.startswith("point_heads.mask") or k.startswith("point_heads.film") for k in rec["unused"])
    saved, own = load_file(str(tmp_path / "weights.safetensors")), net.state_dict()
    assert rec["loaded"] == len(own) - len(rec["fresh"])
    for k, v in own.items():
        if k in fresh_before:
            assert torch.equal(v, fresh_before[k])
        else:
            assert torch.equal(v, saved[k].to(v.dtype))
    with pytest.raises(ValueError, match="init: .* is a rsis model"):
        load_init(net, str(tmp_path / "card.yaml"), "maskrcnn")
    (tmp_path / "weights.safetensors").write_bytes(b"not the weights")
    with pytest.raises(WeightsError, match="sha256"):
        load_init(net, str(tmp_path / "card.yaml"), "rsis")


def test_point_training_feeds_the_object_the_heat_map_rates_highest():
    """The step's mask head gets the fed point of the remaining object whose peak cell the heat
    map rates highest: raise the heat at one object's cell and that object is fed first."""
    from segpipe.modeling import rsis_point

    images, targets = _targets()
    masks = targets[0]["masks"].numpy().astype(bool)
    pts, _, _ = rsis_point.interior_points(masks)
    for first in (0, 2):
        net = _tiny(POINT | {"point_jitter": False}).train()
        cells = rsis_point.cell_of(torch.from_numpy(pts), net.params.point_stride, (8, 10))
        fed = []
        heat_fn = net.point_heads.heat

        def heat(*a, _first=first):
            h = heat_fn(*a)
            bump = torch.zeros_like(h).flatten(1)
            bump[0, cells[_first]] = 50.0
            return h + bump.reshape(h.shape)

        net.point_heads.heat = heat
        mask_fn = net.point_heads.mask
        net.point_heads.mask = lambda dec, hid, side, points, stride: (fed.append(points[0].tolist()), mask_fn(dec, hid, side, points, stride))[1]
        net([images[0]], [targets[0]])
        assert fed[0] == pts[first].tolist()
        assert sorted(map(tuple, fed[:3])) == sorted(map(tuple, pts.tolist()))  # every object fed once, then the stop step


def test_point_inference_never_revisits_a_cell_and_stops_when_none_is_left():
    net = _tiny(POINT | {"max_steps": 200}).eval()
    with torch.no_grad():
        net.stop_head.weight.zero_()
        net.stop_head.bias.fill_(-20.0)  # never stops by the stop score
        net.point_heads.mask_out[-1].weight.zero_()
        net.point_heads.mask_out[-1].bias.fill_(-20.0)  # empty masks: nothing gets covered
    seen = []
    mask_fn = net.point_heads.mask
    net.point_heads.mask = lambda dec, hid, side, points, stride: (seen.append(points[0].tolist()), mask_fn(dec, hid, side, points, stride))[1]
    out = net([torch.rand(3, 24, 40)])
    grid = (24 // 4) * (40 // 4)
    assert out == [[]]
    assert len(seen) == len({tuple(p) for p in seen})  # no cell twice
    assert len(seen) <= grid and len(seen) < 200  # it ran out of cells long before the bound


def test_focal_heat_loss_of_a_batch_is_each_image_s_own():
    from segpipe.modeling.rsis_point import focal_heat_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    target = torch.rand(3, 5, 7) * 0.9
    target[0, 1, 2] = target[0, 3, 3] = 1.0
    target[1, 4, 6] = 1.0  # image 2 has no peak
    batch = focal_heat_loss(logits, target)
    for b in range(3):
        assert float(batch[b]) == pytest.approx(float(focal_heat_loss(logits[b], target[b])), rel=1e-5)


def test_point_train_steps_bounds_the_steps_of_a_training_batch():
    images, targets = _targets()  # 3 objects: 4 steps unbounded
    for bound, steps in ((None, 4), (2, 2)):
        net = _tiny(POINT | {"train_steps": bound}).train()
        calls = []
        hook = net.stop_head.register_forward_hook(lambda *a: calls.append(1))
        losses = net(images, targets)
        hook.remove()
        assert len(calls) == steps and float(losses["loss_heat"].detach()) > 0


def test_the_zoo_rsis_models_find_the_objects_of_a_real_image():
    """The committed rsis cards load (verified weights) and segment. On a crowded bundled nuclei
    val image (151 nuclei), one pass stops at the step bound (100) and says so; the tiled pass at
    the training crop goes past it (measured: 180 instances, 49 nuclei found at IoU 0.5) and
    its tiles rarely reach the bound themselves; on
    generated shapes, rsis-shapes finds objects within its bound (measured: 22 of 29)."""
    import json

    from PIL import Image
    from pycocotools import mask as mask_utils

    from conftest import NUCLEI_SAMPLE
    from segpipe.config import TilingConfig
    from segpipe.data.synthetic import SynthSpec, render_scene
    from segpipe.modeling.tiled import default_tile, tiled_predict
    from segpipe.ops import masks as mask_ops
    from segpipe.ops.tiles import plan_tiles

    adapter, card = load_adapter("rsis-nuclei-base")  # the measured numbers below are its
    doc = json.loads((NUCLEI_SAMPLE / "annotations.json").read_text())
    im = next(i for i in doc["images"] if i["file_name"] == "f952cc65376009cf.png")
    img = np.array(Image.open(NUCLEI_SAMPLE / "images" / im["file_name"]).convert("RGB"))
    bound = card.params["max_steps"]
    flags: list[bool] = []
    assert len(adapter.predict([img], at_bound=flags)[0]) <= bound
    assert flags == [True]  # one pass runs out of steps on 151 nuclei
    inst = tiled_predict(adapter, img, default_tile(card), TilingConfig(mode="on"), 16, at_bound=flags)
    tiles = plan_tiles(*img.shape[:2], default_tile(card), TilingConfig().overlap)
    per_tile: list[bool] = []
    adapter.predict([np.ascontiguousarray(img[t.y0:t.y1, t.x0:t.x1]) for t in tiles], at_bound=per_tile)
    assert flags[1] == any(per_tile) and len(per_tile) == 9
    assert sum(per_tile) <= 2  # measured: 1 of 9 (a tile over-split into 96 fragments for 27 nuclei)
    truth = [a["segmentation"] for a in doc["annotations"] if a["image_id"] == im["id"]]
    iou = np.asarray(mask_utils.iou(list(inst.masks), truth, [0] * len(truth)))
    assert len(inst) > bound and len(truth) == 151
    assert int((iou.max(0) >= 0.5).sum()) >= 38  # a quarter of them
    adapter, card = load_adapter("rsis-shapes")
    scenes = [render_scene(SynthSpec(n=4, seed=77), k) for k in range(4)]  # a seed training never used
    found = total = 0
    for scene, out in zip(scenes, adapter.predict([s.image for s in scenes])):
        assert 1 <= len(out) <= card.params["max_steps"]
        assert mask_ops.decode(out.masks).sum(0).max() <= 1
        truth = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in scene.masks]
        iou = np.asarray(mask_utils.iou(list(out.masks), truth, [0] * len(truth)))
        found, total = found + int((iou.max(0) >= 0.5).sum()), total + len(truth)
    assert found >= 0.6 * total, (found, total)


# --- training the instance classifier alone -------------------------------------------------------


def test_match_clusters_pairs_each_cluster_with_its_best_instance_at_the_iou():
    from segpipe.modeling.embed_cluster import Cluster
    from segpipe.modeling.instance_classifier import match_clusters

    masks = torch.zeros((2, 10, 10), dtype=torch.bool)
    masks[0, :5, :5] = True
    masks[1, 5:, 5:] = True

    def cluster(rows, cols):
        m = np.zeros((10, 10), bool)
        m[rows, cols] = True
        ys, xs = np.nonzero(m)
        return Cluster(ys=ys, xs=xs, score=1.0, label=1, window=(0, 0, 10, 10), prob=m.astype(np.float32))

    clusters = [cluster(slice(0, 5), slice(0, 4)),    # 20 px inside instance 0: IoU 0.8
                cluster(slice(3, 10), slice(5, 10)),  # 35 px holding all of instance 1: IoU 25 / 35
                cluster(slice(0, 5), slice(0, 10)),   # 50 px holding all of instance 0: IoU 0.5
                cluster(slice(5, 10), slice(0, 5)),   # on no instance
                cluster(slice(0, 4), slice(0, 5))]    # a second one on instance 0: IoU 0.8
    assert match_clusters(clusters, masks) == [(0, 0), (1, 1), (2, 0), (4, 0)]
    assert match_clusters(clusters, masks, min_iou=0.6) == [(0, 0), (1, 1), (4, 0)]
    assert match_clusters(clusters, masks[:0]) == []


def _whole_image_net(extra=None):
    """A tiny classifier-only RSIS whose first step paints the whole image and whose later steps
    repeat it (so decoding gives exactly one instance: the image)."""
    net = _tiny(INST | {"train_only": "classifier"} | (extra or {}))
    with torch.no_grad():
        net.stop_head.bias.fill_(-20.0)
        net.stop_head.weight.zero_()
        net.refine[-1].bias.fill_(20.0)
        net.refine[-1].weight.zero_()
    return net


def test_train_only_classifier_learns_from_the_decoded_instances():
    from segpipe.modeling.batching import pad_batch

    net = _whole_image_net().train()
    image = torch.rand(3, 24, 40)
    whole = {"masks": torch.ones((1, 24, 40), dtype=torch.uint8), "labels": torch.tensor([2])}
    small = {"masks": torch.zeros((1, 24, 40), dtype=torch.uint8), "labels": torch.tensor([2])}
    small["masks"][0, 2:6, 2:6] = 1
    x = pad_batch([image], net.multiple)
    decoded = net._decode(x, [(24, 40)])
    assert len(decoded[0]) == 1 and len(decoded[0][0].ys) == 24 * 40
    torch.manual_seed(5)
    losses = net([image], [whole])
    assert set(losses) == {"loss_class_own", "loss_class"}
    clf = net.classifier
    want = torch.nn.functional.cross_entropy(clf(clf.cluster_crops(x[0], decoded[0])), torch.tensor([1]))
    assert torch.allclose(losses["loss_class_own"], want, atol=1e-6)  # the decoded instance, with its truth's label
    torch.manual_seed(5)
    assert torch.allclose(losses["loss_class"], clf.batch_loss(x, [whole]), atol=1e-6)
    losses = net([image], [small])  # the instance matches no truth (IoU 16 / 960): nothing to learn from it
    assert float(losses["loss_class_own"].detach()) == 0.0 and float(losses["loss_class"].detach()) > 0


def test_train_only_classifier_freezes_everything_else_in_eval_mode():
    net = _whole_image_net().train()
    assert net.training and net.classifier.training
    assert not any(m.training for name, m in net.named_modules() if name and not name.startswith("classifier"))
    assert {n for n, q in net.named_parameters() if q.requires_grad} == {f"classifier.{n}" for n, _ in net.classifier.named_parameters()}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=0.1)
    image = torch.rand(3, 24, 40)
    target = {"masks": torch.ones((1, 24, 40), dtype=torch.uint8), "labels": torch.tensor([1])}
    for _ in range(2):
        opt.zero_grad()
        sum(net([image], [target]).values()).backward()
        opt.step()
    after = net.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("classifier.") for k in changed)  # batch-norm statistics included
    assert "classifier.fc.weight" in changed and any("running_mean" in k for k in changed)
    net.eval()
    assert not any(m.training for m in net.modules())
    with pytest.raises(ValueError, match="train_only: classifier needs the instance classifier"):
        _tiny(INST | {"train_only": "classifier"}, num_classes=1)
    with pytest.raises(ValueError, match="train_only: classifier needs the instance classifier"):
        RSISParams.model_validate(TINY | {"train_only": "classifier"})


def test_the_zoo_rsis_shapes_is_rsis_shapes_ft_with_only_its_classifier_retrained():
    """The committed lineage: rsis-shapes records rsis-shapes-ft (its weights' sha256) as its init
    and trained only the classifier, so every other tensor, batch-norm statistics included, is
    rsis-shapes-ft's."""
    from segpipe.modeling.zoo import load_card, load_state

    card, path = load_card("rsis-shapes")
    base, base_path = load_card("rsis-shapes-ft")
    assert card.params["train_only"] == "classifier"
    assert card.training.init["weights_sha256"] == base.weights.sha256
    assert card.training.init["card"].endswith("@" + base.version().split("@")[1])
    new, old = load_state(card, path), load_state(base, base_path)
    assert new.keys() == old.keys()
    changed = {k for k in new if not torch.equal(new[k], old[k])}
    assert changed and all(k.startswith("classifier.") for k in changed)


def test_the_zoo_rsis_nuclei_is_rsis_nuclei_base_fine_tuned_whole():
    """The committed lineage: rsis-nuclei records rsis-nuclei-base (its weights' sha256) as its
    init, every tensor loaded from it, with the same architecture; the fine-tune changed them."""
    from segpipe.modeling.zoo import load_card, load_state

    card, path = load_card("rsis-nuclei")
    base, base_path = load_card("rsis-nuclei-base")
    assert RSISParams.model_validate(card.params) == RSISParams.model_validate(base.params)  # defaults included
    init = card.training.init
    assert init["weights_sha256"] == base.weights.sha256 and init["card"] == base.version()
    new, old = load_state(card, path), load_state(base, base_path)
    assert new.keys() == old.keys() and init["loaded"] == len(old) and init["fresh"] == []
    assert any(not torch.equal(new[k], old[k]) for k in new)
