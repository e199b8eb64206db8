"""Overhead of normlog.keras.watch on `fit`, against plain `fit` and Keras' TensorBoard callback.

Every round builds a fresh copy of the same model for each mode and fits it for two epochs
on the same data, timing the second (the first traces); modes are interleaved, each round
starting at another mode.
Prints median epoch times and ratios to plain fit; an unwatched second copy shows how far
two identical runs differ here.

    python benchmarks/bench_keras.py [--rounds 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import normlog.keras


def make() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4096, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, 10, 4096)
    root = tempfile.mkdtemp(prefix="normlog-bench-keras-")

    names = (
        "plain fit",
        "plain fit, second copy",
        "watch, norms every step",
        "watch, norms and histograms every step",
        "watch defaults",
        "keras TensorBoard(histogram_freq=1)",
    )

    def callbacks_for(name: str, model: keras.Model, logdir: str) -> list[Any]:
        if name == "watch, norms every step":
            return [normlog.keras.watch(model, logdir, histogram_every=None, update_every=None)]
        if name == "watch, norms and histograms every step":
            return [normlog.keras.watch(model, logdir, histogram_every=1)]
        if name == "watch defaults":
            return [normlog.keras.watch(model, logdir)]
        if name.startswith("keras TensorBoard"):
            return [keras.callbacks.TensorBoard(logdir, histogram_freq=1)]
        return []

    class EpochTimer(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.seconds = time.perf_counter() - self.start

    # Two instances of one model differ by up to ~50% in epoch time here, so every round
    # builds a fresh model per mode; epoch 1 (tracing) is not timed, epoch 2 is.
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            model = make()
            timer = EpochTimer()
            logdir = f"{root}/{round_}-{names.index(name)}"
            model.fit(
                images,
                labels,
                batch_size=64,
                epochs=2,
                verbose=0,
                callbacks=[*callbacks_for(name, model, logdir), timer],
            )
            times[name].append(timer.seconds)

    model = make()
    parameters = model.count_params()
    tensors = len(model.trainable_variables)
    print(f"CPU config: convnet, {parameters / 1e6:.2f}M parameters in {tensors} tensors, 64 batches of 64 per epoch")
    print(f"median of the second epoch over {args.rounds} rounds, a fresh model per mode per round\n")
    # Two unwatched modes: pool them as the baseline, and read each ratio against their spread.
    plain = statistics.median(times["plain fit"] + times["plain fit, second copy"])
    print("| mode | epoch (s) | vs plain fit (both copies pooled) |\n| --- | ---: | ---: |")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {median:.2f} | {median / plain:.2f}x |")


if __name__ == "__main__":
    main()
