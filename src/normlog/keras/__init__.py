"""Keras adapter: `normlog.keras.watch(model)` is a callback that logs the gradients each training
step used.

Rules: only this package imports Keras or TensorFlow, and each backend's framework only in
that backend's module: this file imports Keras alone, checks what it was given (a Keras model
or optimizer) and the options before any file is made, and picks the module for Keras'
backend, each with one `make_watcher` signature: `_callback` (TensorFlow: wraps the
optimizers and writes each logged step through `normlog._step`, with `_graph` computing the
statistics inside the traced step by the core's rules), `_jax` (JAX, through `normlog.jax`'s
statistics) and `_torch` (torch, through `normlog.torch.watch`). `_variables` holds what every
backend reads alike: optimizers, variable names and step counts.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Literal

import keras

from normlog._step import HISTOGRAMS_AFTER_FINDING
from normlog.health import Thresholds

if TYPE_CHECKING:
    from normlog.keras._callback import Watcher
    from normlog.writer import Writer

__all__ = ["Watcher", "unwatch", "watch"]

# model or optimizer -> its Watcher, weak on both sides so that watching never keeps a model
# alive: a watcher holds its model (Keras' `set_model`), so a strong value would keep its own
# weak key alive forever.
_WATCHERS: weakref.WeakKeyDictionary[Any, weakref.ref[Any]] = weakref.WeakKeyDictionary()


def _watchers() -> list[tuple[Any, Any]]:
    """The (model, watcher) pairs whose watcher is still alive."""
    return [(model, watcher) for model, ref in list(_WATCHERS.items()) if (watcher := ref()) is not None]


def __getattr__(name: str) -> Any:
    if name == "Watcher":  # the class lives with TensorFlow: imported when asked for
        from normlog.keras._callback import Watcher

        return Watcher
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_target(target: Any) -> None:
    if not isinstance(target, (keras.Model, keras.optimizers.Optimizer)):
        kind = f"{type(target).__module__}.{type(target).__qualname__}"
        hint = ""
        if isinstance(target, keras.layers.Layer):
            hint = " A Layer: watch the keras.Model that trains it."
        elif kind.startswith("torch."):
            hint = " A PyTorch module: use normlog.watch(module)."
        raise TypeError(f"normlog.keras.watch needs a keras.Model or a keras.optimizers.Optimizer, got {kind}.{hint}")


# Keras' backend -> the module that watches under it (each has `make_watcher`, one signature)
_BACKENDS = {
    "tensorflow": "normlog.keras._callback",
    "jax": "normlog.keras._jax",
    "torch": "normlog.keras._torch",
}


def _backend_module() -> Any:
    """The module that watches `model` under this process's Keras backend; a clear error for
    a backend normlog does not support (before any file is made)."""
    import importlib

    backend = keras.backend.backend()
    if backend not in _BACKENDS:
        raise RuntimeError(
            f"normlog.keras supports Keras 3 with the TensorFlow, JAX or torch backend; this process uses "
            f"{backend!r}. Set KERAS_BACKEND to one of those, or log with normlog.Writer from your own loop."
        )
    return importlib.import_module(_BACKENDS[backend])


def watch(
    model: Any,
    logdir: str | None = None,
    *,
    writer: Writer | None = None,
    name: str | None = None,
    log: Literal["gradients", "parameters", "all"] = "all",
    every: int = 1,
    histogram_every: int | None = 100,
    update_every: int | None = 100,
    optimizer: keras.optimizers.Optimizer | None = None,
    step: int | None = None,
    bins: int = 30,
    strict: bool = False,
    health: bool | Thresholds = True,
    health_via: Literal["warnings", "logging"] = "warnings",
    histograms_after_finding: int = HISTOGRAMS_AFTER_FINDING,
) -> Watcher:
    """A callback for `model.fit(..., callbacks=[...])` that logs, per training step (batch),
    the gradient each step really used and the weights: norms every `every` steps,
    histograms every `histogram_every`, update ratios every `update_every`.

    The gradients are the raw ones handed to the optimizer: before `global_clipnorm`
    clipping, before `gradient_accumulation_steps` averaging, and unscaled for mixed
    precision; a step that a loss-scale optimizer skips (Inf/NaN) is written as
    `amp/skipped_step`, not as a finding.

    Args:
        model: the keras.Model to watch (its `optimizer`, and the other optimizers it holds
            as attributes, as a GAN's `train_step` uses), or a keras Optimizer alone.
        logdir: the run directory (default `runs/<date>_<host>`), or `writer=` a
            `normlog.Writer`.
        name: write into the run `<logdir>/<name>` (or `<writer.logdir>/<name>`), so that
            two watchers in one run keep their own tags.
        optimizer: watch this optimizer instead of `model.optimizer` (custom loops).
        step: the index of the first step seen; default: the optimizer's `iterations`, so
            a resumed run continues its steps.
        health, health_via: the training-health rules, as in `normlog.watch`.
        histograms_after_finding: after an `exploding` or `nonfinite` finding at step s,
            log histograms of every tensor at steps s+1 .. s+K (K = this), whatever
            `histogram_every` says; 0 turns the burst off. Needs `health`.

    Raises:
        TypeError: `model` is not a Keras model or optimizer (no file is made).
        ValueError: a bad option (no file is made).
        RuntimeError: Keras runs on a backend other than TensorFlow, JAX or torch.

    Example:
        >>> model.fit(x, y, callbacks=[normlog.keras.watch(model, "runs/mlp")])  # doctest: +SKIP
    """
    _check_target(model)
    if isinstance(histograms_after_finding, bool) or not isinstance(histograms_after_finding, int):
        raise TypeError(f"histograms_after_finding must be an int (steps), got {histograms_after_finding!r}")
    if histograms_after_finding < 0:
        raise ValueError(f"histograms_after_finding must be 0 (off) or more steps, got {histograms_after_finding}")
    backend = _backend_module()
    find_optimizers, make_watcher = backend.find_optimizers, backend.make_watcher

    # Watching again (a notebook cell run twice) replaces the watcher of the same optimizers.
    mine = [optimizer if optimizer is not None else getattr(model, "optimizer", None)]
    if isinstance(model, keras.Model) and optimizer is None:
        mine += list(find_optimizers(model).values())
    if isinstance(model, keras.optimizers.Optimizer):
        mine = [model]
    for watched, old in _watchers():
        if any(o is not None and any(o is w for w in old.optimizers) for o in mine):
            old.unwatch()
            _WATCHERS.pop(watched, None)
    watcher: Watcher = make_watcher(
        model,
        logdir,
        writer,
        name,
        log=log,
        every=every,
        histogram_every=histogram_every,
        update_every=update_every,
        optimizer=optimizer,
        step=step,
        bins=bins,
        strict=strict,
        health=health,
        health_via=health_via,
        histograms_after_finding=histograms_after_finding,
    )
    _WATCHERS[model] = weakref.ref(watcher)
    return watcher


def unwatch(model: Any) -> None:
    """Restore the optimizers `watch` wrapped for `model`, if any, and close the writer it made."""
    ref = _WATCHERS.pop(model, None)
    watcher = ref() if ref is not None else None
    if watcher is not None:
        watcher.unwatch()
