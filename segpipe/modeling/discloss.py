"""Instance segmentation with the discriminative loss (De Brabandere, Neven, Van Gool, 2017).

The shared U-Net (``embednet``) predicts a ``embed_dim``-dimensional embedding per pixel and a
semantic map (background + classes). With ``coord_scale`` set, the pixel's coordinates are added
to the first two embedding dimensions (semi-convolutional embeddings, Novotny, Albanie, Larlus,
Vedaldi, ECCV 2018): a translation-invariant network cannot give look-alike nuclei different
embeddings, and with the coordinate term it only has to learn offsets. Training: pull / push / regularisation on the embeddings
of each instance (``embed_losses.discriminative_loss``) plus pixel cross-entropy on the
semantic map. Inference: ``embed_cluster.cluster_discriminative`` (mean-shift to a mode, then
the paper's threshold at ``delta_d``, then optionally connected components) on the foreground
pixels. With ``classify: instances`` the semantic map is background / foreground only and
``instance_classifier.InstanceClassifier`` names each instance (score x class probability).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segpipe.config import DiscLossParams, ModelCard
from segpipe.modeling.embed_cluster import cluster_discriminative
from segpipe.modeling.embed_losses import coordinate_map, discriminative_loss
from segpipe.modeling.batching import pad_batch
from segpipe.modeling.embednet import ClusterAdapter, EmbedUNet, pad_masks
from segpipe.modeling.instance_classifier import make_classifier
from segpipe.modeling.registry import register


class DiscLossNet(nn.Module):
    """``forward(images, targets=None)`` as ``SpatialEmbNet``: a loss dict in training mode,
    per image a list of ``Cluster`` in eval mode."""

    def __init__(self, params: DiscLossParams, num_classes: int) -> None:
        super().__init__()
        self.params = params
        self.num_classes = num_classes
        self.classifier = make_classifier(params, num_classes)
        self.net = EmbedUNet(params, params.embed_dim + (1 if self.classifier is not None else num_classes) + 1)

    def origin(self, height: int, width: int, device=None) -> torch.Tensor | None:
        """The fixed part of the embedding, [D, H, W]: (x, y) / coord_scale in the first two
        dimensions (pixel centres), zero elsewhere; None without ``coord_scale``."""
        if self.params.coord_scale is None:
            return None
        o = torch.zeros((self.params.embed_dim, height, width), device=device)
        o[:2] = coordinate_map(height, width, self.params.coord_scale, device)[: min(2, self.params.embed_dim)]
        return o

    def maps(self, images: Sequence[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (a list, or a batch already through ``pad_batch``) -> embeddings [B, D, Hp, Wp]
        (``origin`` added), semantic logits [B, C + 1, Hp, Wp] (channel 0 = background; C = 1,
        class-agnostic, with the instance classifier)."""
        x = images if isinstance(images, torch.Tensor) else pad_batch(images, self.net.multiple)
        raw = self.net(x)
        d = self.params.embed_dim
        emb = raw[:, :d]
        origin = self.origin(emb.shape[2], emb.shape[3], emb.device)
        return (emb if origin is None else emb + origin), raw[:, d:]

    def forward(self, images: Sequence[torch.Tensor], targets: Sequence[dict] | None = None):
        x = pad_batch(images, self.net.multiple)
        emb, sem = self.maps(x)
        p = self.params
        if self.training:
            if targets is None:
                raise ValueError("training mode needs targets")
            hp, wp = emb.shape[-2:]
            origin = self.origin(hp, wp, emb.device)
            sem_t = torch.zeros((len(targets), hp, wp), dtype=torch.int64, device=emb.device)
            parts = []
            for b, t in enumerate(targets):
                masks = pad_masks(t["masks"].to(emb.device), hp, wp)
                for k in range(masks.shape[0]):
                    sem_t[b][masks[k]] = int(t["labels"][k]) if self.classifier is None else 1
                parts.append(discriminative_loss(emb[b], masks, delta_v=p.delta_v, delta_d=p.delta_d, origin=origin))
            mean = {k: torch.stack([q[k] for q in parts]).mean() for k in parts[0]}
            losses = {"loss_var": p.w_var * mean["var"], "loss_dist": p.w_dist * mean["dist"],
                      "loss_reg": p.w_reg * mean["reg"], "loss_semantic": p.w_semantic * F.cross_entropy(sem, sem_t)}
            if self.classifier is not None:
                losses["loss_class"] = p.w_class * self.classifier.batch_loss(x, targets)
            return losses
        probs = torch.softmax(sem, 1)
        out = []
        for b, im in enumerate(images):
            h, w = int(im.shape[1]), int(im.shape[2])
            out.append(cluster_discriminative(emb[b, :, :h, :w], probs[b, :, :h, :w], delta_v=p.delta_v, delta_d=p.delta_d,
                                              fg_thresh=p.fg_thresh, bandwidth=p.bandwidth, radius=p.radius, shift_iters=p.shift_iters,
                                              split_components=p.split_components,
                                              min_pixels=p.min_pixels, max_instances=p.max_instances))
        if self.classifier is not None:
            out = [self.classifier.classify(x[b], clusters) for b, clusters in enumerate(out)]
        return out


def build_network(*, params: DiscLossParams, num_classes: int) -> DiscLossNet:
    """An untrained discriminative-loss network; ``num_classes`` excludes the background."""
    return DiscLossNet(params, num_classes)


class DiscLossAdapter(ClusterAdapter):
    """Instances from the discriminative-loss network. ``mask_probs`` samples foreground
    probability x embedding membership (see ``cluster_discriminative``) into each box frame.
    The score threshold drops instances after clustering."""

    params_cls = DiscLossParams
    build_network = staticmethod(build_network)


@register("discloss")
def build(card: ModelCard) -> DiscLossAdapter:
    return DiscLossAdapter.from_card(card)
