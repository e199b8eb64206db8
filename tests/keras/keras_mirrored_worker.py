"""One run for tests/test_distributed.py: `python keras_mirrored_worker.py LOGDIR`.

fit() under tf.distribute.MirroredStrategy on two logical CPUs, watched by normlog, then
the same model trained on one device with a manual tf.GradientTape on the same batches.
Prints JSON: the gradient norms of both, per step and variable."""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import normlog.keras  # noqa: E402

BATCH, STEPS = 16, 4


def model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(7, activation="tanh"), keras.layers.Dense(3)])


def main(logdir: str) -> None:
    x = np.random.default_rng(0).normal(size=(BATCH * STEPS, 5)).astype("float32")
    y = np.random.default_rng(1).normal(size=(BATCH * STEPS, 3)).astype("float32")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored = model()
        mirrored.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    callback = normlog.keras.watch(mirrored, logdir, histogram_every=1, health=False, strict=True)
    mirrored.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
    callback.unwatch()

    single = model()
    optimizer = keras.optimizers.SGD(0.1)
    names = [v.path.removeprefix(f"{mirrored.name}/") for v in mirrored.trainable_variables]  # the logged names
    expected: dict[str, list[float]] = {name: [] for name in names}
    for step in range(STEPS):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(y[rows], single(x[rows]))
        grads = tape.gradient(loss, single.trainable_variables)
        for name, grad in zip(names, grads):
            expected[name].append(float(tf.norm(grad)))
        optimizer.apply(grads, single.trainable_variables)
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "expected": expected}))


if __name__ == "__main__":
    main(sys.argv[1])
