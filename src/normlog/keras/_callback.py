"""The Keras `Watcher` callback: wraps the optimizer's `apply`, and writes each logged step.

Rules: gradients are caught in the optimizer's `apply`, wrapped on the optimizer instance:
the one point that `fit`'s train step and custom `apply_gradients` loops both pass. With
the TensorFlow backend the statistics are computed inside the traced step (`_graph`) and
reach the host as one small vector per batch; what a step writes is `normlog._step`'s.
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

from normlog import _rows
from normlog._step import LOSS_SCALE, Group, Recorder, Updates
from normlog._watching import Guard, check_options
from normlog.health import Finding, Monitor, Thresholds
from normlog.keras._graph import State, histogram_row, nonfinite, norm
from normlog.writer import Writer

__all__ = ["Watcher", "unwatch", "watch"]

Log = Literal["gradients", "parameters", "all"]

# model -> its Watcher; weak so that watching never keeps a model alive.
_WATCHERS: weakref.WeakKeyDictionary[Any, Watcher] = weakref.WeakKeyDictionary()


def _check_backend() -> None:
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"normlog.keras supports Keras 3 with the TensorFlow backend; this process uses {backend!r}. "
            "Set KERAS_BACKEND=tensorflow, or log with normlog.Writer from your own loop."
        )


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
        self._state: State | None = None
        self._written = {"stats": -1, "histograms": -1, "updates": -1}
        monitor = Monitor(health if isinstance(health, Thresholds) else None) if health else None
        self._recorder = Recorder(writer, self._guard, bins, monitor, health_via)
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
        grad_norms, grad_nonfinite = [], []
        for variable in state.variables:
            grad = grad_of.get(id(variable))
            grad_norms.append(missing if grad is None else norm(grad) / scale)
            grad_nonfinite.append(missing if grad is None else nonfinite(grad))
        count = len(state.variables)
        if self._log_parameters:
            weights = [tf.convert_to_tensor(v) for v in state.variables]
            weight_norms, weight_nonfinite = (
                tf.stack([norm(w) for w in weights]),
                tf.stack([nonfinite(w) for w in weights]),
            )
        else:
            weight_norms = weight_nonfinite = tf.zeros([count], tf.float64)

        if self._histogram_every is not None:

            def histograms() -> tf.Tensor:
                rows = []
                if self._log_gradients:
                    for variable in state.variables:
                        grad = grad_of.get(id(variable))
                        if grad is None:  # no gradient this step: a row of NaN, skipped on the host
                            rows.append(tf.fill([_rows.width(self._bins)], missing))
                        else:
                            rows.append(histogram_row(grad / tf.cast(scale, grad.dtype), self._bins))
                if self._log_parameters:
                    rows += [histogram_row(tf.convert_to_tensor(v), self._bins) for v in state.variables]
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
        fields = [tf.stack(grad_norms), tf.stack(grad_nonfinite), weight_norms, weight_nonfinite]
        scalars = tf.concat([tf.stack([scale]), *fields], 0)
        return _Pending(step, due, scalars)

    def _after_apply(self, pending: _Pending, measure_update: bool) -> None:
        """After the optimizer's update: the update ratios if due, then one vector that the
        callback reads with a single transfer."""
        state = self._state
        assert state is not None
        if measure_update and state.shadows:
            variables, shadows = state.variables, state.shadows

            def measure() -> tf.Tensor:
                pairs = [(tf.convert_to_tensor(v), tf.convert_to_tensor(w)) for v, w in zip(variables, shadows)]
                update_norms = tf.stack([norm(after - before) for after, before in pairs])
                state.updates.assign(tf.stack([update_norms, tf.stack([norm(before) for _, before in pairs])]))
                state.update_step.assign(pending.step)
                return tf.constant(True)

            tf.cond(pending.due, measure, lambda: tf.constant(False))
        steps = tf.cast(
            tf.stack([pending.step, state.histogram_step.read_value(), state.update_step.read_value()]), tf.float64
        )
        state.summary.assign(tf.concat([steps, pending.scalars], 0))

    def _ensure_state(self, variables: list[Any]) -> State:
        if self._state is None:
            with tf.init_scope():  # created eagerly even when first reached inside a trace
                model = self._watched()
                name = model.name if model is not None else ""
                kinds = self._log_gradients + self._log_parameters
                shadows = self._update_every is not None
                self._state = State(variables, self._bins, kinds, shadows=shadows, model_name=name)
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
        (step, histogram_step, update_step), scale, fields = state.layout.read(state.summary.numpy())
        present = ~np.isnan(fields["grad_nonfinite"])  # variables that had a gradient this step
        names = np.array(state.names, dtype=object)
        records: dict[int, dict[str, Any]] = {}
        if step >= 0 and step != self._written["stats"] and step % self._every == 0:
            self._written["stats"] = step
            groups = records.setdefault(step, {}).setdefault("groups", [])
            if self._log_gradients:
                grads = Group("gradients", list(names[present]), fields["grad_norms"][present])
                grads.nonfinite = fields["grad_nonfinite"][present]
                groups.append(grads)
            if self._log_parameters:
                groups.append(Group("parameters", state.names, fields["weight_norms"], fields["weight_nonfinite"]))
            if scale != 1.0:
                records[step]["scalars"] = [(LOSS_SCALE, scale)]
        if histogram_step >= 0 and histogram_step != self._written["histograms"]:
            self._written["histograms"] = histogram_step
            records.setdefault(histogram_step, {}).setdefault("groups", [])
            records[histogram_step]["histograms"] = self._histogram_groups(state)
        if update_step >= 0 and update_step != self._written["updates"]:
            self._written["updates"] = update_step
            update_norms, weight_norms = state.updates.numpy()
            records.setdefault(update_step, {})["updates"] = Updates(state.names, update_norms, weight_norms)
        for at, record in sorted(records.items()):
            groups = _with_rows(record.get("groups", []), record.get("histograms", []))
            self._recorder.record(at, groups, record.get("updates"), record.get("scalars", ()))

    def _histogram_groups(self, state: State) -> list[Group]:
        """This step's histogram rows, by kind (variables without a gradient left out)."""
        rows = state.histograms.numpy()
        count = len(state.names)
        groups = []
        if self._log_gradients:
            grads = rows[:count]
            present = ~np.isnan(grads[:, _rows.FINITE])  # no gradient for this variable this step
            names = [name for name, kept in zip(state.names, present) if kept]
            groups.append(Group("gradients", names, rows=grads[present]))
        if self._log_parameters:
            groups.append(Group("parameters", state.names, rows=rows[-count:]))
        return groups

    @property
    def findings(self) -> list[Finding]:
        """Every training-health finding so far (see `normlog.health`)."""
        monitor = self._recorder.monitor
        return [] if monitor is None else list(monitor.findings)

    # -- errors and life cycle -----------------------------------------------------------

    def unwatch(self) -> None:
        """Restore the optimizers' own `apply`; close the writer if `watch` made it."""
        for optimizer in self._wrapped:
            optimizer.__dict__.pop("apply", None)  # back to the class's methods
            optimizer.__dict__.pop("_all_reduce_sum_gradients", None)
        self._wrapped.clear()
        self._recorder.close()
        model = self._watched()
        if model is not None and getattr(model, "train_function", None) is not None:
            model.make_train_function(force=True)
        if model is not None and _WATCHERS.get(model) is self:
            del _WATCHERS[model]
        if self._owns_writer:
            self.writer.close()


def _with_rows(groups: list[Group], histograms: list[Group]) -> list[Group]:
    """The norm groups of one step with the histogram rows of the same kind, joined (the rows
    alone where no norms are due at that step)."""
    by_kind = {group.kind: group for group in groups}
    joined = list(groups)
    for rows in histograms:
        group = by_kind.get(rows.kind)
        if group is not None and list(group.names) == list(rows.names):
            group.rows = rows.rows
        else:
            joined.append(rows)
    return joined


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
    watcher = Watcher(
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
    _WATCHERS[model] = watcher
    return watcher


def unwatch(model: keras.Model) -> None:
    """Restore the optimizer `watch` wrapped for `model`, if any, and close the writer it made."""
    watcher = _WATCHERS.get(model)
    if watcher is not None:
        watcher.unwatch()
