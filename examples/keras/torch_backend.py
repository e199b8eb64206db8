"""normlog with Keras 3 on the torch backend: the same one line as under TensorFlow.

On this backend a Keras model is a `torch.nn.Module` whose variables are torch parameters;
`normlog.keras.watch` hands it to the PyTorch adapter and names every tensor by its Keras
path (`grad_norm/dense/kernel`). TensorFlow is not needed: `pip install normlog[keras-torch]`.

    python examples/keras/torch_backend.py [--logdir runs/keras_torch] [--epochs 3]
    tensorboard --logdir runs/keras_torch
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before Keras is imported: it reads this once

import keras
import numpy as np

import normlog.keras


def two_moons(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved half circles with noise, a small non-linear task learnt in seconds."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, count)
    angle = rng.uniform(0.0, np.pi, count)
    points = np.stack([np.cos(angle) + labels, np.sin(angle) * (1 - 2 * labels) + 0.5 * labels], axis=1)
    return (points + rng.normal(0.0, 0.1, points.shape)).astype("float32"), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/keras_torch")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    points, labels = two_moons(1024)
    model = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(32, activation="relu", name="dense"),
            keras.layers.Dense(32, activation="relu", name="hidden"),
            keras.layers.Dense(1, name="logit"),
        ],
        name="moons",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    watcher = normlog.keras.watch(model, args.logdir, histogram_every=16, update_every=16)
    history = model.fit(points, labels, batch_size=64, epochs=args.epochs, verbose=0, callbacks=[watcher])
    watcher.unwatch()  # restores the optimizer and closes the run
    print(f"backend {keras.backend.backend()}: accuracy {history.history['accuracy'][-1]:.0%}")
    print(f"steps logged: {watcher.step}")
    print(f"logs written to {args.logdir}; view them with: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
