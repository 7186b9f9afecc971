"""Fine-tuning: start a training from another card's weights (``segpipe train --init``)."""

from __future__ import annotations

import torch

from segpipe.modeling.zoo import load_card, load_state


def init_card(ref: str, builder: str):
    """The card ``ref`` (zoo name or card path) -> (card, card path), after checking that it is a
    ``builder`` model (ValueError naming both otherwise; FileNotFoundError when there is none)."""
    card, path = load_card(ref)
    if card.builder != builder:
        raise ValueError(f"init: {ref} is a {card.builder} model; training {builder} cannot start from it")
    return card, path


def load_init(net: torch.nn.Module, ref: str, builder: str) -> dict:
    """Copy into ``net`` every tensor of the card ``ref`` (zoo name or card path; its weights
    verified against the card's sha256) whose name and shape match; the rest keep their fresh
    initialisation. The card must be of ``builder``. -> the record the new card keeps: the init
    card's version and weights sha256, the count of tensors loaded and the names left fresh."""
    card, path = init_card(ref, builder)
    tensors = load_state(card, path)
    own = net.state_dict()
    take = {k: v.to(own[k].dtype) for k, v in tensors.items() if k in own and own[k].shape == v.shape}
    if not take:
        raise ValueError(f"init: no tensor of {ref} matches the network's names and shapes")
    net.load_state_dict(take, strict=False)
    fresh = sorted(k for k in own if k not in take)
    return {"card": card.version(), "weights_sha256": card.weights.sha256, "loaded": len(take), "fresh": fresh,
            "unused": sorted(k for k in tensors if k not in take)}
