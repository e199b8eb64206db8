"""The PyTorch `Watcher`: hooks, the step schedule, GradScaler, the background writing, life cycle.

Rules: a step is one optimizer update. Its gradients are read when the last backward pass
before the update ends (after DDP's all-reduce, before clipping), and the step is written
when the optimizer steps; steps that are not logged never wait for the device. The host side
of a step (tags, scalars, health) is `normlog._step`'s. On a GPU the one transfer lands in
pinned memory and a background thread writes it. A failure inside logging warns once and
training goes on, unless `strict=True`.
"""

from __future__ import annotations

import atexit
import functools
import os
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, cast

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from normlog._step import (
    CLIPPED_GLOBAL_NORM,
    HISTOGRAMS_AFTER_FINDING,
    LOSS_SCALE,
    SKIPPED_STEP,
    Kind,
    Recorder,
    run_directory,
)
from normlog._watching import Background, Guard, check_options
from normlog.health import Finding, Monitor, Thresholds
from normlog.torch._distributed import dtensor_type, local, rank_and_world, unwrapped
from normlog.torch._engines import dense
from normlog.torch._reduce import KeptRows, Reduction
from normlog.writer import Writer

__all__ = ["Watcher", "parameter_names", "renamed", "torch_optimizer", "unwatch", "watch"]

Log = Literal["gradients", "parameters", "all"]

# model -> its Watcher; weak so that watching never keeps a model alive.
_WATCHERS: weakref.WeakKeyDictionary[nn.Module, Watcher] = weakref.WeakKeyDictionary()
# model -> the step its last watcher had reached: watching it again continues the count
_STEPS: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
# every live watcher, for the optimizer hooks torch calls for every optimizer
_LIVE: weakref.WeakSet[Watcher] = weakref.WeakSet()
_GLOBAL_HOOKS: list[RemovableHandle] = []

_Hook = TypeVar("_Hook", bound=Callable[..., Any])


def _eager(hook: _Hook) -> _Hook:
    """`hook`, run eagerly (a graph break) when torch.compile'd code calls it: a backward
    pass or an optimizer step inside a compiled function calls normlog's hooks from frames
    that dynamo would otherwise trace, into the numba kernel and the writer, where the
    step's logging failed; and a compiled model's forward hooks would guard on the step
    counter and recompile every step. What a hook does is never part of the graph."""
    disabled = torch.compiler.disable(hook, reason="normlog's hooks read and write outside the graph")  # type: ignore[no-untyped-call]
    return cast(_Hook, disabled)


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The `torch.optim.Optimizer` that `optimizer` is or wraps (through `.optimizer`, as
    accelerate's AcceleratedOptimizer and Lightning's LightningOptimizer do)."""
    inner = optimizer
    for _ in range(8):
        if isinstance(inner, torch.optim.Optimizer):
            return inner
        inner = getattr(inner, "optimizer", None)
    raise TypeError(
        f"optimizer= takes a torch.optim.Optimizer, or a wrapper whose .optimizer is one (accelerate's "
        f"AcceleratedOptimizer, Lightning's LightningOptimizer); got {type(optimizer).__name__}. Pass the torch "
        "optimizer itself, or leave optimizer= out: every optimizer that updates the model's parameters is found"
    )


def parameter_names(
    names: Mapping[torch.Tensor, str] | None, params: list[tuple[str, nn.Parameter]]
) -> dict[int, tuple[weakref.ref[nn.Parameter], str]]:
    """Check `watch(names=...)` against the model's `params` (named as `named_parameters()`
    names them): {id(parameter): (a weak reference to it, its name)}. Raises what to pass."""
    if names is None:
        return {}
    if not isinstance(names, Mapping):
        raise TypeError(
            f"names= takes a mapping {{parameter: name}}, e.g. {{p: 'encoder.w' for ...}}; got {type(names).__name__}"
        )
    chosen: dict[int, tuple[weakref.ref[nn.Parameter], str]] = {}
    for tensor, name in names.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"names= is keyed by the parameter tensors themselves ({{parameter: name}}); got a key of type "
                f"{type(tensor).__name__} ({tensor!r}). Pass {{p: name}} for p in model.parameters()"
            )
        if not isinstance(name, str):
            raise TypeError(
                f"names= maps each parameter to a str, its name in the tags; got {name!r} ({type(name).__name__})"
            )
        if not name:
            raise ValueError("names= maps a parameter to '': give it a non-empty name (e.g. 'dense/kernel')")
        chosen[id(tensor)] = (weakref.ref(tensor), name)  # type: ignore[arg-type]
    known = {id(p) for _, p in params}
    strangers = [name for key, (_, name) in chosen.items() if key not in known]
    if strangers:
        raise ValueError(
            f"names= names {len(strangers)} tensor(s) that are not parameters of the model ({', '.join(strangers[:5])}"
            f"{', ...' if len(strangers) > 5 else ''}): key it by the tensors model.parameters() yields"
        )
    renamed(chosen, params)
    return chosen


def renamed(
    chosen: Mapping[int, tuple[weakref.ref[nn.Parameter], str]], params: list[tuple[str, nn.Parameter]]
) -> list[tuple[str, nn.Parameter]]:
    """`params` under the names `chosen` gives them (the others keep theirs). Two parameters
    under one name would write into each other's tags: that raises ValueError."""
    if not chosen:
        return params
    out = []
    for name, param in params:
        entry = chosen.get(id(param))
        out.append((entry[1] if entry is not None and entry[0]() is param else name, param))
    seen: dict[str, str] = {}
    for (old, _), (new, _) in zip(params, out):
        if new in seen:
            raise ValueError(
                f"names= would log two parameters as {new!r} (the model's {seen[new]!r} and {old!r}), and their "
                "tags would mix: give each parameter its own name"
            )
        seen[new] = old
    return out


