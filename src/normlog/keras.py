"""Keras adapter: `watch(model)` is a callback that logs the gradients each training step used.

Rules: gradients are caught in the optimizer's `apply`, wrapped on the optimizer instance:
the one point that `fit`'s train step and custom `apply_gradients` loops both pass. With
the TensorFlow backend the statistics are computed inside the traced step (no py_function)
into tf.Variables that neither model nor optimizer tracks, and reach the host only on
logged steps. Histograms use the core's bucket rule in float64, so they equal the core's.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import keras
import numpy as np
import tensorflow as tf

from normlog._watching import Guard, check_options
from normlog.health import Finding, Monitor, StepValues, Thresholds, announce
from normlog.writer import Writer

__all__ = ["Watcher", "watch"]

Log = Literal["gradients", "parameters", "all"]


def _check_backend() -> None:
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"normlog.keras supports Keras 3 with the TensorFlow backend; this process uses {backend!r}. "
            "Set KERAS_BACKEND=tensorflow, or log with normlog.Writer from your own loop."
        )


def _histogram_row(values: tf.Tensor, bins: int) -> tf.Tensor:
    """[min, max, sum, sum_squares, finite, nan, posinf, neginf, counts...] in float64, with
    the core's rule: floor((x - min) / width) over the finite values, clamped to the last
    bucket. Static shapes only (no boolean masks), so XLA can compile it."""
    x = tf.reshape(tf.cast(values, tf.float64), [-1])
    finite = tf.math.is_finite(x)
    count = tf.reduce_sum(tf.cast(finite, tf.float64))
    nan = tf.reduce_sum(tf.cast(tf.math.is_nan(x), tf.float64))
    posinf = tf.reduce_sum(tf.cast(tf.equal(x, math.inf), tf.float64))
    neginf = tf.reduce_sum(tf.cast(tf.equal(x, -math.inf), tf.float64))
    zeroed = tf.where(finite, x, tf.zeros_like(x))
    lo = tf.where(count > 0, tf.reduce_min(tf.where(finite, x, math.inf)), 0.0)
    hi = tf.where(count > 0, tf.reduce_max(tf.where(finite, x, -math.inf)), 0.0)
    width = tf.where(hi > lo, (hi - lo) / bins, 1.0)
    index = tf.cast(tf.floor((zeroed - lo) / width), tf.int32)
    # non-finite values go to an extra bucket that is dropped
    index = tf.where(finite, tf.clip_by_value(index, 0, bins - 1), bins)
    counts = tf.math.unsorted_segment_sum(tf.ones_like(x), index, bins + 1)[:bins]
    head = tf.stack([lo, hi, tf.reduce_sum(zeroed), tf.reduce_sum(zeroed * zeroed), count, nan, posinf, neginf])
    return tf.concat([head, counts], 0)


def _norm(values: tf.Tensor) -> tf.Tensor:
    # float32 accumulation as tf.norm does, reported as float64
    as_float = tf.cast(values, tf.float32) if values.dtype != tf.float64 else values
    return tf.cast(tf.sqrt(tf.reduce_sum(tf.square(as_float))), tf.float64)


def _nonfinite(values: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(tf.cast(tf.logical_not(tf.math.is_finite(values)), tf.float64))


class Watcher(keras.callbacks.Callback):  # type: ignore[misc]
    """The callback `watch` returns: pass it to `fit`. See `watch` for what it logs."""

    def __init__(
        self,
        model: keras.Model,
        writer: Writer,
        *,
        owns_writer: bool,
        log: Log,
        every: int,
        histogram_every: int | None,
        update_every: int | None,
        optimizer: keras.optimizers.Optimizer | None,
        bins: int,
        strict: bool,
        health: bool | Thresholds,
        health_via: Literal["warnings", "logging"],
    ) -> None:
        super().__init__()
        check_options(log, every, histogram_every, update_every)
        self.writer = writer
        self._owns_writer = owns_writer
        self._watched = weakref.ref(model)
        self._log_gradients = log in ("gradients", "all")
        self._log_parameters = log in ("parameters", "all")
        self._every = every
        self._histogram_every = histogram_every
        self._update_every = update_every if self._log_parameters else None
        self._bins = bins
        self._guard = Guard(strict)
        self._wrapped: list[keras.optimizers.Optimizer] = []
        self._state: _State | None = None
        self._written = {"stats": -1, "histograms": -1, "updates": -1}
        self._monitor = Monitor(health if isinstance(health, Thresholds) else None) if health else None
        self._health_via = health_via
        self._wrap(optimizer if optimizer is not None else getattr(model, "optimizer", None))

    @property
    def step(self) -> int:
        """Optimizer updates seen so far (the next step's index)."""
        return 0 if self._state is None else int(self._state.step.numpy())

    # -- installing ------------------------------------------------------------------

    def _wrap(self, optimizer: keras.optimizers.Optimizer | None) -> None:
        if optimizer is None or any(wrapped is optimizer for wrapped in self._wrapped):
            return
        original = optimizer.apply  # the bound method of the class, or another wrapper
        # Under a tf.distribute strategy with several replicas, apply() sees each replica's
        # own gradients; the optimizer sums them in _all_reduce_sum_gradients, which is
        # where the statistics are taken then (of the inner optimizer under loss scaling,
        # whose gradients are already unscaled).
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        reducer = inner if hasattr(inner, "_all_reduce_sum_gradients") else None
        armed = threading.local()

        def apply(grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None) -> Any:
            variables = list(trainable_variables) if trainable_variables is not None else None
            if variables is None and optimizer.built:
                variables = list(optimizer._trainable_variables)
            context = tf.distribute.get_replica_context()
            if reducer is not None and context is not None and context.num_replicas_in_sync > 1:
                armed.variables, armed.pending = variables or [], None
                try:
                    result = original(grads, trainable_variables)
                    pending = armed.pending
                finally:
                    armed.variables = None
            else:
                pending = self._guard.safely(lambda: self._before_apply(optimizer, list(grads), variables or []))
                result = original(grads, trainable_variables)
            if pending is not None:
                self._guard.safely(lambda: self._after_apply(pending, measure_update=True))
            if tf.executing_eagerly():  # a custom eager loop: nothing else will write this step
                self._guard.safely(self.write_pending)
            return result

        optimizer.apply = apply
        self._wrapped.append(optimizer)
        if reducer is not None:
            reduce_original = reducer._all_reduce_sum_gradients

            def all_reduce_sum_gradients(grads_and_vars: Any) -> Any:
                reduced = reduce_original(grads_and_vars)
                variables = getattr(armed, "variables", None)
                if variables is not None:  # inside our apply(), on a replica
                    by_value = {id(getattr(v, "value", v)): v for v in variables}
                    pairs = [(g, by_value.get(id(v), v)) for g, v in reduced]
                    scale = _Unscaled() if reducer is not optimizer else optimizer
                    armed.pending = self._guard.safely(
                        lambda: self._before_apply(scale, [g for g, _ in pairs], [v for _, v in pairs])
                    )
                return reduced

            reducer._all_reduce_sum_gradients = all_reduce_sum_gradients
            if reducer is not optimizer:
                self._wrapped.append(reducer)
        model = self._watched()
        if model is not None and getattr(model, "train_function", None) is not None:
            # fit traced its step before the hook existed: make it trace again, through the hook.
            model.make_train_function(force=True)

    # -- inside the (traced) train step -----------------------------------------------

    def _before_apply(self, optimizer: Any, grads: list[Any], variables: list[Any]) -> _Pending:
        """Statistics of this step's gradients and (pre-update) weights, as graph tensors."""
        pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
        state = self._ensure_state([v for _, v in pairs])
        step = state.step.read_value()
        index = {id(v): i for i, v in enumerate(state.variables)}
        # The optimizer divides by its loss scale after this point: undo it here too.
        scale = tf.cast(optimizer.scale_loss(tf.constant(1.0)), tf.float64)
        dense = [(tf.convert_to_tensor(g), v) for g, v in pairs if id(v) in index]
        grad_of = {id(v): g for g, v in dense}
        missing = tf.constant(math.nan, tf.float64)
        norms, nonfinite = [], []
        for variable in state.variables:
            grad = grad_of.get(id(variable))
            norms.append(missing if grad is None else _norm(grad) / scale)
            nonfinite.append(missing if grad is None else _nonfinite(grad))
        count = len(state.variables)
        weight_norms = (
            tf.stack([_norm(tf.convert_to_tensor(v)) for v in state.variables])
            if self._log_parameters
            else tf.zeros([count], tf.float64)
        )

        if self._histogram_every is not None:

            def histograms() -> tf.Tensor:
                rows = []
                for variable in state.variables:
                    grad = grad_of.get(id(variable))
                    if grad is None:  # no gradient this step: a row of NaN, skipped on the host
                        rows.append(tf.fill([8 + self._bins], missing))
                    else:
                        rows.append(_histogram_row(grad / tf.cast(scale, grad.dtype), self._bins))
                if self._log_parameters:
                    rows += [_histogram_row(tf.convert_to_tensor(v), self._bins) for v in state.variables]
                state.histograms.assign(tf.stack(rows))
                state.histogram_step.assign(step)
                return tf.constant(True)

            tf.cond(tf.equal(step % self._histogram_every, 0), histograms, lambda: tf.constant(False))

        due = tf.constant(False)
        if self._update_every is not None and state.shadows:
            due = tf.equal(step % self._update_every, 0)

            def snapshot() -> tf.Tensor:
                for shadow, variable in zip(state.shadows, state.variables):
                    shadow.assign(variable)
                return tf.constant(True)

            tf.cond(due, snapshot, lambda: tf.constant(False))
        state.step.assign_add(1)
        scalars = tf.concat([tf.stack([scale]), tf.stack(norms), tf.stack(nonfinite), weight_norms], 0)
        return _Pending(step, due, scalars)

    def _after_apply(self, pending: _Pending, measure_update: bool) -> None:
        """After the optimizer's update: the update ratios if due, then one vector that the
        callback reads with a single transfer."""
        state = self._state
        assert state is not None
        if measure_update and state.shadows:

            def measure() -> tf.Tensor:
                state.updates.assign(
                    tf.stack(
                        [
                            _norm(tf.convert_to_tensor(v) - s) / _norm(tf.convert_to_tensor(s))
                            for v, s in zip(state.variables, state.shadows)
                        ]
                    )
                )
                state.update_step.assign(pending.step)
                return tf.constant(True)

            tf.cond(pending.due, measure, lambda: tf.constant(False))
        steps = tf.cast(
            tf.stack([pending.step, state.histogram_step.read_value(), state.update_step.read_value()]), tf.float64
        )
        state.summary.assign(tf.concat([steps, pending.scalars], 0))

    def _ensure_state(self, variables: list[Any]) -> _State:
        if self._state is None:
            with tf.init_scope():  # created eagerly even when first reached inside a trace
                model = self._watched()
                name = model.name if model is not None else ""
                self._state = _State(variables, self._bins, shadows=self._update_every is not None, model_name=name)
        return self._state

    # -- on the host ---------------------------------------------------------------------

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._guard.safely(lambda: self._wrap(getattr(self.model, "optimizer", None)))

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._guard.safely(self.write_pending)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._guard.safely(self.writer.flush)

    def log_gradients(self, grads: Sequence[Any], variables: Sequence[Any], step: int | None = None) -> None:
        """Log one step's gradients from a hand-written loop (a `tf.GradientTape` loop that
        does not go through a watched optimizer), at `step` or else at the next step."""
        grads, variables = list(grads), list(variables)

        def record() -> None:
            state = self._ensure_state([v for g, v in zip(grads, variables) if g is not None])
            if step is not None:
                state.step.assign(step)
            self._after_apply(self._before_apply(_Unscaled(), grads, variables), measure_update=False)
            self.write_pending()

        self._guard.safely(record)

    def write_pending(self) -> None:
        """Write what the last step recorded, if it is a logged step. `fit` calls this after
        every batch, and eager custom loops after every `apply`; a custom loop whose step is a
        `tf.function` calls it after each step."""
        state = self._state
        if state is None:
            return
        summary = state.summary.numpy()  # the one read of a batch
        step, histogram_step, update_step = (int(v) for v in summary[:3])
        count = len(state.names)
        scale, norms, nonfinite, weight_norms = (
            summary[3],
            summary[4 : 4 + count],
            summary[4 + count : 4 + 2 * count],
            summary[4 + 2 * count :],
        )
        scalars: list[tuple[str, float]] = []
        histogram_rows = None
        observed: StepValues | None = None
        if step >= 0 and step != self._written["stats"] and step % self._every == 0:
            self._written["stats"] = step
            scalars += self._stat_scalars(state, step, norms, nonfinite, weight_norms)
            observed = self._step_values(state, step, norms, nonfinite, weight_norms)
            if scale != 1.0:
                scalars.append(("amp/loss_scale", float(scale)))
        if histogram_step >= 0 and histogram_step != self._written["histograms"]:
            self._written["histograms"] = histogram_step
            histogram_rows = self._histogram_rows(state)
            if histogram_step != step and histogram_rows is not None:
                self.writer._summary([], histogram_step, None, rows=histogram_rows)
                histogram_rows = None
        if update_step >= 0 and update_step != self._written["updates"]:
            self._written["updates"] = update_step
            ratios = {name: float(r) for name, r in zip(state.names, state.updates.numpy())}
            self.writer._summary([(f"updates/{name}/ratio", r) for name, r in ratios.items()], update_step, None)
            if observed is not None and update_step == step:
                observed.update_ratios = ratios
        if scalars or histogram_rows is not None:
            self.writer._summary(scalars, step, None, rows=histogram_rows)
        if observed is not None and self._monitor is not None:
            announce(self._monitor.observe(observed), self.writer, self._health_via)

    def _step_values(
        self, state: _State, step: int, norms: np.ndarray, nonfinite: np.ndarray, weight_norms: np.ndarray
    ) -> StepValues:
        """The same numbers as the scalars, for the health rules."""
        present = [(name, float(n), float(c)) for name, n, c in zip(state.names, norms, nonfinite) if not math.isnan(c)]
        values = StepValues(step)
        if self._log_gradients:
            values.grad_norms = {name: n for name, n, _ in present}
            values.grad_nonfinite = {name: c for name, _, c in present if c}
            values.global_norm = math.sqrt(sum(n * n for _, n, _ in present))
        if self._log_parameters:
            values.weight_norms = {name: float(w) for name, w in zip(state.names, weight_norms)}
        return values

    @property
    def findings(self) -> list[Finding]:
        """Every training-health finding so far (see `normlog.health`)."""
        return [] if self._monitor is None else list(self._monitor.findings)

    def _stat_scalars(
        self, state: _State, step: int, norms: np.ndarray, nonfinite: np.ndarray, weight_norms: np.ndarray
    ) -> list[tuple[str, float]]:
        scalars: list[tuple[str, float]] = []
        if self._log_gradients:
            squares = 0.0
            for name, norm, bad in zip(state.names, norms, nonfinite):
                if math.isnan(bad):  # no gradient for this variable this step
                    continue
                scalars.append((f"gradients/{name}/norm", float(norm)))
                squares += float(norm) ** 2
                if bad:
                    scalars.append((f"gradients/{name}/nonfinite", float(bad)))
                    self._guard.warn_once(
                        f"nonfinite:{name}",
                        f"normlog: {int(bad)} NaN/Inf values in the gradients of {name!r} at step {step}",
                    )
            scalars.append(("gradients/global_norm", math.sqrt(squares)))
        if self._log_parameters:
            scalars += [(f"parameters/{name}/norm", float(norm)) for name, norm in zip(state.names, weight_norms)]
        return scalars

    def _histogram_rows(self, state: _State) -> tuple[list[str], np.ndarray, int] | None:
        """The tags and rows of this step's histograms, for `Writer._summary(rows=...)`."""
        rows = state.histograms.numpy()
        names = state.names
        tags, kept = [], []
        if self._log_gradients:
            for name, row in zip(names, rows):
                if not math.isnan(row[4]):  # no gradient for this variable this step
                    tags.append(f"gradients/{name}")
                    kept.append(row)
        if self._log_parameters:
            for name, row in zip(names, rows[len(names) :]):
                tags.append(f"parameters/{name}")
                kept.append(row)
        return (tags, np.stack(kept), self._bins) if tags else None

    # -- errors and life cycle -----------------------------------------------------------

    def unwatch(self) -> None:
        """Restore the optimizers' own `apply`; close the writer if `watch` made it."""
        for optimizer in self._wrapped:
            optimizer.__dict__.pop("apply", None)  # back to the class's methods
            optimizer.__dict__.pop("_all_reduce_sum_gradients", None)
        self._wrapped.clear()
        model = self._watched()
        if model is not None and getattr(model, "train_function", None) is not None:
            model.make_train_function(force=True)
        if self._owns_writer:
            self.writer.close()


@dataclass
class _Pending:
    """One step's statistics, computed before the optimizer's update and published after it."""

    step: tf.Tensor
    due: tf.Tensor
    scalars: tf.Tensor


class _Unscaled:
    """Stands in for an optimizer in `log_gradients`: gradients from a tape are unscaled."""

    def scale_loss(self, loss: tf.Tensor) -> tf.Tensor:
        return loss


class _State:
    """The tf.Variables a traced step writes its statistics into. Plain tf.Variables held
    here, never by the model or the optimizer, so checkpoints do not change."""

    def __init__(self, variables: list[Any], bins: int, shadows: bool, model_name: str) -> None:
        count = len(variables)
        self.variables = variables
        # Keras' variable path, without the watched model's own name: "dense/kernel"
        paths = [getattr(v, "path", None) or v.name.split(":")[0] for v in variables]
        self.names = [path.removeprefix(f"{model_name}/") for path in paths]

        def make(value: Any) -> tf.Variable:
            # Under a tf.distribute strategy these are mirrored and, with no aggregation, each
            # replica writes its own copy: the same statistics of the same summed gradients.
            # The host reads the first replica's.
            return tf.Variable(value, trainable=False)

        self.step = make(tf.constant(0, tf.int64))
        # [step, histogram step, update step, loss scale, norms, NaN/Inf counts, weight norms]:
        # what the callback reads after every batch, in one transfer. NaN counts mark variables
        # that had no gradient.
        self.summary = make(
            tf.concat([tf.constant([-1.0, -1.0, -1.0, 1.0], tf.float64), tf.zeros([3 * count], tf.float64)], 0)
        )
        self.histogram_step = make(tf.constant(-1, tf.int64))
        self.histograms = make(tf.zeros([2 * count, 8 + bins], tf.float64))
        self.update_step = make(tf.constant(-1, tf.int64))
        self.updates = make(tf.zeros([count], tf.float64))
        self.shadows = [make(tf.zeros(v.shape, tf.as_dtype(v.dtype))) for v in variables] if shadows else []


def watch(
    model: keras.Model,
    logdir: str | None = None,
    *,
    writer: Writer | None = None,
    log: Log = "all",
    every: int = 1,
    histogram_every: int | None = 100,
    update_every: int | None = 100,
    optimizer: keras.optimizers.Optimizer | None = None,
    bins: int = 30,
    strict: bool = False,
    health: bool | Thresholds = True,
    health_via: Literal["warnings", "logging"] = "warnings",
) -> Watcher:
    """A callback for `model.fit(..., callbacks=[...])` that logs, per training step (batch,
    from 0), the gradient each step really used and the weights: norms every `every` steps,
    histograms every `histogram_every`, update ratios every `update_every`.

    The gradients are the raw ones handed to the optimizer: before `global_clipnorm`
    clipping, before `gradient_accumulation_steps` averaging, and unscaled for mixed
    precision. `optimizer=` watches an optimizer other than `model.optimizer` (custom loops).
    `health` and `health_via` run the training-health rules, as in `normlog.watch`.
    """
    _check_backend()
    if writer is not None and logdir is not None:
        raise ValueError("pass logdir or writer, not both")
    return Watcher(
        model,
        writer if writer is not None else Writer(logdir),
        owns_writer=writer is None,
        log=log,
        every=every,
        histogram_every=histogram_every,
        update_every=update_every,
        optimizer=optimizer,
        bins=bins,
        strict=strict,
        health=health,
        health_via=health_via,
    )
