"""normlog.keras.watch at real size and in every loop: a 150-variable model, steps_per_execution,
tf.function loops, resumed runs, named watchers, a GAN, recompiles, loss-scale skips, and what
is refused; each against a manual tf.GradientTape or TensorBoard's reader."""

from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import pytest

from helpers import read_events, requires, scalars

tf = requires("tensorflow")
keras = requires("keras")

from test_keras_watch import X, Y, make_model, tape_gradients  # noqa: E402

import normlog  # noqa: E402
import normlog.keras  # noqa: E402
from normlog._step import GLOBAL_NORM, LOSS_SCALE, SKIPPED_STEP, histogram_tag, norm_tag  # noqa: E402


def mobilenet() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=4, classifier_activation=None)
    assert len(model.trainable_variables) >= 150
    return model


def assert_logged(
    events, step: int, arrays: dict[str, np.ndarray], kind: str, rel: float = 1e-5, buckets: str = "exact"
) -> None:
    """Norms equal numpy's of the same arrays; histograms the core's (`buckets`: "exact"
    bucket for bucket; "moved": the same values, at most 0.1% of them in another bucket;
    "bounds": min, max and count to `rel`)."""
    for name, array in arrays.items():
        logged = scalars(events, norm_tag(kind, name))[step]
        assert logged == pytest.approx(np.linalg.norm(array.astype(np.float64)), rel=rel), name
        value = next(e for e in events.Histograms(histogram_tag(kind, name)) if e.step == step).histogram_value
        core = normlog.histogram(array)
        assert value.num == core.num, name
        if buckets == "bounds":
            assert (value.min, value.max) == pytest.approx((core.min, core.max), rel=rel, abs=1e-9), name
            continue
        assert (value.min, value.max) == (core.min, core.max), name
        filled = np.flatnonzero(core.counts)
        expected = core.counts[filled[0] : filled[-1] + 1]
        if buckets == "exact":
            np.testing.assert_array_equal(value.bucket, expected, err_msg=name)
        else:
            got = np.zeros(expected.size)
            got[: len(value.bucket)] = list(value.bucket)[: expected.size]
            assert np.abs(got - expected).sum() <= 2 + 1e-3 * core.num, name


def test_a_150_variable_model_under_fit_logs_the_tapes_gradients(tmp_path) -> None:
    # run_eagerly: fit's step runs eager ops as the tape does (a traced step rounds the
    # convolutions' gradients differently: one BN beta's norm was 17% off, its sum cancelling)
    model = mobilenet()
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), run_eagerly=True)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 32, 32, 3)).astype("float32"), rng.integers(0, 4, 16)
    expected = tape_gradients(model, x[:8], y[:8])
    weights = {v.path.removeprefix(f"{model.name}/"): v.numpy() for v in model.trainable_variables}
    watcher = normlog.keras.watch(model, str(tmp_path), histogram_every=1, strict=True)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[watcher])
    events = read_events(str(tmp_path))
    # fit (even run eagerly) and the tape round a few sums differently: norms agree to 1e-3
    assert_logged(events, 0, expected, "gradients", rel=1e-3, buckets="bounds")
    assert_logged(events, 0, weights, "parameters", rel=1e-4)  # the initial weights, known exactly
    assert sorted(scalars(events, GLOBAL_NORM)) == [0, 1]


def test_a_150_variable_model_in_a_traced_step_logs_that_steps_gradients(tmp_path) -> None:
    model = mobilenet()
    optimizer = keras.optimizers.Adam()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    watcher = normlog.keras.watch(model, str(tmp_path), optimizer=optimizer, histogram_every=1, strict=True)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        weights = [tf.identity(v) for v in model.trainable_variables]
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return grads, weights

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 32, 32, 3)).astype("float32"), rng.integers(0, 4, 8)
    grads, weights = train_step(x, y)
    watcher.write_pending()
    names = [v.path.removeprefix(f"{model.name}/") for v in model.trainable_variables]
    watcher.unwatch()
    events = read_events(str(tmp_path))
    # The same tensors. Open: some gradient of this model has buckets that differ from the
    # core's while its norm, min, max and count agree (seen once, not yet traced to a value;
    # suspected: TensorFlow flushes float32 subnormals to zero on the CPU, numpy keeps them).
    # Bounded here; exact for the weights and in tests/keras/test_keras_watch.py.
    # norms summed in float32 (as tf.norm sums them) over up to 0.4M values: 1e-4 of numpy's
    arrays = dict(zip(names, [g.numpy() for g in grads]))
    assert_logged(events, 0, arrays, "gradients", rel=1e-4, buckets="moved")
    assert_logged(events, 0, dict(zip(names, [w.numpy() for w in weights])), "parameters", rel=1e-4)