@_eager
def _before_any_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for watcher in list(_LIVE):
        watcher._before_optimizer_step(optimizer, args, kwargs)


@_eager
def _after_any_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for watcher in list(_LIVE):
        watcher._after_optimizer_step(optimizer, args, kwargs)


def _hook_every_optimizer() -> None:
    # torch calls these for every optimizer's step(), wrapped ones and those made after
    # watch() included; registered once, they reach each live watcher through a weak set
    if not _GLOBAL_HOOKS:
        _GLOBAL_HOOKS.append(register_optimizer_step_pre_hook(_before_any_step))
        _GLOBAL_HOOKS.append(register_optimizer_step_post_hook(_after_any_step))


class _InertHook:
    """What an activation hook becomes in a pickle or a deep copy: it records nothing."""

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        return None


class _ActivationHook:
    """A leaf module's forward hook for `log_activations`. It holds its watcher and module
    weakly, records only that module's own outputs (never a copy's, whose dict of hooks a
    shallow copy shares), and pickles and deep-copies as an `_InertHook`, so `torch.save`,
    `pickle` and an EMA's `copy.deepcopy` of a watched model work and log nothing."""

    def __init__(self, watcher: Watcher, module: nn.Module, name: str) -> None:
        self._watcher = weakref.ref(watcher)
        self._module = weakref.ref(module)
        self._name = name

    @_eager
    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        watcher = self._watcher()
        if watcher is not None and module is self._module():
            watcher._record_activation(self._name, output)

    def __reduce__(self) -> tuple[type[_InertHook], tuple[()]]:
        return (_InertHook, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> _InertHook:
        return _InertHook()


class _GradHook:
    """A parameter's post-accumulate-grad hook. It holds its watcher weakly: torch keeps a
    tensor's hooks from C++, where the garbage collector cannot see a cycle back to them."""

    def __init__(self, watcher: Watcher) -> None:
        self._watcher = weakref.ref(watcher)

    @_eager
    def __call__(self, param: torch.Tensor) -> None:
        watcher = self._watcher()
        if watcher is not None:
            watcher._on_grad_accumulated(param)


def _release(background: Background, recorder: Recorder, writer: Writer | None) -> None:
    """A watcher's clean-up, run by `unwatch` or when the watcher is collected: its threads
    (the writing, a picture being drawn) end and the Writer it made closes, so dropped
    watchers leak no thread or descriptor."""
    background.stop()
    recorder.wait_for_drawing()
    if writer is not None:
        writer.close()


class Watcher:
    """The hooks `watch` installs, and the step they count. Use `watch()` to make one.

    `step` is the number the next optimizer update will be logged at; set it to move the
    step axis (the integrations keep it on their trainer's global step)."""

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
        optimizer: Any,
        scaler: torch.amp.GradScaler | None,
        bins: int,
        log_activations: bool,
        strict: bool,
        health: bool | Thresholds,
        health_via: Literal["warnings", "logging"],
        step: int = 0,
        names: Mapping[torch.Tensor, str] | None = None,
        histograms_after_finding: int = HISTOGRAMS_AFTER_FINDING,
        histograms_before_finding: int = 0,
    ) -> None:
        check_options(log, every, histogram_every, update_every)
        if not isinstance(histograms_before_finding, int) or isinstance(histograms_before_finding, bool):
            raise TypeError(f"histograms_before_finding must be an int (steps), got {histograms_before_finding!r}")
        if histograms_before_finding < 0:
            raise ValueError(
                f"histograms_before_finding must be an int >= 0 (0: no ring), got {histograms_before_finding}"
            )
        if histograms_before_finding and not health:
            raise ValueError(
                "histograms_before_finding writes its ring when a health rule finds something: with health=False "
                "it would compute histograms every step for nothing. Keep health on, or leave it at 0"
            )
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        chosen = None if optimizer is None else torch_optimizer(optimizer)
        self.writer = writer
        self.step = step
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
        self._grad_hooks: dict[int, RemovableHandle] = {}  # id(parameter) -> its hook
        # named as in the model itself, so one GPU and many give the same tags
        self._params: list[tuple[str, nn.Parameter]] = []
        self._ndims: dict[str, int] = {}  # each parameter's number of dimensions, by name
        self._trainable: set[int] = set()
        dtensor = dtensor_type()
        params = list(unwrapped(model).named_parameters())
        self._names = parameter_names(names, params)
        params = renamed(self._names, params)
        self._sharded = dtensor is not None and any(isinstance(p, dtensor) for _, p in params)
        if self._sharded and optimizer is None:
            raise ValueError(
                "the model has sharded (DTensor) parameters, as FSDP2's fully_shard makes: pass optimizer=, "
                "since their gradients only arrive, reduce-scattered, before optimizer.step()"
            )
        self._optimizer = None if chosen is None else weakref.ref(chosen)
        self._accepted: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[int, bool]] = weakref.WeakKeyDictionary()
        if chosen is not None:
            watched = {id(p) for _, p in params}
            if not any(id(p) in watched for group in chosen.param_groups for p in group["params"]):
                raise ValueError("the optimizer updates none of the model's parameters")
        # the step being read: see _after_backward and the optimizer hooks
        self._pending: Reduction | None = None  # the reductions of the latest backward pass
        self._fresh = False  # a backward pass ended since the last step was written
        self._task = -1  # the autograd graph task the grad hooks last saw
        self._seen_backward = False
        self._seen_optimizer = False
        self._per_backward = False  # no optimizer: each backward pass is a step
        self._snapshot: list[tuple[int, int, int]] = []  # (parameter, grad id, grad version)
        self._in_step: torch.optim.Optimizer | None = None
        self._closure = False
        self._closure_backward = False  # a backward pass ran inside this step(closure)
        self._before: list[tuple[str, nn.Parameter, torch.Tensor]] | None = None
        self._stepped = False
        self._restore: list[Callable[[], None]] = []
        self._activations: dict[str, torch.Tensor] = {}
        self._scaler = scaler
        self._background = Background()
        self._failure: Exception | None = None  # from the background, raised on the training thread
        monitor = Monitor(health if isinstance(health, Thresholds) else None) if health else None
        # the ring of histogram rows before a finding; the slack covers the logged steps the
        # training thread can be ahead of the writing one (Background's queue, and the one it writes)
        self._ring = KeptRows(histograms_before_finding, slack=3) if histograms_before_finding else None
        self._recorder = Recorder(
            writer,
            self._guard,
            bins,
            monitor,
            health_via,
            histograms_after=histograms_after_finding,
            kept_histograms=None if self._ring is None else self._ring.through,
        )
        self._finalizer = weakref.finalize(
            self, _release, self._background, self._recorder, writer if owns_writer else None
        )
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
        self._follow(params, announce=False)
        if scaler is not None:
            self._wrap_scaler(scaler)
        if log_activations:
            for name, module in model.named_modules():
                if not any(True for _ in module.children()):
                    self._handles.append(module.register_forward_hook(_ActivationHook(self, module, name or "output")))
        _hook_every_optimizer()
        _LIVE.add(self)

    # -- which tensors -------------------------------------------------------------------

    def _follow(self, params: list[tuple[str, nn.Parameter]], announce: bool = True) -> None:
        """Watch `params`, the model's parameters now: hook new ones, unhook those gone."""
        if announce:
            known = {id(p) for _, p in self._params}
            new = [name for name, p in params if id(p) not in known]
            self._guard.warn_once(
                "replaced:" + ",".join(new),
                f"normlog: the model's parameters changed after watch() (new tensors: {', '.join(new) or 'none'}); "
                "logging the model's parameters as they are now",
            )
        self._params = params
        self._ndims = {name: p.ndim for name, p in params}  # a new dict: steps being written keep theirs
        self._trainable = {id(p) for _, p in params if p.requires_grad}
        self._accepted = weakref.WeakKeyDictionary()
        for key in [key for key in self._grad_hooks if key not in self._trainable]:
            self._grad_hooks.pop(key).remove()
        if self._sharded:
            return  # FSDP2's sharded gradients arrive before optimizer.step(), never through these hooks
        for _, param in params:
            if param.requires_grad and id(param) not in self._grad_hooks:
                hook = param.register_post_accumulate_grad_hook(_GradHook(self))  # type: ignore[no-untyped-call]
                self._grad_hooks[id(param)] = hook

    def _refresh(self) -> None:
        """Follow the model if a layer was replaced (`model.fc = nn.Linear(...)`) since."""
        model = self._model()
        if model is None:
            return
        params = list(unwrapped(model).named_parameters())
        if len(params) != len(self._params) or any(p is not q for (_, p), (_, q) in zip(params, self._params)):
            self._follow(renamed(self._names, params))

    def _accepts(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether `optimizer`'s steps are this model's updates: the one passed as
        `optimizer=` (while it lives), else any that updates a watched parameter."""
        chosen = None if self._optimizer is None else self._optimizer()
        if chosen is not None:
            return optimizer is chosen
        groups = optimizer.param_groups
        cached = self._accepted.get(optimizer)
        if cached is None or cached[0] != len(groups):
            trainable = self._trainable
            updates = any(id(p) in trainable for group in groups for p in group["params"])
            cached = self._accepted[optimizer] = (len(groups), updates)
        return cached[1]

    # -- when a step happens ---------------------------------------------------------

    def _due(self, every: int | None) -> bool:
        return every is not None and self.step % every == 0

    def _logged(self) -> tuple[bool, bool, bool]:
        """Whether this step logs anything, whether it logs histograms (every
        `histogram_every` steps, and in the burst after a finding), and whether it logs norms
        (the steps its cadences make due). A burst step that no cadence makes due logs
        histograms alone: no norms, so the health rules do not judge it and their counts of
        logged steps (warm-up, re-arm, streaks) run as in the Keras adapter. Sharded
        parameters' rows take collectives every rank must join, and only rank 0 hears of
        findings: no bursts."""
        scheduled = self._due(self._histogram_every)
        burst = not self._sharded and self._recorder.histograms_wanted(self.step)
        norms = self._due(self._every) or scheduled or (self._log_parameters and self._due(self._update_every))
        return norms or burst, scheduled or burst, norms

    def _on_grad_accumulated(self, param: torch.Tensor) -> None:
        # Runs once per parameter per backward pass. The first of a pass (a new graph task:
        # a pass that failed never ran its callback, and the next one is new all the same)
        # queues the callback that runs once all of them have.
        task = torch._C._current_graph_task_id()
        if task != self._task:
            self._task = task
            self._guard.safely(lambda: self._new_backward(param))
            torch.autograd.Variable._execution_engine.queue_callback(self._queue_after_backward)

    def _new_backward(self, first: torch.Tensor) -> None:
        """Before any optimizer step was seen, a backward pass that follows one whose
        gradients were cleared (zero_grad) marks a loop without an optimizer: from then on
        each backward pass is a step. Gradients kept (accumulation) decide nothing."""
        if self._seen_optimizer or self._per_backward or not self._fresh or self._in_step is not None:
            return
        params = {id(p): p for _, p in self._params}
        for key, grad_id, version in self._snapshot:
            param = params.get(key)
            if param is None or param is first:
                continue
            grad = param.grad
            if grad is None or id(grad) != grad_id or grad._version != version:
                self._per_backward = True
                self._write_step(self._pending)
                return

    @_eager
    def _queue_after_backward(self) -> None:
        # Queued again, so it runs after every callback queued during the backward pass:
        # DDP's, which writes the all-reduced gradients into .grad, may have come after ours.
        torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)

    @_eager
    def _after_backward(self) -> None:
        """A backward pass is done: read its gradients now, before any clipping; the step is
        written when the optimizer steps. Inside `step(closure)`, only the first pass counts
        (LBFGS evaluates the closure again: the first is the gradient at the step's start)."""
        self._guard.safely(self._raise_failure)
        if self._in_step is not None:
            if self._closure_backward:
                return
            self._closure_backward = True
        self._seen_backward = True
        self._fresh = True
        self._pending = self._guard.safely(self._reduce, where=f" at step {self.step}")
        if not self._seen_optimizer:
            self._snapshot = [
                (id(p), id(p.grad), p.grad._version) for _, p in self._params if p.grad is not None and p.requires_grad
            ]
        if self._per_backward:
            self._write_step(self._pending)

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._in_step is not None or not self._accepts(optimizer):
            return  # an optimizer inside another's step, or one of another model
        self._in_step = optimizer
        self._seen_optimizer = True
        self._per_backward = False
        # torch hands the hooks step()'s own arguments, the optimizer first: a closure is the next
        self._closure = (args[1] if len(args) > 1 else kwargs.get("closure")) is not None
        self._closure_backward = False
        self._guard.safely(self._raise_failure)
        self._guard.safely(self._start_optimizer_step, where=f" at step {self.step}")

    def _start_optimizer_step(self) -> None:
        if not self._fresh and not self._closure and (self._sharded or not self._seen_backward):
            # gradients that no hook saw arrive: FSDP2's, or ones set by hand; read them now
            self._pending, self._fresh = self._reduce(), True
        self._before = None
        if self._log_parameters and self._due(self._update_every) and self._in_step is not None:
            # A copy of every weight this optimizer updates (owns): the reason update ratios have
            # their own, sparser cadence. A tensor left out of it has no update ratio, so the
            # health rules never call it stalled, online or in `normlog report`.
            groups = self._in_step.param_groups
            owned = {id(p) for group in groups for p in group["params"]}
            with torch.no_grad():
                trainable = [(n, p) for n, p in self._params if p.requires_grad and id(p) in owned]
                self._before = [(n, p, local(p.detach())[0].clone()) for n, p in trainable]

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if optimizer is not self._in_step:
            return
        self._in_step = None
        self._stepped = True
        if not self._fresh:
            return  # no backward pass since the last step: a second optimizer of the same update
        pending = self._pending
        before, self._before = self._before, None
        if pending is not None:
            self._guard.safely(lambda: self._measure_step(pending, before), where=f" at step {self.step}")
        self._write_step(pending)

    def _measure_step(self, pending: Reduction, before: list[tuple[str, nn.Parameter, torch.Tensor]] | None) -> None:
        """After the optimizer's update: the norm of the gradients it applied, and the
        update ratios when due."""
        with torch.no_grad():
            grads = [p.grad for _, p in pending.updated]
            if (
                pending.norms
                and self._log_gradients
                and any(g is None or id(g) != i or g._version != v for g, (i, v) in zip(grads, pending.versions))
            ):  # changed since backward (clipped, unscaled): measured again; else the same norm
                pending.measure_applied([dense(g) for g in grads if g is not None])
            if before is not None:
                kept = [(n, p, b) for n, p, b in before if p.grad is not None]
                pending.updated = [(n, p) for n, p, _ in kept]
                pending.before = [b for _, _, b in kept]
                pending.measure_updates()

    def _write_step(self, pending: Reduction | None, scalars: list[tuple[str, float]] | None = None) -> None:
        """Write the step read last at `self.step`, and count it."""
        self._pending, self._fresh = None, False
        try:
            if pending is not None:
                pending.step = self.step
                self._guard.safely(lambda: self._finish(pending, scalars or []), where=f" at step {self.step}")
            elif scalars:
                self._guard.safely(lambda: self._recorder.record(self.step, scalars=scalars))
        finally:
            self.step += 1

    def _wrap_scaler(self, scaler: torch.amp.GradScaler) -> None:
        # GradScaler skips optimizer.step() when the unscaled gradients hold Inf/NaN, so the
        # optimizer's hooks never see those steps; scaler.update() runs every iteration.
        original = scaler.update
        reference = weakref.ref(self)  # the scaler must not keep a dropped watcher alive

        def update(new_scale: Any = None) -> None:
            watcher = reference()
            if watcher is not None:
                stepped, watcher._stepped = watcher._stepped, False
                if not stepped:
                    watcher._write_step(watcher._pending, [(SKIPPED_STEP, 1.0)])
                watcher._guard.safely(lambda: watcher._log_loss_scale(scaler), where=f" at step {watcher.step - 1}")
            original(new_scale)

        scaler.update = update  # type: ignore[method-assign]
        self._restore.append(lambda: scaler.__dict__.pop("update", None))

    def _log_loss_scale(self, scaler: torch.amp.GradScaler) -> None:
        step = self.step - 1  # the step this update() closes
        if step % self._every == 0:
            self._recorder.record(step, scalars=[(LOSS_SCALE, scaler.get_scale())])

    def _record_activation(self, name: str, output: Any) -> None:
        # one output per module, the latest: forwards never followed by a backward pass of
        # the model (validation without no_grad) hold one batch's outputs, never more
        if isinstance(output, torch.Tensor) and torch.is_grad_enabled() and self._logged()[0]:
            self._activations[name] = output.detach()

    # -- what a logged step records ----------------------------------------------------

    def _reduce(self) -> Reduction | None:
        """Start the reductions of a logged step on the device; nothing waits for them yet.
        It runs on the training thread for hundreds of tensors, so it makes no tensor
        objects per tensor (no detach, no views): autograd is off instead."""
        with torch.no_grad():
            return self._reduce_without_grad()

    def _reduce_without_grad(self) -> Reduction | None:
        logged, histograms, norms = self._logged()
        activations, self._activations = self._activations, {}
        if not logged:
            return None
        self._refresh()
        groups: list[tuple[Kind, list[str], list[torch.Tensor]]] = []
        # a frozen parameter's gradient is left out whatever its stale .grad holds: it is
        # never dead or stalled; its weight is still logged
        with_grad = [(name, p) for name, p in self._params if p.grad is not None and p.requires_grad]
        if self._log_gradients and with_grad:  # no gradient at all (a step before any backward): no gradient tags
            grads = [dense(p.grad) for _, p in with_grad]  # type: ignore[arg-type]
            groups.append(("gradients", [n for n, _ in with_grad], grads))
        if self._log_parameters:
            groups.append(("parameters", [n for n, _ in self._params], [p for _, p in self._params]))
        if activations:
            groups.append(("activations", list(activations), list(activations.values())))
        if self.writer is None and not self._sharded:
            return None  # a rank that does not write, with nothing to add to the ranks that do
        keep = self._ring is not None and not histograms  # rows for the ring, written only on a finding
        pending = Reduction.start(self.step, groups, with_grad, self._bins, histograms or keep, self._sharded)
        if pending is not None:
            pending.rows_kept = keep
            pending.norms = norms
            pending.ndims = self._ndims
            pending.versions = [(id(p.grad), p.grad._version) for _, p in with_grad]  # type: ignore[union-attr]
            scale = None if self._scaler is None or not self._scaler.is_enabled() else self._scaler._scale
            if scale is not None and self._in_step is None:  # gradients read in backward: still scaled
                pending.scale = scale.detach().clone()
        return pending

    def _finish(self, pending: Reduction, scalars: list[tuple[str, float]] | None = None) -> None:
        """The one device-to-host transfer of a logged step, then the writing. When nothing
        can need a recount (the rows of the Triton path) on a GPU, the copy goes to pinned
        memory without waiting, and a background thread waits for it and writes, while
        training goes on; `unwatch`, `findings` and exit wait for that thread. Rows meant
        for the ring go there, and stay on the device."""
        if pending.rows_kept and self._ring is not None:
            self._ring.keep(pending.keep_rows())
        joined = pending.joined()
        if pending.rows and joined.is_cuda:
            host = torch.empty(joined.shape, dtype=joined.dtype, pin_memory=True)
            host.copy_(joined, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
            pending.release()  # the device tensors are not needed again: let them go now
            self._background.submit(functools.partial(self._write_later, pending, host, event, scalars or []))
        else:
            self._write(pending, joined.cpu().numpy(), scalars or [])

    def _write_later(
        self, pending: Reduction, host: torch.Tensor, event: torch.cuda.Event, scalars: list[tuple[str, float]]
    ) -> None:
        """On the background thread: wait for the copy, then write (see `_finish`)."""
        try:
            event.synchronize()
            self._guard.safely(lambda: self._write(pending, host.numpy(), scalars), where=f" at step {pending.step}")
        except Exception as error:  # strict: raised on the training thread, at its next hook
            self._failure = error

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def _wait_for_writing(self) -> None:
        self._background.wait()
        self._raise_failure()

    def _write(self, pending: Reduction, host: np.ndarray, scalars: list[tuple[str, float]]) -> None:
        groups, updates, applied = pending.decode(host)
        ring = self._ring
        if ring is not None and pending.rows_kept and self._recorder.histograms_wanted(pending.step):
            # a burst that began after this step was reduced (the writing thread is behind
            # the training one on a GPU): its rows, kept in the ring, are written with it
            kept = ring.take(pending.step)
            if kept is not None:
                for group, kept_group in zip(groups, kept, strict=True):
                    group.rows = kept_group.rows
        if applied is None and pending.versions and self._log_gradients:
            # the gradients were not changed after backward: the optimizer applied them as read
            gradients = next(g for g in groups if g.kind == "gradients")
            if gradients.norms is not None:
                applied = float(np.sqrt(np.sum(np.square(gradients.norms))))
        extra = [*scalars, (CLIPPED_GLOBAL_NORM, applied)] if applied is not None else scalars
        self._recorder.record(pending.step, groups, updates, extra)
        if ring is not None and any(group.rows is not None for group in groups):
            ring.forget_through(pending.step)

    def flush(self) -> None:
        """Write out everything logged so far (a step still being written, the pictures being
        drawn) and make it durable on disk, as `Writer.flush` does."""
        self._guard.safely(self._wait_for_writing)
        self._recorder.wait_for_drawing()
        if self.writer is not None:
            self.writer.flush()

    @property
    def findings(self) -> list[Finding]:
        """Every training-health finding so far (see `normlog.health`)."""
        self._guard.safely(self._wait_for_writing)
        monitor = self._recorder.monitor
        return [] if monitor is None else list(monitor.findings)

    # -- errors and life cycle -----------------------------------------------------------

    def unwatch(self) -> None:
        """Write the step still in flight, remove every hook; close the writer if `watch` made it.
        Without an optimizer, the last backward pass is written as a step now."""
        atexit.unregister(self._at_exit)
        _LIVE.discard(self)
        try:
            if self._fresh and not self._seen_optimizer:
                self._write_step(self._pending)
            self._guard.safely(self._wait_for_writing)  # with strict, raises after the clean-up below
        finally:
            self._pending, self._fresh = None, False
            try:
                self._recorder.close()  # with strict, a failed picture raises after the clean-up below
            finally:
                self._clean_up()

    def _clean_up(self) -> None:
        """Remove every hook, undo every wrapper, and let the thread and the Writer go."""
        for handle in [*self._handles, *self._grad_hooks.values()]:
            handle.remove()
        self._handles.clear()
        self._grad_hooks.clear()
        for restore in self._restore:
            restore()
        self._restore.clear()
        model = self._model()
        if model is not None:
            _STEPS[model] = self.step
            if _WATCHERS.get(model) is self:
                del _WATCHERS[model]
        self._finalizer()  # stops the background thread, closes the writer if watch made it

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unwatch()


def watch(
    model: nn.Module,
    logdir: str | None = None,
    *,
    writer: Writer | None = None,
    name: str | None = None,
    step: int | None = None,
    log: Log = "all",
    every: int = 1,
    histogram_every: int | None = 100,
    update_every: int | None = 100,
    optimizer: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    bins: int = 30,
    log_activations: bool = False,
    strict: bool = False,
    health: bool | Thresholds = True,
    health_via: Literal["warnings", "logging"] = "warnings",
    per_rank: bool = False,
    names: Mapping[torch.Tensor, str] | None = None,
    histograms_after_finding: int = HISTOGRAMS_AFTER_FINDING,
    histograms_before_finding: int = 0,
) -> Watcher:
    """Log `model`'s gradient and weight norms every `every` steps and histograms every
    `histogram_every` steps, to `logdir` (or to `writer`).

    A step is one optimizer update. Its gradients are those the last backward pass before
    the update left: accumulated over micro-batches, after DDP's all-reduce, unscaled where a
    GradScaler scaled them, and before clipping (`global/grad_norm_clipped` gives the
    global norm the optimizer applied, after clipping). With `optimizer.step(closure)`
    they are those of the closure's first backward pass (LBFGS evaluates it again; the first
    is the gradient at the step's starting point). Every optimizer that updates the model's
    parameters is found, including wrapped ones and ones made after `watch`; `optimizer=`
    chooses one (a `torch.optim.Optimizer`, or a wrapper whose `.optimizer` is one). A loop
    without any optimizer logs each backward pass as a step. Weights are those the
    gradients were computed at; update ratios ‖w_after - w_before‖ / ‖w_before‖ are logged
    every `update_every` steps (each costs a copy of the weights).

    Args:
        model: the `nn.Module` to watch (or its DDP / `torch.compile` wrapper).
        logdir: the run directory (default `runs/<date>_<host>`); or pass `writer`.
        writer: a `normlog.Writer` to write into instead.
        name: write into the run `<logdir>/<name>` (with `writer`, `<writer.logdir>/<name>`,
            a Writer the watcher makes and closes): one run per model, so a GAN's two
            models keep their own tags and TensorBoard overlays them.
        step: the number of the first update logged (a resumed run: the checkpoint's step).
            Default: 0, or where the model's previous watcher stopped.
        log, every, histogram_every, update_every, bins: what is logged and how often.
        optimizer: the optimizer whose steps count (default: every one updating the model).
        scaler: a `torch.amp.GradScaler`: gradients are read scaled and divided by its scale,
            the steps it skips for Inf/NaN are still logged with `amp/skipped_step`, and
            `amp/loss_scale` is logged every `every` steps.
        log_activations: log each leaf module's output too.
        strict: raise failures inside logging instead of warning once.
        health, health_via: the rules of `normlog.health` (pass `Thresholds` to tune them);
            findings come as HealthWarnings (or `logging` records) and under `health/`.
        per_rank: under torch.distributed, each rank writes `<logdir>/rank<k>`.
        names: the name to log a parameter under, keyed by the parameter tensor itself
            (`{model.fc.weight: "head/kernel"}`); every tag of that parameter (norms,
            histograms, update ratios, NaN/Inf counts, findings) uses it. Parameters not in
            it keep their `named_parameters()` name. Adapters that train a torch module
            under other names (Keras' torch backend) pass their own.
        histograms_after_finding: when an `exploding` or `nonfinite` finding begins at step
            s, steps s+1 .. s+K log histograms of every tensor, whatever `histogram_every`
            says. A burst step that no cadence (`every`, `histogram_every`, `update_every`)
            makes due logs histograms alone: no norms, and the rules do not judge it. Default 5: the findings
            benchmark finds these rules 0-4 logged steps after their cause, and 5 steps show
            the blow-up spreading or settling, at the cost of 5 histogram steps per episode;
            0 turns it off. On a GPU, where a background thread writes the steps, a finding
            is known once its step is written, up to 3 logged steps later: the burst's steps
            reduced before that carry no histograms, unless the ring below kept them.
        histograms_before_finding: K > 0 keeps the histogram rows of the last K logged steps
            on the device (no copy to the host until written) and, when an exploding or
            nonfinite finding begins at step s, writes those of s-K+1 .. s at their own
            steps, so the spike's step and the steps before it are there too. Every logged
            step then computes histograms (the cost is in the README's table); only steps
            since the last histogram step are kept, so each tag's steps stay in order and
            TensorBoard keeps them all. Default 0: off.

    Returns:
        The `Watcher`; `unwatch()` it (or use it as a context manager).

    Raises:
        TypeError: `model` is not an `nn.Module`, `optimizer` is not a torch optimizer,
            `names` is not a {parameter tensor: str} mapping, or a histograms_*_finding
            length is not an int.
        ValueError: a bad option, an optimizer that updates none of the model's parameters,
            `names` naming a tensor that is not the model's, or two parameters alike, or
            `histograms_before_finding` with `health=False`.

    Example:
        >>> watcher = normlog.watch(model, "runs/exp1")  # doctest: +SKIP

    On a CUDA GPU, each logged step is written by a background thread while training goes
    on; `unwatch()`, `findings` and interpreter exit wait for it. Under torch.distributed
    (call `watch` after `init_process_group`), every rank calls `watch` and rank 0 alone
    writes. Parameters sharded by FSDP2 (DTensors) are logged whole, need `optimizer=`, and
    are read just before `optimizer.step()` (after any clipping: their gradients arrive
    there). On the ranks that do not write, `watcher.writer` is None.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"normlog.watch expects a torch.nn.Module, got {type(model).__name__}")
    if writer is not None and logdir is not None:
        raise ValueError("pass logdir or writer, not both")
    if optimizer is not None:
        torch_optimizer(optimizer)  # refuse what is not an optimizer before anything is made
    parameter_names(names, list(unwrapped(model).named_parameters()))  # and names= that cannot be used
    previous = _WATCHERS.get(model)
    unwatch(model)
    start = step if step is not None else (previous.step if previous is not None else _STEPS.get(model, 0))
    owns_writer = writer is None
    if name is not None:  # its own run, under the logdir or the given Writer's
        logdir, writer, owns_writer = run_directory(writer.logdir if writer is not None else logdir, name), None, True
    rank, world = rank_and_world()
    if world > 1 and per_rank and owns_writer:
        writer = Writer(None if logdir is None else os.path.join(logdir, f"rank{rank}"), comment=f"_rank{rank}")
    elif world > 1 and not per_rank and rank != 0:
        writer = None  # rank 0 writes; this rank only joins the all-reduces of sharded tensors
    elif writer is None:
        writer = Writer(logdir)
    try:
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
            step=start,
            names=names,
            histograms_after_finding=histograms_after_finding,
            histograms_before_finding=histograms_before_finding,
        )
    except BaseException:
        if owns_writer and writer is not None:
            writer.close()
        raise
    _WATCHERS[model] = watcher
    return watcher


def unwatch(model: nn.Module) -> None:
    """Remove the hooks `watch` installed on `model`, if any."""
    watcher = _WATCHERS.get(model)
    if watcher is not None:
        watcher.unwatch()
