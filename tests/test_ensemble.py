"""Mask fusion on tiny golden masks (segpipe.ensemble.fuse)."""

from __future__ import annotations

import numpy as np
import pytest

from segpipe.config import EnsembleConfig
from segpipe.ensemble.fuse import ModelOutput, encode_fused, fuse_image, fuse_images, match_groups
from segpipe.ops import masks as mask_ops
from segpipe.structures import SOFT_MASK_SIZE, Instances

H, W = 64, 80


def _instances(masks: list[np.ndarray], scores: list[float], labels: list[int] | None = None, soft: bool = True,
               h: int = H, w: int = W) -> Instances:
    """Instances from dense bool masks [h, w]: tight boxes, soft masks sampled from the binary ones."""
    n = len(masks)
    boxes = np.zeros((n, 4), np.float32)
    for k, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        boxes[k] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    probs = np.stack([mask_ops.crop_to_box_frame(m.astype(np.float32), b, SOFT_MASK_SIZE) for m, b in zip(masks, boxes)]) \
        if n else np.zeros((0, SOFT_MASK_SIZE, SOFT_MASK_SIZE), np.float32)
    return Instances(height=h, width=w, boxes=boxes, scores=np.asarray(scores, np.float32),
                     labels=np.asarray(labels or [1] * n, np.int64),
                     masks=mask_ops.encode(np.stack(masks)) if n else [],
                     mask_probs=probs.astype(np.float16) if soft else None)


def _out(name: str, masks, scores, labels=None, soft=True) -> ModelOutput:
    return ModelOutput(name=name, version=f"{name}@0123456789ab", instances=_instances(masks, scores, labels, soft))


def _rect(x0, y0, x1, y1) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


SQUARE = _rect(10, 8, 38, 36)  # 28 x 28 pixels: the box frame maps 1:1 onto pixels
FAR = _rect(50, 40, 70, 60)


def _dense(fused, k=0) -> np.ndarray:
    return mask_ops.decode([fused.instances.masks[k]])[0].astype(bool)


@pytest.mark.parametrize("method", ["soft", "vote", "best"])
def test_identical_members_fuse_to_themselves(method):
    outs = [_out("a", [SQUARE], [0.9]), _out("b", [SQUARE], [0.7])]
    fused = fuse_image(outs, EnsembleConfig(method=method))
    assert len(fused.instances) == 1
    assert np.array_equal(_dense(fused), SQUARE)
    np.testing.assert_array_equal(fused.instances.boxes[0], [10, 8, 38, 36])
    assert fused.n_votes.tolist() == [2] and fused.agreement == [1.0]
    assert [(m.model, m.model_version, m.iou) for m in fused.members[0]] == [("a", "a@0123456789ab", 1.0), ("b", "b@0123456789ab", 1.0)]
    assert fused.instances.scores[0] == pytest.approx((0.9 + 0.7) / 2)
    assert fused.confidence[0] == pytest.approx((0.9 + 0.7) / 2)
    assert fused.instances.mask_probs.shape == (1, SOFT_MASK_SIZE, SOFT_MASK_SIZE)
    assert float(fused.instances.mask_probs[0].min()) > 0.99  # the whole box is the object


def test_a_disjoint_member_stays_separate_and_min_votes_drops_it():
    outs = [_out("a", [SQUARE], [0.9]), _out("b", [SQUARE, FAR], [0.8, 0.6])]
    fused = fuse_image(outs, EnsembleConfig())
    assert len(fused.instances) == 2
    assert fused.n_votes.tolist() == [2, 1] and fused.agreement == [1.0, None]
    assert np.array_equal(_dense(fused, 1), FAR)
    assert fused.instances.scores[1] == pytest.approx(0.6 / 2)  # model a found nothing there: counts as 0
    only = fuse_image(outs, EnsembleConfig(min_votes=2))
    assert len(only.instances) == 1 and np.array_equal(_dense(only), SQUARE)


