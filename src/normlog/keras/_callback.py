"""The Keras `Watcher` callback (TensorFlow backend): wraps the optimizers' `apply`, and
writes each logged step.

Rules: gradients are caught in the optimizer's `apply`, wrapped on the optimizer instance:
the one point that `fit`'s train step and custom `apply_gradients` loops both pass. The
statistics are computed inside the traced step (`_graph`) and reach the host as one small
vector per logged step; what a step writes is `normlog._step`'s. Each watched optimizer
(a GAN's two) counts its own steps; the steps they share are written as one record.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import keras
import numpy as np
import tensorflow as tf

from normlog._step import LOSS_SCALE, SKIPPED_STEP, Group, Recorder, Updates, owned_run
from normlog._watching import Guard, check_options
from normlog.health import Finding, Monitor, Thresholds
from normlog.keras._graph import State, dense_sums, in_order, reduce_tensors
from normlog.keras._variables import applied_steps, find_optimizers, variable_names
from normlog.writer import Writer

__all__ = ["Watcher", "find_optimizers", "make_watcher"]

Log = Literal["gradients", "parameters", "all"]

# Every live watcher, so that a process that ends with steps never written says so.
_LIVE: weakref.WeakSet[Watcher] = weakref.WeakSet()

_PRIMARY = "optimizer"  # the slot of model.optimizer, or of optimizer= (whichever instance it is now)


@dataclass
class _Slot:
    """One watched optimizer: its step counter (a tf.Variable the traced step advances), the
    States of the variable sets it has applied, and what the host has read of them."""

    name: str
    first_step: int
    step: tf.Variable | None = None
    states: dict[tuple[int, ...], State] = field(default_factory=dict)
    optimizers: list[Any] = field(default_factory=list)  # wrapped, with their apply() count then
    applied_at_wrap: dict[int, int] = field(default_factory=dict)


class Watcher(keras.callbacks.Callback):  # type: ignore[misc]
    """The callback `watch` returns: pass it to `fit`. See `watch` for what it logs."""

    def __init__(
        self,
        target: Any,
        writer: Writer,
        *,
        owns_writer: bool,
        log: Log,
        every: int,
        histogram_every: int | None,
        update_every: int | None,
        optimizer: keras.optimizers.Optimizer | None,
        step: int | None,
        bins: int,
        strict: bool,
        health: bool | Thresholds,
        health_via: Literal["warnings", "logging"],
        histograms_after_finding: int = 5,
    ) -> None:
        super().__init__()
        check_options(log, every, histogram_every, update_every)
        if step is not None and (not isinstance(step, int) or step < 0):
            raise ValueError(f"step must be a non-negative int (the first step's index), got {step!r}")
        is_optimizer = isinstance(target, keras.optimizers.Optimizer)
        model = None if is_optimizer else target
        optimizer = target if is_optimizer else optimizer
        self.writer = writer
        self._owns_writer = owns_writer
        self._watched = weakref.ref(model) if model is not None else None
        self._fixed_optimizer = optimizer is not None
        self._log_gradients = log in ("gradients", "all")
        self._log_parameters = log in ("parameters", "all")
        self._every = every
        self._histogram_every = histogram_every
        self._update_every = update_every if self._log_parameters else None
        self._bins = bins
        self._first_step = step
        self._guard = Guard(strict)
        self._slots: dict[str, _Slot] = {}
        self._written: dict[tuple[int, str], int] = {}  # (id(state), what) -> last step written
        self._lock = threading.Lock()
        monitor = Monitor(health if isinstance(health, Thresholds) else None) if health else None
        # the burst of histograms after an exploding/nonfinite finding: the Recorder says until
        # which step; the traced step reads it from `_histograms_until` (set after each write)
        self._burst = histograms_after_finding if monitor is not None else 0
        self._histograms_until: tf.Variable | None = None
        self._histograms_until_set = -1
        self._recorder = Recorder(writer, self._guard, bins, monitor, health_via, histograms_after=self._burst)
        self._install(model, optimizer)
        _LIVE.add(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> Watcher:
        # keras-tuner deep-copies the callbacks of every trial. A watcher owns an open event
        # file and hooks on optimizers: the copy is the watcher itself, so every trial logs
        # into the one run, with its steps continuing.
        return self

    @property
    def optimizers(self) -> list[Any]:
        """The optimizers (and their inner ones) whose `apply` this watcher wraps."""
        return [optimizer for slot in self._slots.values() for optimizer in slot.optimizers]

    @property
    def step(self) -> int:
        """The next step's index: updates seen so far by the most advanced watched optimizer,
        counted from the first step (`step=`, or the optimizer's `iterations` when watched)."""
        steps = [int(s.step.numpy()) if s.step is not None else s.first_step for s in self._slots.values()]
        return max(steps, default=0 if self._first_step is None else self._first_step)

    # -- installing ------------------------------------------------------------------

    def _install(self, model: Any, optimizer: Any) -> None:
        """Wrap the main optimizer and, without optimizer=, the others the model holds."""
        self._wrap(_PRIMARY, optimizer if optimizer is not None else getattr(model, "optimizer", None))
        if model is not None and not self._fixed_optimizer:
            for name, other in find_optimizers(model).items():
                self._wrap(name, other)

    def _slot(self, name: str, optimizer: Any) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            first = self._first_step if name == _PRIMARY and self._first_step is not None else applied_steps(optimizer)
            slot = self._slots[name] = _Slot(name, first)
        return slot

    def _wrap(self, name: str, optimizer: keras.optimizers.Optimizer | None) -> None:
        if optimizer is None or any(o is optimizer for s in self._slots.values() for o in s.optimizers):
            return
        slot = self._slot(name, optimizer)
        slot.optimizers.append(optimizer)
        slot.applied_at_wrap[id(optimizer)] = applied_steps(optimizer)
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
                pending = self._guard.safely(lambda: self._before_apply(slot, optimizer, list(grads), variables or []))
                result = original(grads, trainable_variables)
            if pending is not None:
                self._guard.safely(lambda: self._after_apply(pending, measure_update=True))
            if tf.executing_eagerly():  # a custom eager loop: nothing else will write this step
                self._guard.safely(self.write_pending)
            return result

        optimizer.apply = apply
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
                        lambda: self._before_apply(slot, scale, [g for g, _ in pairs], [v for _, v in pairs])
                    )
                return reduced

            reducer._all_reduce_sum_gradients = all_reduce_sum_gradients
            if reducer is not optimizer:
                slot.optimizers.append(reducer)
        model = self._watched() if self._watched is not None else None
        if model is not None and getattr(model, "train_function", None) is not None:
            # fit traced its step before the hook existed: make it trace again, through the hook.
            model.make_train_function(force=True)

    # -- inside the (traced) train step -----------------------------------------------

    def _before_apply(self, slot: _Slot, optimizer: Any, grads: list[Any], variables: list[Any]) -> _Pending | None:
        """Statistics of this step's gradients and (pre-update) weights, as graph tensors,
        on the steps they are due; the due histogram step's tensors are stashed."""
        pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
        if not pairs:  # nothing to log (Keras raises itself where that is an error)
            return None
        state = self._ensure_state(slot, [v for _, v in pairs])
        assert slot.step is not None
        step = slot.step.read_value()
        # The optimizer divides by its loss scale after this point: undo it here too.
        scale = tf.cast(optimizer.scale_loss(tf.constant(1.0)), tf.float64)
        # sparse gradients (an Embedding's) stay sparse for the norms; densified only when stashed
        grads = [g if isinstance(g, tf.IndexedSlices) else tf.convert_to_tensor(g) for g, _ in pairs]

        def weights() -> list[tf.Tensor]:
            return [tf.convert_to_tensor(v) for v in state.variables]

        def reduce() -> tf.Tensor:
            wanted = [grads] if self._log_gradients else []
            wanted += [weights()] if self._log_parameters else []
            reduced = iter(reduce_tensors(state.fused, *wanted))  # every kind in one pass
            none = (tf.zeros([len(state.variables)], tf.float64),) * 2
            grad_norms, grad_nonfinite = next(reduced) if self._log_gradients else none
            weight_norms, weight_nonfinite = next(reduced) if self._log_parameters else none
            return tf.concat([grad_norms / scale, grad_nonfinite, weight_norms, weight_nonfinite], 0)

        stats_due = tf.equal(step % self._every, 0)
        empty = tf.zeros([4 * len(state.variables)], tf.float64)
        stats = tf.cond(stats_due, reduce, lambda: empty)

        if state.grad_stash or state.weight_stash:

            def stash() -> tf.Tensor:
                for stashes, tensors in ((state.grad_stash, grads), (state.weight_stash, None)):
                    if stashes:
                        tensors = tensors if tensors is not None else weights()
                        for group, variable in zip(state.fused, stashes):
                            variable.assign(group.flatten([tensors[p] for p in group.positions]))
                state.histogram_scale.assign(scale)
                state.histogram_step.assign(step)
                return tf.constant(True)

            due = []
            if self._histogram_every is not None:
                due.append(tf.equal(step % self._histogram_every, 0))
            if self._histograms_until is not None:  # a burst after a finding
                due.append(step <= self._histograms_until.read_value())
            tf.cond(tf.reduce_any(tf.stack(due)), stash, lambda: tf.constant(False))

        update_due = tf.constant(False)
        if self._update_every is not None and state.shadows:
            update_due = tf.equal(step % self._update_every, 0)

            def snapshot() -> tf.Tensor:
                current = weights()
                for group, shadow in zip(state.fused, state.shadows):
                    shadow.assign(group.flatten([current[p] for p in group.positions]))
                return tf.constant(True)

            tf.cond(update_due, snapshot, lambda: tf.constant(False))
        slot.step.assign_add(1)
        return _Pending(state, step, optimizer, scale, stats_due, stats, update_due)

    def _after_apply(self, pending: _Pending, measure_update: bool) -> None:
        """After the optimizer's update: the update norms if due, then, on a logged step, one
        vector that the callback reads with a single transfer."""
        state = pending.state
        if measure_update and state.shadows:

            def measure() -> tf.Tensor:
                after = [tf.convert_to_tensor(v) for v in state.variables]
                update_norms, weight_norms = [], []
                for group, shadow in zip(state.fused, state.shadows):
                    before = tf.split(tf.convert_to_tensor(shadow), group.sizes)  # static sizes: XLA compiles it
                    deltas = [group.flatten([after[p]]) - part for p, part in zip(group.positions, before)]
                    sums = tf.sqrt(dense_sums(group.dtype, deltas + before)[0])
                    update_norms.append(sums[: len(deltas)])
                    weight_norms.append(sums[len(deltas) :])
                state.updates.assign(
                    tf.stack([in_order(state.fused, update_norms), in_order(state.fused, weight_norms)])
                )
                state.update_step.assign(pending.step)
                return tf.constant(True)

            tf.cond(pending.update_due, measure, lambda: tf.constant(False))
        # A loss-scale optimizer that found Inf/NaN skips the update and lowers its scale.
        scale_after = tf.cast(pending.scaler.scale_loss(tf.constant(1.0)), tf.float64)
        skipped = tf.cast(scale_after < pending.scale, tf.float64)

        def publish() -> tf.Tensor:
            head = tf.stack([tf.cast(pending.step, tf.float64), pending.scale, skipped])
            state.summary.assign(tf.concat([head, pending.stats], 0))
            return tf.constant(True)

        tf.cond(pending.stats_due, publish, lambda: tf.constant(False))

    def _ensure_state(self, slot: _Slot, variables: list[Any]) -> State:
        keys = tuple(id(v) for v in variables)
        state = slot.states.get(keys)
        if state is None:
            with tf.init_scope():  # created eagerly even when first reached inside a trace
                if slot.step is None:
                    slot.step = tf.Variable(tf.constant(slot.first_step, tf.int64), trainable=False)
                if self._burst and self._histograms_until is None:
                    self._histograms_until = tf.Variable(tf.constant(-1, tf.int64), trainable=False)
                model = self._watched() if self._watched is not None else None
                names = variable_names(variables, model.name if model is not None else "")
                stash = self._histogram_every is not None or self._burst > 0
                state = State(
                    variables,
                    names,
                    self._bins,
                    self._log_gradients,
                    self._log_parameters,
                    stash=stash,
                    shadows=self._update_every is not None,
                )
                slot.states[keys] = state
        return state

    # -- on the host ---------------------------------------------------------------------

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        def install() -> None:
            if self._fixed_optimizer:
                return
            self._install(self.model, None)
            spe = int(getattr(self.model, "steps_per_execution", 1) or 1)
            if spe > 1 and self._every % spe:
                self._guard.warn_once(
                    "steps_per_execution",
                    f"normlog: steps_per_execution={spe}: the callback reads once per execution, so of the steps "
                    f"due every {self._every} it logs the last in each execution of {spe} steps",
                )

        self._guard.safely(install)
        self._counted_at_begin = self._counted()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._guard.safely(self.write_pending)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        def end() -> None:
            if self._counted() == getattr(self, "_counted_at_begin", -1) and not self._fixed_optimizer:
                found = ", ".join(find_optimizers(self.model)) or "none"
                self._guard.warn_once(
                    "no-step",
                    "normlog: fit ran but no watched optimizer applied a gradient: the train_step applies an "
                    f"optimizer that is neither model.optimizer nor an attribute of the model (attributes found: "
                    f"{found}). Pass it: normlog.keras.watch(model, optimizer=...), one watcher per optimizer "
                    "with name=.",
                )
            self.check_gaps()
            self.writer.flush()

        self._guard.safely(end)

    def _counted(self) -> int:
        return sum(int(s.step.numpy()) for s in self._slots.values() if s.step is not None)

    def log_gradients(self, grads: Sequence[Any], variables: Sequence[Any], step: int | None = None) -> None:
        """Log one step's gradients from a hand-written loop (a `tf.GradientTape` loop that
        does not go through a watched optimizer), at `step` or else at the next step."""
        grads, variables = list(grads), list(variables)

        def record() -> None:
            slot = self._slots.get("log_gradients") or self._slot("log_gradients", _NoOptimizer())
            self._ensure_state(slot, [v for g, v in zip(grads, variables) if g is not None])
            assert slot.step is not None
            if step is not None:
                slot.step.assign(step)
            pending = self._before_apply(slot, _Unscaled(), grads, variables)
            if pending is not None:
                self._after_apply(pending, measure_update=False)
            self.write_pending()

        self._guard.safely(record)

    def write_pending(self) -> None:
        """Write what the last logged step recorded, if not written yet. `fit` calls this after
        every batch, and eager custom loops after every `apply`; a custom loop whose step is a
        `tf.function` calls it after each step."""
        with self._lock:
            records: dict[int, _Record] = {}
            for slot in self._slots.values():
                for state in slot.states.values():
                    self._read(state, records)
            for at, record in sorted(records.items()):
                self._recorder.record(at, record.joined(), record.updates, record.scalars)
            until = self._recorder.histograms_until
            if self._histograms_until is not None and until != self._histograms_until_set:
                self._histograms_until.assign(until)  # the next traced steps stash their tensors
                self._histograms_until_set = until
            if not records:
                self._check_unseen_steps()

    def _read(self, state: State, records: dict[int, _Record]) -> None:
        key = id(state)
        step, scale, skipped, fields = state.layout.read(state.summary.numpy())
        if step >= 0 and self._written.get((key, "stats"), -1) != step:
            self._written[key, "stats"] = step
            record = records.setdefault(step, _Record())
            if scale != 1.0 and LOSS_SCALE not in dict(record.scalars):  # one per step, however many optimizers
                record.scalars.append((LOSS_SCALE, scale))
            if skipped and SKIPPED_STEP not in dict(record.scalars):  # Keras skipped it by design: not a finding
                record.scalars.append((SKIPPED_STEP, 1.0))
            else:
                if self._log_gradients:
                    record.add(
                        Group(
                            "gradients", state.names, fields["grad_norms"], fields["grad_nonfinite"], ndims=state.ndims
                        )
                    )
                if self._log_parameters:
                    record.add(
                        Group(
                            "parameters",
                            state.names,
                            fields["weight_norms"],
                            fields["weight_nonfinite"],
                            ndims=state.ndims,
                        )
                    )
        histogram_step = int(state.histogram_step.numpy())
        if histogram_step >= 0 and self._written.get((key, "histograms"), -1) != histogram_step:
            self._written[key, "histograms"] = histogram_step
            rows = state.histograms()
            count = len(state.names)
            record = records.setdefault(histogram_step, _Record())
            if self._log_gradients:
                record.add(Group("gradients", state.names, rows=rows[:count], ndims=state.ndims), rows=True)
            if self._log_parameters:
                record.add(Group("parameters", state.names, rows=rows[-count:], ndims=state.ndims), rows=True)
        update_step = int(state.update_step.numpy())
        if update_step >= 0 and self._written.get((key, "updates"), -1) != update_step:
            self._written[key, "updates"] = update_step
            update_norms, weight_norms = state.updates.numpy()
            records.setdefault(update_step, _Record()).add_updates(Updates(state.names, update_norms, weight_norms))

    # -- gaps: steps that ran and were never written --------------------------------------

    def _check_unseen_steps(self) -> None:
        """An optimizer that applied updates that our hook never saw: its `apply` was traced
        into a tf.function before `watch` wrapped it."""
        for slot in self._slots.values():
            if slot.states:
                continue
            for optimizer in slot.optimizers:
                start = slot.applied_at_wrap.get(id(optimizer))
                unseen = applied_steps(optimizer) - start if start is not None else 0
                if unseen > 0:
                    self._guard.warn_once(
                        "traced-before-watch",
                        f"normlog: {optimizer.name!r} applied {unseen} updates that normlog did "
                        "not see: its apply was traced into a tf.function before watch(). Call watch() before the "
                        "tf.function first runs, or make a new tf.function after it.",
                    )

    def check_gaps(self) -> None:
        """Warn once where steps ran whose statistics were never written: a tf.function loop
        that does not call `write_pending`, or an optimizer traced before `watch`. `fit`,
        `unwatch` and the end of the process call this."""
        for slot in self._slots.values():
            if slot.step is None or not slot.states:
                continue
            ran = int(slot.step.numpy())
            last_due = ((ran - 1) // self._every) * self._every
            written = max((self._written.get((id(s), "stats"), -1) for s in slot.states.values()), default=-1)
            if last_due >= slot.first_step and written < last_due:
                self._guard.warn_once(
                    "unwritten",
                    f"normlog: the watched optimizer ran up to step {ran - 1}, but statistics were written only up "
                    f"to step {written}: a tf.function training loop must call watcher.write_pending() after each "
                    "step (fit does this itself)",
                )
        self._check_unseen_steps()

    @property
    def findings(self) -> list[Finding]:
        """Every training-health finding so far (see `normlog.health`)."""
        monitor = self._recorder.monitor
        return [] if monitor is None else list(monitor.findings)

    # -- errors and life cycle -----------------------------------------------------------

    def unwatch(self) -> None:
        """Restore the optimizers' own `apply`; close the writer if `watch` made it."""
        self._guard.safely(self.check_gaps)
        for slot in self._slots.values():
            for optimizer in slot.optimizers:
                optimizer.__dict__.pop("apply", None)  # back to the class's methods
                optimizer.__dict__.pop("_all_reduce_sum_gradients", None)
            slot.optimizers.clear()
        _LIVE.discard(self)
        try:
            self._recorder.close()  # with strict, a failed picture raises after the clean-up below
        finally:
            model = self._watched() if self._watched is not None else None
            if model is not None and getattr(model, "train_function", None) is not None:
                model.make_train_function(force=True)
            if self._owns_writer:
                self.writer.close()


@atexit.register
def _check_at_exit() -> None:
    for watcher in list(_LIVE):
        try:
            watcher.check_gaps()
        except Exception:  # TensorFlow may be half torn down at exit
            pass


@dataclass
class _Record:
    """What one step writes, gathered from every watched optimizer's State."""

    groups: dict[str, Group] = field(default_factory=dict)
    rows: dict[str, Group] = field(default_factory=dict)
    updates: Updates | None = None
    scalars: list[tuple[str, float]] = field(default_factory=list)

    def add(self, group: Group, rows: bool = False) -> None:
        into = self.rows if rows else self.groups
        known = into.get(group.kind)
        if known is None:
            into[group.kind] = group
            return
        known.names = [*known.names, *group.names]
        known.ndims = {**(known.ndims or {}), **(group.ndims or {})}
        for attribute in ("norms", "nonfinite", "rows"):
            mine, theirs = getattr(known, attribute), getattr(group, attribute)
            if mine is not None and theirs is not None:
                setattr(known, attribute, np.concatenate([mine, theirs]))

    def add_updates(self, updates: Updates) -> None:
        if self.updates is None:
            self.updates = updates
        else:
            self.updates = Updates(
                [*self.updates.names, *updates.names],
                np.concatenate([self.updates.update_norms, updates.update_norms]),
                np.concatenate([self.updates.weight_norms, updates.weight_norms]),
            )

    def joined(self) -> list[Group]:
        """The norm groups with the histogram rows of the same kind (the rows alone where no
        norms are due at that step)."""
        joined = list(self.groups.values())
        for kind, rows in self.rows.items():
            group = self.groups.get(kind)
            if group is not None and list(group.names) == list(rows.names):
                group.rows = rows.rows
            else:
                joined.append(rows)
        return joined


@dataclass
class _Pending:
    """One step's statistics, computed before the optimizer's update and published after it."""

    state: State
    step: tf.Tensor
    scaler: Any  # the optimizer whose loss scale the gradients carry
    scale: tf.Tensor
    stats_due: tf.Tensor
    stats: tf.Tensor
    update_due: tf.Tensor


class _Unscaled:
    """Stands in for an optimizer in `log_gradients`: gradients from a tape are unscaled."""

    def scale_loss(self, loss: tf.Tensor) -> tf.Tensor:
        return loss


class _NoOptimizer:
    """The step source of `log_gradients`: no optimizer, counting from 0."""

    iterations = tf.constant(0)


def make_watcher(target: Any, logdir: Any, writer: Writer | None, name: str | None, **options: Any) -> Watcher:
    """`watch`'s work once the backend is known to be TensorFlow: the run directory, the
    writer, the watcher, in that order, so that a refused target makes no file."""
    if writer is not None and logdir is not None:
        raise ValueError("pass logdir or writer, not both")
    with owned_run(logdir, writer, name) as (run, owns_writer):
        return Watcher(target, run, owns_writer=owns_writer, **options)
