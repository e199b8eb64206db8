"""What a Keras step records is the step record's (`normlog._step`), the same as PyTorch's: the
drifts the two adapters' own copies had, each against an independent reference."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from helpers import read_events, requires, row_histogram, scalars

tf = requires("tensorflow")
keras = requires("keras")

from test_keras_watch import nonfinite_of  # noqa: E402

import normlog  # noqa: E402
import normlog.keras  # noqa: E402
from normlog._step import histogram_tag, norm_tag, parse_tag, ratio_tag  # noqa: E402


def small_model() -> keras.Model:
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense")], name="net")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def test_a_gradient_tape_loop_with_log_gradients_writes_its_norms(tmp_path) -> None:
    # seed 004's loop: log_gradients from a tape, with log="gradients" (it failed with a shape
    # mismatch and wrote nothing)
    model = small_model()
    watcher = normlog.keras.watch(model, str(tmp_path), log="gradients", histogram_every=1, strict=True)
    x, y = np.ones((2, 4), "float32"), np.zeros((2, 3), "float32")
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x) - y))
    grads = tape.gradient(loss, model.trainable_variables)
    watcher.log_gradients(grads, model.trainable_variables, step=0)
    watcher.unwatch()
    events = read_events(str(tmp_path))
    for variable, grad in zip(model.trainable_variables, grads):
        name = variable.path.removeprefix("net/")
        assert scalars(events, norm_tag("gradients", name))[0] == pytest.approx(np.linalg.norm(grad.numpy()), rel=1e-6)
        assert len(events.Histograms(histogram_tag("gradients", name))) == 1
    assert not any(getattr(parse_tag(tag), "kind", "") == "parameters" for tag in events.Tags()["scalars"])


def test_nan_and_inf_in_the_weights_are_counted_as_in_pytorch(tmp_path) -> None:
    model = small_model()
    kernel = model.get_layer("dense").kernel
    broken = kernel.numpy()
    broken[0, 0], broken[1, 1] = np.nan, np.inf
    kernel.assign(broken)
    watcher = normlog.keras.watch(model, str(tmp_path), health=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(np.ones((4, 4), "float32"), np.zeros((4, 3), "float32"), batch_size=4, verbose=0, callbacks=[watcher])
    watcher.unwatch()
    events = read_events(str(tmp_path))
    assert scalars(events, nonfinite_of("parameters", "dense/kernel"))[0] == 2  # counted as numpy counts them
    assert math.isnan(scalars(events, norm_tag("parameters", "dense/kernel"))[0])
    assert any("NaN/Inf values in the parameters of 'dense/kernel' at step 0" in str(w.message) for w in caught)


def test_a_zero_weight_writes_no_update_ratio(tmp_path) -> None:
    # the Dense bias starts at zero: its relative update has no meaning (it was NaN here and
    # inf in PyTorch, which blanks the chart); the kernel's is written
    model = small_model()
    watcher = normlog.keras.watch(model, str(tmp_path), update_every=1)
    model.fit(np.ones((4, 4), "float32"), np.zeros((4, 3), "float32"), batch_size=4, verbose=0, callbacks=[watcher])
    watcher.unwatch()
    tags = read_events(str(tmp_path)).Tags()["scalars"]
    assert ratio_tag("dense/kernel") in tags
    assert ratio_tag("dense/bias") not in tags


@pytest.mark.parametrize(
    "values",
    [
        np.array([-1.7e308, 0.0, 1e300, 1.7e308]),  # a range past the largest double
        # (a width below the smallest normal double is not testable here: TensorFlow's CPU
        # kernels flush subnormal float64 values to zero, so the graph never sees them)
        np.array([-np.inf, 1.0, np.nan, 1e308, -1e308]),
    ],
)
def test_the_in_graph_row_of_extreme_float64_ranges_equals_the_core(values: np.ndarray) -> None:
    from normlog.keras._graph import histogram_row

    got = row_histogram(histogram_row(tf.constant(values, tf.float64), 30).numpy(), 30)
    expected = normlog.histogram(values, 30)
    np.testing.assert_array_equal(got.edges, expected.edges)
    np.testing.assert_array_equal(got.counts, expected.counts)


def test_the_in_graph_norms_equal_the_core_where_float32_sums_would_fail() -> None:
    """The quick float32 sums of squares hand over to float64 where they would lose values:
    squares that underflow (1e-25) or overflow (1e25) float32, zeros, NaN and Inf; sparse
    rows as their dense gradient; float16 and float64 tensors."""
    from normlog.keras._graph import fuse, reduce_tensors

    rng = np.random.default_rng(3)
    base = rng.normal(size=(64, 33)).astype("float32")
    with_nan, with_inf = base.copy(), base.copy()
    with_nan[3, 4], with_inf[5, 6] = np.nan, -np.inf
    cases = {
        "ordinary": [base, base[0] * 1e-3],
        "underflowing squares": [base, base * 1e-25],
        "overflowing squares": [base * 1e25, base],
        "zeros": [np.zeros_like(base), base],
        "nan and inf": [with_nan, with_inf],
        "float16": [base.astype("float16"), base.astype("float16")[:2]],
        "float64": [base.astype("float64") * 1e150, base.astype("float64")],
    }

    def reduced(variables: list, *kinds: list) -> list:
        return tf.function(lambda: reduce_tensors(fuse(variables), *kinds))()

    for case, arrays in cases.items():
        halves = [a / 2 for a in arrays]  # a second kind (the weights) in the same pass
        (norms, nonfinite), (half_norms, _) = reduced([tf.Variable(a) for a in arrays], arrays, halves)
        expected = [normlog.l2_norm(a) for a in arrays]
        np.testing.assert_allclose(norms.numpy(), expected, rtol=1e-6, err_msg=case)
        np.testing.assert_allclose(half_norms.numpy(), [normlog.l2_norm(a) for a in halves], rtol=1e-6, err_msg=case)
        counts = [np.count_nonzero(~np.isfinite(a)) for a in arrays]
        np.testing.assert_array_equal(nonfinite.numpy(), counts, err_msg=case)
    # a sparse gradient (repeated rows summed) reduces as the dense gradient it stands for
    table = tf.Variable(np.zeros((50, 4), "float32"))
    values = base[:3, :4] * 1e-22
    sparse = tf.IndexedSlices(tf.constant(values), tf.constant([7, 7, 9]), tf.constant([50, 4]))
    ((norms, _),) = reduced([table], [sparse])
    dense = np.zeros((50, 4))
    np.add.at(dense, [7, 7, 9], values.astype(np.float64))
    np.testing.assert_allclose(norms.numpy(), [normlog.l2_norm(dense)], rtol=1e-6)
