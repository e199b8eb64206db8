"""JAX adapter: `normlog.jax.watch(optax.adamw(1e-3), "runs/x")` is an optax gradient
transformation that logs the gradients, weights and updates of every step.

Rules: only this package (and `normlog.keras._jax`, Keras on the JAX backend) imports jax;
optax is imported only by `watch` (`_optax`), so the Keras adapter can use `_stats` and
`_emit` without it. The statistics are computed inside the traced step (`_stats`, the core's
rules in jax.numpy) and written through `normlog._step` (`_emit`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from normlog.jax._optax import WatchedTransformation

__all__ = ["watch"]


def watch(inner: Any, logdir: str | None = None, **options: Any) -> WatchedTransformation:
    """Wrap an optax transformation so that each update logs its statistics: see
    `normlog.jax._optax.watch` for the options.

    Example:
        >>> tx = normlog.jax.watch(optax.adamw(1e-3), "runs/mlp")  # doctest: +SKIP
    """
    from normlog.jax._optax import watch as watch_optax  # imports optax only now

    return watch_optax(inner, logdir, **options)
