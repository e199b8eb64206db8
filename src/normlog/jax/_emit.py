"""One watched set of JAX arrays: what a traced step computes on its logged steps, and what the
host writes when the numbers arrive.

Rules: jax only (no optax, no Keras); both `normlog.jax.watch` (optax) and the Keras adapter
on the JAX backend log through `Emitter.trace`, so they write the same things. Work is done
only on the steps it is due, inside `lax.cond`: statistics every `every` steps, histogram
rows every `histogram_every`, update norms every `update_every`. The numbers reach the host
in one `jax.debug.callback` per logged step (float64 as uint32 pairs, `_stats.to_host`), where
`normlog._step.Recorder` writes them: tags, findings and the writer call are its business.
A failure on the host warns once (`Guard`); with strict=True it is raised in the step.

The burst of histograms after a finding (`Recorder.histograms_wanted`) is asked of the host
by an `io_callback` at every step (when there are health rules and a burst length): on the
CPU backend each step's callbacks have run before the next step starts (they run inline), so
the burst covers steps s+1 .. s+K exactly. On an accelerator the callbacks are unordered and
may run after the next step has asked: the first steps of a burst may then carry no
histograms (as torch on a GPU).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import io_callback

from normlog import _rows
from normlog._step import Group, Kind, Recorder, Updates
from normlog._watching import Guard
from normlog.health import Monitor, Thresholds
from normlog.jax import _stats
from normlog.writer import Writer

__all__ = ["Emitter", "Schedule", "check_recorder_options", "make_recorder", "path_name", "wait_for_host"]


def wait_for_host() -> None:
    """Return once every callback of the steps dispatched so far has run on the host."""
    jax.effects_barrier()  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class Schedule:
    """What is logged, and how often (steps counted from the watcher's first step)."""

    gradients: bool
    parameters: bool
    every: int
    histogram_every: int | None
    update_every: int | None
    bins: int


def path_name(path: Sequence[Any]) -> str:
    """A pytree path as a tensor name: `{"dense": {"kernel": w}}` gives "dense/kernel", a
    list's third item "2", an attribute its name."""
    parts = []
    for key in path:
        for attribute in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts) or "value"


def check_recorder_options(histograms_after_finding: Any, health: Any, health_via: Any) -> None:
    """Raise for an option the Recorder or the rules would refuse, before any file is made."""
    after = histograms_after_finding
    if not isinstance(after, int) or isinstance(after, bool):
        raise TypeError(f"histograms_after_finding must be an int (steps), got {after!r}")
    if after < 0:
        raise ValueError(f"histograms_after_finding must be an int >= 0 (0: no burst), got {after}")
    if health_via not in ("warnings", "logging"):
        raise ValueError(f"health_via must be 'warnings' or 'logging', got {health_via!r}")
    if not isinstance(health, (bool, Thresholds)):
        raise TypeError(f"health must be a bool or a normlog.health.Thresholds, got {health!r}")


def make_recorder(
    writer: Writer,
    guard: Guard,
    bins: int,
    monitor: Monitor | None,
    health_via: Any,
    histograms_after_finding: int,
) -> Recorder:
    """The Recorder of one watcher, with its burst of histograms after a finding
    (`Recorder.histograms_wanted`)."""
    return Recorder(writer, guard, bins, monitor, health_via, histograms_after=histograms_after_finding)


