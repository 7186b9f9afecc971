"""A learned ensemble confidence: each fused instance's mask IoU with the truth, predicted from
what the ensemble knows about it (in the spirit of Mask Scoring R-CNN, Huang et al., CVPR 2019,
which ranks a detector's masks by their predicted IoU; here the evidence is the ensemble's).

Features of a fused instance (``ensemble_features``; models in the scorer's order): per model,
its member's score, its member's mask IoU with the fused mask and whether it is a member (0, 0,
0 when absent); then the share of the models that voted, the agreement (mean pairwise member
IoU; 0 for a lone member), log(1 + mask area in pixels) and the members' mean spread. An MLP
(``ScorerNet``: standardise, two ReLU layers, sigmoid) maps them to the IoU. Trained by
``segpipe train scorer --priors RUN`` on a run's fused instances over the training images
against the truth (target: the best IoU with a ground-truth instance, 0 for none).

With ``ensemble.scorer`` set, a fused instance's ``confidence`` is its predicted IoU (instead
of score x agreement), and ``rank: confidence`` ranks by it. Inference is plain numpy on the
weights (``ScorerWeights``), so a pipeline task needs no torch module and no global state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from torch import nn

from segpipe.config import ModelCard, ScorerParams
from segpipe.ensemble.fuse import Fused
from segpipe.modeling.base import NetworkHolder
from segpipe.modeling.registry import register
from segpipe.ops import masks as mask_ops


def n_features(n_models: int) -> int:
    return 3 * n_models + 4


def ensemble_features(fused: Fused, models: Sequence[str]) -> np.ndarray:
    """One image's fused instances -> float32 [N, 3 M + 4] (the module docstring's order)."""
    n, m = len(fused.instances), len(models)
    x = np.zeros((n, n_features(m)), np.float32)
    if n == 0:
        return x
    col = {name: k for k, name in enumerate(models)}
    for i, members in enumerate(fused.members):
        for mem in members:
            k = col.get(mem.model)
            if k is not None:
                x[i, k], x[i, m + k], x[i, 2 * m + k] = mem.score, mem.iou, 1.0
    x[:, 3 * m] = fused.n_votes / m
    x[:, 3 * m + 1] = [a if a is not None else 0.0 for a in fused.agreement]
    x[:, 3 * m + 2] = np.log1p(mask_ops.area(fused.instances.masks))
    if fused.spread is not None:
        x[:, 3 * m + 3] = fused.spread.reshape(n, -1).astype(np.float32).mean(1)
    return x


class ScorerNet(nn.Module):
    """Features [N, F] -> IoU logits [N]: standardised by the training set's ``mean`` and
    ``std`` (buffers), two ReLU layers of ``hidden``."""

    def __init__(self, params: ScorerParams) -> None:
        super().__init__()
        f = n_features(len(params.models))
        self.params = params
        self.register_buffer("mean", torch.zeros(f))
        self.register_buffer("std", torch.ones(f))
        self.mlp = nn.Sequential(nn.Linear(f, params.hidden), nn.ReLU(), nn.Linear(params.hidden, params.hidden), nn.ReLU(),
                                 nn.Linear(params.hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp((x - self.mean) / self.std)[:, 0]


@dataclass(frozen=True)
class ScorerWeights:
    """A trained scorer as numpy arrays (plain data: passes to pipeline tasks as an argument):
    ``models`` in feature order, ``version`` (provenance), ``arrays`` by state-dict name."""

    models: list[str]
    version: str
    arrays: dict[str, np.ndarray]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Features [N, F] -> predicted mask IoU [N] in (0, 1), float32."""
        a = self.arrays
        h = (x.astype(np.float32) - a["mean"]) / a["std"]
        for k in (0, 2):
            h = np.maximum(h @ a[f"mlp.{k}.weight"].T + a[f"mlp.{k}.bias"], 0.0)
        z = h @ a["mlp.4.weight"].T + a["mlp.4.bias"]
        return (1.0 / (1.0 + np.exp(-z[:, 0]))).astype(np.float32)


def rescore(fused: Fused, scorer: ScorerWeights, rank: str) -> Fused:
    """``fused`` with each instance's confidence its predicted mask IoU; with ``rank``
    "confidence" also its score, re-sorted by it (descending, ties in the old order)."""
    if len(fused.instances) == 0:
        return fused
    conf = scorer.predict(ensemble_features(fused, scorer.models))
    out = replace(fused, confidence=conf)
    if rank != "confidence":
        return out
    order = np.argsort(-conf, kind="stable")
    inst = replace(fused.instances.select(order), scores=conf[order].astype(np.float32))
    return Fused(instances=inst, members=[fused.members[i] for i in order], n_votes=fused.n_votes[order],
                 agreement=[fused.agreement[i] for i in order], confidence=conf[order],
                 spread=None if fused.spread is None else fused.spread[order])


class Scorer(NetworkHolder):
    """Holds a ``ScorerNet`` (the zoo's view of a scorer card); ``weights()`` for inference."""

    def __init__(self, network: ScorerNet, name: str = "scorer", version: str = "") -> None:
        self.network, self.name, self.version = network, name, version
        self.device = torch.device("cpu")

    def weights(self) -> ScorerWeights:
        arrays = {k: v.detach().cpu().float().numpy() for k, v in self.network.state_dict().items()}
        return ScorerWeights(models=list(self.network.params.models), version=self.version, arrays=arrays)


@register("scorer")
def build(card: ModelCard) -> Scorer:
    return Scorer(ScorerNet(ScorerParams.model_validate(card.params)), card.name, card.version())


def load_scorer(ref: str) -> ScorerWeights:
    """A zoo scorer card (name or path) -> its verified weights; ValueError if the card is no scorer."""
    from segpipe.modeling.zoo import load_adapter, load_card

    card, _ = load_card(ref)
    if card.builder != "scorer":
        raise ValueError(f"{ref} is a {card.builder} card, not an ensemble scorer")
    adapter, _ = load_adapter(ref)
    return adapter.weights()
