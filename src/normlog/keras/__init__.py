"""Keras adapter: `normlog.keras.watch(model)` is a callback that logs the gradients each training
step used.

Rules: only this package imports Keras or TensorFlow. `_callback` wraps the optimizer and
writes each logged step through `normlog._step`; `_graph` computes the statistics inside the
traced step, with the core's rules.
"""

from normlog.keras._callback import Watcher, unwatch, watch

__all__ = ["Watcher", "unwatch", "watch"]
