"""The Keras `Watcher` callback on the JAX backend: wraps the optimizers' `apply`, and logs each
step from inside the jitted train step.

Rules: imports Keras and jax, never TensorFlow. Keras' JAX trainer calls
`optimizer.stateless_apply`, which runs `optimizer.apply` inside a `StatelessScope` (so do
custom `train_step`s that use `stateless_apply`, and eager loops that call `apply`): the
wrapped `apply` reads the gradients, the weights before the update (`variable.value`, the
scope's current value) and after it, and hands them to `normlog.jax._emit`, which computes
the statistics in jax.numpy inside the step and sends them to the host with
`jax.debug.callback`. The step index is the optimizer's own update counter, offset to the
first step, so nothing is added to the model's or the optimizer's state.

Under `mixed_float16` the optimizer is a `LossScaleOptimizer`, whose `stateless_apply` calls
its inner optimizer's: the inner one is wrapped, and sees the unscaled gradients. A step whose
scaled gradients are not finite skips the inner update (and its counter): it is not logged,
and the next applied step takes its index (no `amp/skipped_step` on this backend).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence
from typing import Any, Literal

import keras

from normlog._step import owned_run
from normlog._watching import Guard, check_options
from normlog.health import Finding, Monitor, Thresholds
from normlog.jax import _stats
from normlog.jax._emit import Emitter, Schedule, check_recorder_options, make_recorder, wait_for_host
from normlog.keras._variables import applied_steps, find_optimizers, step_counter, variable_names
from normlog.writer import Writer

__all__ = ["Watcher", "find_optimizers", "make_watcher"]

Log = Literal["gradients", "parameters", "all"]


class Watcher(keras.callbacks.Callback):  # type: ignore[misc]
    """The callback `watch` returns under the JAX backend: pass it to `fit`."""

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
        self._first_step = step
        self._guard = Guard(strict)
        monitor = Monitor(health if isinstance(health, Thresholds) else None) if health else None
        self._recorder = make_recorder(writer, self._guard, bins, monitor, health_via, histograms_after_finding)
        parameters = log in ("parameters", "all")
        self._emitter = Emitter(
            self._recorder,
            self._guard,
            Schedule(
                gradients=log in ("gradients", "all"),
                parameters=parameters,
                every=every,
                histogram_every=histogram_every,
                update_every=update_every if parameters else None,
                bins=bins,
            ),
        )
        self._wrapped: list[Any] = []
        self._applied = False  # whether a wrapped apply ran (was traced) at all
        self._install(model, optimizer)

    def __deepcopy__(self, memo: dict[int, Any]) -> Watcher:
        # keras-tuner deep-copies the callbacks of every trial; the copy is the watcher itself
        # (it owns an open event file and hooks on optimizers), as on TensorFlow.
        return self

    @property
    def optimizers(self) -> list[Any]:
        """The optimizers whose `apply` this watcher wraps."""
        return list(self._wrapped)

    @property
    def findings(self) -> list[Finding]:
        """Every training-health finding so far (see `normlog.health`)."""
        monitor = self._recorder.monitor
        return [] if monitor is None else list(monitor.findings)

    # -- installing ------------------------------------------------------------------------

    def _install(self, model: Any, optimizer: Any) -> None:
        self._wrap(optimizer if optimizer is not None else getattr(model, "optimizer", None), primary=True)
        if model is not None and not self._fixed_optimizer:
            for other in find_optimizers(model).values():
                self._wrap(other, primary=False)

    def _wrap(self, optimizer: keras.optimizers.Optimizer | None, primary: bool) -> None:
        # A LossScaleOptimizer (mixed_float16) applies through its inner optimizer, whose
        # `apply` runs only on the steps whose gradients were finite, with the gradients
        # unscaled: that is the one wrapped (its own `apply` is never called on JAX).
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        if optimizer is None or any(o is optimizer for o in self._wrapped):
            return
        self._wrapped.append(optimizer)
        counted = applied_steps(optimizer)
        first = self._first_step if primary and self._first_step is not None else counted
        original = optimizer.apply  # the bound method of the class, or another wrapper
        reference = weakref.ref(self)  # the optimizer must not keep a dropped watcher alive

        def apply(grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None) -> Any:
            watcher = reference()
            if watcher is None:
                return original(grads, trainable_variables)
            watcher._applied = True
            variables = list(trainable_variables) if trainable_variables is not None else None
            if variables is None and optimizer.built:
                variables = list(optimizer._trainable_variables)
            guard = watcher._guard
            before = guard.safely(lambda: watcher._before(optimizer, first - counted, list(grads), variables or []))
            result = original(grads, trainable_variables)
            if before is not None:
                guard.safely(lambda: watcher._after(*before))
            return result

        optimizer.apply = apply
        self._retrace()

    def _retrace(self) -> None:
        """fit traced its step before (or with) the hook: make it trace again."""
        model = self._watched() if self._watched is not None else None
        if model is not None and getattr(model, "train_function", None) is not None:
            model.make_train_function(force=True)

    # -- inside the (traced) step -----------------------------------------------------------

    def _before(
        self, optimizer: Any, offset: int, grads: list[Any], variables: list[Any]
    ) -> tuple[Any, list[str], list[Any], list[Any], list[Any]] | None:
        """This step's index, gradients and weights before the update (traced values)."""
        pairs = [(g, v) for g, v in zip(grads, variables) if g is not None and _stats.is_float(g)]
        if not pairs:
            return None
        model = self._watched() if self._watched is not None else None
        names = variable_names([v for _, v in pairs], model.name if model is not None else "")
        step = step_counter(optimizer).value + offset
        kept = [v for _, v in pairs]
        return step, names, [g for g, _ in pairs], kept, [v.value for v in kept]

    def _after(self, step: Any, names: list[str], grads: list[Any], variables: list[Any], before: list[Any]) -> None:
        after = [v.value for v in variables]

        def updates() -> list[Any]:
            return [a - b for a, b in zip(after, before)]

        self._emitter.trace(step, names, grads, before, updates)

    # -- on the host -------------------------------------------------------------------------

    def write_pending(self) -> None:
        """Wait for the steps already dispatched to reach the host, and flush the writer.
        `fit` does this at its end; a custom loop may call it whenever it wants the files
        complete."""
        wait_for_host()
        self.writer.flush()

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if not self._fixed_optimizer:
            self._guard.safely(lambda: self._install(self.model, None))

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if not self._applied and self._wrapped:
            # the wrapped apply never ran, not even while fit traced its step: nothing is logged
            if self._fixed_optimizer:
                hint = "the train_step applies another optimizer than the one passed to watch()"
            else:
                found = ", ".join(find_optimizers(self.model)) if self.model is not None else ""
                hint = (
                    "the train_step applies an optimizer that is not model.optimizer (attributes found: "
                    f"{found or 'none'}). Pass it: normlog.keras.watch(model, optimizer=...), one watcher per "
                    "optimizer with name="
                )
            self._guard.warn_once("no-step", f"normlog: fit ran but the watched optimizer applied no gradient: {hint}.")
        self._guard.safely(self.write_pending)
        # fit's set_model left the model in the callback: a strong reference that would keep
        # the model (and so watch()'s registry entry, this watcher) alive for good; the
        # watcher holds its model weakly (`_watched`), and the next fit sets it again
        self._model = None

    def unwatch(self) -> None:
        """Restore the optimizers' own `apply`; close the writer if `watch` made it."""
        self._guard.safely(wait_for_host)
        for optimizer in self._wrapped:
            optimizer.__dict__.pop("apply", None)  # back to the class's method
        self._wrapped.clear()
        try:
            self._recorder.close()
        finally:
            self._retrace()
            if self._owns_writer:
                self.writer.close()


def make_watcher(
    target: Any,
    logdir: Any,
    writer: Writer | None,
    name: str | None,
    *,
    histograms_after_finding: int = 5,
    **options: Any,
) -> Watcher:
    """`watch`'s work once the backend is known to be JAX: the run directory, the writer, the
    watcher, in that order, so that a refused target makes no file. Options that a later
    normlog passes and this one does not know are ignored."""
    known = set(inspect.signature(Watcher.__init__).parameters)
    options = {key: value for key, value in options.items() if key in known}
    if writer is not None and logdir is not None:
        raise ValueError("pass logdir or writer, not both")
    check_recorder_options(histograms_after_finding, options.get("health", True), options.get("health_via", "warnings"))
    with owned_run(logdir, writer, name) as (run, owns_writer):
        return Watcher(
            target, run, owns_writer=owns_writer, histograms_after_finding=histograms_after_finding, **options
        )
