"""normlog.keras.watch, against a manual tf.GradientTape and the core on the same data."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings
from typing import Any

import numpy as np
import pytest

from helpers import assert_same_histogram, read_events, requires, row_histogram, scalars

tf = requires("tensorflow")
keras = requires("keras")

import normlog  # noqa: E402
import normlog.keras  # noqa: E402
from normlog._step import GLOBAL_NORM, LOSS_SCALE, histogram_tag, norm_tag, ratio_tag  # noqa: E402

RNG = np.random.default_rng(7)
X = RNG.normal(size=(256, 8)).astype("float32")
Y = (X[:, :1] + X[:, 1:2] > 0).astype("float32")


def nonfinite_of(kind: str, name: str) -> str:
    """The tag of a tensor's NaN/Inf count, whatever the scheme spells it (`parse_tag` reads it)."""
    from normlog import _step

    if hasattr(_step, "nonfinite_count_tag"):
        return str(_step.nonfinite_count_tag(kind, name))
    return str(_step.nonfinite_tag(histogram_tag(kind, name)))


def make_model(optimizer=None, **compile_options) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="tanh", name="dense"),
            keras.layers.Dense(1, name="head"),
        ],
        name="net",
    )
    model.compile(optimizer=optimizer or keras.optimizers.SGD(0.1), loss="mse", **compile_options)
    return model


def tape_gradients(model: keras.Model, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    return {v.path.removeprefix(f"{model.name}/"): g.numpy() for v, g in zip(model.trainable_variables, grads)}


def fit_watched(model: keras.Model, logdir, x=X, y=Y, batch_size: int = 32, **options) -> Any:
    """One epoch of `fit`, in order, watched by normlog with `options`; the events written."""
    callback = normlog.keras.watch(model, str(logdir), **options)
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
    return read_events(str(logdir))


def test_step_zero_gradient_norms_equal_a_manual_gradient_tape(tmp_path) -> None:
    model = make_model()
    expected = tape_gradients(model, X[:32], Y[:32])
    events = fit_watched(model, tmp_path)
    for name, grad in expected.items():
        assert scalars(events, norm_tag("gradients", name))[0] == pytest.approx(np.linalg.norm(grad), rel=1e-5)
    total = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in expected.values()))
    assert scalars(events, GLOBAL_NORM)[0] == pytest.approx(total, rel=1e-5)
    assert sorted(scalars(events, norm_tag("gradients", "dense/kernel"))) == list(range(8))  # steps are batches


@pytest.mark.parametrize("binning", ["numba on the host", "tf.function"])
def test_histograms_equal_the_cores_and_follow_histogram_every(tmp_path, monkeypatch, binning) -> None:
    if binning == "tf.function":
        from normlog.keras import _graph

        monkeypatch.setattr(_graph, "_numba_rows", lambda: None)
    else:
        requires("numba")
    model = make_model()
    expected = tape_gradients(model, X[:32], Y[:32])
    weights = {v.path.removeprefix("net/"): v.numpy() for v in model.trainable_variables}
    events = fit_watched(model, tmp_path, histogram_every=3)
    assert [e.step for e in events.Histograms(histogram_tag("gradients", "dense/kernel"))] == [0, 3, 6]
    for kind, arrays in (("gradients", expected), ("parameters", weights)):
        for name, array in arrays.items():
            value = events.Histograms(histogram_tag(kind, name))[0].histogram_value
            core = normlog.histogram(array)
            filled = np.flatnonzero(core.counts)
            np.testing.assert_array_equal(value.bucket, core.counts[filled[0] : filled[-1] + 1])
            np.testing.assert_array_equal(value.bucket_limit, core.bucket_limits[filled[0] : filled[-1] + 1])
            assert (value.min, value.max, value.num) == (core.min, core.max, core.num)


@pytest.mark.parametrize(
    "values",
    [
        np.array([1.0, np.nan, 3.0, np.inf, -np.inf, 2.0, 2.5], dtype=np.float32),
        np.full(5, 0.25, dtype=np.float32),
        np.full(3, np.nan, dtype=np.float32),
        RNG.normal(size=4000).astype(np.float16),
    ],
)
def test_in_graph_histogram_row_matches_the_core(values: np.ndarray) -> None:
    from normlog.keras._graph import histogram_row

    got = row_histogram(histogram_row(tf.constant(values), 30).numpy(), 30)
    expected = normlog.histogram(values)
    assert_same_histogram(got, expected)


def test_update_ratio_is_the_relative_size_of_the_step(tmp_path) -> None:
    model = make_model()
    before = [v.numpy().copy() for v in model.trainable_variables]
    events = fit_watched(model, tmp_path, x=X[:32], y=Y[:32], update_every=1)
    for variable, old in zip(model.trainable_variables, before):
        name = variable.path.removeprefix("net/")
        if not np.any(old):  # a zero-initialised bias has no relative update: none is written
            assert ratio_tag(name) not in events.Tags()["scalars"]
            continue
        expected = np.linalg.norm(variable.numpy() - old) / np.linalg.norm(old)
        assert scalars(events, ratio_tag(name))[0] == pytest.approx(expected, rel=1e-5)


