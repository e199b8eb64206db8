"""`normlog.jax.watch`: an optax gradient transformation that logs what it is given and what
the transformation it wraps gives back.

Rules: imports jax and optax. The step counter lives in the transformation's state (so a
checkpointed optimizer state resumes its steps); the numbers are computed inside the traced
update by `normlog.jax._emit`, which writes through `normlog._step`. Names are the pytree
paths of the updates ("dense/kernel"). Logging never changes the updates or the inner state.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from normlog._step import Recorder, owned_run
from normlog._watching import Guard, check_options
from normlog.health import Finding, Monitor, Thresholds
from normlog.jax import _stats
from normlog.jax._emit import Emitter, Schedule, check_recorder_options, make_recorder, path_name, wait_for_host
from normlog.writer import Writer

__all__ = ["WatchState", "WatchedTransformation", "watch"]


class WatchState(NamedTuple):
    """The state of a watched transformation: the index of the next step, and the state of
    the transformation it wraps."""

    step: jax.Array
    inner: Any


class WatchedTransformation(optax.GradientTransformationExtraArgs):  # type: ignore[misc]
    """An `optax.GradientTransformationExtraArgs` (use it as the transformation it wraps)
    with the watcher's handles: `flush()`, `close()`, `findings`, `writer`."""

    _watcher: _Watcher

    @property
    def writer(self) -> Writer:
        """The Writer the statistics go to."""
        return self._watcher.writer

    @property
    def findings(self) -> list[Finding]:
        """Every training-health finding so far (see `normlog.health`)."""
        monitor = self._watcher.recorder.monitor
        return [] if monitor is None else list(monitor.findings)

    def flush(self) -> None:
        """Wait for the steps already dispatched to reach the host, then flush the writer."""
        self._watcher.flush()

    def close(self) -> None:
        """Flush, draw the last pictures, and close the writer if `watch` made it."""
        self._watcher.close()


class _Watcher:
    """The host side of one watched transformation."""

    def __init__(self, writer: Writer, owns_writer: bool, recorder: Recorder, emitter: Emitter, guard: Guard) -> None:
        self.writer = writer
        self.owns_writer = owns_writer
        self.recorder = recorder
        self.emitter = emitter
        self.guard = guard
        self.warned_params = False

    def flush(self) -> None:
        wait_for_host()
        self.writer.flush()

    def close(self) -> None:
        wait_for_host()
        try:
            self.recorder.close()
        finally:
            if self.owns_writer:
                self.writer.close()


