"""Watching never keeps a Keras model alive: a model dropped without `unwatch` is collected, on
each of Keras' backends (keras-tuner builds a model per trial; a notebook rebuilds them).

Keras reads KERAS_BACKEND once per process, so each backend runs in a subprocess. The
reference is Python's own: a weakref to the model and to the watcher, after `gc.collect()`,
and the same scenario with Keras' History callback in place of normlog's.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import requires

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)

SCENARIO = textwrap.dedent(
    """
    import gc, os, sys, tempfile, weakref
    import keras, numpy as np
    import normlog.keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    logdir = tempfile.mkdtemp()
    callback = normlog.keras.watch(model, logdir) if sys.argv[1] == "normlog" else keras.callbacks.History()
    model.fit(np.ones((8, 4)), np.ones((8, 2)), verbose=0, callbacks=[callback])
    dead_model, dead_callback = weakref.ref(model), weakref.ref(callback)
    del model, callback
    gc.collect()
    gc.collect()
    print("alive:", dead_model() is not None, dead_callback() is not None)
    """
)


@pytest.mark.parametrize("backend", ["tensorflow", "torch", "jax"])
def test_a_dropped_model_is_collected_on_every_backend(backend: str) -> None:
    requires({"tensorflow": "tensorflow", "torch": "torch", "jax": "jax"}[backend])
    if importlib.util.find_spec("keras") is None:
        requires("keras")
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": os.path.join(ROOT, "src"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    results = {}
    for callback in ("history", "normlog"):
        done = subprocess.run(
            [sys.executable, "-c", SCENARIO, callback], capture_output=True, text=True, env=env, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr
        results[callback] = done.stdout.strip().splitlines()[-1]
    assert results["history"] == "alive: False False"  # the reference: Keras alone keeps nothing
    assert results["normlog"] == "alive: False False"