def test_watching_changes_no_checkpoint(tmp_path) -> None:
    model = make_model()
    model.fit(X, Y, batch_size=64, epochs=1, verbose=0)
    counts = (len(model.weights), len(model.optimizer.variables))
    model.fit(X, Y, batch_size=64, epochs=1, verbose=0, callbacks=[normlog.keras.watch(model, str(tmp_path / "logs"))])
    assert (len(model.weights), len(model.optimizer.variables)) == counts
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    fresh = make_model()
    fresh.load_weights(path)
    for a, b in zip(model.weights, fresh.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_train_function_traced_before_watching_is_retraced(tmp_path) -> None:
    model = make_model()
    model.fit(X, Y, batch_size=64, epochs=1, verbose=0)  # traces without the hook
    fit_watched(model, tmp_path, batch_size=64)
    assert len(scalars(read_events(str(tmp_path)), GLOBAL_NORM)) == 4


def test_non_trainable_and_gradient_less_variables_are_skipped(tmp_path) -> None:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    frozen = keras.layers.Dense(8, name="frozen", trainable=False)
    hidden = keras.layers.BatchNormalization(name="norm")(frozen(inputs))
    outputs = keras.layers.Dense(1, name="head")(hidden)
    model = keras.Model(inputs, outputs, name="net")
    model.compile(optimizer="adam", loss="mse")
    fit_watched(model, tmp_path, batch_size=64, strict=True, histogram_every=1)
    tags = set(read_events(str(tmp_path)).Tags()["scalars"])
    assert {norm_tag("gradients", "head/kernel"), norm_tag("gradients", "norm/gamma")} <= tags
    assert not any("frozen" in tag or "moving_mean" in tag for tag in tags)


def test_global_clipnorm_logs_the_norm_before_clipping(tmp_path) -> None:
    model = make_model(keras.optimizers.SGD(0.1, global_clipnorm=1e-3))
    expected = tape_gradients(model, X[:32], Y[:32])
    fit_watched(model, tmp_path)
    total = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in expected.values()))
    logged = scalars(read_events(str(tmp_path)), GLOBAL_NORM)[0]
    assert logged == pytest.approx(total, rel=1e-5) and logged > 100 * 1e-3


def test_gradient_accumulation_logs_every_micro_batch(tmp_path) -> None:
    model = make_model(keras.optimizers.SGD(0.1, gradient_accumulation_steps=2))
    expected = tape_gradients(model, X[:32], Y[:32])
    fit_watched(model, tmp_path)
    logged = scalars(read_events(str(tmp_path)), norm_tag("gradients", "dense/kernel"))
    assert sorted(logged) == list(range(8))
    assert logged[0] == pytest.approx(np.linalg.norm(expected["dense/kernel"]), rel=1e-5)


def test_loss_scale_optimizer_logs_unscaled_gradients_and_the_scale(tmp_path) -> None:
    model = make_model(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)))
    expected = tape_gradients(model, X[:32], Y[:32])
    events = fit_watched(model, tmp_path)
    assert scalars(events, norm_tag("gradients", "dense/kernel"))[0] == pytest.approx(
        np.linalg.norm(expected["dense/kernel"]), rel=1e-5
    )
    assert scalars(events, LOSS_SCALE)[0] == model.optimizer.initial_scale


def test_steps_per_execution_logs_the_last_step_of_each_execution(tmp_path) -> None:
    model = make_model(steps_per_execution=4)
    events = fit_watched(model, tmp_path, histogram_every=2)
    assert sorted(scalars(events, GLOBAL_NORM)) == [3, 7]
    # a histogram step inside an execution is kept until the callback reads it
    assert [e.step for e in events.Histograms(histogram_tag("gradients", "dense/kernel"))] == [2, 6]


def test_xla_compiled_train_step(tmp_path) -> None:
    model = make_model(jit_compile=True)
    expected = tape_gradients(model, X[:32], Y[:32])
    events = fit_watched(model, tmp_path, histogram_every=4)
    assert scalars(events, norm_tag("gradients", "dense/kernel"))[0] == pytest.approx(
        np.linalg.norm(expected["dense/kernel"]), rel=1e-5
    )
    assert [e.step for e in events.Histograms(histogram_tag("gradients", "dense/kernel"))] == [0, 4]


