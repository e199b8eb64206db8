"""The PyTorch `Watcher`: hooks, the step schedule, GradScaler, the background writing, life cycle.

Rules: the hooks decide when a step is logged and start its reductions (`_reduce`); steps
that are not logged never wait for the device. The host side of a step (tags, scalars,
health) is `normlog._step`'s. On a GPU the one transfer lands in pinned memory and a
background thread writes it, so logged steps do not wait either. A failure inside logging
warns once and training goes on, unless `strict=True`.
"""

from __future__ import annotations

import atexit
import functools
import os
import weakref
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from normlog._step import LOSS_SCALE, SKIPPED_STEP, Kind, Recorder
from normlog._watching import Background, Guard, check_options
from normlog.health import Finding, Monitor, Thresholds
from normlog.torch._distributed import dtensor_type, local, rank_and_world, unwrapped
from normlog.torch._engines import dense
from normlog.torch._reduce import Reduction
from normlog.writer import Writer

__all__ = ["Watcher", "unwatch", "watch"]

Log = Literal["gradients", "parameters", "all"]

# model -> its Watcher; weak so that watching never keeps a model alive.
_WATCHERS: weakref.WeakKeyDictionary[nn.Module, Watcher] = weakref.WeakKeyDictionary()


class Watcher:
    """The hooks `watch` installs, and the step they count. Use `watch()` to make one."""

    def __init__(
        self,
        model: nn.Module,
        writer: Writer | None,
        *,
        owns_writer: bool,
        log: Log,
        every: int,
        histogram_every: int | None,
        update_every: int | None,
        optimizer: torch.optim.Optimizer | None,
        scaler: torch.amp.GradScaler | None,
        bins: int,
        log_activations: bool,
        strict: bool,
        health: bool | Thresholds,
        health_via: Literal["warnings", "logging"],
    ) -> None:
        check_options(log, every, histogram_every, update_every)
        self.writer = writer
        self.step = 0
        self._owns_writer = owns_writer
        self._model = weakref.ref(model)
        self._log_gradients = log in ("gradients", "all")
        self._log_parameters = log in ("parameters", "all")
        self._every = every
        self._histogram_every = histogram_every
        self._update_every = update_every
        self._bins = bins
        self._guard = Guard(strict)
        self._handles: list[RemovableHandle] = []
        # named as in the model itself, so one GPU and many give the same tags
        self._params = [(name, p) for name, p in unwrapped(model).named_parameters()]
        dtensor = dtensor_type()
        self._sharded = dtensor is not None and any(isinstance(p, dtensor) for _, p in self._params)
        if self._sharded and optimizer is None:
            raise ValueError(
                "the model has sharded (DTensor) parameters, as FSDP2's fully_shard makes: pass optimizer=, "
                "since their gradients only arrive, reduce-scattered, before optimizer.step()"
            )
        self._backward_queued = False
        self._pending: Reduction | None = None
        self._background = Background()
        self._failure: Exception | None = None  # from the background, raised on the training thread
        # at exit, steps still being written are finished before the writer's own exit hook
        # closes it (atexit runs the last registered first); a weak reference keeps the
        # watcher, and so the model, collectable
        reference = weakref.ref(self)

        def at_exit() -> None:
            watcher = reference()
            if watcher is not None:
                watcher._guard.safely(watcher._wait_for_writing)

        self._at_exit = at_exit
        atexit.register(at_exit)
        self._has_optimizer = optimizer is not None
        self._stepped = False
        self._restore: list[Callable[[], None]] = []
        self._activations: list[tuple[str, torch.Tensor]] = []
        monitor = Monitor(health if isinstance(health, Thresholds) else None) if health else None
        self._recorder = Recorder(writer, self._guard, bins, monitor, health_via)

        if optimizer is not None:
            watched = {id(p) for _, p in self._params}
            if not any(id(p) in watched for group in optimizer.param_groups for p in group["params"]):
                raise ValueError("the optimizer updates none of the model's parameters")
            self._handles.append(optimizer.register_step_pre_hook(self._before_optimizer_step))
            self._handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))
            if scaler is not None:
                self._wrap_scaler(scaler)
        elif scaler is not None:
            raise ValueError("scaler= needs optimizer= too: skipped steps are the optimizer's")
        else:
            for _, param in self._params:
                if param.requires_grad:
                    self._handles.append(param.register_post_accumulate_grad_hook(self._on_grad_accumulated))  # type: ignore[no-untyped-call]
        if log_activations:
            for name, module in model.named_modules():
                if not any(True for _ in module.children()):
                    self._handles.append(module.register_forward_hook(self._activation_hook(name)))

    # -- when a step happens ---------------------------------------------------------

    def _due(self, every: int | None) -> bool:
        return every is not None and self.step % every == 0

    def _logged(self) -> tuple[bool, bool]:
        """Whether this step logs anything, and whether it logs histograms."""
        histograms = self._due(self._histogram_every)
        updates = self._has_optimizer and self._log_parameters and self._due(self._update_every)
        return self._due(self._every) or histograms or updates, histograms

    def _on_grad_accumulated(self, _: torch.Tensor) -> None:
        # Runs once per parameter per backward pass; the callback runs once, after all of them.
        if not self._backward_queued:
            self._backward_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._queue_after_backward)

    def _queue_after_backward(self) -> None:
        # Queued again, so it runs after every callback queued during the backward pass:
        # DDP's, which writes the all-reduced gradients into .grad, may have come after ours.
        torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)

    def _after_backward(self) -> None:
        self._backward_queued = False
        self._guard.safely(self._raise_failure)
        try:
            self._guard.safely(self._log_backward, where=f" at step {self.step}")
        finally:
            self.step += 1

    def _log_backward(self) -> None:
        pending = self._reduce()
        if pending is not None:
            self._finish(pending)

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._pending = None
        self._guard.safely(self._raise_failure)
        self._guard.safely(self._start_optimizer_step, where=f" at step {self.step}")

    def _start_optimizer_step(self) -> None:
        pending = self._reduce()
        if pending is not None and self._log_parameters and self._due(self._update_every):
            # A copy of every weight: the reason update ratios have their own, sparser cadence.
            pending.before = [local(p.detach())[0].clone() for _, p in pending.updated]
        self._pending = pending

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._stepped = True
        try:
            self._guard.safely(self._finish_optimizer_step, where=f" at step {self.step}")
        finally:
            self._pending = None
            self.step += 1

    def _wrap_scaler(self, scaler: torch.amp.GradScaler) -> None:
        # GradScaler skips optimizer.step() when the unscaled gradients hold Inf/NaN, so the
        # optimizer's hooks never see those steps; scaler.update() runs every iteration.
        original = scaler.update

        def update(new_scale: Any = None) -> None:
            stepped, self._stepped = self._stepped, False
            if not stepped:
                try:
                    self._guard.safely(self._log_skipped_step, where=f" at step {self.step}")
                finally:
                    self.step += 1
            self._guard.safely(lambda: self._log_loss_scale(scaler), where=f" at step {self.step - 1}")
            original(new_scale)

        scaler.update = update  # type: ignore[method-assign]
        self._restore.append(lambda: scaler.__dict__.pop("update", None))

    def _log_skipped_step(self) -> None:
        self._recorder.record(self.step, scalars=[(SKIPPED_STEP, 1.0)])
        self._log_backward()  # the gradients, unscaled by scaler.step(), with their NaN/Inf counts

    def _log_loss_scale(self, scaler: torch.amp.GradScaler) -> None:
        step = self.step - 1  # the step this update() closes
        if step % self._every == 0:
            self._recorder.record(step, scalars=[(LOSS_SCALE, scaler.get_scale())])

    def _finish_optimizer_step(self) -> None:
        pending = self._pending
        if pending is None:
            return
        pending.measure_updates()
        self._finish(pending)

    def _activation_hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and self._logged()[0] and torch.is_grad_enabled():
                self._activations.append((name or "output", output.detach()))

        return hook

    # -- what a logged step records ----------------------------------------------------

    def _reduce(self) -> Reduction | None:
        """Start the reductions of a logged step on the device; nothing waits for them yet.
        It runs on the training thread for hundreds of tensors, so it makes no tensor
        objects per tensor (no detach, no views): autograd is off instead."""
        with torch.no_grad():
            return self._reduce_without_grad()

    def _reduce_without_grad(self) -> Reduction | None:
        logged, histograms = self._logged()
        activations, self._activations = self._activations, []
        if not logged:
            return None
        groups: list[tuple[Kind, list[str], list[torch.Tensor]]] = []
        with_grad = [(name, p) for name, p in self._params if p.grad is not None]
        if self._log_gradients:
            grads = [dense(p.grad) for _, p in with_grad]  # type: ignore[arg-type]
            groups.append(("gradients", [n for n, _ in with_grad], grads))
        if self._log_parameters:
            params = with_grad if self._has_optimizer else self._params
            groups.append(("parameters", [n for n, _ in params], [p for _, p in params]))
        if activations:
            groups.append(("activations", [n for n, _ in activations], [a for _, a in activations]))
        if self.writer is None and not self._sharded:
            return None  # a rank that does not write, with nothing to add to the ranks that do
        return Reduction.start(self.step, groups, with_grad, self._bins, histograms, self._sharded)

    def _finish(self, pending: Reduction) -> None:
        """The one device-to-host transfer of a logged step, then the writing. When nothing
        can need a recount (the rows of the Triton path) on a GPU, the copy goes to pinned
        memory without waiting, and a background thread waits for it and writes, while
        training goes on; `unwatch`, `findings` and exit wait for that thread."""
        joined = pending.joined()
        if pending.rows and joined.is_cuda:
            host = torch.empty(joined.shape, dtype=joined.dtype, pin_memory=True)
            host.copy_(joined, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
            pending.release()  # the device tensors are not needed again: let them go now
            self._background.submit(functools.partial(self._write_later, pending, host, event))
        else:
            self._write(pending, joined.cpu().numpy())

    def _write_later(self, pending: Reduction, host: torch.Tensor, event: torch.cuda.Event) -> None:
        """On the background thread: wait for the copy, then write (see `_finish`)."""
        try:
            event.synchronize()
            self._guard.safely(lambda: self._write(pending, host.numpy()), where=f" at step {pending.step}")
        except Exception as error:  # strict: raised on the training thread, at its next hook
            self._failure = error

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def _wait_for_writing(self) -> None:
        self._background.wait()
        self._raise_failure()

    def _write(self, pending: Reduction, host: np.ndarray) -> None:
        groups, updates = pending.decode(host)
        self._recorder.record(pending.step, groups, updates)

    @property
    def findings(self) -> list[Finding]:
        """Every training-health finding so far (see `normlog.health`)."""
        self._guard.safely(self._wait_for_writing)
        monitor = self._recorder.monitor
        return [] if monitor is None else list(monitor.findings)

    # -- errors and life cycle -----------------------------------------------------------

    def unwatch(self) -> None:
        """Write the step still in flight, remove every hook; close the writer if `watch` made it."""
        atexit.unregister(self._at_exit)
        try:
            self._guard.safely(self._wait_for_writing)  # with strict, raises after the clean-up below
        finally:
            self._background.stop()
            self._recorder.close()
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            for restore in self._restore:
                restore()
            self._restore.clear()
            model = self._model()
            if model is not None and _WATCHERS.get(model) is self:
                del _WATCHERS[model]
            if self._owns_writer and self.writer is not None:
                self.writer.close()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unwatch()


def watch(
    model: nn.Module,
    logdir: str | None = None,
    *,
    writer: Writer | None = None,
    log: Log = "all",
    every: int = 1,
    histogram_every: int | None = 100,
    update_every: int | None = 100,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    bins: int = 30,
    log_activations: bool = False,
    strict: bool = False,
    health: bool | Thresholds = True,
    health_via: Literal["warnings", "logging"] = "warnings",
    per_rank: bool = False,
) -> Watcher:
    """Log `model`'s gradient and weight norms every `every` steps and histograms every
    `histogram_every` steps, to `logdir` (or to `writer`).

    With `optimizer`, a step is one `optimizer.step()`: gradients are read just before it,
    after accumulation, DDP's all-reduce and GradScaler's unscaling, and update ratios
    ‖w_after - w_before‖ / ‖w_before‖ are logged every `update_every` steps (each costs a
    copy of the weights). With `scaler` (a `torch.amp.GradScaler`) too, the steps the scaler
    skips for Inf/NaN are still logged, with `amp/skipped_step`, and `amp/loss_scale` is
    logged every `every` steps. Without an optimizer, a step is one backward pass.
    Watching a model again replaces its hooks. On a CUDA GPU, each logged step is written
    by a background thread while training goes on; `unwatch()`, `findings` and interpreter
    exit wait for it. With `health` (on by default; or pass
    `normlog.health.Thresholds`), the rules of `normlog.health` run on every logged step and
    report findings as HealthWarnings (or `logging` records with `health_via="logging"`) and
    under `health/` in TensorBoard.

    Under torch.distributed (call `watch` after `init_process_group`), every rank calls
    `watch` and rank 0 alone writes, or with
    `per_rank=True` each rank writes to `<logdir>/rank<k>`. Gradients are DDP's all-reduced
    ones. Parameters sharded by FSDP2 (DTensors) are logged whole: norms add the shards'
    squares and histograms bin every shard with the global min and max and add the counts,
    in one all-reduce per logged step (two more when histograms are due, one for update ratios).
    On the ranks that do not write, `watcher.writer` is None. A model wrapped in
    DistributedDataParallel or torch.compile keeps its own tensor names.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"normlog.watch expects a torch.nn.Module, got {type(model).__name__}")
    if writer is not None and logdir is not None:
        raise ValueError("pass logdir or writer, not both")
    unwatch(model)
    owns_writer = writer is None
    rank, world = rank_and_world()
    if world > 1 and per_rank and writer is None:
        writer = Writer(None if logdir is None else os.path.join(logdir, f"rank{rank}"), comment=f"_rank{rank}")
    elif world > 1 and not per_rank and rank != 0:
        writer = None  # rank 0 writes; this rank only joins the all-reduces of sharded tensors
    elif writer is None:
        writer = Writer(logdir)
    watcher = Watcher(
        model,
        writer,
        owns_writer=owns_writer,
        log=log,
        every=every,
        histogram_every=histogram_every,
        update_every=update_every,
        optimizer=optimizer,
        scaler=scaler,
        bins=bins,
        log_activations=log_activations,
        strict=strict,
        health=health,
        health_via=health_via,
    )
    _WATCHERS[model] = watcher
    return watcher


def unwatch(model: nn.Module) -> None:
    """Remove the hooks `watch` installed on `model`, if any."""
    watcher = _WATCHERS.get(model)
    if watcher is not None:
        watcher.unwatch()
