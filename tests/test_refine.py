"""The PointRend refiner: degradations, subdivision on a known boundary, tiny training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segpipe.config import PointRendParams
from segpipe.refine import degrade as dg
import segpipe.refine.pointrend as pr
from segpipe.refine.pointrend import PointRendRefiner, cell_centres, frame_to_image, grow, sample_maps

from conftest import TINY_POINTREND_PARAMS, assert_training_reduces_loss, check_loss_backward

TINY = TINY_POINTREND_PARAMS | {"output_size": 112, "points": 256}
PATCH = {"fine": "patch", "patch": 5, "coarse_patch": True}


def test_morph_shift_and_lowres():
    f = torch.zeros((1, 9, 9))
    f[0, 4, 4] = 1.0
    assert dg.morph(f, 1)[0, 3:6, 3:6].sum() == 9 and dg.morph(f, 1).sum() == 9
    assert dg.morph(dg.morph(f, 1), -1).sum() == 1
    moved = dg.shift(f, 2, -1)
    assert moved[0, 3, 6] == 1 and moved.sum() == 1
    square = torch.zeros((1, 8, 8))
    square[0, :4, :4] = 1.0
    np.testing.assert_allclose(dg.lowres(square, 2)[0, 0, 0], 1.0)  # a 2 x 2 view keeps the quadrant
    assert 0.0 < float(dg.lowres(square, 2)[0, 3, 3]) < 1.0  # and blurs its edge


def test_polygon_of_a_disc_is_close_and_loses_a_ring_hole():
    s = 28
    yy, xx = np.mgrid[:s, :s] + 0.5
    disc = ((xx - 14) ** 2 + (yy - 14) ** 2 <= 10**2).astype(np.float32)
    poly = dg.polygon(disc, 12)
    assert np.abs(poly - disc).mean() < 0.05
    ring = disc * ((xx - 14) ** 2 + (yy - 14) ** 2 > 5**2)
    assert dg.polygon(ring, 12)[14, 14] > 0.9  # a star-shaped polygon cannot keep the hole


def test_degrade_gives_coarse_maps_and_disagreement_of_the_fused_kind():
    frames = torch.zeros((16, 28, 28))
    frames[:, 6:22, 8:20] = 1.0
    gen = torch.Generator().manual_seed(0)
    coarse, spread = dg.degrade(frames, gen)
    assert coarse.shape == spread.shape == frames.shape
    assert float(coarse.min()) >= 0 and float(coarse.max()) <= 1 and float(spread.max()) <= 0.5
    iou = ((coarse >= 0.5) & (frames >= 0.5)).flatten(1).sum(1) / ((coarse >= 0.5) | (frames >= 0.5)).flatten(1).sum(1)
    assert float(iou.min()) > 0.4 and float(iou.mean()) < 0.999  # degraded, but still the object
    assert float(spread.flatten(1).amax(1).max()) > 0  # some fused copies disagree


def test_mild_degradations_stay_within_one_cell_of_the_frame():
    frames = torch.zeros((64, 28, 28))
    frames[:, 6:22, 8:20] = 1.0
    coarse, spread = dg.degrade(frames, torch.Generator().manual_seed(1), mild=1.0)
    assert float(coarse.min()) >= 0 and float(coarse.max()) <= 1 and float(spread.max()) <= 0.5
    # Every pixel more than one cell inside or outside the object keeps its value.
    assert torch.all(coarse[:, 7:21, 9:19] >= 0.5) and torch.all(coarse[:, :5] == 0) and torch.all(coarse[:, :, :7] == 0)
    exact = (coarse == frames).flatten(1).all(1)
    assert 0 < int(exact.sum()) < 64  # some "cells" copies, the rest nudged, half-morphed or fused
    assert float(spread.flatten(1).amax(1).max()) > 0
    plain, _ = dg.degrade(frames, torch.Generator().manual_seed(1), mild=0.0)
    assert not torch.equal(plain, coarse)


def test_frame_geometry():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    assert grow(boxes, 0.1).tolist() == [[8.0, 16.0, 32.0, 64.0]]
    uv = cell_centres(4, torch.tensor([[0, 5, 15]]))
    np.testing.assert_allclose(uv[0].numpy(), [[0.125, 0.125], [0.375, 0.375], [0.875, 0.875]])
    np.testing.assert_allclose(frame_to_image(uv, boxes)[0, 0].numpy(), [12.5, 25.0])
    maps = torch.arange(16.0).reshape(1, 4, 4)
    np.testing.assert_allclose(sample_maps(maps, uv).numpy(), [[0.0, 5.0, 15.0]])


class _OracleHead(PointRendRefiner):
    """The point head replaced by the truth: a disc of radius 30 px about (50, 40) in the image
    (its inputs are the points themselves)."""

    def point_inputs(self, feats, xy, coarse=None, frames=None, inst=None):
        return [xy]

    def head(self, parts, coarse_logit, disagreement):
        xy = parts[0]
        inside = ((xy[:, 0] - 50.0) ** 2 + (xy[:, 1] - 40.0) ** 2) <= 30.0**2
        return torch.where(inside, 10.0, -10.0)


def test_subdivision_recovers_a_known_boundary_from_a_coarse_mask():
    p = PointRendParams.model_validate(TINY | {"coarse_size": 14, "output_size": 112, "points": 400})
    net = _OracleHead(p).eval()
    frame = torch.tensor([[10.0, 0.0, 90.0, 80.0]])  # 80 x 80 px around the disc

    def disc_at(res):
        c = (torch.arange(res) + 0.5) / res * 80.0
        y, x = torch.meshgrid(c + 0.0, c + 10.0, indexing="ij")
        return (((x - 50.0) ** 2 + (y - 40.0) ** 2) <= 30.0**2).float()

    coarse = dg.lowres(disc_at(112)[None], 7)  # [1, 112, 112] blurred
    coarse = torch.nn.functional.adaptive_avg_pool2d(coarse[None], 14)[0]  # 14 x 14 start
    refined = net.subdivide(torch.zeros((1, 100, 100)), coarse, frame)
    assert refined.shape == (1, 112, 112)
    truth = disc_at(112) >= 0.5

    def iou(a):
        return float((a & truth).sum() / (a | truth).sum())

    upsampled = torch.nn.functional.interpolate(coarse[None], size=(112, 112), mode="bilinear", align_corners=False)[0]
    assert iou(refined[0] >= 0.5) > 0.985 > iou(upsampled[0] >= 0.5)
    # Only uncertain cells are re-predicted: far inside and outside keep the coarse answer.
    assert float(refined[0, 56, 56]) > 0.99 and float(refined[0, 2, 2]) < 0.01


def _batch():
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.uniform(size=(3, 40, 48)).astype(np.float32)) for _ in range(2)]
    m = torch.zeros((2, 40, 48), dtype=torch.uint8)
    m[0, 5:20, 6:30] = 1
    m[1, 22:38, 30:46] = 1
    empty = {"masks": torch.zeros((0, 40, 48), dtype=torch.uint8), "labels": torch.zeros(0, dtype=torch.int64)}
    return images, [{"masks": m, "labels": torch.tensor([1, 1])}, empty]


def test_stride_2_features_are_read_at_the_right_pixel():
    """feature_stride 2: features [C, H/2, W/2]; a point at image pixel (x, y) reads feature
    cell (x / 2, y / 2), as the stride-1 net reads cell (x, y)."""
    p = PointRendParams.model_validate(TINY | {"feature_stride": 2, "use_disagreement": False})
    net = PointRendRefiner(p).eval()
    img = torch.rand(3, 40, 48)
    feats = net.image_features([img])[0]
    assert feats.shape[-2:] == (24, 24)  # padded to 48 x 48, then stride 2
    assert net.features.full is None and net.features.refine is None
    probe = torch.zeros_like(feats)
    probe[:, 7, 11] = 1.0  # the cell of image pixels x 22..23, y 14..15
    with torch.no_grad():
        for layer in net.layers:
            layer.weight.zero_(), layer.bias.zero_()
        net.layers[0].weight[0, 0, 0] = 1.0  # hidden unit 0 = feature channel 0
        net.layers[1].weight[0, 0, 0] = 1.0
        net.layers[2].weight[0, 0, 0] = 1.0
        net.out.weight.zero_(), net.out.bias.zero_()
        net.out.weight[0, 0, 0] = 1.0
        xy = torch.tensor([[[23.0, 15.0], [5.0, 5.0]]])  # the centre of that cell; a far point
        out = net.point_logits(probe, xy, torch.zeros(1, 2), None)
    assert out[0].tolist() == pytest.approx([1.0, 0.0])


@pytest.mark.parametrize("extra", [{}, {"use_disagreement": False}, {"feature_stride": 2}, PATCH | {"boundary": 0.5}])
def test_tiny_refiner_trains(extra):
    torch.manual_seed(0)
    net = PointRendRefiner(PointRendParams.model_validate(TINY | extra)).train()
    images, targets = _batch()
    grads = check_loss_backward(net, images, targets, {"loss_point"})
    assert all(g is not None for g in grads)
    with pytest.raises(ValueError, match="targets"):
        net(images)

    class Fixed(PointRendRefiner):  # same degradations and points every step: the loss must fall
        def forward(self, images, targets=None):
            torch.manual_seed(1)
            return super().forward(images, targets)

    torch.manual_seed(0)
    assert_training_reduces_loss(Fixed(PointRendParams.model_validate(TINY | extra)).train(), images, targets, steps=40)


@pytest.mark.parametrize("extra", [{}, {"render": "pixels"}, PATCH | {"render": "pixels", "certain": 2.0}])
def test_refiner_on_instances_keeps_rows_and_fits_the_contract(tmp_path, extra):
    """Untrained weights through the zoo: every instance comes back (same scores and labels,
    in order) with a non-empty mask inside the image, a tight box and a soft mask."""
    import yaml

    from segpipe.modeling.zoo import load_adapter, save_weights
    from segpipe.ops import masks as mask_ops
    from segpipe.structures import Instances

    p = PointRendParams.model_validate(TINY | {"output_size": 56, "points": 64} | extra)
    torch.manual_seed(0)
    digest = save_weights(PointRendRefiner(p), tmp_path / "weights.safetensors")
    card = {"name": "tiny-pointrend", "family": "refinement", "paper": "test fixture", "builder": "pointrend",
            "params": p.model_dump(mode="json"), "categories": [{"id": 1, "name": "x"}],
            "weights": {"file": "weights.safetensors", "sha256": digest, "format": "safetensors", "dtype": "float16"}}
    (tmp_path / "card.yaml").write_text(yaml.safe_dump(card))
    refiner, _ = load_adapter(str(tmp_path / "card.yaml"))
    h, w = 50, 60
    m = np.zeros((3, h, w), np.uint8)
    m[0, 5:25, 5:30] = 1
    m[1, 30:50, 40:60] = 1  # touches the image corner: the frame leaves the image
    m[2, 10:13, 50:53] = 1  # tiny
    boxes = np.array([[5, 5, 30, 25], [40, 30, 60, 50], [50, 10, 53, 13]], np.float32)
    probs = np.stack([mask_ops.crop_to_box_frame(mk.astype(np.float32), b, 28) for mk, b in zip(m, boxes)])
    for soft in (True, False):
        inst = Instances(height=h, width=w, boxes=boxes, scores=np.array([0.9, 0.8, 0.7], np.float32),
                         labels=np.array([1, 1, 1]), masks=mask_ops.encode(m),
                         mask_probs=probs.astype(np.float16) if soft else None)
        image = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
        out = refiner.refine(image, inst)
        assert len(out) == 3 and out.scores.tolist() == inst.scores.tolist() and out.labels.tolist() == [1, 1, 1]
        assert np.all(mask_ops.area(out.masks) > 0)
        xywh = mask_ops.to_bbox(out.masks)
        np.testing.assert_allclose(out.boxes, np.c_[xywh[:, :2], xywh[:, :2] + xywh[:, 2:]])
        assert out.mask_probs.shape == (3, 28, 28) and out.mask_probs.dtype == np.float16
        # Each refined mask stays in its instance's frame (the box grown by 10%, out to whole pixels).
        frames = grow(torch.from_numpy(boxes), p.margin).numpy()
        assert np.all(out.boxes[:, :2] >= np.floor(frames[:, :2])) and np.all(out.boxes[:, 2:] <= np.ceil(frames[:, 2:]))


def test_coarse_in_frames_reproduces_a_mask_from_its_soft_mask_and_from_its_rle():
    from segpipe.ops import masks as mask_ops
    from segpipe.refine.refiner import coarse_in_frames
    from segpipe.structures import Instances

    m = np.zeros((1, 40, 40), np.uint8)
    m[0, 10:30, 8:36] = 1
    box = np.array([[8, 10, 36, 30]], np.float32)
    frame = np.array([[4.0, 6.0, 40.0, 34.0]], np.float32)  # 36 x 28 px: 28 cells -> 1.29 x 1 px per cell
    probs = mask_ops.crop_to_box_frame(m[0].astype(np.float32), box[0], 28)[None].astype(np.float16)
    want = mask_ops.crop_to_box_frame(m[0].astype(np.float32), frame[0], 28)
    for p in (probs, None):
        inst = Instances(height=40, width=40, boxes=box, scores=np.ones(1, np.float32), labels=np.ones(1, np.int64),
                         masks=mask_ops.encode(m), mask_probs=p)
        got = coarse_in_frames(inst, frame, 28)[0]
        assert np.abs((got >= 0.5) != (want >= 0.5)).mean() < 0.02


def test_patch_head_reads_the_pixel_window_and_the_coarse_window():
    """fine=patch: a point reads the normalised image in the 5 x 5 pixel window around it
    (edge pixels repeat past the image border) and, with coarse_patch, the coarse map's logits
    at the same 25 places, in the frame."""
    import segpipe.refine.pointrend as pr

    net = PointRendRefiner(PointRendParams.model_validate(TINY | PATCH)).eval()
    img = torch.rand(3, 40, 50)
    feats = net.image_features([img])[0]
    np.testing.assert_allclose(feats.numpy(), ((img - 0.5) / 0.25).numpy(), atol=1e-6)  # no network, no padding
    frames = torch.tensor([[0.0, 0.0, 50.0, 40.0]])  # the frame is the image: one coarse cell per pixel
    coarse = torch.rand(1, 40, 50) * 0.9 + 0.05
    xy = torch.tensor([[10.5, 20.5], [0.5, 0.5]])  # pixel centres: (10, 20) and the top-left corner
    with torch.no_grad():
        parts = net.point_inputs(feats, xy, coarse=coarse, frames=frames, inst=torch.zeros(2, dtype=torch.int64))
    assert [q.shape for q in parts] == [(2, 25)] * 4  # 3 colours + the coarse logit per window pixel
    x = torch.cat(parts, 1)
    np.testing.assert_allclose(x[0, :75].numpy(), feats[:, 18:23, 8:13].reshape(-1).numpy(), atol=1e-4)
    corner = feats[:, [0, 0, 0, 1, 2]][:, :, [0, 0, 0, 1, 2]]
    np.testing.assert_allclose(x[1, :75].numpy(), corner.reshape(-1).numpy(), atol=1e-4)
    np.testing.assert_allclose(x[0, 75:100].numpy(), (torch.logit(coarse[0, 18:23, 8:13]) / 4).reshape(-1).numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="coarse_patch needs fine=patch"):
        PointRendRefiner(PointRendParams.model_validate(TINY | {"coarse_patch": True}))


def test_boundary_points_lie_within_a_pixel_of_the_true_boundary():
    from segpipe.refine.pointrend import boundary_points, near_boundary, sample_masks

    masks = torch.zeros(2, 60, 60)
    masks[0, 10:40, 20:50] = 1  # a 30 x 30 square
    masks[1, 30:34, 5:9] = 1  # a 4 x 4 one: every pixel is within one of its boundary
    frames = torch.tensor([[17.0, 7.0, 53.0, 43.0], [4.0, 29.0, 10.0, 35.0]])
    torch.manual_seed(0)
    xy = boundary_points(masks, frames, 50, 800)
    assert xy.shape == (2, 50, 2)
    x, y = xy[0, :, 0], xy[0, :, 1]
    to_edge = torch.minimum(torch.minimum((x - 20).abs(), (x - 50).abs()), torch.minimum((y - 10).abs(), (y - 40).abs()))
    assert float(to_edge.max()) <= 2.0  # the pixel holding it or a neighbour lies across the edge
    assert bool(near_boundary(lambda p: sample_masks(masks, p), xy).all())
    inside = torch.tensor([[[35.5, 25.5]]]).expand(2, 1, 2)
    assert not bool(near_boundary(lambda p: sample_masks(masks[:1], p), inside[:1]).any())


def test_pixel_render_recovers_a_known_boundary_at_pixel_level():
    """render=pixels: a blurred 14 x 14 coarse disc, refined on the image's own pixel grid by a
    head that knows the truth, gives the disc pixel for pixel (pixel centres within 30 px of
    (50, 40)); with ``certain`` tiny, no point is re-predicted and the coarse answer stays."""
    from segpipe.ops import masks as mask_ops
    from segpipe.refine.refiner import Refiner
    from segpipe.structures import Instances

    h, w = 80, 100
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    truth = ((xx - 50.0) ** 2 + (yy - 40.0) ** 2) <= 30.0**2
    box = np.array([[20.0, 10.0, 80.0, 70.0]], np.float32)
    soft = dg.lowres(torch.from_numpy(mask_ops.crop_to_box_frame(truth.astype(np.float32), box[0], 56))[None], 7)[0]
    soft = torch.nn.functional.adaptive_avg_pool2d(soft[None], 28)[0]  # the box-frame soft mask; the refiner starts at 14
    inst = Instances(height=h, width=w, boxes=box, scores=np.ones(1, np.float32), labels=np.ones(1, np.int64),
                     masks=mask_ops.encode(truth[None].astype(np.uint8)), mask_probs=soft[None].numpy().astype(np.float16))
    image = np.zeros((h, w, 3), np.uint8)
    for certain, want_exact in ((None, True), (1e-3, False)):
        p = PointRendParams.model_validate(TINY | {"coarse_size": 14, "points": 2000, "render": "pixels", "certain": certain})
        out = Refiner(_OracleHead(p).eval()).refine(image, inst)
        got = mask_ops.decode(out.masks)[0].astype(bool)
        if want_exact:
            assert (got == truth).all()
        else:  # nothing re-predicted: the blurred coarse map's own boundary, off by a few pixels
            assert 0.9 < (got & truth).sum() / (got | truth).sum() < 1.0


def test_pixel_windows_gathered_by_index_equal_the_interpolated_ones():
    """render_pixels reads each window by integer index (image and maps); the generic path
    (point_logits: grid_sample windows, the coarse maps as one atlas) must give the same logits
    for the same pixels, across instances of different sizes and frames that leave the image."""
    torch.manual_seed(0)
    net = PointRendRefiner(PointRendParams.model_validate(TINY | PATCH | {"points": 40})).eval()
    img = torch.rand(3, 48, 64)
    feats = net.image_features([img])[0]
    frames = torch.tensor([[-4.0, 2.0, 30.0, 40.0], [40.0, 30.0, 70.0, 52.0], [10.0, 10.0, 18.0, 16.0]])
    regions = torch.tensor([[0, 2, 30, 40], [40, 30, 64, 48], [10, 10, 18, 16]])
    logits = torch.randn(3, 14, 14) * 3
    dis = torch.rand(3, 14, 14)
    with torch.no_grad():
        got = net.render_pixels(feats, logits, frames, regions, dis)
        base = pr.region_pixels(torch.stack([logits, dis], 1), frames, regions)
        inside = pr.in_regions(regions, *base.shape[-2:])
        changed = (got != base[:, 0]) & inside
        i, y, x = changed.nonzero(as_tuple=True)
        assert len(i) > 60  # up to 40 per instance; the small one has only 48 pixels
        xy = torch.stack([regions[i, 0] + x, regions[i, 1] + y], -1).float() + 0.5
        want = net.point_logits(feats, xy, base[i, 0, y, x], base[i, 1, y, x], coarse=torch.sigmoid(logits),
                                frames=frames, inst=i)
    np.testing.assert_allclose(got[i, y, x].numpy(), want.numpy(), atol=1e-4)


def test_subdivision_stops_each_instance_at_its_own_size():
    """Per-instance output sizes: an instance asking for 28 is only upsampled past 28, one asking
    for 112 is re-predicted at 56 and 112 (a head that counts the points it is asked for)."""
    seen = []

    class Counting(PointRendRefiner):
        def point_inputs(self, feats, xy, coarse=None, frames=None, inst=None):
            seen.append((inst.numel(), bool((xy[:, 0] > 20).any()), bool((xy[:, 0] < 20).all())))
            return [xy]

        def head(self, parts, coarse_logit, disagreement):
            return coarse_logit

    net = Counting(PointRendParams.model_validate(TINY | {"coarse_size": 14, "points": 10})).eval()
    frames = torch.tensor([[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 100.0, 100.0]])
    out = net.subdivide(torch.zeros(1, 100, 100), torch.rand(2, 14, 14), frames, None, torch.tensor([28, 112]))
    assert out.shape == (2, 112, 112)
    # step to 28: both (10 points each); to 56 and 112: the large one only (its points reach past 20 px)
    assert [s[0] for s in seen] == [20, 10, 10] and seen[1][1] and seen[2][1]


def test_min_score_leaves_low_scoring_instances_as_they_were():
    """Refiner.refine(min_score=...): instances scoring under it come back untouched (mask,
    box and soft mask); the others are refined (here by the truth: a disc)."""
    from segpipe.ops import masks as mask_ops
    from segpipe.refine.refiner import Refiner
    from segpipe.structures import Instances

    h, w = 80, 100
    sq = np.zeros((2, h, w), np.uint8)
    sq[:, 15:65, 25:75] = 1  # a square: the coarse guess for the disc
    box = np.array([[25.0, 15.0, 75.0, 65.0]] * 2, np.float32)
    probs = np.stack([mask_ops.crop_to_box_frame(m.astype(np.float32), box[0], 28) for m in sq]).astype(np.float16)
    inst = Instances(height=h, width=w, boxes=box, scores=np.array([0.9, 0.02], np.float32), labels=np.ones(2, np.int64),
                     masks=mask_ops.encode(sq), mask_probs=probs)
    p = PointRendParams.model_validate(TINY | {"coarse_size": 14, "points": 4000, "render": "pixels"})
    out = Refiner(_OracleHead(p).eval()).refine(np.zeros((h, w, 3), np.uint8), inst, None, 0.05)
    assert out.masks[1] == inst.masks[1] and (out.boxes[1] == box[1]).all() and (out.mask_probs[1] == probs[1]).all()
    assert abs(int(mask_ops.area(out.masks[:1])[0]) - np.pi * 30**2) < 30  # the oracle's disc (r 30 px), not the square


# --- priors: the zoo's own predictions as training input ---------------------------------------


def _l_shapes(h: int = 40, w: int = 50) -> list[np.ndarray]:
    """Two asymmetric objects (an L and a wedge), so a wrong flip or turn shows."""
    a = np.zeros((h, w), np.uint8)
    a[5:20, 6:10] = 1
    a[16:20, 6:22] = 1
    b = np.zeros((h, w), np.uint8)
    for y in range(24, 38):
        b[y, 30 : 30 + (y - 22)] = 1
    return [a, b]


def _tiny_coco(tmp_path, masks):
    import json

    from PIL import Image

    from segpipe.ops import masks as mask_ops

    h, w = masks[0].shape
    (tmp_path / "images").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "images" / "a.png")
    anns = []
    for k, m in enumerate(masks):
        rle = mask_ops.encode(m[None])[0]
        ys, xs = np.nonzero(m)
        anns.append({"id": 10 + k, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": int(m.sum()),
                     "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                     "segmentation": {"size": [h, w], "counts": rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]}})
    doc = {"images": [{"id": 1, "file_name": "a.png", "height": h, "width": w}], "annotations": anns,
           "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    return tmp_path / "ann.json"


def test_dataset_priors_follow_the_crop_flips_and_turns(tmp_path):
    """Each prior (the object's box-frame map, as a fused prediction would give it) stays on its
    object through random crops, flips and quarter turns; an object the crop cuts has none."""
    from segpipe.data.coco import CocoInstances
    from segpipe.ops.masks import crop_to_box_frame
    from segpipe.refine.priors import Prior

    masks = _l_shapes()
    ann = _tiny_coco(tmp_path, masks)
    priors = {"a.png": {}}
    for k, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
        fm = crop_to_box_frame(m.astype(np.float32), box, 28)
        priors["a.png"][10 + k] = Prior(box=box, maps=np.stack([fm, 1 - fm]).astype(np.float16), iou=1.0)
    seen_cut = seen = 0
    for crop in (None, 32):
        ds = CocoInstances(str(ann), str(tmp_path / "images"), category_ids=[1], flips=True, crop=crop, priors=priors)
        for epoch in range(12):
            ds.set_epoch(epoch)
            _, t = ds[0]
            assert t["prior_boxes"].shape == (len(t["masks"]), 4) and t["prior_maps"].shape == (len(t["masks"]), 2, 28, 28)
            for k in range(len(t["masks"])):
                if not bool(t["prior"][k]):
                    seen_cut += 1
                    assert t["masks"][k].sum() < max(m.sum() for m in masks)  # only a cut object lacks its prior
                    continue
                seen += 1
                box = t["prior_boxes"][k].numpy()
                again = crop_to_box_frame(t["masks"][k].numpy().astype(np.float32), box, 28)
                got = t["prior_maps"][k].float().numpy()
                assert np.abs(again - got[0]).mean() < 0.02 and np.abs((1 - again) - got[1]).mean() < 0.02
    assert seen >= 12 and seen_cut >= 1


def test_match_priors_pairs_each_truth_with_its_best_prediction():
    """Greedy one-to-one by mask IoU: of two predictions of one object the closer one wins; a
    prediction under min_iou or under min_score is nobody's prior."""
    from segpipe.ensemble.fuse import Fused
    from segpipe.ops import masks as mask_ops
    from segpipe.refine.priors import match_priors
    from segpipe.structures import Instances

    a, b = _l_shapes()
    a_fat = a.copy()
    a_fat[4:21, 5:11] = 1  # a close but looser copy of a
    stray = np.zeros_like(a)
    stray[0:3, 40:48] = 1
    preds = [a_fat, a, b, stray]
    scores = np.array([0.9, 0.8, 0.7, 0.95], np.float32)
    rles = mask_ops.encode(np.stack(preds))
    boxes = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] for ys, xs in (np.nonzero(m) for m in preds)], np.float32)
    probs = np.full((4, 28, 28), 0.25, np.float16) * np.arange(1, 5, dtype=np.float16)[:, None, None]
    inst = Instances(height=40, width=50, boxes=boxes, scores=scores, labels=np.ones(4, np.int64), masks=rles, mask_probs=probs)
    fused = Fused(instances=inst, spread=np.zeros((4, 28, 28), np.float16))
    gt = mask_ops.encode(np.stack([a, b]))
    got = match_priors(fused, gt, [10, 11])
    assert set(got) == {10, 11}
    assert got[10].iou == pytest.approx(1.0) and float(got[10].maps[0, 0, 0]) == 0.5  # the exact copy, not the fat one
    assert float(got[11].maps[0, 0, 0]) == 0.75 and got[11].box.tolist() == boxes[2].tolist()
    assert got[10].maps.shape == (2, 28, 28) and got[10].maps.dtype == np.float16
    assert set(match_priors(fused, gt, [10, 11], min_score=0.85)) == {10}  # only the fat copy of a is left: IoU > 0.5
    assert match_priors(fused, gt, [10, 11], min_iou=1.01) == {}