def test_nonfinite_gradients_are_counted_and_warned_about(tmp_path) -> None:
    model = make_model()
    x = X.copy()
    x[40, 0] = np.nan  # batch 1
    with pytest.warns(RuntimeWarning, match=r"NaN/Inf values in the gradients of 'dense/kernel' at step 1"):
        fit_watched(model, tmp_path, x=x)
    nonfinite = scalars(read_events(str(tmp_path)), nonfinite_of("gradients", "dense/kernel"))
    assert min(nonfinite) == 1 and nonfinite[1] > 0


def test_a_failure_inside_logging_warns_once_and_fit_goes_on(tmp_path) -> None:
    model = make_model()
    watcher = normlog.keras.watch(model, str(tmp_path))
    watcher.writer.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(X, Y, batch_size=32, epochs=2, verbose=0, callbacks=[watcher])
    assert len(history.history["loss"]) == 2
    assert len([w for w in caught if "normlog: logging failed" in str(w.message)]) == 1
    other = make_model()
    strict = normlog.keras.watch(other, str(tmp_path / "strict"), strict=True)
    strict.writer.close()
    with pytest.raises(ValueError, match="closed"):
        other.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=[strict])


def test_custom_loops_log_gradients_and_eager_apply_gradients(tmp_path) -> None:
    model = make_model()
    optimizer = keras.optimizers.Adam(1e-2)
    watcher = normlog.keras.watch(model, str(tmp_path / "apply"), optimizer=optimizer)
    tape_watcher = normlog.keras.watch(model, str(tmp_path / "tape"), histogram_every=1)
    norms = []
    for step in range(3):
        x, y = X[step * 32 : (step + 1) * 32], Y[step * 32 : (step + 1) * 32]
        with tf.GradientTape() as tape:
            loss = keras.losses.mean_squared_error(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        norms.append(float(tf.norm(grads[0])))
        tape_watcher.log_gradients(grads, model.trainable_variables, step=10 * step)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))  # recorded with no extra code
    watcher.unwatch()  # closes the writers watch made
    tape_watcher.unwatch()
    for run, steps in (("apply", [0, 1, 2]), ("tape", [0, 10, 20])):
        logged = scalars(read_events(str(tmp_path / run)), norm_tag("gradients", "dense/kernel"))
        assert sorted(logged) == steps
        assert [logged[s] for s in steps] == pytest.approx(norms, rel=1e-5)
    assert histogram_tag("gradients", "dense/kernel") in read_events(str(tmp_path / "tape")).Tags()["histograms"]
    assert "apply" not in optimizer.__dict__


def test_other_keras_backends_get_a_clear_error() -> None:
    # Keras 3's numpy backend (inference only) is not one normlog watches under
    script = textwrap.dedent(
        """
        import os, sys, tempfile
        import keras, normlog.keras
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        logdir = os.path.join(tempfile.mkdtemp(), "logs")
        try:
            normlog.keras.watch(model, logdir)
        except RuntimeError as error:
            print(error)
        print("tensorflow imported:", "tensorflow" in sys.modules, "logdir made:", os.path.exists(logdir))
        """
    )
    env = {**os.environ, "KERAS_BACKEND": "numpy"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "supports Keras 3 with the TensorFlow, JAX or torch backend" in result.stdout, result.stdout + result.stderr
    assert "'numpy'" in result.stdout
    # normlog.keras needs TensorFlow only for the TensorFlow backend, and refuses before any file
    assert "tensorflow imported: False logdir made: False" in result.stdout


def test_a_trainable_layer_outside_the_forward_pass_is_skipped(tmp_path) -> None:
    class Net(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="net")
            self.used = keras.layers.Dense(1, name="used")
            self.unused = keras.layers.Dense(1, name="unused")
            self.unused.build((None, 8))

        def call(self, x):
            return self.used(x)

    keras.utils.set_random_seed(0)
    model = Net()
    model.compile(optimizer="sgd", loss="mse")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras' own warning about the missing gradients
        events = fit_watched(model, tmp_path, batch_size=64, strict=True, histogram_every=1)
    assert len(scalars(events, norm_tag("gradients", "used/kernel"))) == 4
    assert not any("unused" in tag for tag in events.Tags()["scalars"] + events.Tags()["histograms"])


def test_mixed_float16_policy_logs_unscaled_float32_gradient_norms(tmp_path) -> None:
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = make_model()  # compile wraps the optimizer in a LossScaleOptimizer
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        expected = tape_gradients(model, X[:32], Y[:32])
        fit_watched(model, tmp_path, histogram_every=1)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    events = read_events(str(tmp_path))
    logged = scalars(events, norm_tag("gradients", "dense/kernel"))[0]
    assert logged == pytest.approx(np.linalg.norm(expected["dense/kernel"].astype(np.float64)), rel=1e-3)
    assert scalars(events, LOSS_SCALE)[0] == model.optimizer.initial_scale
    assert events.Histograms(histogram_tag("gradients", "dense/kernel"))[0].histogram_value.max < 1e3  # unscaled values
