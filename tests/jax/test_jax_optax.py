"""`normlog.jax.watch` (optax) under jax.jit: what it writes, read back with TensorBoard's reader,
against numbers computed independently (jax.grad, jnp.linalg.norm, the unwatched optax
transformation, the core's histogram)."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from typing import Any

import numpy as np
import pytest

from helpers import read_events, requires, scalars

jax = requires("jax")
optax = requires("optax")
jnp = jax.numpy

import normlog  # noqa: E402
import normlog.jax  # noqa: E402
from normlog._step import GLOBAL_NORM, histogram_tag, nonfinite_count_tag, norm_tag, ratio_tag  # noqa: E402

RNG = np.random.default_rng(3)
X = jnp.asarray(RNG.normal(size=(16, 5)).astype(np.float32))
Y = jnp.asarray(RNG.normal(size=(16, 2)).astype(np.float32))


def make_params() -> dict[str, Any]:
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    return {
        "dense": {"kernel": jax.random.normal(keys[0], (5, 8)) * 0.5, "bias": jnp.zeros(8)},
        "out": {"kernel": jax.random.normal(keys[1], (8, 2)) * 0.5, "bias": jnp.full(2, 0.1)},
    }


NAMES = ["dense/bias", "dense/kernel", "out/bias", "out/kernel"]  # pytree paths, in jax's sorted-key order


def loss(params: dict[str, Any], x: Any, y: Any) -> Any:
    hidden = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"])
    return jnp.mean((hidden @ params["out"]["kernel"] + params["out"]["bias"] - y) ** 2)


grad = jax.jit(jax.grad(loss))


def leaves(tree: Any) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): np.asarray(leaf) for path, leaf in flat}


def train(tx: Any, steps: int, x: Any = X, poison: int | None = None) -> list[dict[str, np.ndarray]]:
    """`steps` jitted updates of `tx` (the gradient computed by its own jitted function, so the
    test holds the exact arrays the update saw); the gradients of each step."""
    params = make_params()
    state = tx.init(params)

    @jax.jit
    def update(grads: Any, state: Any, params: Any) -> Any:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    seen = []
    for step in range(steps):
        grads = grad(params, x, Y)
        if step == poison:
            grads = jax.tree_util.tree_map(lambda g: g, grads)
            grads["out"]["kernel"] = grads["out"]["kernel"].at[0, 0].set(jnp.nan)
        seen.append(leaves(grads))
        params, state = update(grads, state, params)
    return seen


def test_step_zero_norms_equal_jax_grad_and_the_ratio_equals_the_plain_update(tmp_path) -> None:
    tx = normlog.jax.watch(optax.adamw(1e-2), str(tmp_path), update_every=1)
    train(tx, 3)
    tx.close()
    events = read_events(str(tmp_path))
    params = make_params()
    expected = leaves(jax.grad(loss)(params, X, Y))  # eager, not the jitted one
    weights = leaves(params)
    plain = optax.adamw(1e-2)
    updates = leaves(plain.update(jax.grad(loss)(params, X, Y), plain.init(params), params)[0])
    for name in NAMES:
        assert scalars(events, norm_tag("gradients", name))[0] == pytest.approx(
            float(jnp.linalg.norm(expected[name])), rel=1e-5
        )
        assert scalars(events, norm_tag("parameters", name))[0] == pytest.approx(
            float(np.linalg.norm(weights[name])), rel=1e-6
        )
        assert sorted(scalars(events, norm_tag("gradients", name))) == [0, 1, 2]
        if np.linalg.norm(weights[name]):
            ratio = np.linalg.norm(updates[name]) / np.linalg.norm(weights[name])
            assert scalars(events, ratio_tag(name))[0] == pytest.approx(ratio, rel=1e-5)
    total = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in expected.values()))
    assert scalars(events, GLOBAL_NORM)[0] == pytest.approx(total, rel=1e-5)
    assert sorted(scalars(events, ratio_tag("dense/bias"))) == [1, 2]  # zero at step 0: no ratio


def test_histograms_equal_the_cores_and_follow_histogram_every(tmp_path) -> None:
    tx = normlog.jax.watch(optax.sgd(0.1), str(tmp_path), histogram_every=2)
    seen = train(tx, 5)
    tx.close()
    events = read_events(str(tmp_path))
    assert [e.step for e in events.Histograms(histogram_tag("gradients", "dense/kernel"))] == [0, 2, 4]
    weights = leaves(make_params())
    for kind, arrays in (("gradients", seen[0]), ("parameters", weights)):
        for name, array in arrays.items():
            if kind == "parameters" and name == "dense/bias":
                continue  # zeros: one bucket [0, 0], checked by the core's own tests
            value = events.Histograms(histogram_tag(kind, name))[0].histogram_value
            core = normlog.histogram(array)
            filled = np.flatnonzero(core.counts)
            np.testing.assert_array_equal(value.bucket, core.counts[filled[0] : filled[-1] + 1])
            np.testing.assert_array_equal(value.bucket_limit, core.bucket_limits[filled[0] : filled[-1] + 1])
            assert (value.min, value.max, value.num) == (core.min, core.max, core.num)
    value = events.Histograms(histogram_tag("gradients", "out/kernel"))[2].histogram_value  # step 4
    core = normlog.histogram(seen[4]["out/kernel"])
    assert (value.min, value.max, value.num) == (core.min, core.max, core.num)


def test_a_nan_is_found_at_its_step(tmp_path) -> None:
    tx = normlog.jax.watch(optax.sgd(0.1), str(tmp_path), histogram_every=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tx, 5, poison=3)
        tx.flush()
    findings = [f for f in tx.findings if f.rule == "nonfinite"]
    assert findings and min(f.step for f in findings) == 3
    assert findings[0].tensor == "out/kernel"
    tx.close()
    events = read_events(str(tmp_path))
    counts = scalars(events, nonfinite_count_tag("gradients", "out/kernel"))
    assert min(counts) == 3 and counts[3] == 1.0  # then the NaN weight spreads it
    assert math.isnan(scalars(events, norm_tag("gradients", "out/kernel"))[3])
    assert any("NaN/Inf" in str(w.message) and "step 3" in str(w.message) for w in caught)


def test_a_nan_brings_histograms_at_the_next_steps(tmp_path) -> None:
    tx = normlog.jax.watch(optax.sgd(0.1), str(tmp_path), histogram_every=100, histograms_after_finding=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(tx, 8, poison=3)
    tx.close()
    events = read_events(str(tmp_path))
    # step 0 by the cadence; 4 and 5 after the finding at step 3 (a tensor whose values are
    # all NaN by then has no histogram: out/bias's weight stays finite longest)
    assert [e.step for e in events.Histograms(histogram_tag("parameters", "out/bias"))] == [0, 4, 5]
    assert [e.step for e in events.Histograms(histogram_tag("gradients", "out/kernel"))] == [0, 4]


def test_the_step_lives_in_the_state_and_step_gives_the_first(tmp_path) -> None:
    tx = normlog.jax.watch(optax.sgd(0.1), str(tmp_path), step=10, every=2)
    params = make_params()
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(3):
        _, state = update(grad(params, X, Y), state, params)
    assert int(state.step) == 13
    restored = jax.tree_util.tree_map(np.asarray, state)  # as a checkpoint gives it back
    for _ in range(2):
        _, restored = update(grad(params, X, Y), restored, params)
    tx.close()
    assert sorted(scalars(read_events(str(tmp_path)), GLOBAL_NORM)) == [10, 12, 14]


def test_the_updates_are_those_of_the_inner_transformation(tmp_path) -> None:
    params = make_params()
    grads = grad(params, X, Y)
    plain = optax.adamw(1e-2)
    tx = normlog.jax.watch(optax.adamw(1e-2), str(tmp_path), health=False)
    expected, _ = jax.jit(plain.update)(grads, plain.init(params), params)
    got, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    tx.close()
    for name, value in leaves(expected).items():
        np.testing.assert_array_equal(leaves(got)[name], value)


def test_without_params_only_gradients_are_logged_with_a_warning(tmp_path) -> None:
    tx = normlog.jax.watch(optax.sgd(0.1), str(tmp_path))
    params = make_params()
    with pytest.warns(RuntimeWarning, match="without params"):
        jax.jit(tx.update)(grad(params, X, Y), tx.init(params))
    tx.close()
    tags = read_events(str(tmp_path)).Tags()["scalars"]
    assert norm_tag("gradients", "dense/kernel") in tags and norm_tag("parameters", "dense/kernel") not in tags


def test_a_failure_in_logging_warns_once_and_training_goes_on_and_strict_raises(tmp_path) -> None:
    writer = normlog.Writer(str(tmp_path / "closed"))
    tx = normlog.jax.watch(optax.sgd(0.1), writer=writer, health=False)
    writer.close()  # every write now fails
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tx, 3)
        jax.effects_barrier()
    assert sum("logging failed" in str(w.message) for w in caught) == 1
    writer = normlog.Writer(str(tmp_path / "strict"))
    tx = normlog.jax.watch(optax.sgd(0.1), writer=writer, health=False, strict=True)
    writer.close()
    with pytest.raises(Exception, match="closed"):  # noqa: PT012 (the callback may run at the barrier)
        train(tx, 1)
        jax.effects_barrier()


def test_options_are_checked_before_any_file_is_made(tmp_path) -> None:
    with pytest.raises(ValueError, match="every"):
        normlog.jax.watch(optax.sgd(0.1), str(tmp_path / "run"), every=0)
    assert not (tmp_path / "run").exists()


def test_importing_normlog_jax_imports_neither_jax_nor_optax() -> None:
    code = "import sys, normlog, normlog.jax; print([m for m in ('jax', 'optax') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_burst_after_a_finding_brings_histograms_at_the_next_steps_whatever_every_says(tmp_path) -> None:
    # every=10, K=5: a NaN gradient at step 10 (a step `every` logs) is found there; steps
    # 11..15 carry histograms of every tensor, and norms stay at the multiples of 10. The inner
    # transformation skips the NaN step (apply_if_finite), so the weights stay finite and
    # every tensor has a histogram at each burst step.
    inner = optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=5)
    tx = normlog.jax.watch(
        inner, str(tmp_path), every=10, histogram_every=None, update_every=None, histograms_after_finding=5
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(tx, 22, poison=10)
        tx.flush()
    assert min(f.step for f in tx.findings if f.rule == "nonfinite") == 10
    tx.close()
    events = read_events(str(tmp_path))
    assert sorted(scalars(events, norm_tag("gradients", "dense/kernel"))) == [0, 10, 20]
    assert sorted(scalars(events, GLOBAL_NORM)) == [0, 10, 20]
    for kind in ("gradients", "parameters"):
        for name in NAMES:
            steps = [e.step for e in events.Histograms(histogram_tag(kind, name))]
            assert steps == [11, 12, 13, 14, 15], (kind, name)


def test_no_findings_no_host_question_with_health_off_or_no_burst(tmp_path, monkeypatch) -> None:
    asked: list[int] = []
    from normlog.jax._emit import Emitter

    original = Emitter._wanted

    def counting(self: Any, step: Any) -> Any:
        asked.append(int(step))
        return original(self, step)

    monkeypatch.setattr(Emitter, "_wanted", counting)
    for index, options in enumerate(({"health": False}, {"histograms_after_finding": 0}, {})):
        tx = normlog.jax.watch(optax.sgd(0.1), str(tmp_path / str(index)), **options)
        train(tx, 3)
        tx.close()
        assert len(asked) == (3 if options == {} else 0), options
    assert sorted(scalars(read_events(str(tmp_path / "0")), GLOBAL_NORM)) == [0, 1, 2]


def _frozen_out(learning_rate: float) -> Any:
    labels = {"dense": {"kernel": "train", "bias": "train"}, "out": {"kernel": "slow", "bias": "slow"}}
    return optax.multi_transform(
        {"train": optax.sgd(0.1), "slow": optax.sgd(learning_rate) if learning_rate else optax.set_to_zero()}, labels
    )


def test_a_leaf_frozen_by_set_to_zero_is_not_found_stalled_and_has_no_ratio(tmp_path) -> None:
    tx = normlog.jax.watch(_frozen_out(0.0), str(tmp_path), update_every=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tx, 6)
        tx.flush()
    assert [f for f in tx.findings if f.rule == "stalled"] == []
    assert not any("stalled" in str(w.message) for w in caught)
    tx.close()
    tags = read_events(str(tmp_path)).Tags()["scalars"]
    assert ratio_tag("dense/kernel") in tags and ratio_tag("out/kernel") not in tags


def test_a_real_stall_is_still_found(tmp_path) -> None:
    tx = normlog.jax.watch(_frozen_out(1e-12), str(tmp_path), update_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(tx, 6)
        tx.flush()
    stalled = {f.tensor for f in tx.findings if f.rule == "stalled"}
    tx.close()
    assert stalled and stalled <= {"out/kernel", "out/bias"}
    ratio = scalars(read_events(str(tmp_path)), ratio_tag("out/kernel"))
    assert 0 < ratio[0] < 1e-9


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"histograms_after_finding": -1}, ValueError),
        ({"histograms_after_finding": 1.5}, TypeError),
        ({"health_via": "email"}, ValueError),
        ({"health": "yes"}, TypeError),
    ],
)
def test_a_bad_option_makes_no_file_and_no_writer(tmp_path, options: dict[str, Any], error: type) -> None:
    import threading

    before = {thread.ident for thread in threading.enumerate()}
    with pytest.raises(error):
        normlog.jax.watch(optax.sgd(0.1), str(tmp_path / "run"), **options)
    assert not (tmp_path / "run").exists()
    assert list(tmp_path.iterdir()) == []
    assert {thread.ident for thread in threading.enumerate()} <= before