def test_steps_per_execution_logs_the_due_steps_and_says_which(tmp_path) -> None:
    model = make_model(steps_per_execution=4)
    watcher = normlog.keras.watch(model, str(tmp_path), every=2)
    with pytest.warns(RuntimeWarning, match="steps_per_execution=4.*the last in each execution"):
        model.fit(X, Y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[watcher])
    logged = scalars(read_events(str(tmp_path)), norm_tag("gradients", "dense/kernel"))
    assert sorted(logged) == [2, 6]  # due steps (multiples of 2), the last of each execution of 4
    model = make_model(steps_per_execution=4)
    expected = tape_gradients(model, X[:32], Y[:32])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every=8 is a multiple of 4: nothing to warn about
        events = fit(model, tmp_path / "eight", every=8)
    logged = scalars(events, norm_tag("gradients", "dense/kernel"))
    assert sorted(logged) == [0]  # step 0 of steps 0-7: the due step, not the execution's last
    assert logged[0] == pytest.approx(np.linalg.norm(expected["dense/kernel"]), rel=1e-5)


def fit(model, logdir, **options):
    watcher = normlog.keras.watch(model, str(logdir), **options)
    model.fit(X, Y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[watcher])
    return read_events(str(logdir))


def tf_function_loop(model, optimizer):
    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = keras.losses.mean_squared_error(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return grads

    return train_step


def test_a_tf_function_loop_that_writes_each_step_logs_the_tapes_norms(tmp_path) -> None:
    model, optimizer = make_model(), keras.optimizers.SGD(0.1)
    watcher = normlog.keras.watch(model, str(tmp_path), optimizer=optimizer, strict=True)
    train_step = tf_function_loop(model, optimizer)
    norms = []
    for step in range(3):
        grads = train_step(X[step * 32 : (step + 1) * 32], Y[step * 32 : (step + 1) * 32])
        norms.append(float(tf.norm(grads[0])))
        watcher.write_pending()
    watcher.unwatch()
    logged = scalars(read_events(str(tmp_path)), norm_tag("gradients", "dense/kernel"))
    assert [logged[s] for s in range(3)] == pytest.approx(norms, rel=1e-5)


def test_a_tf_function_loop_that_never_writes_warns(tmp_path) -> None:
    model, optimizer = make_model(), keras.optimizers.SGD(0.1)
    watcher = normlog.keras.watch(model, str(tmp_path), optimizer=optimizer)
    train_step = tf_function_loop(model, optimizer)
    for step in range(3):
        train_step(X[step * 32 : (step + 1) * 32], Y[step * 32 : (step + 1) * 32])
    with pytest.warns(
        RuntimeWarning, match=r"up to step 2, but statistics were written only up to step -1.*write_pending"
    ):
        watcher.unwatch()


def test_a_tf_function_traced_before_watch_warns(tmp_path) -> None:
    model, optimizer = make_model(), keras.optimizers.SGD(0.1)
    train_step = tf_function_loop(model, optimizer)
    train_step(X[:32], Y[:32])  # traced without the hook
    watcher = normlog.keras.watch(model, str(tmp_path), optimizer=optimizer)
    train_step(X[32:64], Y[32:64])
    with pytest.warns(RuntimeWarning, match="applied 1 updates that normlog did not see.*traced"):
        watcher.write_pending()
    watcher.unwatch()


def test_a_resumed_run_continues_its_steps(tmp_path) -> None:
    model = make_model()
    model.fit(X[:96], Y[:96], batch_size=32, epochs=1, verbose=0)  # 3 steps before watching
    assert int(model.optimizer.iterations) == 3
    events = fit(model, tmp_path / "resumed")
    assert sorted(scalars(events, GLOBAL_NORM)) == list(range(3, 11))
    events = fit(make_model(), tmp_path / "given", step=100)
    assert sorted(scalars(events, GLOBAL_NORM)) == list(range(100, 108))


def test_named_watchers_keep_their_tags_and_an_unnamed_second_warns(tmp_path) -> None:
    first, second = make_model(), make_model(keras.optimizers.SGD(0.5))
    expected = tape_gradients(second, X[:32], Y[:32])
    a = normlog.keras.watch(first, str(tmp_path), name="first")
    b = normlog.keras.watch(second, str(tmp_path), name="second")
    for model, watcher in ((first, a), (second, b)):
        model.fit(X, Y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[watcher])
    a.unwatch(), b.unwatch()
    logged = scalars(read_events(str(tmp_path / "second")), norm_tag("gradients", "dense/kernel"))
    assert sorted(logged) == list(range(8))
    assert logged[0] == pytest.approx(np.linalg.norm(expected["dense/kernel"]), rel=1e-5)
    assert sorted(scalars(read_events(str(tmp_path / "first")), GLOBAL_NORM)) == list(range(8))

    writer = normlog.Writer(str(tmp_path / "shared"))
    named = normlog.keras.watch(make_model(), writer=writer, name="third")
    assert named.writer.logdir == os.path.join(writer.logdir, "third")
    normlog.keras.watch(make_model(), writer=writer)
    with pytest.warns(RuntimeWarning, match="second watcher writes into"):
        normlog.keras.watch(make_model(), writer=writer)
    writer.close()


class GAN(keras.Model):
    """keras.io's GAN shape: two optimizers set in compile, applied in train_step."""

    def __init__(self) -> None:
        super().__init__(name="gan")
        self.generator = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="g_dense")], name="generator")
        self.discriminator = keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(1, name="d_dense")], name="discriminator"
        )

    def compile(self, d_optimizer, g_optimizer):
        super().compile()
        self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer

    def gradients(self, real):
        noise = tf.random.stateless_normal((tf.shape(real)[0], 4), seed=(1, 2))
        with tf.GradientTape(persistent=True) as tape:
            fake = self.generator(noise)
            d_loss = tf.reduce_mean(self.discriminator(fake)) - tf.reduce_mean(self.discriminator(real))
            g_loss = -tf.reduce_mean(self.discriminator(fake))
        d_grads = tape.gradient(d_loss, self.discriminator.trainable_variables)
        g_grads = tape.gradient(g_loss, self.generator.trainable_variables)
        return d_grads, g_grads

    def train_step(self, real):
        d_grads, g_grads = self.gradients(real)
        self.d_optimizer.apply(d_grads, self.discriminator.trainable_variables)
        self.g_optimizer.apply(g_grads, self.generator.trainable_variables)
        return {"d_grad_norm": tf.norm(d_grads[0])}


