"""The Keras callback and the training-health rules: the burst of histograms after a finding,
and what the rules are told about each tensor (owned by the optimizer, its number of
dimensions); each read back with TensorBoard's reader."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from helpers import read_events, requires

tf = requires("tensorflow")
keras = requires("keras")

from test_keras_watch import X, Y, make_model  # noqa: E402

import normlog  # noqa: E402
import normlog.keras  # noqa: E402
from normlog._step import histogram_tag  # noqa: E402
from normlog.health import HealthWarning  # noqa: E402

SPIKE = 25  # the step of the corrupted batch: after the exploding rule's 20-step warm-up
BATCH = 8


class WeightsAtEachStep(keras.callbacks.Callback):  # type: ignore[misc]
    """The weights each step's gradient is computed from, copied before the step runs."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: dict[int, dict[str, np.ndarray]] = {}

    def on_train_batch_begin(self, batch: int, logs=None) -> None:
        name = self.model.name
        self.weights[batch] = {v.path.removeprefix(f"{name}/"): v.numpy() for v in self.model.trainable_variables}


def corrupted_data() -> tuple[np.ndarray, np.ndarray]:
    """40 batches of 8; the labels of batch SPIKE multiplied by 1e4 (a corrupted batch): its
    gradients are ~1e4x the others', and global_clipnorm keeps the weights sane after it."""
    x = np.concatenate([X, X[:64]])
    y = np.concatenate([Y, Y[:64]]).copy()
    y[SPIKE * BATCH : (SPIKE + 1) * BATCH] *= 1e4
    return x, y


def histogram_steps(events, name: str) -> list[int]:
    return sorted(event.step for event in events.Histograms(histogram_tag("parameters", name)))


@pytest.mark.parametrize(
    ("histogram_every", "after", "expected"),
    [
        (100, {}, [0, *range(SPIKE + 1, SPIKE + 6)]),  # the defaults: step 0, then 5 steps after
        (None, {"histograms_after_finding": 3}, list(range(SPIKE + 1, SPIKE + 4))),
        (100, {"histograms_after_finding": 0}, [0]),
    ],
)
def test_a_finding_is_followed_by_histograms_of_every_tensor(tmp_path, histogram_every, after, expected) -> None:
    model = make_model(keras.optimizers.SGD(0.01, global_clipnorm=1.0))
    weights = WeightsAtEachStep()
    watcher = normlog.keras.watch(model, str(tmp_path), histogram_every=histogram_every, strict=True, **after)
    x, y = corrupted_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HealthWarning)
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[weights, watcher])
    assert [(f.rule, f.step) for f in watcher.findings] == [("exploding", SPIKE)]
    events = read_events(str(tmp_path))
    names = ["dense/kernel", "dense/bias", "head/kernel", "head/bias"]
    for name in names:
        assert histogram_steps(events, name) == expected, name
        assert sorted(e.step for e in events.Histograms(histogram_tag("gradients", name))) == expected, name
    for step in expected:  # each burst histogram is of its own step's weights
        for name in names:
            value = next(e for e in events.Histograms(histogram_tag("parameters", name)) if e.step == step)
            core = normlog.histogram(weights.weights[step][name])
            assert (value.histogram_value.min, value.histogram_value.max, value.histogram_value.num) == (
                core.min,
                core.max,
                core.num,
            ), (step, name)


def test_no_burst_without_the_health_rules(tmp_path) -> None:
    model = make_model(keras.optimizers.SGD(0.01, global_clipnorm=1.0))
    watcher = normlog.keras.watch(model, str(tmp_path), histogram_every=None, health=False, strict=True)
    x, y = corrupted_data()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[watcher])
    assert not read_events(str(tmp_path)).Tags()["histograms"]


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_a_bad_histograms_after_finding_is_refused_before_a_file_is_made(tmp_path, bad) -> None:
    with pytest.raises((TypeError, ValueError), match="histograms_after_finding"):
        normlog.keras.watch(make_model(), str(tmp_path / "run"), histograms_after_finding=bad)
    assert not (tmp_path / "run").exists()


class Amplifier(keras.layers.Layer):  # type: ignore[misc]
    """x * w * 1e-4 with w of 1e4: the identity, whose weight's gradient is ~1e-9 of its norm
    (a gain that 'vanishes' by the ratio alone). `w` has `shape`: 1-D, or a 2-D matrix."""

    def __init__(self, shape: tuple[int, ...], **kwargs) -> None:
        super().__init__(**kwargs)
        self.w = self.add_weight(name="w", shape=shape, initializer=keras.initializers.Constant(1e4))

    def call(self, x):
        return x * self.w * 1e-4


def test_the_rules_know_a_1d_weight_by_its_shape_not_its_name(tmp_path) -> None:
    # "amplifier/w" is no bias or gain by name; the health rules judge a 1-D tensor's tiny
    # ratio only with its module's matrix, and Keras tells them the shape
    x, y = np.tile(X, (3, 1)), np.tile(Y, (3, 1))  # 96 steps of 8: past vanishing's 50-step streak
    found = {}
    for shape in [(16,), (1, 16)]:
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(16, activation="tanh", name="dense"),
                Amplifier(shape, name="amplifier"),
                keras.layers.Dense(1, name="head"),
            ],
            name="net",
        )
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
        watcher = normlog.keras.watch(model, str(tmp_path / str(len(shape))), histogram_every=None, strict=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", HealthWarning)
            model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[watcher])
        found[len(shape)] = [(f.rule, f.tensor) for f in watcher.findings]
    assert ("vanishing", "amplifier/w") in found[2]  # as a matrix, its ratio is reported
    assert not any(tensor == "amplifier/w" for _, tensor in found[1]), found[1]