def watch(
    inner: optax.GradientTransformation,
    logdir: str | None = None,
    *,
    writer: Writer | None = None,
    name: str | None = None,
    log: Literal["gradients", "parameters", "all"] = "all",
    every: int = 1,
    histogram_every: int | None = 100,
    update_every: int | None = 100,
    bins: int = 30,
    strict: bool = False,
    health: bool | Thresholds = True,
    health_via: Literal["warnings", "logging"] = "warnings",
    step: int | None = None,
    histograms_after_finding: int = 5,
) -> WatchedTransformation:
    """Wrap an optax transformation so that each update logs, to TensorBoard, the gradients it
    was given, the weights, and the updates the wrapped transformation returned: per tensor
    L2 norms and NaN/Inf counts every `every` steps, histograms every `histogram_every`,
    update ratios ‖update‖/‖w‖ every `update_every`, `global/grad_norm`, and the
    training-health findings, with the tags of `normlog.watch`. Works under `jax.jit`: the
    numbers are computed inside the compiled update, only on the steps they are due, and
    reach the host through `jax.debug.callback`.

    Args:
        inner: the transformation to wrap, e.g. `optax.adamw(1e-3)`; the gradients logged
            are those handed to the watched transformation (what the loss gave, before any
            clipping that `inner` does).
        logdir: the run directory (default `runs/<date>_<host>`), or `writer=` a Writer.
        name: write into the run `<logdir>/<name>`, so that two watched transformations in
            one run keep their own tags.
        log: "gradients", "parameters" (weights and update ratios) or "all". Weights need
            `update(grads, state, params)`; without params only gradients are logged.
        every, histogram_every, update_every: the cadences, in steps (None: never).
        bins: equal-width histogram buckets, with the core's rule (`normlog.histogram`).
        strict: raise errors inside logging instead of warning once and going on.
        health, health_via: the training-health rules, as in `normlog.watch`.
        step: the index of the first step (default 0); the counter lives in the state, so
            a restored state continues its own steps.
        histograms_after_finding: after an exploding or nonfinite finding at step s,
            histograms of every tensor at steps s+1 .. s+this, whether `every` or
            `histogram_every` makes them due or not (such a step carries histograms only,
            no norms); 0: none beyond `histogram_every`. Each step then asks the host (an
            `io_callback`, about 1 ms on the CPU); none is made with 0 or `health=False`. On
            an accelerator the callbacks are unordered: the first steps of a burst may
            carry no histograms.

    Returns:
        A `WatchedTransformation`: an optax transformation whose `flush()` writes what the
        steps dispatched so far measured, and `close()` ends the run.

    Update ratios and the stall rule cover the tensors the transformation moved at that
    step: a leaf whose update is exactly 0 (frozen by `optax.set_to_zero()` in a
    `multi_transform`) has no ratio and is never found stalled.

    Raises:
        ValueError: an option is out of range, or both `logdir` and `writer` are given
            (checked before any file is made).
        TypeError: `histograms_after_finding` is not an int, or `health` neither a bool
            nor a Thresholds.

    Example:
        >>> tx = normlog.jax.watch(optax.adamw(1e-3), "runs/mlp")  # doctest: +SKIP
        >>> state = tx.init(params)  # doctest: +SKIP
        >>> updates, state = tx.update(grads, state, params)  # inside your jitted step  # doctest: +SKIP
    """
    check_options(log, every, histogram_every, update_every)
    if step is not None and (not isinstance(step, int) or step < 0):
        raise ValueError(f"step must be a non-negative int (the first step's index), got {step!r}")
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    if writer is not None and logdir is not None:
        raise ValueError("pass logdir or writer, not both")
    check_recorder_options(histograms_after_finding, health, health_via)
    inner = optax.with_extra_args_support(inner)
    guard = Guard(strict)
    monitor = Monitor(health if isinstance(health, Thresholds) else None) if health else None
    # every option is checked and the rules made before the writer: a refused option makes no file
    with owned_run(logdir, writer, name) as (writer, owns_writer):
        recorder = make_recorder(writer, guard, bins, monitor, health_via, histograms_after_finding)
    schedule = Schedule(
        gradients=log in ("gradients", "all"),
        parameters=log in ("parameters", "all"),
        every=every,
        histogram_every=histogram_every,
        update_every=update_every if log in ("parameters", "all") else None,
        bins=bins,
    )
    emitter = Emitter(recorder, guard, schedule)
    watcher = _Watcher(writer, owns_writer, recorder, emitter, guard)
    first = 0 if step is None else step

    def init(params: Any) -> WatchState:
        return WatchState(jnp.asarray(first, jnp.int32), inner.init(params))

    def update(updates: Any, state: WatchState, params: Any = None, **extra_args: Any) -> tuple[Any, WatchState]:
        applied, inner_state = inner.update(updates, state.inner, params, **extra_args)
        guard.safely(lambda: _trace(watcher, schedule, state.step, updates, params, applied))
        return applied, WatchState(state.step + 1, inner_state)

    transformation = WatchedTransformation(init, update)
    transformation.__dict__["_watcher"] = watcher
    return transformation


def _trace(watcher: _Watcher, schedule: Schedule, step: jax.Array, grads: Any, params: Any, applied: Any) -> None:
    """Inside the traced update: the float leaves of the gradients, named by their paths,
    with the weights and updates at the same places."""
    leaves, structure = jax.tree_util.tree_flatten_with_path(grads)
    treedef: Any = structure  # its flatten_up_to is missing from jax's type stubs
    kept = [k for k, (_, leaf) in enumerate(leaves) if _stats.is_float(leaf)]
    names = [path_name(leaves[k][0]) for k in kept]
    grad_leaves = [leaves[k][1] for k in kept]
    weights = None
    if params is not None:
        param_leaves = treedef.flatten_up_to(params)
        weights = [param_leaves[k] for k in kept]
    elif schedule.parameters and not watcher.warned_params:
        watcher.warned_params = True
        watcher.guard.warn_once(
            "no-params",
            "normlog: update() was called without params: only gradients are logged. Pass them: "
            "tx.update(grads, state, params) to log weights and update ratios.",
        )
    applied_leaves = treedef.flatten_up_to(applied)

    def updates() -> list[Any]:
        return [applied_leaves[k] for k in kept]

    watcher.emitter.trace(step, names, grad_leaves, weights, updates)