def test_prior_share_decides_which_coarse_mask_the_head_learns_from():
    """With prior_share 1 an instance with a prior is read through it (here a wrong prior that
    says "certainly outside" all over the object's box); with 0 it gets a degraded copy of the truth."""
    torch.manual_seed(0)
    m = torch.zeros((1, 32, 32), dtype=torch.bool)
    m[0, 8:20, 10:24] = True
    prior = (torch.tensor([[10.0, 8.0, 24.0, 20.0]]), torch.stack([torch.full((28, 28), 0.001), torch.zeros(28, 28)])[None],
             torch.tensor([True]))
    seen = {}

    class Spy(PointRendRefiner):
        def point_logits(self, feats, xy, coarse_logit, disagreement, **kw):
            seen["coarse"], seen["xy"] = coarse_logit, xy
            return super().point_logits(feats, xy, coarse_logit, disagreement, **kw)

    for share in (1.0, 0.0):
        net = Spy(PointRendParams.model_validate(TINY | {"prior_share": share}))
        loss = net._instance_loss(net.image_features([torch.rand(3, 32, 32)])[0], m, prior)
        loss.backward()
        xy = seen["xy"][0]
        inside = (xy[:, 0] > 12) & (xy[:, 0] < 22) & (xy[:, 1] > 10) & (xy[:, 1] < 18)
        c = seen["coarse"][0][inside]
        assert c.numel() > 0
        if share == 1.0:
            assert bool((c < -5.0).all())  # logit of 0.001 everywhere inside the prior's box
        else:
            assert not bool((c < -5.0).any())  # a degraded copy of the truth keeps the interior


