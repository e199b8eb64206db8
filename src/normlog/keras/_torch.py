"""The Keras `Watcher` callback on Keras' torch backend: the PyTorch adapter watches the model.

Rules: on this backend a Keras model is a `torch.nn.Module` and each Keras variable holds a
`torch.nn.Parameter` (`variable.value`), so the hooks, the reductions and the writing are
`normlog.torch.watch`'s, with the Keras variable paths as the parameters' names. A Keras
optimizer is no `torch.optim.Optimizer`: its `apply` is wrapped on the instance to run as the
`step()` of a stand-in torch optimizer (`_KerasUpdate`), whose step hooks tell the PyTorch
adapter where each update begins and ends. This file imports torch and Keras, never TensorFlow.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal

import keras
import torch

import normlog.torch
from normlog._step import owned_run
from normlog._watching import Guard, check_options
from normlog.health import Finding, Thresholds
from normlog.keras._variables import applied_steps, find_optimizers, variable_names
from normlog.writer import Writer

__all__ = ["Watcher", "find_optimizers", "make_watcher"]

Log = Literal["gradients", "parameters", "all"]


def _refuse(optimizer: Any) -> None:
    """Raise for an optimizer whose gradients this backend cannot log as the step used them."""
    if optimizer is not None and hasattr(optimizer, "inner_optimizer"):
        raise ValueError(
            "normlog.keras on the torch backend does not yet watch a LossScaleOptimizer (mixed_float16): "
            "the gradients backward() leaves are scaled by its loss scale, and would be logged scaled. "
            "Train in float32 or bfloat16 (mixed_bfloat16 needs no loss scale) while watching."
        )


class _KerasUpdate(torch.optim.Optimizer):
    """A torch optimizer that updates nothing itself: its `step()` runs one Keras optimizer's
    `apply`, so that torch's optimizer step hooks, and through them the PyTorch adapter,
    see each Keras update begin and end. Its parameters are the watched ones (torch checks
    that the optimizer passed to `normlog.torch.watch` updates some of them)."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        super().__init__(params, {})
        self.pending: Callable[[], Any] | None = None

    def step(self, closure: Any = None) -> Any:
        update, self.pending = self.pending, None
        return update() if update is not None else None


