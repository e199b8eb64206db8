"""normlog: per-layer values, L2 norms and histograms of weights and gradients, for TensorBoard.

Rules: `import normlog` imports numpy and nothing heavier; torch, TensorFlow, Keras, JAX,
tensorboardX and matplotlib load only when a Writer or an adapter needs them. The core
(`l2_norm`, `summarize`, `histogram`) is the reference every adapter must agree with.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from normlog._core import Histogram, Stats, histogram, l2_norm, summarize
from normlog.writer import Writer

if TYPE_CHECKING:
    from torch import nn

    from normlog.torch import Watcher

__all__ = ["Histogram", "Stats", "Writer", "histogram", "l2_norm", "summarize", "unwatch", "watch"]


def watch(model: nn.Module, logdir: str | None = None, **options: Any) -> Watcher:
    """Log a PyTorch model's gradient and weight norms and histograms: see `normlog.torch.watch`."""
    from normlog.torch import watch as watch_torch  # imports torch only now

    return watch_torch(model, logdir, **options)


def __getattr__(name: str) -> Any:
    # `normlog.keras` loads Keras (and TensorFlow on its default backend), so it is imported
    # on first use only; `normlog.jax` likewise, though it imports jax only when watching.
    if name in ("keras", "jax"):
        import importlib

        return importlib.import_module(f"normlog.{name}")
    raise AttributeError(f"module 'normlog' has no attribute {name!r}")


def unwatch(model: nn.Module) -> None:
    """Remove the hooks `normlog.watch` installed on `model`."""
    if "normlog.torch" in sys.modules:  # never watched: nothing to remove, and no torch import
        from normlog.torch import unwatch as unwatch_torch

        unwatch_torch(model)


__version__ = "0.1.0"
