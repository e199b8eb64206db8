"""normlog in one line for Keras: the gradients of every training step `fit` really ran.

A small convnet on synthetic MNIST-sized images (28x28, 10 classes). The callback logs, per
batch, every variable's gradient and weight norm and the global gradient norm, with
histograms and update ratios every 100 steps.

    python examples/keras/quickstart.py [--logdir runs/keras_quickstart] [--epochs 3]
    tensorboard --logdir runs/keras_quickstart
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import normlog.keras


def synthetic_digits(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class decides where a bright bar sits, plus noise: learnable in seconds."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count)
    images = rng.normal(0.0, 0.3, size=(count, 28, 28, 1)).astype("float32")
    for i, label in enumerate(labels):
        images[i, 2 + 2 * label : 5 + 2 * label, 4:24, 0] += 1.0
    return images, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/keras_quickstart")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    images, labels = synthetic_digits(4096)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(8, 3, activation="relu", name="conv"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu", name="dense"),
            keras.layers.Dense(10, name="logits"),
        ],
        name="digits",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(
        images,
        labels,
        batch_size=64,
        epochs=args.epochs,
        verbose=0,
        callbacks=[normlog.keras.watch(model, args.logdir)],  # the one line
    )
    print(f"trained {args.epochs} epochs: accuracy {history.history['accuracy'][-1]:.0%}")
    print(f"logs written to {args.logdir}; view them with: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
