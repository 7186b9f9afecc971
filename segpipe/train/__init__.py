"""Training loops that produce zoo entries (weights + card)."""