class Watcher(keras.callbacks.Callback):  # type: ignore[misc]
    """The callback `watch` returns on Keras' torch backend: pass it to `fit`. See
    `normlog.keras.watch` for what it logs; `torch_watcher` is the PyTorch adapter's
    `Watcher` doing the work (made at the first step when the model has no variables yet)."""

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
        _check(log, every, histogram_every, update_every, step)
        is_optimizer = isinstance(target, keras.optimizers.Optimizer)
        model = None if is_optimizer else target
        optimizer = target if is_optimizer else optimizer
        self.writer = writer
        self._owns_writer = owns_writer
        self._watched = weakref.ref(model) if model is not None else None
        self._fixed_optimizer = optimizer is not None
        self._first_step = step
        self._guard = Guard(strict)
        self._options: dict[str, Any] = dict(
            log=log,
            every=every,
            histogram_every=histogram_every,
            update_every=update_every,
            bins=bins,
            strict=strict,
            health=health,
            health_via=health_via,
            histograms_after_finding=histograms_after_finding,
        )
        self._wrapped: list[Any] = []  # the Keras optimizers whose apply runs through the stand-in
        self._update: _KerasUpdate | None = None
        self._holder: torch.nn.Module | None = None  # what the PyTorch adapter watches for a lone optimizer
        self.torch_watcher: normlog.torch.Watcher | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._outside_grad_said = False
        self._wrap(optimizer if optimizer is not None else getattr(model, "optimizer", None))
        if model is not None and model.weights and (self._wrapped or step is not None):
            self._start(model.weights)  # else at fit's start or the first update, when both are known

    def __deepcopy__(self, memo: dict[int, Any]) -> Watcher:
        # keras-tuner deep-copies the callbacks of every trial: the copy is the watcher itself
        # (it owns an open event file and hooks), so every trial logs into the one run.
        return self

    @property
    def optimizers(self) -> list[Any]:
        """The Keras optimizers whose `apply` this watcher wraps."""
        return list(self._wrapped)

    @property
    def step(self) -> int:
        """The index the next update will be logged at."""
        if self.torch_watcher is not None:
            return self.torch_watcher.step
        if self._first_step is not None:
            return self._first_step
        return applied_steps(self._wrapped[0]) if self._wrapped else 0

    @property
    def findings(self) -> list[Finding]:
        """Every training-health finding so far (see `normlog.health`)."""
        return [] if self.torch_watcher is None else self.torch_watcher.findings

    # -- installing ------------------------------------------------------------------

    def _start(self, variables: Sequence[Any]) -> None:
        """Make the PyTorch adapter's watcher, once the variables exist: on the model itself,
        with each parameter named by its Keras path; for a lone optimizer, on a module that
        holds the variables it updates."""
        with self._lock:
            if self.torch_watcher is not None or self._closed:
                return
            model = self._watched() if self._watched is not None else None
            if model is not None:
                module: torch.nn.Module = model
                variables = list(model.weights)
                model_name = model.name
            else:
                module = self._holder = torch.nn.Module()
                module.register_module("variables", torch.nn.ParameterList([v.value for v in variables]))
                model_name = ""
            # named by path; only the module's own parameters (what named_parameters() yields)
            known = {id(p) for p in module.parameters()}
            named = [
                (v.value, n) for v, n in zip(variables, variable_names(variables, model_name)) if id(v.value) in known
            ]
            if not named:
                return
            params = [p for p, _ in named]
            names = dict(named)
            first = self._first_step
            if first is None:  # a resumed run continues at the optimizer's own count
                first = applied_steps(self._wrapped[0]) if self._wrapped else 0
            self._update = _KerasUpdate(params)
            self.torch_watcher = normlog.torch.watch(
                module,
                writer=self.writer,
                optimizer=self._update,
                step=first,
                names=names,
                **self._options,
            )

    def _wrap(self, optimizer: Any) -> None:
        """Route `optimizer.apply` through the stand-in torch optimizer's `step()`."""
        if optimizer is None or any(optimizer is known for known in self._wrapped):
            return
        _refuse(optimizer)
        clipping = [a for a in ("clipnorm", "global_clipnorm", "clipvalue") if getattr(optimizer, a, None) is not None]
        if clipping:
            self._guard.warn_once(
                "keras-clipping",
                f"normlog: {optimizer.name!r} clips inside apply ({clipping[0]}), on copies of the gradients: on the "
                "torch backend normlog logs the gradients before that clipping, and global/grad_norm_clipped is "
                "their norm unclipped, not the norm applied",
            )
        original = optimizer.apply  # the class's bound method, or another wrapper
        reference = weakref.ref(self)  # the optimizer must not keep a dropped watcher alive

        def apply(grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None) -> Any:
            watcher = reference()
            if watcher is None or watcher._closed:
                return original(grads, trainable_variables)
            return watcher._apply(optimizer, original, grads, trainable_variables)

        # Under jit_compile=True Keras compiles its train step with torch.compile: the update
        # (normlog's hooks inside it included) runs eagerly instead of being traced by dynamo,
        # which cannot trace the host-side work of a logged step.
        optimizer.apply = torch.compiler.disable(apply)  # type: ignore[no-untyped-call]
        self._wrapped.append(optimizer)

    def _apply(
        self,
        optimizer: Any,
        original: Callable[..., Any],
        grads: Sequence[Any],
        variables: Sequence[Any] | None,
    ) -> Any:
        """One Keras update, as one step of the stand-in torch optimizer."""
        if self.torch_watcher is None:
            chosen = list(variables) if variables is not None else list(getattr(optimizer, "_trainable_variables", []))
            self._guard.safely(lambda: self._start(chosen))
        update = self._update
        if update is None:
            return original(grads, variables)
        self._guard.safely(lambda: self._check_gradients(grads, variables))
        result: list[Any] = []
        update.pending = lambda: result.append(original(grads, variables))
        update.step()  # the hooks' failures warn inside them; with strict=True they raise here
        return result[0] if result else None

    def _check_gradients(self, grads: Sequence[Any], variables: Sequence[Any] | None) -> None:
        # The PyTorch adapter reads the gradients backward() left in .grad, as Keras' torch
        # trainer passes them; gradients from elsewhere (torch.autograd.grad) never reach it.
        if variables is None or self._outside_grad_said:
            return
        for grad, variable in zip(grads, variables):
            if grad is not None and getattr(getattr(variable, "value", None), "grad", None) is None:
                self._guard.warn_once(
                    "not-dot-grad",
                    f"normlog: {variable.path!r} got a gradient in apply() that backward() did not leave in its "
                    ".grad; on the torch backend normlog logs the gradients loss.backward() computes",
                )
                self._outside_grad_said = True  # said once: no more looking
                return

    # -- fit's callbacks -----------------------------------------------------------------

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        def begin() -> None:
            if not self._fixed_optimizer:  # compiled (again) after watch: follow model.optimizer
                self._wrap(getattr(self.model, "optimizer", None))
            if self.torch_watcher is None and self.model is not None and self.model.weights:
                self._start(self.model.weights)

        self._guard.safely(begin)
        self._step_at_begin = self.step

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        def end() -> None:
            if self.step == getattr(self, "_step_at_begin", -1) and not self._fixed_optimizer:
                found = ", ".join(find_optimizers(self.model)) or "none"
                self._guard.warn_once(
                    "no-step",
                    "normlog: fit ran but the watched optimizer applied no gradient: the train_step applies an "
                    f"optimizer that is not model.optimizer (attributes found: {found}). Pass it: "
                    "normlog.keras.watch(model, optimizer=...), one watcher per optimizer with name=.",
                )
            if self.torch_watcher is not None:
                self.torch_watcher.flush()
            else:
                self.writer.flush()

        self._guard.safely(end)

    # -- life cycle ------------------------------------------------------------------------

    def unwatch(self) -> None:
        """Restore the optimizers' own `apply`, remove the PyTorch adapter's hooks, and close
        the writer if `watch` made it."""
        self._closed = True
        for optimizer in self._wrapped:
            optimizer.__dict__.pop("apply", None)  # back to the class's method
        self._wrapped.clear()
        try:
            if self.torch_watcher is not None:
                self.torch_watcher.unwatch()
        finally:
            self._update = None
            if self._owns_writer:
                self.writer.close()