def test_quorum_voting_drops_single_model_instances():
    outs = [_out("a", [SQUARE, FAR], [0.9, 0.9]), _out("b", [SQUARE], [0.9]), _out("c", [_rect(12, 8, 38, 36)], [0.9])]
    fused = fuse_image(outs, EnsembleConfig(method="vote", quorum=0.5))
    assert len(fused.instances) == 1  # FAR: 1 of 3 models < quorum
    assert np.array_equal(_dense(fused), SQUARE)  # columns 10-11: 2 of 3 votes, kept
    strict = fuse_image(outs, EnsembleConfig(method="vote", quorum=1.0))
    assert np.array_equal(_dense(strict), _rect(12, 8, 38, 36))  # only pixels all three agree on


def test_weights_change_the_soft_fusion_as_specified():
    big, small = _rect(10, 8, 38, 36), _rect(10, 8, 30, 36)  # IoU 20/28 = 0.71: one group
    outs = [_out("a", [big], [0.8]), _out("b", [small], [0.8])]
    # Columns 30..37 are covered by a only: fused probability = w_a s_a / (w_a s_a + w_b s_b).
    heavy_a = fuse_image(outs, EnsembleConfig(weights={"a": 3.0}))  # 0.75 >= 0.5: kept
    heavy_b = fuse_image(outs, EnsembleConfig(weights={"b": 3.0}))  # 0.25 < 0.5: dropped
    assert np.array_equal(_dense(heavy_a), big) and np.array_equal(_dense(heavy_b), small)
    assert heavy_a.instances.scores[0] == pytest.approx((3 * 0.8 + 0.8) / 4)
    # best: the largest weight x score wins, whatever the order of the models.
    assert np.array_equal(_dense(fuse_image(outs, EnsembleConfig(method="best", weights={"b": 2.0}))), small)
    assert np.array_equal(_dense(fuse_image(outs, EnsembleConfig(method="best"))), big)  # tie: the first model
    # vote with weights: a alone carries 3 / 4 of the weight, above the quorum.
    assert np.array_equal(_dense(fuse_image(outs, EnsembleConfig(method="vote", weights={"a": 3.0}))), big)
    assert np.array_equal(_dense(fuse_image(outs, EnsembleConfig(method="vote", weights={"b": 3.0}))), small)


def test_matching_is_class_aware_by_default():
    outs = [_out("a", [SQUARE], [0.9], labels=[1]), _out("b", [SQUARE], [0.5], labels=[2]), _out("c", [SQUARE], [0.5], labels=[2])]
    aware = fuse_image(outs, EnsembleConfig())
    assert sorted(aware.instances.labels.tolist()) == [1, 2] and sorted(aware.n_votes.tolist()) == [1, 2]
    agnostic = fuse_image(outs, EnsembleConfig(class_agnostic=True))
    assert len(agnostic.instances) == 1 and agnostic.n_votes.tolist() == [3]
    assert agnostic.instances.labels.tolist() == [2]  # 0.5 + 0.5 outvotes 0.9


def test_matching_never_puts_two_instances_of_one_model_in_a_group():
    twin = _rect(10, 8, 37, 36)
    outs = [_out("a", [SQUARE, twin], [0.9, 0.8]), _out("b", [SQUARE], [0.7])]
    groups = match_groups(outs, EnsembleConfig())
    assert sorted(map(sorted, groups)) == [[(0, 0), (1, 0)], [(0, 1)]]


def test_iou_below_the_threshold_does_not_match_and_agreement_is_mean_pairwise_iou():
    a, b = _rect(10, 8, 38, 36), _rect(24, 8, 52, 36)  # IoU 14/42 = 1/3
    outs = [_out("a", [a], [0.9]), _out("b", [b], [0.9])]
    assert len(fuse_image(outs, EnsembleConfig(iou_thresh=0.5)).instances) == 2
    fused = fuse_image(outs, EnsembleConfig(iou_thresh=0.3, method="vote", quorum=0.5))
    assert len(fused.instances) == 1 and fused.agreement[0] == pytest.approx(1 / 3)
    assert np.array_equal(_dense(fused), a | b)
    assert fused.confidence[0] == pytest.approx(0.9 / 3)


def test_members_without_soft_masks_use_their_binary_masks():
    outs = [_out("a", [SQUARE], [0.9], soft=False), _out("b", [SQUARE], [0.9])]
    fused = fuse_image(outs, EnsembleConfig())
    assert np.array_equal(_dense(fused), SQUARE)


