"""normlog for Keras on the JAX backend: the same one callback as on TensorFlow, and no
TensorFlow needed (pip install 'normlog[keras-jax]').

A small MLP classifier on synthetic data, trained with `fit` under KERAS_BACKEND=jax. The
callback logs, per batch, every variable's gradient and weight norm and the global gradient
norm, with histograms and update ratios every 100 steps: computed inside the jitted train
step with jax.numpy and sent to the host with jax.debug.callback.

    KERAS_BACKEND=jax python examples/jax/keras_jax_fit.py [--logdir runs/keras_jax] [--epochs 2]
    tensorboard --logdir runs/keras_jax
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # before Keras is imported

import keras
import numpy as np

import normlog.keras


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/keras_jax")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    if keras.backend.backend() != "jax":
        raise SystemExit(f"run with KERAS_BACKEND=jax (Keras is on {keras.backend.backend()!r})")

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2048, 20)).astype("float32")
    labels = (features[:, :5].sum(axis=1) > 0).astype("int32")
    model = keras.Sequential(
        [
            keras.Input((20,)),
            keras.layers.Dense(64, activation="relu", name="hidden"),
            keras.layers.Dense(64, activation="relu", name="hidden2"),
            keras.layers.Dense(2, name="logits"),
        ],
        name="classifier",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    watcher = normlog.keras.watch(model, args.logdir)
    history = model.fit(features, labels, batch_size=64, epochs=args.epochs, verbose=2, callbacks=[watcher])
    watcher.unwatch()  # closes the event file
    print(f"accuracy {history.history['accuracy'][-1]:.3f}; findings: {len(watcher.findings)}; logdir: {args.logdir}")


if __name__ == "__main__":
    main()
