"""A plain dict registry of model builders, filled by the ``register`` decorator.

A builder is ``build(card: ModelCard) -> ModelAdapter`` with untrained weights; the zoo loads the
weights afterwards. Method modules register themselves when ``segpipe.modeling.builtin`` imports them.
"""

from __future__ import annotations

from typing import Callable

BUILDERS: dict[str, Callable] = {}


def register(name: str) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        if name in BUILDERS and BUILDERS[name] is not fn:
            raise KeyError(f"builder {name!r} registered twice")
        BUILDERS[name] = fn
        return fn

    return deco


def get_builder(name: str) -> Callable:
    from segpipe.modeling import builtin  # noqa: F401  (registers the built-in methods)

    try:
        return BUILDERS[name]
    except KeyError:
        raise KeyError(f"unknown builder {name!r}; known: {sorted(BUILDERS)}") from None