def test_a_model_without_instances_and_bad_inputs():
    outs = [_out("a", [SQUARE], [0.8]), _out("b", [], [])]
    fused = fuse_image(outs, EnsembleConfig())
    assert len(fused.instances) == 1 and fused.instances.scores[0] == pytest.approx(0.4)
    assert len(fuse_image([_out("b", [], [])], EnsembleConfig()).instances) == 0
    with pytest.raises(ValueError, match="at least one"):
        fuse_image([], EnsembleConfig())
    with pytest.raises(ValueError, match="weights"):
        EnsembleConfig(weights={"a": 0.0})


def test_spread_is_the_members_disagreement_and_survives_serialisation():
    from segpipe.ensemble.fuse import decode_fused, encode_fused

    big, small = _rect(10, 8, 38, 36), _rect(10, 8, 30, 36)
    fused = fuse_image([_out("a", [big], [0.8]), _out("b", [small], [0.8])], EnsembleConfig())
    spread = fused.spread[0].astype(np.float32)  # fused box = big: columns 30..37 are the last 8 of 28 cells
    assert spread.shape == (SOFT_MASK_SIZE, SOFT_MASK_SIZE)
    assert float(spread[14, 2:18].max()) < 0.05 and float(spread[14, 22:].min()) > 0.45  # std of {0, 1} = 0.5
    back = decode_fused(*encode_fused(fused))
    np.testing.assert_array_equal(back.spread, fused.spread)
    assert back.members == fused.members and back.agreement == fused.agreement
    np.testing.assert_array_equal(back.instances.mask_probs, fused.instances.mask_probs)


def test_rank_by_confidence_puts_agreeing_masks_first():
    a, b = _rect(10, 8, 38, 36), _rect(20, 8, 48, 36)  # IoU 18/38 = 0.47 at iou_thresh 0.3: one group
    outs = [_out("a", [a, FAR], [0.9, 0.8]), _out("b", [b, FAR], [0.9, 0.7])]
    cfg = dict(iou_thresh=0.3, method="vote", quorum=0.5)
    by_score = fuse_image(outs, EnsembleConfig(**cfg))
    assert by_score.instances.scores.tolist() == pytest.approx([0.9, 0.75])  # the disputed mask first
    by_conf = fuse_image(outs, EnsembleConfig(rank="confidence", **cfg))
    assert by_conf.instances.scores.tolist() == pytest.approx([0.75, 0.9 * 18 / 38])  # FAR agrees fully: now first
    assert np.array_equal(_dense(by_conf), FAR) and by_conf.confidence.tolist() == pytest.approx(by_conf.instances.scores.tolist())


@pytest.mark.parametrize("method", ["soft", "best"])
def test_a_lone_member_passes_through_unchanged(method):
    ellipse = np.zeros((H, W), bool)
    yy, xx = np.mgrid[:H, :W]
    ellipse[((yy - 30) / 11.0) ** 2 + ((xx - 40) / 17.0) ** 2 <= 1] = True
    out = _out("a", [ellipse], [0.6])
    fused = fuse_image([out, _out("b", [], [])], EnsembleConfig(method=method))
    assert fused.instances.masks[0] == out.instances.masks[0]
    np.testing.assert_array_equal(fused.instances.boxes[0], out.instances.boxes[0])
    np.testing.assert_array_equal(fused.instances.mask_probs[0], out.instances.mask_probs[0])
    assert float(np.abs(fused.spread[0].astype(np.float32)).max()) == 0.0
    assert fused.instances.scores[0] == pytest.approx(0.3) and fused.members[0][0].iou == 1.0
    # A vote quorum above the lone model's share of the weight drops it.
    assert len(fuse_image([out, _out("b", [], [])], EnsembleConfig(method="vote", quorum=0.6)).instances) == 0


