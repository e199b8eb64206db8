"""Vanishing gradients in Keras: a deep tanh MLP against the same MLP with relu.

The story of examples/torch/vanishing_gradients.py, told with `fit`: two concentric circles
(generated here), ten hidden layers of 16 units. With tanh and torch's default initialisation,
each layer passes back a smaller gradient than the one after it (the first layer's ends ~50x
below the last's) and accuracy lags far behind; relu with He initialisation learns. Both runs share one logdir: compare
`grad_norm/hidden_0/kernel` between the `tanh` and `relu` runs (Custom Scalars: every layer on one
chart), and `normlog/grad_norm_by_depth` in Images.

    python examples/keras/vanishing_gradients.py [--logdir runs/keras_vanishing] [--epochs 30]
    tensorboard --logdir runs/keras_vanishing
"""

from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import normlog.keras


def two_circles(samples: int, noise: float, factor: float = 0.5, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Points on an outer circle (label 0) and an inner one of radius `factor` (label 1), plus noise."""
    rng = np.random.default_rng(seed)
    label = np.arange(samples) % 2
    angle = rng.random(samples) * 2 * math.pi
    radius = np.where(label == 1, factor, 1.0)
    points = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1) + noise * rng.normal(size=(samples, 2))
    return points.astype("float32"), label.astype("float32")[:, None]


def build(activation: str, depth: int = 10, hidden: int = 16) -> keras.Model:
    # tanh gets torch's default initialisation (uniform within ±1/sqrt(fan_in), biases too),
    # relu He's: the two runs of the torch example.
    layers = [keras.Input((2,))]
    for i in range(depth):
        bound = 1 / math.sqrt(2 if i == 0 else hidden)
        uniform = keras.initializers.RandomUniform(-bound, bound)
        kernel, bias = (uniform, uniform) if activation == "tanh" else ("he_uniform", "zeros")
        layers.append(
            keras.layers.Dense(
                hidden, activation=activation, kernel_initializer=kernel, bias_initializer=bias, name=f"hidden_{i}"
            )
        )
    layers.append(keras.layers.Dense(1, name="out"))
    return keras.Sequential(layers, name=activation)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/keras_vanishing")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    x, y = two_circles(1000, noise=0.1)
    for activation in ("tanh", "relu"):
        keras.utils.set_random_seed(0)
        model = build(activation)
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss=keras.losses.BinaryCrossentropy(from_logits=True),
            metrics=[keras.metrics.BinaryAccuracy(threshold=0.0)],
        )
        watcher = normlog.keras.watch(model, os.path.join(args.logdir, activation), histogram_every=50)
        model.fit(x[:500], y[:500], batch_size=32, epochs=args.epochs, verbose=0, callbacks=[watcher])
        accuracy = model.evaluate(x[500:], y[500:], verbose=0)[1]
        watcher.unwatch()
        print(f"{activation}: test accuracy {accuracy:.0%}")
    print(f"logs written to {args.logdir}; view them with: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
