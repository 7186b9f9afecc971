"""SpatialEmbeddings and the discriminative loss: losses with known values, clustering on
hand-made embedding maps, forward/backward of tiny untrained networks, the adapter contract."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from segpipe.config import DiscLossParams, SpatialEmbParams
from segpipe.modeling import discloss, spatialemb
from segpipe.modeling.embed_cluster import Cluster, cluster_discriminative, cluster_spatial
from segpipe.modeling.embed_losses import (
    coordinate_map,
    discriminative_loss,
    gaussian_membership,
    lovasz_hinge,
    spatial_embedding_loss,
)
from segpipe.modeling.instance_classifier import InstanceClassifier, grow_boxes, jitter_boxes, make_classifier, tight_boxes
from segpipe.modeling.zoo import load_adapter

from conftest import assert_training_reduces_loss, check_loss_backward, check_nonoverlapping_output, make_embed_card

TINY_NET = {"channels": [4, 8, 8], "full_res_channels": 2, "context_dilations": [2]}


# --- Lovasz hinge ---------------------------------------------------------------------------


def test_lovasz_hinge_is_zero_for_margin_correct_logits():
    labels = torch.tensor([1, 1, 0, 0, 0], dtype=torch.bool)
    logits = torch.tensor([1.0, 3.0, -1.0, -2.0, -5.0])
    assert float(lovasz_hinge(logits, labels)) == 0.0


def test_lovasz_hinge_one_undecided_pixel_costs_one():
    assert float(lovasz_hinge(torch.tensor([0.0]), torch.tensor([True]))) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(5))
def test_lovasz_hinge_on_binary_errors_is_the_jaccard_loss(seed):
    """With logits +-1 every hinge error is 0 or 2; the Lovasz extension is then 2 x the Jaccard
    loss of the thresholded prediction (it is exact on the cube's vertices, and 1-homogeneous)."""
    rng = np.random.default_rng(seed)
    gt = rng.uniform(size=40) < 0.4
    pred = rng.uniform(size=40) < 0.5
    logits = torch.from_numpy(np.where(pred, 1.0, -1.0))
    inter, union = np.sum(gt & pred), np.sum(gt | pred)
    expected = 2.0 * (1.0 - inter / union)
    assert float(lovasz_hinge(logits, torch.from_numpy(gt))) == pytest.approx(expected, abs=1e-9)


def test_lovasz_hinge_brute_force_on_a_small_vector():
    """Against the definition: the Lovasz extension is the expectation, over thresholds, of the
    Jaccard loss of the set of pixels whose error exceeds the threshold."""
    gt = np.array([1, 0, 1, 1, 0, 0], bool)
    logits = np.array([0.3, 0.5, -0.2, 1.4, -1.5, 0.0])
    err = np.maximum(1 - logits * np.where(gt, 1, -1), 0)

    def jaccard_loss(mistakes):
        # Set of pixels predicted wrongly; the prediction is gt XOR mistakes.
        pred = gt ^ mistakes
        return 1 - np.sum(gt & pred) / np.sum(gt | pred)

    levels = np.sort(np.unique(np.concatenate([[0.0], err])))
    expected = sum((hi - lo) * jaccard_loss(err > lo) for lo, hi in zip(levels[:-1], levels[1:]))
    assert float(lovasz_hinge(torch.from_numpy(logits), torch.from_numpy(gt))) == pytest.approx(expected, abs=1e-9)


# --- discriminative loss ----------------------------------------------------------------------


def _two_instances(mu_a, mu_b, spread=0.0):
    """A [2, 4, 8] embedding map: left half instance a at mu_a, right half b at mu_b (+- spread on x)."""
    emb = torch.zeros(2, 4, 8)
    jitter = torch.tensor([spread, -spread]).repeat(8)[:16].view(4, 4)  # zero-mean per half
    for (x0, x1), mu in (((0, 4), mu_a), ((4, 8), mu_b)):
        emb[0, :, x0:x1] = mu[0] + jitter
        emb[1, :, x0:x1] = mu[1]
    masks = torch.zeros(2, 4, 8, dtype=torch.bool)
    masks[0, :, :4] = True
    masks[1, :, 4:] = True
    return emb, masks


def test_discriminative_loss_is_zero_pull_push_for_separated_clusters():
    emb, masks = _two_instances((0.0, 0.0), (4.0, 0.0), spread=0.3)  # spread < delta_v, distance 4 > 2 delta_d
    out = discriminative_loss(emb, masks, delta_v=0.5, delta_d=1.5)
    assert float(out["var"]) == 0.0 and float(out["dist"]) == 0.0
    assert float(out["reg"]) == pytest.approx((0.0 + 4.0) / 2)


def test_discriminative_loss_merged_clusters_are_pushed():
    emb, masks = _two_instances((1.0, 1.0), (1.0, 1.0))
    out = discriminative_loss(emb, masks, delta_v=0.5, delta_d=1.5)
    assert float(out["dist"]) == pytest.approx((2 * 1.5) ** 2, rel=1e-5)  # both ordered pairs at distance 0
    assert float(out["var"]) == 0.0
    emb, masks = _two_instances((0.0, 0.0), (2.0, 0.0))  # 2 < 2 delta_d = 3
    assert float(discriminative_loss(emb, masks, delta_v=0.5, delta_d=1.5)["dist"]) == pytest.approx(1.0)


def test_discriminative_loss_pulls_a_spread_cluster():
    emb, masks = _two_instances((0.0, 0.0), (5.0, 0.0), spread=1.0)  # every pixel 1 from its mean
    out = discriminative_loss(emb, masks, delta_v=0.5, delta_d=1.5)
    assert float(out["var"]) == pytest.approx((1.0 - 0.5) ** 2)
    assert float(out["dist"]) == 0.0


def test_discriminative_loss_does_not_regularise_the_origin():
    emb, masks = _two_instances((0.0, 0.0), (4.0, 0.0), spread=0.3)
    out = discriminative_loss(emb, masks, delta_v=0.5, delta_d=1.5, origin=emb.clone())
    assert float(out["reg"]) == pytest.approx(0.0, abs=1e-6) and float(out["dist"]) == 0.0
    shifted = discriminative_loss(emb + 1.0, masks, delta_v=0.5, delta_d=1.5, origin=torch.ones_like(emb))
    assert float(shifted["reg"]) == pytest.approx(2.0)  # as without origin: |(0, 0)| and |(4, 0)|


def test_semi_convolutional_embeddings_add_pixel_coordinates():
    torch.manual_seed(0)
    p = DiscLossParams.model_validate(TINY_NET | {"coord_scale": 4.0, "embed_dim": 3})
    net = discloss.build_network(params=p, num_classes=1).eval()
    img = [torch.rand(3, 20, 36)]
    with torch.no_grad():
        emb, _ = net.maps(img)
        raw = net.net(net_input(img))
    diff = emb[0] - raw[0, :3]
    np.testing.assert_allclose(diff[:2].numpy(), coordinate_map(32, 48, 4.0).numpy(), atol=1e-6)  # padded to 16s
    assert float(diff[2].abs().max()) == 0.0


def net_input(images):
    from segpipe.modeling.batching import pad_batch

    return pad_batch(images, 16)


def test_discriminative_loss_without_instances_is_zero_and_differentiable():
    emb = torch.randn(3, 5, 5, requires_grad=True)
    out = discriminative_loss(emb, torch.zeros(0, 5, 5, dtype=torch.bool), delta_v=0.5, delta_d=1.5)
    sum(out.values()).backward()
    assert all(float(v.detach()) == 0 for v in out.values()) and emb.grad is not None


# --- spatial embedding loss -------------------------------------------------------------------


def _boxes_scene(h=32, w=48):
    masks = torch.zeros(3, h, w, dtype=torch.bool)
    masks[0, 2:12, 3:15] = True
    masks[1, 2:12, 15:27] = True  # touches instance 0
    masks[2, 18:30, 30:44] = True
    return masks


def _perfect_offsets(masks, scale):
    h, w = masks.shape[1:]
    xy = coordinate_map(h, w, scale)
    off = torch.zeros(2, h, w)
    for m in masks:
        c = xy[:, m].mean(1)
        off[:, m] = c[:, None] - xy[:, m]
    return off


def test_spatial_embedding_loss_perfect_prediction_is_near_zero():
    masks, scale = _boxes_scene(), 32.0
    off = _perfect_offsets(masks, scale)
    sigma = torch.full((2,) + masks.shape[1:], 1.0)  # exp(10): phi < 1e-4 beyond ~0.03 units (1 px)
    labels = torch.tensor([1, 2, 1])
    seed = torch.zeros(2, *masks.shape[1:])
    for m, lab in zip(masks, labels):
        seed[int(lab) - 1][m] = 1.0
    out = spatial_embedding_loss(off, sigma, seed, masks, labels, coord_scale=scale)
    assert float(out["instance"]) < 1e-3 and float(out["var"]) == 0.0 and float(out["seed"]) < 1e-6


def test_spatial_embedding_loss_without_offsets_is_large():
    masks, scale = _boxes_scene(), 32.0
    sigma = torch.full((2,) + masks.shape[1:], 1.0)
    seed = torch.zeros(2, *masks.shape[1:])
    out = spatial_embedding_loss(torch.zeros(2, *masks.shape[1:]), sigma, seed, masks, torch.tensor([1, 1, 2]), coord_scale=scale)
    assert float(out["instance"]) > 0.8  # only pixels at the centre are claimed
    assert float(out["seed"]) > 0  # instance pixels want phi > 0 where the seed says 0


def test_sigma_spread_inside_an_instance_costs_var():
    masks, scale = _boxes_scene(), 32.0
    sigma = torch.zeros(1, *masks.shape[1:])
    sigma[0, :, :9] = 1.0  # splits instance 0 (cols 3..14) into two sigma values
    out = spatial_embedding_loss(_perfect_offsets(masks, scale), sigma, torch.zeros(1, *masks.shape[1:]), masks,
                                 torch.tensor([1, 1, 1]), coord_scale=scale)
    frac = 6 / 12  # columns 3..8 of 3..14 have sigma 1
    assert float(out["var"]) == pytest.approx(frac * (1 - frac) / 3, rel=1e-5)  # variance of one instance, mean over 3


# --- clustering -------------------------------------------------------------------------------


def test_cluster_spatial_recovers_the_instances():
    masks, scale = _boxes_scene(), 32.0
    off = _perfect_offsets(masks, scale)
    sigma = torch.full((2,) + masks.shape[1:], 0.8)
    seed = torch.zeros(2, *masks.shape[1:])
    labels = [1, 2, 2]
    for k, (m, lab) in enumerate(zip(masks, labels)):
        seed[lab - 1][m] = 0.9 - 0.1 * k
    clusters = cluster_spatial(off, sigma, seed, coord_scale=scale, min_pixels=4)
    assert len(clusters) == 3
    for k, c in enumerate(clusters):  # highest seed first
        got = np.zeros(masks.shape[1:], bool)
        got[c.ys, c.xs] = True
        assert np.array_equal(got, masks[k].numpy())
        assert c.label == labels[k] and c.score == pytest.approx(0.9 - 0.1 * k)
        x0, y0, x1, y1 = c.window
        assert c.prob.shape == (y1 - y0, x1 - x0) and c.prob.max() <= 1.0


def test_cluster_spatial_nothing_above_the_seed_threshold():
    masks = _boxes_scene()
    seed = torch.zeros(1, *masks.shape[1:])
    seed[0][masks[0]] = 0.55  # foreground, but below seed_thresh
    assert cluster_spatial(torch.zeros(2, *masks.shape[1:]), torch.zeros(1, *masks.shape[1:]), seed,
                           coord_scale=32.0, seed_thresh=0.6) == []


def test_cluster_discriminative_recovers_instances_and_splits_far_look_alikes():
    h, w = 40, 40
    masks = np.zeros((4, h, w), bool)
    masks[0, 2:12, 2:12] = True
    masks[1, 2:12, 12:20] = True  # touching 0, different embedding
    masks[2, 25:35, 25:38] = True  # far away, same embedding as 0 -> split by connectivity
    masks[3, 28:33, 2:9] = True
    vecs = [(0.0, 0.0, 0.0), (3.5, 0.0, 0.0), (0.0, 0.0, 0.0), (0.0, 3.5, 1.0)]
    rng = np.random.default_rng(0)
    emb = rng.normal(0, 0.1, (3, h, w)).astype(np.float32) + 10.0  # background embedding far away
    probs = np.zeros((3, h, w), np.float32)
    probs[0] = 1.0
    for k, (m, v) in enumerate(zip(masks, vecs)):
        emb[:, m] = np.asarray(v, np.float32)[:, None] + rng.normal(0, 0.1, (3, int(m.sum())))
        cls = 1 + (k % 2)
        probs[:, m] = 0.0
        probs[cls][m] = 0.95
        probs[0][m] = 0.05
    clusters = cluster_discriminative(torch.from_numpy(emb), torch.from_numpy(probs), delta_v=0.5, delta_d=1.5, min_pixels=4)
    got = []
    for c in clusters:
        g = np.zeros((h, w), bool)
        g[c.ys, c.xs] = True
        got.append((g, c.label))
    assert len(got) == 4
    for k, m in enumerate(masks):
        match = [lab for g, lab in got if np.array_equal(g, m)]
        assert match == [1 + (k % 2)], k
    assert all(0.5 < c.score <= 1.0 for c in clusters)
    # Without the component split the far look-alikes 0 and 2 stay one instance (their union).
    joined = cluster_discriminative(torch.from_numpy(emb), torch.from_numpy(probs), delta_v=0.5, delta_d=1.5, min_pixels=4,
                                    split_components=False)
    assert len(joined) == 3
    union = [c for c in joined if len(c.ys) == int((masks[0] | masks[2]).sum())]
    assert len(union) == 1
    g = np.zeros((h, w), bool)
    g[union[0].ys, union[0].xs] = True
    assert np.array_equal(g, masks[0] | masks[2])


# --- tiny networks ------------------------------------------------------------------------------


def _targets():
    rng = np.random.default_rng(1)
    images, targets = [], []
    for b in range(2):
        masks = _boxes_scene(40, 56).numpy().astype(np.uint8)
        images.append(torch.from_numpy(rng.uniform(size=(3, 40, 56)).astype(np.float32)))
        targets.append({"masks": torch.from_numpy(masks), "labels": torch.tensor([1, 2, 1])})
    targets[1] = {"masks": torch.zeros(0, 40, 56, dtype=torch.uint8), "labels": torch.zeros(0, dtype=torch.int64)}
    return images, targets


NETS = {
    "spatialemb": (spatialemb.build_network, SpatialEmbParams, {"loss_instance", "loss_var", "loss_seed"}),
    "discloss": (discloss.build_network, DiscLossParams, {"loss_var", "loss_dist", "loss_reg", "loss_semantic"}),
}
SEMI = {"discloss": {"coord_scale": 8.0}}  # forward/backward also with semi-convolutional embeddings
INST = {"classify": "instances", "class_crop": 8, "class_channels": [4, 8]}  # class-agnostic maps + instance classifier
VARIANTS = [(m, None) for m in NETS] + list(SEMI.items()) + [(m, INST) for m in NETS]


def _tiny_train_net(method, extra=None):
    build, P, _ = NETS[method]
    torch.manual_seed(0)
    return build(params=P.model_validate(TINY_NET | (extra or {})), num_classes=2).train()


@pytest.mark.parametrize("method, extra", VARIANTS)
def test_tiny_network_forward_backward(method, extra):
    keys = NETS[method][2] | ({"loss_class"} if extra == INST else set())
    net = _tiny_train_net(method, extra)
    images, targets = _targets()
    grads = check_loss_backward(net, images, targets, keys)
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    with pytest.raises(ValueError, match="targets"):
        net(images)


@pytest.mark.parametrize("method, extra", VARIANTS)
def test_a_few_steps_reduce_the_loss(method, extra):
    assert_training_reduces_loss(_tiny_train_net(method, extra), *_targets())


@pytest.mark.parametrize("method, extra", [(m, None) for m in NETS] + [(m, INST) for m in NETS])
def test_adapter_contract_on_untrained_weights(tmp_path, method, extra):
    cats = [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]
    adapter, card = load_adapter(str(make_embed_card(tmp_path / method, method, categories=cats, params=extra)))
    assert (adapter.network.classifier is not None) == (extra == INST)
    assert card.builder == method and adapter.network.training is False
    # Lower the thresholds so an untrained net yields clusters to check the contract on.
    p = adapter.network.params
    upd = {"fg_thresh": 0.01, "min_pixels": 2} | ({"seed_thresh": 0.01} if method == "spatialemb" else {})
    adapter.network.params = p.model_copy(update=upd)
    check_nonoverlapping_output(adapter, {3, 7}, min_area=2)


def test_discloss_score_threshold_filters(tmp_path):
    adapter, _ = load_adapter(str(make_embed_card(tmp_path / "d", "discloss", categories=[{"id": 1, "name": "x"}])))
    # Tiny margins split an untrained net's embeddings into many clusters.
    adapter.network.params = adapter.network.params.model_copy(
        update={"fg_thresh": 0.01, "min_pixels": 2, "delta_v": 0.002, "delta_d": 0.005})
    img = [np.random.default_rng(2).integers(0, 255, (40, 40, 3), dtype=np.uint8)]
    scores = adapter.predict(img)[0].scores
    assert len(scores) > 1
    cut = float(np.median(scores))
    adapter.set_score_threshold(cut)
    assert np.all(adapter.predict(img)[0].scores >= cut)


def test_gaussian_membership_single_sigma_is_isotropic():
    emb = torch.tensor([[0.0, 0.1, 0.0], [0.0, 0.0, 0.1]])  # points (0,0), (0.1,0), (0,0.1)
    phi = gaussian_membership(emb, torch.zeros(2), torch.tensor([0.5]))
    assert float(phi[0]) == 1.0 and float(phi[1]) == pytest.approx(float(phi[2]))
    assert float(phi[1]) == pytest.approx(np.exp(-0.01 * np.exp(5.0)), rel=1e-5)


@pytest.mark.parametrize("a, b", list(itertools.combinations([0.3, 0.5], 2)))
def test_params_reject_delta_d_not_above_delta_v(a, b):
    with pytest.raises(ValueError, match="delta_d"):
        DiscLossParams(delta_v=b, delta_d=a)


# --- instance classifier (classify: instances) --------------------------------------------------


def test_grow_and_jitter_boxes():
    b = torch.tensor([[10.0, 10.0, 30.0, 20.0]])
    assert torch.allclose(grow_boxes(b, 0.15), torch.tensor([[7.0, 8.5, 33.0, 21.5]]))
    torch.manual_seed(0)
    d = (jitter_boxes(b.repeat(500, 1), 0.1) - b).abs()
    assert float(d[:, [0, 2]].max()) <= 2.0 + 1e-5 and float(d[:, [1, 3]].max()) <= 1.0 + 1e-5  # 0.1 x side
    assert float(d[:, [0, 2]].max()) > 1.8 and float(d[:, [1, 3]].mean()) > 0.3  # and they really move


def test_tight_boxes_are_half_open():
    m = torch.zeros((2, 8, 9), dtype=torch.bool)
    m[0, 2:5, 3:7] = True
    m[1, 0, 8] = True
    assert tight_boxes(m).tolist() == [[3.0, 2.0, 7.0, 5.0], [8.0, 0.0, 9.0, 1.0]]


def _cluster_of(mask: np.ndarray) -> Cluster:
    ys, xs = np.nonzero(mask)
    return Cluster(ys=ys, xs=xs, score=0.8, label=1, window=(0, 0, mask.shape[1], mask.shape[0]),
                   prob=mask.astype(np.float32))


@pytest.mark.parametrize("where", ["inside", "at the corner"])
def test_cluster_crops_equal_the_training_crops(where):
    """Inference builds each mask in a small local frame; training samples full-image masks:
    both must give the classifier the same input."""
    torch.manual_seed(0)
    clf = InstanceClassifier(3, crop=16, channels=[4]).eval()
    image = torch.randn(3, 30, 40)
    m = np.zeros((30, 40), bool)
    if where == "inside":
        m[5:17, 8:30] = True
        m[10:12, 8:20] = False  # a notch
    else:
        m[0:9, 31:40] = True
    got = clf.cluster_crops(image, [_cluster_of(m)])
    full = torch.from_numpy(m)[None]
    want = clf.crops(image, full, tight_boxes(full))
    assert got.shape == (1, 4, 16, 16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    if where == "inside":  # mask channel: +2 on the object, -2 in the margin around it
        assert float(got[0, 3, 3, 12]) > 1.9 and float(got[0, 3, 0, 0]) < -1.9 and float(got[0, 3, 8, 4]) < 0


def _outline_batch(rng: np.random.Generator, n: int, size: int = 40):
    """Images with one textured filled square (class 1) or plus sign (class 2) each; the outline
    alone tells the class -> (normalised images [n, 3, size, size], targets)."""
    images, targets = torch.randn(n, 3, size, size), []
    for i in range(n):
        label = int(rng.integers(1, 3))
        r = int(rng.integers(6, 12))
        cy, cx = (int(v) for v in rng.integers(r, size - r, 2))
        m = torch.zeros((size, size), dtype=torch.bool)
        if label == 1:
            m[cy - r : cy + r, cx - r : cx + r] = True
        else:
            a = max(r // 3, 1)
            m[cy - r : cy + r, cx - a : cx + a] = True
            m[cy - a : cy + a, cx - r : cx + r] = True
        images[i][:, m] = torch.randn(3, 1) + 0.3 * torch.randn(3, int(m.sum()))
        targets.append({"masks": m[None], "labels": torch.tensor([label])})
    return images, targets


def test_instance_classifier_learns_classes_from_outlines():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    clf = InstanceClassifier(2, crop=16, channels=[8, 16])
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    for _ in range(60):
        images, targets = _outline_batch(rng, 16)
        loss = clf.batch_loss(images, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    images, targets = _outline_batch(np.random.default_rng(99), 40)
    right = 0
    for img, t in zip(images, targets):
        [c] = clf.classify(img, [_cluster_of(t["masks"][0].numpy())])
        right += int(c.label == int(t["labels"][0]))
        assert 0.0 < c.score <= 0.8  # cluster score x class probability
    assert right >= 36, right  # 90% on unseen images (chance: 50%)


def test_instance_classifier_loss_without_instances_is_zero():
    clf = InstanceClassifier(2, crop=8, channels=[4])
    empty = {"masks": torch.zeros((0, 16, 16), dtype=torch.uint8), "labels": torch.zeros(0, dtype=torch.int64)}
    loss = clf.batch_loss(torch.randn(1, 3, 16, 16), [empty])
    assert float(loss) == 0.0 and loss.requires_grad


def test_single_class_models_need_no_classifier():
    """One class: the maps name it, so the nuclei zoo weights (no classifier) stay loadable."""
    p = SpatialEmbParams.model_validate(TINY_NET | INST)
    assert make_classifier(p, 1) is None and make_classifier(p, 2) is not None
    net = spatialemb.build_network(params=p, num_classes=1)
    assert net.classifier is None and not any(k.startswith("classifier") for k in net.state_dict())
    assert net.n_seed == 1 and spatialemb.build_network(params=p, num_classes=3).n_seed == 1
    assert spatialemb.build_network(params=SpatialEmbParams.model_validate(TINY_NET), num_classes=3).n_seed == 3