def _random_instances(rng: np.random.Generator, h: int, w: int, scores: list[float]):
    """Rectangles with ragged edges at random places of an h x w image, with box-frame soft masks."""
    from segpipe.ops import masks as mask_ops
    from segpipe.structures import Instances

    n = len(scores)
    m = np.zeros((n, h, w), np.uint8)
    boxes = np.zeros((n, 4), np.float32)
    for k in range(n):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        x1, y1 = int(rng.integers(x0 + 6, min(w, x0 + 40) + 1)), int(rng.integers(y0 + 6, min(h, y0 + 40) + 1))
        m[k, y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < 0.9
        ys, xs = np.nonzero(m[k])
        boxes[k] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    probs = np.stack([mask_ops.crop_to_box_frame(mk.astype(np.float32), b, 28) for mk, b in zip(m, boxes)]) if n else None
    return Instances(height=h, width=w, boxes=boxes, scores=np.asarray(scores, np.float32), labels=np.ones(n, np.int64),
                     masks=mask_ops.encode(m), mask_probs=None if probs is None else probs.astype(np.float16))


@pytest.mark.parametrize("extra", [PATCH | {"render": "pixels"}, {"render": "pixels"}, PATCH])
def test_refine_batch_gives_each_image_what_refine_gives_it(extra):
    """Several images in one refine_batch call (fine=patch + pixels: one pixel step over all
    their instances; otherwise image by image): images of other sizes, one without instances,
    one whose instances all score under min_score, grid steps to different sides (frames under
    and over 28 px) -> per image the masks, boxes and scores refine() gives, soft masks within
    one float16 step (the head's matrix products see other row counts)."""
    from segpipe.refine.refiner import Refiner

    torch.manual_seed(1)
    p = PointRendParams.model_validate(TINY | extra | {"coarse_size": 14, "output_size": 28, "points": 60})
    refiner = Refiner(PointRendRefiner(p).eval())
    rng = np.random.default_rng(5)
    sizes = [(50, 60), (40, 40), (64, 48), (30, 70)]
    scores = [[0.9, 0.5, 0.3], [], [0.8, 0.05], [0.02, 0.01]]
    insts = [_random_instances(rng, h, w, s) for (h, w), s in zip(sizes, scores)]
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    spreads = [rng.random((len(s), 28, 28)).astype(np.float32) if s else None for s in scores]
    got = refiner.refine_batch(images, insts, spreads, 0.1)
    assert len(got) == 4 and got[1] is insts[1] and got[3] is insts[3]  # nothing to refine: returned as given
    changed = 0
    for img, inst, spread, g in zip(images, insts, spreads, got):
        want = refiner.refine(img, inst, spread, 0.1)
        assert g.masks == want.masks and np.array_equal(g.boxes, want.boxes) and np.array_equal(g.scores, inst.scores)
        if len(inst):
            np.testing.assert_allclose(g.mask_probs.astype(np.float32), want.mask_probs.astype(np.float32), atol=2e-3)
        changed += sum(a != b for a, b in zip(g.masks, inst.masks))
    assert got[2].masks[1] == insts[2].masks[1]  # under min_score: untouched
    assert changed >= 3  # the untrained head does change the masks it refines


def test_refine_stage_isolates_an_image_that_fails_in_a_batch(tmp_path):
    """RefineStage refines a batch in one call; when that call fails, each image is retried on
    its own: the bad row (an unreadable ensemble prediction) becomes an error record and the
    others are refined as they would be alone."""
    from conftest import make_pointrend_card

    from segpipe.ensemble.fuse import ModelOutput, encode_fused, fuse_image
    from segpipe.config import EnsembleConfig
    from segpipe.pipeline.stages import RefineStage

    card = make_pointrend_card(tmp_path / "zoo" / "tiny-pointrend")
    stage = RefineStage(model_ref=str(card), source="ensemble", use_gpu=False, num_threads=1)
    rng = np.random.default_rng(2)
    rows = []
    for k in range(3):
        inst = _random_instances(rng, 48, 56, [0.9, 0.7])
        data, meta = encode_fused(fuse_image([ModelOutput("m", "m@1", inst)], EnsembleConfig()))
        rows.append((rng.integers(0, 255, (48, 56, 3), dtype=np.uint8), data, meta))
    batch = {"uri": np.array([f"u{k}" for k in range(3)], dtype=object),
             "image": np.array([r[0] for r in rows] + [None], dtype=object)[:3],
             "pred:ensemble": np.array([rows[0][1], b"not an ensemble prediction", rows[2][1]], dtype=object),
             "meta:ensemble": np.array([r[2] for r in rows], dtype=object),
             "error_stage": np.array([""] * 3, dtype=object), "error_type": np.array([""] * 3, dtype=object),
             "error_message": np.array([""] * 3, dtype=object)}
    out = stage(batch)
    assert list(out["error_type"][[0, 2]]) == ["", ""] and out["error_stage"][1] == "refine:tiny-pointrend"
    assert out["pred:refined"][1] == b"" and "image" not in out
    alone = stage({k: v[[0, 2]] for k, v in batch.items()})
    assert list(out["pred:refined"][[0, 2]]) == list(alone["pred:refined"])
    assert (out["cpu_ms:refine"][[0, 2]] > 0).all()