def test_a_gans_two_optimizers_are_both_watched(tmp_path) -> None:
    keras.utils.set_random_seed(0)
    gan = GAN()
    gan.compile(keras.optimizers.SGD(0.1), keras.optimizers.SGD(0.1))
    real = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    d_grads, g_grads = gan.gradients(tf.constant(real[:32]))
    watcher = normlog.keras.watch(gan, str(tmp_path), strict=True)
    gan.fit(real, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[watcher])
    events = read_events(str(tmp_path))
    for grads, variables in (
        (d_grads, gan.discriminator.trainable_variables),
        (g_grads, gan.generator.trainable_variables),
    ):
        for grad, variable in zip(grads, variables):
            logged = scalars(events, norm_tag("gradients", variable.path))
            assert sorted(logged) == [0, 1]
            assert logged[0] == pytest.approx(float(tf.norm(grad)), rel=1e-5)
    total = np.sqrt(sum(float(tf.reduce_sum(g**2)) for g in [*d_grads, *g_grads]))
    assert scalars(events, GLOBAL_NORM)[0] == pytest.approx(total, rel=1e-5)  # one global norm, both models


def test_unfreezing_after_a_recompile_is_followed_and_a_frozen_layer_is_not_stalled(tmp_path) -> None:
    keras.utils.set_random_seed(0)
    base = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="tanh", name="base_dense")], name="base"
    )
    model = keras.Sequential([base, keras.layers.Dense(1, name="head")], name="net")
    base.trainable = False
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    watcher = normlog.keras.watch(model, str(tmp_path), update_every=1)
    model.fit(X, Y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[watcher])
    base.trainable = True
    model.compile(optimizer=keras.optimizers.Adam(1e-5), loss="mse")  # keras.io's fine-tuning recipe
    expected = tape_gradients(model, X[:32], Y[:32])
    model.fit(X, Y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[watcher])
    base.trainable = False  # frozen again: its update ratio is not 0 from now on, it is not watched
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(X, Y, batch_size=32, epochs=3, shuffle=False, verbose=0, callbacks=[watcher])
    events = read_events(str(tmp_path))
    logged = scalars(events, norm_tag("gradients", "base/base_dense/kernel"))
    assert sorted(logged) == list(range(8, 16))  # the second fit only, its steps continuing
    assert logged[8] == pytest.approx(np.linalg.norm(expected["base/base_dense/kernel"]), rel=1e-5)
    assert sorted(scalars(events, norm_tag("gradients", "head/kernel"))) == list(range(40))
    assert not [f for f in watcher.findings if f.rule == "stalled"]