def test_group_probs_resamples_all_members_at_once_as_one_by_one():
    """Soft fusion reads the members' box-frame soft masks with one grid_sample per group; it
    must equal member_probs member by member (zero outside each member's box)."""
    from segpipe.ensemble.fuse import group_probs, member_probs
    from segpipe.structures import Instances

    rng = np.random.default_rng(0)
    boxes = [np.array([[3.2, 4.7, 20.5, 18.1]], np.float32), np.array([[6.0, 2.5, 25.0, 21.9]], np.float32)]
    insts = [Instances(height=30, width=32, boxes=b, scores=np.ones(1, np.float32), labels=np.ones(1, np.int64),
                       masks=mask_ops.encode(np.ones((1, 30, 32), np.uint8)),
                       mask_probs=rng.random((1, 28, 28)).astype(np.float16)) for b in boxes]
    region = (2, 2, 26, 23)
    got = group_probs(insts, [0, 0], region)
    want = np.stack([member_probs(ins, 0, region) for ins in insts])
    assert got.shape == (2, 21, 24)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got[0, :, -1].max() == 0.0  # x 25.5 lies right of the first member's box


# --- the learned ensemble scorer ------------------------------------------------------------------


def test_scorer_features_hold_each_models_evidence_in_the_scorers_order():
    from segpipe.ensemble.scorer import ensemble_features

    a, b = _rect(10, 8, 38, 36), _rect(12, 8, 38, 36)
    fused = fuse_image([_out("a", [a, FAR], [0.9, 0.8]), _out("b", [b], [0.6])], EnsembleConfig())
    x = ensemble_features(fused, ["b", "a", "c"])  # the scorer's order, with a model that found nothing
    assert x.shape == (2, 13)
    group = [k for k in range(2) if fused.n_votes[k] == 2][0]
    lone = 1 - group
    iou_ab = (26 * 28) / (28 * 28)
    assert x[group, :3].tolist() == pytest.approx([0.6, 0.9, 0.0])  # scores of b, a, c
    assert x[group, 6:9].tolist() == [1.0, 1.0, 0.0]  # who voted
    assert x[group, 9] == pytest.approx(2 / 3) and x[group, 10] == pytest.approx(iou_ab)  # votes share, agreement
    assert x[group, 11] == pytest.approx(np.log1p(mask_ops.area(fused.instances.masks[group:group + 1])[0]))
    assert x[group, 12] > 0  # the members disagree on two columns
    assert x[lone, :3].tolist() == pytest.approx([0.0, 0.8, 0.0]) and x[lone, 10] == 0.0 and x[lone, 12] == 0.0
    assert x[lone, 4] == pytest.approx(1.0)  # a lone member's IoU with its own mask


def test_rescore_ranks_by_the_predicted_iou_and_numpy_matches_the_network():
    import torch

    from segpipe.config import ScorerParams
    from segpipe.ensemble.scorer import Scorer, ScorerNet, ensemble_features, rescore

    torch.manual_seed(0)
    net = ScorerNet(ScorerParams(models=["a", "b"], hidden=8))
    weights = Scorer(net, "s", "s@0").weights()
    fused = fuse_image([_out("a", [SQUARE, FAR], [0.9, 0.3]), _out("b", [SQUARE], [0.8])], EnsembleConfig())
    x = ensemble_features(fused, ["a", "b"])
    with torch.no_grad():
        want = torch.sigmoid(net(torch.from_numpy(x))).numpy()
    np.testing.assert_allclose(weights.predict(x), want, rtol=1e-5, atol=1e-6)
    kept = rescore(fused, weights, "score")  # confidence replaced, order and scores kept
    assert kept.instances.scores.tolist() == fused.instances.scores.tolist()
    np.testing.assert_allclose(kept.confidence, want, rtol=1e-5, atol=1e-6)
    ranked = rescore(fused, weights, "confidence")
    order = np.argsort(-want, kind="stable")
    np.testing.assert_allclose(ranked.instances.scores, want[order], rtol=1e-5, atol=1e-6)
    assert [m[0].model for m in ranked.members] == [fused.members[i][0].model for i in order]
    assert ranked.instances.masks == [fused.instances.masks[i] for i in order]
    assert ranked.n_votes.tolist() == fused.n_votes[order].tolist()


