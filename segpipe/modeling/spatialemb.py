"""SpatialEmbeddings (Neven, De Brabandere, Proesmans, Van Gool, CVPR 2019).

Every pixel predicts an offset to its instance's centre (embedding e = pixel coordinate +
offset), a clustering bandwidth sigma, and a seediness per class. Training: the Lovasz hinge
of each instance's Gaussian membership map phi_k(e) against its mask, a smoothness term that
pulls sigma to its instance mean, and seediness regressed to phi_k on instance pixels (0 on
background). Inference: ``embed_cluster.cluster_spatial`` grows instances from the most
confident seeds with their own learned bandwidths; scores are the seed values.

Differences from the paper, all for CPU budgets: one shared U-Net decoder with 1x1 heads (the
paper uses a two-decoder ERFNet), and coordinates measured in units of ``coord_scale`` pixels.
With ``classify: instances`` the seediness map is class-agnostic (one channel) and
``instance_classifier.InstanceClassifier`` names each instance from its crop and mask; the
score is then the seed value x the class probability.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from segpipe.config import ModelCard, SpatialEmbParams
from segpipe.modeling.embed_cluster import cluster_spatial
from segpipe.modeling.embed_losses import spatial_embedding_loss
from segpipe.modeling.batching import pad_batch
from segpipe.modeling.embednet import ClusterAdapter, EmbedUNet, pad_masks
from segpipe.modeling.instance_classifier import make_classifier
from segpipe.modeling.registry import register

SIGMA_INIT = 0.5  # exp(10 * 0.5) = 148: membership 0.5 at ~0.068 units (~9 px at 128 px/unit)


class SpatialEmbNet(nn.Module):
    """``forward(images, targets=None)``: images a list of float [3, H, W] in [0, 1]. Training
    mode with targets (``masks`` uint8 [N, H, W], ``labels`` int64 [N], 1-based) returns the loss
    dict; eval mode returns per image a list of ``Cluster``."""

    def __init__(self, params: SpatialEmbParams, num_classes: int) -> None:
        super().__init__()
        self.params = params
        self.num_classes = num_classes
        self.classifier = make_classifier(params, num_classes)
        self.n_seed = 1 if self.classifier is not None else num_classes
        self.net = EmbedUNet(params, 2 + params.n_sigma + self.n_seed)
        with torch.no_grad():
            head = self.net.head
            head.weight[: 2 + params.n_sigma].zero_()
            head.bias[:2].zero_()
            head.bias[2 : 2 + params.n_sigma].fill_(SIGMA_INIT)

    def maps(self, images: Sequence[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images (a list, or a batch already through ``pad_batch``) -> offsets [B, 2, Hp, Wp]
        (tanh), sigma raw [B, n_sigma, Hp, Wp], seed [B, n_seed, Hp, Wp] (sigmoid; one channel
        per class, or one class-agnostic channel with the instance classifier)."""
        x = images if isinstance(images, torch.Tensor) else pad_batch(images, self.net.multiple)
        raw = self.net(x)
        ns = self.params.n_sigma
        return torch.tanh(raw[:, :2]), raw[:, 2 : 2 + ns], torch.sigmoid(raw[:, 2 + ns :])

    def forward(self, images: Sequence[torch.Tensor], targets: Sequence[dict] | None = None):
        x = pad_batch(images, self.net.multiple)
        offsets, sigma, seed = self.maps(x)
        p = self.params
        if self.training:
            if targets is None:
                raise ValueError("training mode needs targets")
            hp, wp = offsets.shape[-2:]
            parts = []
            for b, t in enumerate(targets):
                masks = pad_masks(t["masks"].to(offsets.device), hp, wp)
                labels = t["labels"] if self.classifier is None else torch.ones_like(t["labels"])
                parts.append(spatial_embedding_loss(offsets[b], sigma[b], seed[b], masks, labels,
                                                    coord_scale=p.coord_scale, fg_weight=p.fg_weight))
            mean = {k: torch.stack([q[k] for q in parts]).mean() for k in parts[0]}
            losses = {"loss_instance": p.w_instance * mean["instance"], "loss_var": p.w_var * mean["var"],
                      "loss_seed": p.w_seed * mean["seed"]}
            if self.classifier is not None:
                losses["loss_class"] = p.w_class * self.classifier.batch_loss(x, targets)
            return losses
        out = []
        for b, im in enumerate(images):
            h, w = int(im.shape[1]), int(im.shape[2])
            out.append(cluster_spatial(offsets[b, :, :h, :w], sigma[b, :, :h, :w], seed[b, :, :h, :w],
                                       coord_scale=p.coord_scale, fg_thresh=p.fg_thresh, seed_thresh=p.seed_thresh,
                                       min_pixels=p.min_pixels, max_instances=p.max_instances))
        if self.classifier is not None:
            out = [self.classifier.classify(x[b], clusters) for b, clusters in enumerate(out)]
        return out


def build_network(*, params: SpatialEmbParams, num_classes: int) -> SpatialEmbNet:
    """An untrained SpatialEmbeddings network; ``num_classes`` excludes the background."""
    return SpatialEmbNet(params, num_classes)


class SpatialEmbAdapter(ClusterAdapter):
    """Instances from SpatialEmbeddings. ``mask_probs`` samples each instance's Gaussian
    membership phi (zero off the foreground) into its box frame. The score threshold is the
    seed threshold: no instance grows from a seed below it."""

    params_cls = SpatialEmbParams
    build_network = staticmethod(build_network)

    def set_score_threshold(self, value: float) -> None:
        super().set_score_threshold(value)
        self.network.params = self.network.params.model_copy(update={"seed_thresh": float(value)})


@register("spatialemb")
def build(card: ModelCard) -> SpatialEmbAdapter:
    return SpatialEmbAdapter.from_card(card)