def test_watching_again_replaces_the_old_watcher_in_the_compiled_step(tmp_path) -> None:
    model = make_model()
    old = normlog.keras.watch(model, str(tmp_path / "old"))
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=[old])
    new = normlog.keras.watch(model, str(tmp_path / "new"))
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=[new])
    assert sorted(scalars(read_events(str(tmp_path / "new")), GLOBAL_NORM)) == list(range(8, 16))
    assert sorted(scalars(read_events(str(tmp_path / "old")), GLOBAL_NORM)) == list(range(8))
    assert old.step == 8  # its counter stopped: the compiled step no longer runs it


def test_a_loss_scale_overflow_is_a_skipped_step_not_a_finding(tmp_path) -> None:
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        # a scale far past float16's range: the first steps overflow and Keras skips them
        model = make_model(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=2.0**24))
        watcher = normlog.keras.watch(model, str(tmp_path))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[watcher])
        events = read_events(str(tmp_path))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    skipped = scalars(events, SKIPPED_STEP)
    assert skipped and set(skipped.values()) == {1.0}
    scales = scalars(events, LOSS_SCALE)
    # each skipped step used a scale half the one before, as LossScaleOptimizer lowers it
    assert [scales[step] for step in sorted(skipped)] == [2.0 ** (24 - k) for k in range(len(skipped))]
    norms = scalars(events, norm_tag("gradients", "dense/kernel"))
    assert norms and set(norms) == set(range(32)) - set(skipped) and all(np.isfinite(list(norms.values())))
    assert not [w for w in caught if "NaN/Inf" in str(w.message) or "normlog [" in str(w.message)]
    assert not watcher.findings
    assert not any(tag.startswith("health") for tag in events.Tags()["tensors"] + events.Tags()["scalars"])


@pytest.mark.parametrize("thing", ["object", "layer", "module", "string"])
def test_anything_but_a_keras_model_or_optimizer_is_refused_before_a_file_is_made(tmp_path, thing) -> None:
    objects = {
        "object": lambda: object(),
        "layer": lambda: keras.layers.Dense(2),
        "module": lambda: tf.Module(),
        "string": lambda: "model",
    }
    with pytest.raises(TypeError, match=r"needs a keras\.Model or a keras\.optimizers\.Optimizer"):
        normlog.keras.watch(objects[thing](), str(tmp_path / "logs"))
    assert not (tmp_path / "logs").exists()


def test_an_optimizer_alone_is_watched(tmp_path) -> None:
    model, optimizer = make_model(), keras.optimizers.SGD(0.1)
    watcher = normlog.keras.watch(optimizer, str(tmp_path))
    with tf.GradientTape() as tape:
        loss = keras.losses.mean_squared_error(Y[:32], model(X[:32], training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    watcher.unwatch()
    logged = scalars(read_events(str(tmp_path)), norm_tag("gradients", "net/dense/kernel"))
    assert logged[0] == pytest.approx(float(tf.norm(grads[0])), rel=1e-5)


def test_a_deep_copied_watcher_logs_as_the_original(tmp_path) -> None:
    model = make_model()
    watcher = normlog.keras.watch(model, str(tmp_path))
    copied = copy.deepcopy([watcher])[0]  # as keras-tuner copies callbacks
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=[copied])
    assert sorted(scalars(read_events(str(tmp_path)), GLOBAL_NORM)) == list(range(8))


def test_a_sparse_embedding_gradient_is_reduced_as_its_dense_gradient(tmp_path) -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((6,), dtype="int32"), keras.layers.Embedding(1000, 8, name="embedding"), keras.layers.Dense(1)],
        name="net",
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    tokens = np.random.default_rng(0).integers(0, 20, size=(64, 6)).astype("int32")  # repeated rows
    target = np.random.default_rng(1).normal(size=(64, 6, 1)).astype("float32")
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=tokens[:32], y=target[:32], y_pred=model(tokens[:32], training=True))
    grad = tape.gradient(loss, model.trainable_variables)[0]
    assert isinstance(grad, tf.IndexedSlices)
    dense = tf.convert_to_tensor(grad).numpy()
    watcher = normlog.keras.watch(model, str(tmp_path), histogram_every=1, strict=True)
    model.fit(tokens, target, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[watcher])
    events = read_events(str(tmp_path))
    assert scalars(events, norm_tag("gradients", "embedding/embeddings"))[0] == pytest.approx(
        np.linalg.norm(dense), rel=1e-5
    )
    value = events.Histograms(histogram_tag("gradients", "embedding/embeddings"))[0].histogram_value
    core = normlog.histogram(dense)
    assert (value.num, value.min, value.max) == (core.num, pytest.approx(core.min), pytest.approx(core.max))
