"""The model zoo: find cards, verify weights, compute versions, build loaded adapters."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from segpipe.config import ModelCard
from segpipe.modeling.base import ModelAdapter
from segpipe.modeling.registry import get_builder

DEFAULT_ZOO = Path(__file__).resolve().parents[2] / "models"


class WeightsError(RuntimeError):
    """Weights missing, or their digest differs from the card's."""


def card_path(ref: str, zoo: Path = DEFAULT_ZOO) -> Path:
    """A zoo name (``models/<name>/card.yaml``) or a path to a card file -> the card's path."""
    p = Path(ref)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise FileNotFoundError(f"model card {ref!r} not found")
        return p
    p = zoo / ref / "card.yaml"
    if not p.is_file():
        known = ", ".join(list_cards(zoo)) or "none"
        raise FileNotFoundError(f"no zoo model {ref!r} (looked for {p}); known: {known}")
    return p


def list_cards(zoo: Path = DEFAULT_ZOO) -> list[str]:
    return sorted(p.parent.name for p in zoo.glob("*/card.yaml"))


def load_card(ref: str, zoo: Path = DEFAULT_ZOO) -> tuple[ModelCard, Path]:
    path = card_path(ref, zoo)
    return ModelCard.from_yaml(path), path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_path(card: ModelCard, card_file: Path) -> Path:
    p = Path(card.weights.file)
    return p if p.is_absolute() else card_file.parent / p


def verified_weights(card: ModelCard, card_file: Path) -> Path:
    """The card's weights file, after checking that its sha256 is the card's. Raises WeightsError
    naming the file and both digests on a mismatch, or when the file is missing."""
    wpath = weights_path(card, card_file)
    if not wpath.is_file():
        raise WeightsError(f"{card.name}: weights file {wpath} is missing")
    digest = sha256_file(wpath)
    if digest != card.weights.sha256:
        raise WeightsError(f"{card.name}: weights file {wpath} has sha256 {digest}, which does not match its card "
                           f"{card_file}: {card.weights.sha256}; refusing to load")
    return wpath


def load_adapter(ref: str, *, device: str = "cpu", zoo: Path = DEFAULT_ZOO) -> tuple[ModelAdapter, ModelCard]:
    """Build the card's network, load its verified weights (safetensors only: never unpickled),
    move to ``device``, eval mode."""
    card, path = load_card(ref, zoo)
    state = load_state(card, path)
    adapter = get_builder(card.builder)(card)
    adapter.network.load_state_dict(state, strict=True)
    return adapter.to(device).eval(), card


def load_state(card: ModelCard, card_file: Path) -> dict[str, torch.Tensor]:
    """The card's verified weights as a state dict, floating tensors as float32 (safetensors
    only: never unpickled). Raises WeightsError on a digest mismatch or a non-safetensors file."""
    wpath = verified_weights(card, card_file)
    try:
        tensors = load_file(str(wpath))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise WeightsError(f"{card.name}: weights file {wpath} is not a safetensors file ({type(e).__name__}: {e})") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def save_weights(network: torch.nn.Module, path: str | Path, dtype: torch.dtype = torch.float16) -> str:
    """Write a state dict as safetensors (floating tensors cast to ``dtype``); returns its sha256."""
    state = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu() for k, v in network.state_dict().items()}
    save_file(state, str(path))
    return sha256_file(path)