def _random_output(rng: np.random.Generator, name: str, h: int, w: int, n: int, soft: bool = True) -> ModelOutput:
    """n ragged rectangles at random places of an h x w image (they overlap other models' often)."""
    masks = []
    for _ in range(n):
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        m = np.zeros((h, w), bool)
        m[y0:y0 + int(rng.integers(8, 30)), x0:x0 + int(rng.integers(8, 30))] = True
        m &= rng.random((h, w)) < 0.95
        masks.append(m)
    inst = _instances(masks, rng.uniform(0.1, 1.0, n).tolist(), soft=soft, h=h, w=w)
    return ModelOutput(name=name, version=f"{name}@0123456789ab", instances=inst)


@pytest.mark.parametrize("method", ["soft", "vote"])
def test_fuse_images_gives_each_image_what_fuse_image_gives_it(method):
    """Several images (of other sizes; one with a model that found nothing; one whose second
    model has no soft masks, so its groups take the per-group path) in one fuse_images call ->
    per image the same masks, boxes, scores, members and agreement as fuse_image; soft masks
    and spread within one float16 step (the batch pads regions to other sizes)."""
    rng = np.random.default_rng(7)
    sizes = [(40, 60), (50, 50), (90, 70), (64, 80)]
    images = [[_random_output(rng, "a", h, w, 6), _random_output(rng, "b", h, w, 0 if k == 1 else 5, soft=k != 2)]
              for k, (h, w) in enumerate(sizes)]
    cfg = EnsembleConfig(method=method, rank="confidence", iou_thresh=0.3)
    got = fuse_images(images, cfg)
    groups = 0
    for outs, g in zip(images, got):
        want = fuse_image(outs, cfg)
        assert g.instances.masks == want.instances.masks and np.array_equal(g.instances.boxes, want.instances.boxes)
        assert np.array_equal(g.instances.scores, want.instances.scores) and g.members == want.members
        assert g.agreement == want.agreement and np.array_equal(g.n_votes, want.n_votes)
        np.testing.assert_allclose(g.instances.mask_probs.astype(np.float32), want.instances.mask_probs.astype(np.float32), atol=2e-3)
        np.testing.assert_allclose(g.spread.astype(np.float32), want.spread.astype(np.float32), atol=2e-3)
        assert all(r["size"] == [outs[0].instances.height, outs[0].instances.width] for r in g.instances.masks)
        groups += int((g.n_votes > 1).sum())
    assert groups >= 4  # the batch did fuse groups of two, not only pass lone members through


def test_fuse_batch_isolates_an_image_whose_fusion_fails():
    """The ensemble stage fuses a batch in one call; when that fails, each image is retried on
    its own: the bad row (an unreadable prediction) becomes an error record (stage ensemble)
    and the others get what fuse_image gives them."""
    from segpipe.pipeline.stages import fuse_batch

    rng = np.random.default_rng(8)
    images = [[_random_output(rng, "a", H, W, 4), _random_output(rng, "b", H, W, 4)] for _ in range(3)]
    batch = {"uri": np.array(["u0", "u1", "u2"], dtype=object),
             "error_stage": np.array(["", "", ""], dtype=object), "error_type": np.array(["", "", ""], dtype=object),
             "error_message": np.array(["", "", ""], dtype=object)}
    for name in ("a", "b"):
        batch[f"pred:{name}"] = np.array([next(o for o in outs if o.name == name).instances.to_bytes() for outs in images],
                                         dtype=object)
    batch["pred:b"][1] = b"truncated"
    cfg = EnsembleConfig(method="soft")
    out = fuse_batch(batch, models=[["a", "a@0123456789ab"], ["b", "b@0123456789ab"]], config=cfg.model_dump(mode="json"))
    assert list(out["error_type"][[0, 2]]) == ["", ""] and out["error_stage"][1] == "ensemble" and out["error_type"][1]
    assert out["pred:ensemble"][1] == b"" and out["meta:ensemble"][1] == ""
    for k in (0, 2):
        assert (out["pred:ensemble"][k], out["meta:ensemble"][k]) == encode_fused(fuse_image(images[k], cfg))
    assert (out["cpu_ms:ensemble"][[0, 2]] > 0).all()