def _check(log: Log, every: int, histogram_every: int | None, update_every: int | None, step: int | None) -> None:
    check_options(log, every, histogram_every, update_every)
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ValueError(f"step must be a non-negative int (the first step's index), got {step!r}")


def make_watcher(
    target: Any,
    logdir: Any,
    writer: Writer | None,
    name: str | None,
    *,
    optimizer: keras.optimizers.Optimizer | None = None,
    **options: Any,
) -> Watcher:
    """`watch`'s work once the backend is known to be torch: what cannot be watched is refused,
    then the run directory, the writer and the watcher are made, in that order, so that a
    refused target makes no file."""
    if writer is not None and logdir is not None:
        raise ValueError("pass logdir or writer, not both")
    get = options.get
    _check(get("log", "all"), get("every", 1), get("histogram_every", 100), get("update_every", 100), get("step"))
    if isinstance(target, keras.optimizers.Optimizer):
        _refuse(target)
    else:
        _refuse(optimizer if optimizer is not None else getattr(target, "optimizer", None))
        others = find_optimizers(target) if optimizer is None else {}
        if others:
            attributes = ", ".join(f"model.{attribute}" for attribute in others)
            raise ValueError(
                f"the model holds other optimizers than model.optimizer ({attributes}): on the torch backend one "
                "watcher follows one optimizer. Watch the sub-model each one trains, each in its own run, e.g. "
                "normlog.keras.watch(gan.discriminator, logdir, optimizer=gan.d_optimizer, name='discriminator')"
            )
    with owned_run(logdir, writer, name) as (run, owns_writer):
        return Watcher(target, run, owns_writer=owns_writer, optimizer=optimizer, **options)
