"""Gradient tracking for a Keras binary classifier, without a subclassed TensorBoard callback.

Since TensorFlow 2.1 ignores `TensorBoard(write_grads=True)`, the usual recipe subclasses
the TensorBoard callback and, at every epoch end, runs a second forward and backward pass
with tf.GradientTape over the training set: extra compute, and gradients of other weights
and data than any training step used. `normlog.keras.watch` replaces all of it with one
callback that records the gradients of the real training steps.

    python examples/keras/binary_classifier.py [--logdir runs/binary_classifier] [--epochs 10]
    tensorboard --logdir runs/binary_classifier
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import normlog.keras


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/binary_classifier")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x_train = rng.normal(size=(2000, 20)).astype("float32")
    y_train = (x_train[:, :3].sum(1) + 0.5 * rng.normal(size=2000) > 0).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((20,)),
            keras.layers.Dense(32, activation="relu", name="layer1"),
            keras.layers.Dense(16, activation="relu", name="layer2"),
            keras.layers.Dense(1, activation="sigmoid", name="layer3"),
        ],
        name="classifier",
    )
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])

    callbacks = [
        keras.callbacks.TensorBoard(os.path.join(args.logdir, "keras")),  # loss and accuracy, as before
        normlog.keras.watch(model, os.path.join(args.logdir, "gradients"), histogram_every=20),  # was: a subclass
    ]
    history = model.fit(x_train, y_train, batch_size=64, epochs=args.epochs, verbose=0, callbacks=callbacks)
    print(f"accuracy {history.history['accuracy'][-1]:.0%}")
    print(f"logs written to {args.logdir}; view them with: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
