"""`normlog.keras.watch` on Keras' JAX backend, in a subprocess where TensorFlow cannot be
imported (`sys.modules["tensorflow"] = None` before Keras loads): `fit` and a custom
`train_step` that calls `optimizer.stateless_apply`. The references are computed in that
process independently of normlog (`jax.grad` of the loss through `model.stateless_call` on
the same batch, the weights before training); the events are read back here with
TensorBoard's reader and compared with them and with the core's histogram."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from helpers import read_events, requires, scalars

requires("jax")

import normlog  # noqa: E402
from normlog._step import GLOBAL_NORM, histogram_tag, norm_tag, ratio_tag  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)

WORKER = textwrap.dedent(
    """
    import json, os, sys
    sys.modules["tensorflow"] = None  # any import of TensorFlow now fails
    os.environ["KERAS_BACKEND"] = "jax"
    import jax, jax.numpy as jnp, keras, numpy as np
    import normlog.keras

    out = sys.argv[1]
    rng = np.random.default_rng(5)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.normal(size=(32, 2)).astype("float32")

    def make(cls=keras.Sequential):
        keras.utils.set_random_seed(1)
        layers = [keras.Input((6,)), keras.layers.Dense(5, activation="tanh", name="hidden"),
                  keras.layers.Dense(2, name="out")]
        if cls is keras.Sequential:
            model = keras.Sequential(layers, name="net")
        else:
            inputs = layers[0]
            outputs = layers[2](layers[1](inputs))
            model = cls(inputs, outputs, name="net")
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        return model

    def reference(model, xb, yb):
        # the gradient of the same loss on the same batch, through stateless_call
        trainable = [v.value for v in model.trainable_variables]
        others = [v.value for v in model.non_trainable_variables]
        def loss(trainable):
            prediction, _ = model.stateless_call(trainable, others, xb)
            return jnp.mean((prediction - yb) ** 2)
        grads = jax.grad(loss)(trainable)
        names = [v.path.removeprefix("net/") for v in model.trainable_variables]
        return {name: np.asarray(g) for name, g in zip(names, grads)}, {
            name: np.asarray(v) for name, v in zip(names, trainable)}

    results = {}
    # fit
    model = make()
    grads, weights = reference(model, x[:8], y[:8])
    np.savez(os.path.join(out, "fit_grads.npz"), **grads)
    np.savez(os.path.join(out, "fit_weights.npz"), **weights)
    watcher = normlog.keras.watch(model, os.path.join(out, "fit"), histogram_every=2, update_every=1)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[watcher])
    results["optimizers"] = len(watcher.optimizers)
    watcher.unwatch()

    # a NaN in the third batch (step 2)
    model = make()
    poisoned = y.copy()
    poisoned[17, 0] = np.nan
    watcher = normlog.keras.watch(model, os.path.join(out, "nan"), histogram_every=None)
    model.fit(x, poisoned, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[watcher])
    results["nan_steps"] = sorted({f.step for f in watcher.findings if f.rule == "nonfinite"})
    watcher.unwatch()

    # a custom train_step (JAX style) that applies the optimizer with stateless_apply
    class Custom(keras.Model):
        def train_step(self, state, data):
            trainable, non_trainable, optimizer_variables, metrics_variables = state
            xb, yb = data
            def loss(trainable):
                prediction, _ = self.stateless_call(trainable, non_trainable, xb, training=True)
                return jnp.mean((prediction - yb) ** 2)
            value, grads = jax.value_and_grad(loss)(trainable)
            trainable, optimizer_variables = self.optimizer.stateless_apply(optimizer_variables, grads, trainable)
            return {"loss": value}, (trainable, non_trainable, optimizer_variables, metrics_variables)

    model = make(Custom)
    grads, _ = reference(model, x[:8], y[:8])
    np.savez(os.path.join(out, "custom_grads.npz"), **grads)
    watcher = normlog.keras.watch(model, os.path.join(out, "custom"))
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[watcher])
    watcher.unwatch()

    # steps_per_execution=4 with every=2: the statistics are taken inside each step, so every
    # second step is logged; a second fit, watched anew, continues from optimizer.iterations
    model = make()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", steps_per_execution=4)
    watcher = normlog.keras.watch(model, os.path.join(out, "spe"), every=2)
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[watcher])
    watcher.unwatch()
    watcher = normlog.keras.watch(model, os.path.join(out, "resumed"))
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[watcher])
    results["deepcopy_is_itself"] = __import__("copy").deepcopy(watcher) is watcher
    watcher.unwatch()

    # a dropped watcher is collected: the wrapped apply holds it weakly. Unwatched (the model
    # lives on), or never unwatched while its optimizer lives on (shared with a new model)
    import gc, warnings, weakref
    for unwatch in (True, False):
        model = make()
        optimizer = model.optimizer
        watcher = normlog.keras.watch(model, os.path.join(out, f"dropped_{unwatch}"))
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[watcher])
        watcher.write_pending()
        dropped = weakref.ref(watcher)
        if unwatch:
            normlog.keras.unwatch(model)
        else:
            del model  # the registry of watch() holds a watcher as long as its model lives
        del watcher
        gc.collect()
        results[f"collected_{unwatch}"] = dropped() is None
        if not unwatch:
            model = make()
            model.compile(optimizer=optimizer, loss="mse")  # the still-wrapped optimizer, reused
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)  # training goes on

    # a watcher whose optimizer fit never applies: warned once, at the end of fit
    model = make()
    unused = keras.optimizers.SGD(0.05)
    unused.build(model.trainable_variables)
    watcher = normlog.keras.watch(model, os.path.join(out, "unused"), optimizer=unused)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[watcher])
    results["unused_warnings"] = [str(w.message) for w in caught if "applied no gradient" in str(w.message)]
    watcher.unwatch()

    # mixed_float16: Keras wraps the optimizer in a LossScaleOptimizer, whose stateless_apply
    # calls the inner optimizer's; the gradients logged are the unscaled ones
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = make()
    results["loss_scaled"] = type(model.optimizer).__name__
    trainable = [v.value for v in model.trainable_variables]
    others = [v.value for v in model.non_trainable_variables]
    def mixed_loss(trainable, xb, yb):
        prediction, _ = model.stateless_call(trainable, others, xb)
        return jnp.mean((prediction.astype("float32") - yb) ** 2)
    names = [v.path.removeprefix("net/") for v in model.trainable_variables]
    mixed = jax.grad(mixed_loss)(trainable, x[:8], y[:8])
    np.savez(os.path.join(out, "mixed_grads.npz"), **{n: np.asarray(g) for n, g in zip(names, mixed)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watcher = normlog.keras.watch(model, os.path.join(out, "mixed"), update_every=1)
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[watcher])
    # no NaN, finding or failure warning; without matplotlib (tox -e jax) the pictures' skip is said
    results["mixed_warnings"] = [
        str(w.message) for w in caught if "normlog" in str(w.message) and "need matplotlib" not in str(w.message)
    ]
    watcher.unwatch()
    keras.mixed_precision.set_global_policy("float32")

    results["tensorflow"] = sorted(m for m, v in sys.modules.items() if m.split(".")[0] == "tensorflow" and v)
    with open(os.path.join(out, "results.json"), "w") as file:
        json.dump(results, file)
    """
)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> str:
    requires("keras")
    out = str(tmp_path_factory.mktemp("keras_jax"))
    script = os.path.join(out, "worker.py")
    with open(script, "w") as file:
        file.write(WORKER)
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run(
        [sys.executable, script, out], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def results(out: str) -> dict[str, object]:
    with open(os.path.join(out, "results.json")) as file:
        loaded: dict[str, object] = json.load(file)
        return loaded


def test_no_tensorflow_is_imported_and_the_optimizer_is_wrapped(worker: str) -> None:
    assert results(worker)["tensorflow"] == []
    assert results(worker)["optimizers"] == 1


def test_fit_step_zero_norms_equal_jax_grad_of_the_same_batch(worker: str) -> None:
    events = read_events(os.path.join(worker, "fit"))
    grads = dict(np.load(os.path.join(worker, "fit_grads.npz")))
    weights = dict(np.load(os.path.join(worker, "fit_weights.npz")))
    assert set(grads) == {"hidden/kernel", "hidden/bias", "out/kernel", "out/bias"}
    for name, grad in grads.items():
        assert scalars(events, norm_tag("gradients", name))[0] == pytest.approx(np.linalg.norm(grad), rel=1e-5)
        assert scalars(events, norm_tag("parameters", name))[0] == pytest.approx(
            np.linalg.norm(weights[name]), rel=1e-6
        )
        assert sorted(scalars(events, norm_tag("gradients", name))) == [0, 1, 2, 3]  # steps are batches
    total = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    assert scalars(events, GLOBAL_NORM)[0] == pytest.approx(total, rel=1e-5)
    # SGD: the update is -lr * grad, so the ratio is lr * ‖g‖ / ‖w‖
    kernel = "hidden/kernel"
    expected_ratio = 0.05 * np.linalg.norm(grads[kernel]) / np.linalg.norm(weights[kernel])
    assert scalars(events, ratio_tag(kernel))[0] == pytest.approx(expected_ratio, rel=1e-4)


def test_fit_histograms_equal_the_cores(worker: str) -> None:
    events = read_events(os.path.join(worker, "fit"))
    assert [e.step for e in events.Histograms(histogram_tag("gradients", "hidden/kernel"))] == [0, 2]
    grads = dict(np.load(os.path.join(worker, "fit_grads.npz")))
    weights = dict(np.load(os.path.join(worker, "fit_weights.npz")))
    for kind, arrays in (("gradients", grads), ("parameters", weights)):
        for name, array in arrays.items():
            if kind == "parameters" and name.endswith("bias"):
                continue  # zeros: one bucket [0, 0]
            value = events.Histograms(histogram_tag(kind, name))[0].histogram_value
            core = normlog.histogram(array)
            filled = np.flatnonzero(core.counts)
            np.testing.assert_array_equal(value.bucket, core.counts[filled[0] : filled[-1] + 1])
            limits = core.bucket_limits[filled[0] : filled[-1] + 1]
            if kind == "parameters":  # the very arrays: bit for bit
                np.testing.assert_array_equal(value.bucket_limit, limits)
                assert (value.min, value.max, value.num) == (core.min, core.max, core.num)
            else:  # fit's compiled gradient and the eager jax.grad differ in the last float32 bit
                np.testing.assert_allclose(value.bucket_limit, limits, rtol=1e-6)
                assert (value.min, value.max) == pytest.approx((core.min, core.max), rel=1e-6)
                assert value.num == core.num


def test_steps_per_execution_logs_the_steps_due_and_a_resumed_run_continues(worker: str) -> None:
    name = norm_tag("gradients", "hidden/kernel")
    assert sorted(scalars(read_events(os.path.join(worker, "spe")), name)) == [0, 2, 4, 6]  # 8 batches of 4
    assert sorted(scalars(read_events(os.path.join(worker, "resumed")), name)) == [8, 9, 10, 11]
    assert results(worker)["deepcopy_is_itself"] is True


def test_a_nan_in_fit_is_found_at_its_step(worker: str) -> None:
    assert results(worker)["nan_steps"][0] == 2  # type: ignore[index]


def test_a_custom_train_step_with_stateless_apply_is_logged(worker: str) -> None:
    events = read_events(os.path.join(worker, "custom"))
    grads = dict(np.load(os.path.join(worker, "custom_grads.npz")))
    for name, grad in grads.items():
        assert scalars(events, norm_tag("gradients", name))[0] == pytest.approx(np.linalg.norm(grad), rel=1e-5)
        assert sorted(scalars(events, norm_tag("gradients", name))) == [0, 1, 2, 3]


def test_a_dropped_watcher_is_collected(worker: str) -> None:
    assert results(worker)["collected_True"] is True  # after unwatch()
    assert results(worker)["collected_False"] is True  # dropped while still wrapping


def test_fit_with_an_optimizer_it_never_applies_warns_once(worker: str) -> None:
    found = results(worker)["unused_warnings"]
    assert isinstance(found, list) and len(found) == 1


def test_mixed_float16_logs_the_unscaled_gradients_of_the_inner_optimizer(worker: str) -> None:
    assert results(worker)["loss_scaled"] == "LossScaleOptimizer"
    assert results(worker)["mixed_warnings"] == []
    events = read_events(os.path.join(worker, "mixed"))
    grads = dict(np.load(os.path.join(worker, "mixed_grads.npz")))
    assert set(grads) == {"hidden/kernel", "hidden/bias", "out/kernel", "out/bias"}
    for name, grad in grads.items():
        logged = scalars(events, norm_tag("gradients", name))
        assert sorted(logged) == [0, 1, 2, 3]  # every step's scaled gradients were finite
        # jax.grad of the unscaled loss; fit's scaled float16 backward rounds differently
        assert logged[0] == pytest.approx(np.linalg.norm(grad.astype(np.float64)), rel=2e-2)
        assert all(math.isfinite(value) for value in logged.values())
    assert sorted(scalars(events, ratio_tag("hidden/kernel"))) == [0, 1, 2, 3]