class Emitter:
    """Logs the steps of one watched set of arrays: `trace` inside the traced step, the
    callbacks on the host."""

    def __init__(self, recorder: Recorder, guard: Guard, schedule: Schedule) -> None:
        self.recorder = recorder
        self.guard = guard
        self.schedule = schedule

    # -- inside the traced step ------------------------------------------------------------

    def trace(
        self,
        step: jax.Array,
        names: Sequence[str],
        grads: Sequence[jax.Array],
        weights: Sequence[jax.Array] | None,
        updates: Callable[[], Sequence[jax.Array]] | None,
    ) -> None:
        """Log step `step` (a traced int) of the arrays `names`: their gradients, their
        weights before the update (None: not known) and, called only where update ratios
        are due, the update each received (w_after - w_before)."""
        plan = self.schedule
        names = tuple(names)
        if not names:
            return
        grads = list(grads) if plan.gradients else []
        weights = list(weights) if plan.parameters and weights is not None else []
        kinds: list[tuple[Kind, list[jax.Array]]] = [("gradients", grads)] if grads else []
        kinds += [("parameters", weights)] if weights else []
        if not kinds:
            return
        with _stats.x64():
            stats_due = step % plan.every == 0
            hist_due = step % plan.histogram_every == 0 if plan.histogram_every else jnp.bool_(False)
            ratios = plan.update_every is not None and updates is not None and bool(weights)
            update_due = step % plan.update_every == 0 if ratios and plan.update_every else jnp.bool_(False)
            fused = {kind: _stats.fuse(arrays) for kind, arrays in kinds}
            # a burst of histograms after an exploding or nonfinite finding needs the rules (a
            # monitor) and a length: without them no step asks the host anything
            burst = self.recorder.monitor is not None and self.recorder.histograms_after > 0
            if burst:
                # The host knows (from the steps before, whose callbacks have run: see `send`),
                # so every step asks it, due by `every` or not: the burst counts steps s+1 ..
                # s+K. About 1 ms a step on the CPU; histograms_after_finding=0 turns it off. A
                # burst step that `every` does not make due carries histograms only, no norms,
                # so the rules' counters advance only on the steps `every` logs.
                wanted = jax.ShapeDtypeStruct((), jnp.bool_)  # type: ignore[no-untyped-call]
                asked: jax.Array = io_callback(self._wanted, wanted, step)
                hist_due = hist_due | asked

            def statistics(_: None) -> jax.Array:
                parts = []
                for _kind, arrays in kinds:
                    sums = _stats.sums_of_squares(arrays)
                    parts += [jnp.sqrt(sums), _stats.nonfinite(arrays, sums)]
                return jnp.concatenate(parts)

            def histogram_rows() -> jax.Array:
                return jnp.concatenate([_stats.rows(fused[kind], arrays, plan.bins) for kind, arrays in kinds])

            def update_norms(_: None) -> jax.Array:
                assert updates is not None
                applied = list(updates())
                sums = [_stats.sums_of_squares(part) for part in (applied, weights)]
                return jnp.stack([jnp.sqrt(s) for s in sums])

            # Each heavy reduction sits in a cond of its own at the top level, and the callback's
            # cond holds only their small results: with the reductions nested inside one cond,
            # a 2.1M-parameter MLP's steps where nothing was due cost 2x plain (measured).
            size = 2 * len(names) * len(kinds)
            values = lax.cond(stats_due, statistics, lambda _: jnp.zeros(size, jnp.float64), None)
            update_values = (
                lax.cond(update_due, update_norms, lambda _: jnp.zeros((2, len(names)), jnp.float64), None)
                if ratios
                else jnp.zeros((2, 0), jnp.float64)
            )
            rows = None
            if plan.histogram_every or burst:
                width = _rows.width(plan.bins)
                empty = jnp.zeros((len(names) * len(kinds), width), jnp.float64)
                rows = lax.cond(hist_due, lambda _: histogram_rows(), lambda _: empty, None)
            on_step = functools.partial(self._on_step, names, tuple(kind for kind, _ in kinds))
            flags = jnp.stack([stats_due, update_due, hist_due])

            def send(_: None) -> None:
                # One callback per step, unordered: an ordered one costs about 1 ms more per step
                # on the CPU (measured). On the CPU backend callbacks run inline, so each step's
                # has run before the next step starts; on an accelerator nothing orders them
                # (see the module docstring: the first steps of a burst may go without).
                jax.debug.callback(
                    on_step,
                    step,
                    flags,
                    _stats.to_host(values),
                    _stats.to_host(update_values),
                    None if rows is None else _stats.to_host(rows),
                )

            lax.cond(stats_due | hist_due | update_due, send, lambda _: None, None)

    # -- on the host -----------------------------------------------------------------------

    def _wanted(self, step: Any) -> np.ndarray:
        wanted = self.guard.safely(lambda: self.recorder.histograms_wanted(int(step)))
        return np.asarray(bool(wanted))

    def _on_step(
        self,
        names: tuple[str, ...],
        kinds: tuple[Kind, ...],
        step: Any,
        flags: Any,
        values: Any,
        updates: Any,
        rows: Any,
    ) -> None:
        self.guard.safely(lambda: self._record(names, kinds, int(step), np.asarray(flags), values, updates, rows))

    def _record(
        self,
        names: tuple[str, ...],
        kinds: tuple[Kind, ...],
        step: int,
        flags: np.ndarray,
        bits: Any,
        update_bits: Any,
        row_bits: Any,
    ) -> None:
        stats_due, update_due, hist_due = (bool(flag) for flag in flags)
        count = len(names)
        rows = _stats.from_host(row_bits) if hist_due and row_bits is not None else None
        groups = []
        values = _stats.from_host(bits) if stats_due else None
        for k, kind in enumerate(kinds):
            group = Group(kind, names)
            if values is not None:
                group.norms = values[2 * k * count : (2 * k + 1) * count]
                group.nonfinite = values[(2 * k + 1) * count : (2 * k + 2) * count]
            if rows is not None:
                group.rows = rows[k * count : (k + 1) * count]
            if group.norms is not None or group.rows is not None:
                groups.append(group)
        update = None
        if update_due:
            update_norms, weight_norms = _stats.from_host(update_bits)
            # A tensor whose update is exactly 0 at this step was not updated (frozen by
            # optax.set_to_zero in a multi_transform, say): it is not the optimizer's, so it
            # gets no update ratio and the stall rule does not judge it (`Updates`).
            moved = update_norms != 0
            owned = tuple(name for name, keep in zip(names, moved, strict=True) if keep)
            update = Updates(owned, update_norms[moved], weight_norms[moved])
        self.recorder.record(step, groups, update)
