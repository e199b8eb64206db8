"""A hand-written tf.GradientTape loop that logs a dense layer's weights, biases and gradients.

The TensorBoard tutorials write `tf.summary.histogram("layer1_weights", ...)` by hand for
each tensor. Here `watcher.log_gradients(grads, variables)` logs the norms and histograms
of every gradient and weight in one call, with NaN and Inf counted rather than breaking
the chart.

    python examples/keras/gradient_tape_loop.py [--logdir runs/gradient_tape_loop] [--epochs 30]
    tensorboard --logdir runs/gradient_tape_loop
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import normlog.keras


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/gradient_tape_loop")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x_train = rng.random((1000, 100)).astype("float32")
    y_train = (x_train[:, :10].sum(1, keepdims=True) / 10).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((100,)),
            keras.layers.Dense(10, activation="relu", name="layer1"),
            keras.layers.Dense(1, name="out"),
        ],
        name="regressor",
    )
    optimizer = keras.optimizers.Adam(learning_rate=0.01)
    loss_fn = keras.losses.MeanSquaredError()
    watcher = normlog.keras.watch(model, args.logdir, histogram_every=1)

    for epoch in range(args.epochs):
        with tf.GradientTape() as tape:
            loss = loss_fn(y_train, model(x_train, training=True))
        gradients = tape.gradient(loss, model.trainable_variables)
        # grad/layer1/kernel, grad/layer1/bias, weight/layer1/kernel, ...
        watcher.log_gradients(gradients, model.trainable_variables, step=epoch)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        watcher.writer.add_scalar("loss", loss, epoch)

    watcher.unwatch()
    print(f"final loss {float(loss):.4f}")
    print(f"logs written to {args.logdir}; view them with: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
