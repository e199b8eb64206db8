"""PyTorch adapter: `watch(model)` logs per-parameter gradient and weight norms and histograms.

Rules: statistics are reduced where the tensors live and cross to the host as one small
tensor per logged step; steps that are not logged never wait for the device. On a CUDA
GPU, every tensor is read by two Triton launches (normlog._triton), and the result is
written by a background thread, so logged steps do not wait either; on the CPU, histogram
rows come from a compiled kernel (normlog._numba) where numba is installed; elsewhere,
torch ops. Every path bins with the core's rule in float64, and tests compare each with
the core. A failure inside logging warns once and training goes on, unless `strict=True`.
"""

from __future__ import annotations

import atexit
import functools
import math
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from normlog._watching import Background, Guard, check_options
from normlog.health import Finding, Monitor, StepValues, Thresholds, announce
from normlog.writer import Writer

__all__ = ["Watcher", "unwatch", "watch"]

Log = Literal["gradients", "parameters", "all"]

# model -> its Watcher; weak so that watching never keeps a model alive.
_WATCHERS: weakref.WeakKeyDictionary[nn.Module, Watcher] = weakref.WeakKeyDictionary()


def _by_device_and_dtype(tensors: Sequence[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """The positions of the tensors on each device with each dtype: one launch's worth."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, tensor in enumerate(tensors):
        groups.setdefault((tensor.device, tensor.dtype), []).append(i)
    return groups


def _norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each tensor as one float64 vector on the first tensor's device, reduced per
    (device, dtype) group and accumulated in float32 (float64 for float64)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    parts, order = [], []
    for (device, dtype), indices in _by_device_and_dtype(tensors).items():
        dense = [tensors[i] for i in indices]
        if device.type == "cpu" and dtype in (torch.float32, torch.float64):
            # BLAS dot on the CPU: ~4x faster than _foreach_norm there, and more accurate
            # (torch's float32 CPU norm drifts ~1e-4 from float64 on multi-million-element
            # tensors; dot stays within ~1e-5). On accelerators, one foreach launch wins.
            norms = torch.stack([torch.dot(flat, flat) for flat in (t.reshape(-1) for t in dense)]).sqrt_()
        elif dtype in (torch.float32, torch.float64):
            norms = torch.stack(torch._foreach_norm(dense, 2))  # the dtype= path is slower for these
        else:  # accumulate float16 and bfloat16 in float32, as p.grad.float().norm() does
            norms = torch.stack(torch._foreach_norm(dense, 2, dtype=torch.float32))
        parts.append(norms.to(tensors[0].device, torch.float64))
        order += indices
    joined = torch.cat(parts) if len(parts) > 1 else parts[0]
    if order == sorted(order):  # one group, or groups in the tensors' order: no per-tensor work
        return joined
    # Put in the tensors' order without an index tensor, whose copy to an accelerator would
    # make the host wait for it.
    position = {index: k for k, index in enumerate(order)}
    by_tensor = joined.unbind()
    return torch.stack([by_tensor[position[i]] for i in range(len(tensors))])


_TINY = float(torch.finfo(torch.float64).tiny)


def _histogram_row(
    tensor: torch.Tensor, bins: int, mask_nonfinite: bool, span: torch.Tensor | None = None
) -> torch.Tensor:
    """[min, max, sum, sum_squares, finite, nan, posinf, neginf, counts...] of one tensor, in
    float64 on its device, bucketed as `normlog.histogram(values, bins)` does: floor((x - min)
    / width) in float64, clamped to the last bucket, worked in place on one float64 copy.
    `span` ([min, max] in float64) bins a shard with the whole tensor's rule; every field
    but min and max is then a sum over the shards. On the CPU, with numba, the row comes
    from `normlog._numba` instead: the same numbers, in two passes over the memory, with
    NaN and Inf always counted (as `mask_nonfinite` asks)."""
    if span is None and _compiled_on_cpu(tensor) and _numba() is not None:
        return _compiled_rows([tensor], bins)[0]
    flat = tensor.detach().reshape(-1)
    values = flat.to(torch.float64)  # a copy (for float64 input too, made below): worked on in place
    counts_nonfinite = [values.new_zeros(())] * 3
    if mask_nonfinite:
        finite = torch.isfinite(values)
        counts_nonfinite = [torch.isnan(values).sum(), (values == math.inf).sum(), (values == -math.inf).sum()]
        values = values[finite]
        flat = values
    elif values.data_ptr() == flat.data_ptr():
        values = values.clone()
    size = values.numel()
    if size == 0:
        head = values.new_zeros(5) if span is None else torch.cat([span.to(values), values.new_zeros(3)])
        return torch.cat([head, torch.stack(counts_nonfinite).to(values), values.new_zeros(bins)])
    if span is None:
        lo, hi = (bound.to(torch.float64) for bound in torch.aminmax(flat))  # exact in any float dtype
    else:
        lo, hi = span.to(values.device).unbind()
    # No tensor is made from host numbers here (torch.full, not new_tensor): on an
    # accelerator, that copy would make the host wait for the device.
    stats = torch.stack([lo, hi, values.sum(), values.dot(values), torch.full_like(lo, float(size))])
    if tensor.dtype == torch.float64:
        # Only float64 ranges can overflow (past the largest double) or give a width below
        # the smallest normal one: scale by a power of two, exactly, as the core does.
        extent = hi - lo
        half, up, one = (torch.full_like(extent, v) for v in (0.5, 2.0**600, 1.0))
        scale = torch.where(torch.isinf(extent), half, torch.where(extent / bins < _TINY, up, one))
        values.mul_(scale)
        lo, hi = lo * scale, hi * scale
    width = torch.where(hi > lo, (hi - lo) / bins, torch.ones_like(lo))
    values.sub_(lo).div_(width)
    if values.device.type == "cpu":
        # x - min >= 0, so the conversion's truncation is the floor. The clamp also keeps NaN
        # and Inf, which become arbitrary integers, inside bincount's range until the norms
        # reveal them and the masked pass redoes the row.
        counts = torch.bincount(values.to(torch.int32).clamp_(0, bins - 1), minlength=bins).to(torch.float64)
    else:
        # bincount on an accelerator reads its input's max back to the host; histc over
        # whole bucket numbers with a fixed range counts the same without waiting.
        counts = torch.histc(values.floor_().clamp_(0, bins - 1), bins, min=0, max=bins)
    return torch.cat([stats, torch.stack(counts_nonfinite).to(values), counts])


def _compiled_rows(tensors: Sequence[torch.Tensor], bins: int) -> torch.Tensor:
    """The rows of CPU tensors from `normlog._numba`, all in one call: its threads share
    the blocks of every tensor, however small each is."""
    exact = (t.detach() if t.dtype in (torch.float32, torch.float64) else t.detach().float() for t in tensors)
    return torch.from_numpy(_numba().rows([t.reshape(-1).numpy() for t in exact], bins))


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.layout == torch.strided:
        return tensor
    return tensor.detach().coalesce().to_dense()  # sparse gradients of nn.Embedding(sparse=True)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) if isinstance(model, nn.parallel.DistributedDataParallel) else None
        inner = inner if inner is not None else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _distributed() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside torch.distributed."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _local(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[Any, ...]]:
    """The part of `tensor` on this rank, and the process groups its shards are spread over
    (none for an ordinary tensor or a replicated DTensor, as FSDP2's `fully_shard` makes)."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(tensor, dtensor):
        return tensor, ()
    sharded: Any = tensor
    groups = []
    for dim, placement in enumerate(sharded.placements):
        if placement.is_partial():
            raise ValueError("a Partial DTensor (a sum not yet reduced) has no norm of its own")
        if placement.is_shard():
            groups.append(sharded.device_mesh.get_group(dim))
    return sharded.to_local(), tuple(groups)


@functools.cache
def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _all_reduce(values: torch.Tensor, groups: tuple[Any, ...], op: Any) -> None:
    for group in groups:
        torch.distributed.all_reduce(values, op=op, group=group)


def _full_norms(locals_: list[torch.Tensor], groups: list[tuple[Any, ...]]) -> torch.Tensor:
    """Norms of whole tensors from their local shards: one all-reduce of the squares per
    set of groups (in practice one per logged step), none without shards."""
    norms = _norms(locals_)
    for key in dict.fromkeys(g for g in groups if g):
        index = torch.tensor([i for i, g in enumerate(groups) if g == key], device=norms.device)
        squares = norms[index].square()
        _all_reduce(squares, key, torch.distributed.ReduceOp.SUM)
        norms[index] = squares.sqrt()
    return norms


def _full_rows(
    locals_: list[torch.Tensor], groups: list[tuple[Any, ...]], bins: int, mask_nonfinite: bool
) -> list[torch.Tensor]:
    """Histogram rows of whole tensors from their shards: the global min and max in one
    all-reduce, then each shard binned with them and the counts and sums added in another,
    which is `Histogram.merge` done on the device."""
    rows: list[torch.Tensor | None] = [None] * len(locals_)
    whole = [i for i, g in enumerate(groups) if not g]
    compiled = [i for i in whole if _compiled_on_cpu(locals_[i])] if _numba() is not None else []
    if compiled:  # in one call, as its threads share blocks of every tensor
        rows_of_compiled = _compiled_rows([locals_[i] for i in compiled], bins)
        for i, row in zip(compiled, rows_of_compiled, strict=True):
            rows[i] = row
    for i in whole:
        if rows[i] is None:
            rows[i] = _histogram_row(locals_[i], bins, mask_nonfinite)
    for key in dict.fromkeys(g for g in groups if g):
        members = [i for i, g in enumerate(groups) if g == key]
        bounds = torch.stack([_negated_bounds(locals_[i], mask_nonfinite) for i in members])
        _all_reduce(bounds, key, torch.distributed.ReduceOp.MAX)  # [-min, max] per tensor
        spans = torch.stack([-bounds[:, 0], bounds[:, 1]], dim=1)
        shard_rows = torch.stack(
            [_histogram_row(locals_[i], bins, mask_nonfinite, span) for i, span in zip(members, spans)]
        )
        sums = shard_rows[:, 2:].contiguous()
        _all_reduce(sums, key, torch.distributed.ReduceOp.SUM)
        for i, span, tail in zip(members, spans, sums):
            empty = tail[2] == 0  # no finite value on any rank: the core's empty histogram
            rows[i] = torch.cat([torch.where(empty, torch.zeros_like(span), span), tail])
    return [row for row in rows if row is not None]


def _negated_bounds(tensor: torch.Tensor, finite_only: bool) -> torch.Tensor:
    """[-min, max] of a shard in float64 (of its finite values with `finite_only`), -inf for
    an empty shard, so that a MAX all-reduce gives the whole tensor's bounds."""
    flat = tensor.detach().reshape(-1)
    if finite_only:
        flat = flat[torch.isfinite(flat)]
    if flat.numel() == 0:
        return torch.full((2,), -math.inf, dtype=torch.float64, device=tensor.device)
    lo, hi = torch.aminmax(flat)
    return torch.stack([-lo.to(torch.float64), hi.to(torch.float64)])


def _compiled_on_cpu(tensor: torch.Tensor) -> bool:
    """Whether `_histogram_row` takes the compiled CPU path for this tensor."""
    return tensor.device.type == "cpu" and tensor.layout == torch.strided


@functools.cache
def _numba() -> Any:
    """normlog._numba where numba is installed (normlog[torch] brings it), else None."""
    try:
        from normlog import _numba as module
    except ImportError:
        return None
    return module


@functools.cache
def _triton() -> Any:
    """normlog._triton where Triton and a CUDA device are there, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        from normlog import _triton as module
    except ImportError:
        return None
    return module


def _multi_tensor_rows(tensors: list[torch.Tensor], bins: int) -> tuple[list[torch.Tensor], list[int]]:
    """Stats rows of every tensor, one pair of Triton launches per (device, dtype); the
    rows come grouped, and `order` lists the tensor each row belongs to."""
    groups = _by_device_and_dtype(tensors)
    pieces = [_triton().stats_rows([tensors[i] for i in members], bins) for members in groups.values()]
    return pieces, [i for members in groups.values() for i in members]


@dataclass
class _Pending:
    """A logged step's reductions, started on the device and not yet read."""

    step: int
    groups: list[tuple[str, list[str], list[torch.Tensor]]]
    tensors: list[torch.Tensor]  # this rank's part of each: shards of FSDP2 parameters
    shards: list[tuple[Any, ...]]  # the process groups each tensor is sharded over
    pieces: list[torch.Tensor]
    histograms: bool
    # the parameters that had a gradient: the before/after snapshots and the ratios follow this order
    updated: list[tuple[str, nn.Parameter]]
    before: list[torch.Tensor] | None = None
    update_norms: torch.Tensor | None = None
    # rows: pieces hold one stats row per tensor ([..., sum_squares, finite, nan, posinf,
    # neginf, counts...], NaN/Inf already counted), in the tensors' order after `order`.
    # Norms come from the rows and nothing is recounted, so the device tensors can go.
    rows: bool = False
    order: list[int] | None = None


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
        self._params = [(name, p) for name, p in _unwrapped(model).named_parameters()]
        dtensor = _dtensor_type()
        self._sharded = dtensor is not None and any(isinstance(p, dtensor) for _, p in self._params)
        if self._sharded and optimizer is None:
            raise ValueError(
                "the model has sharded (DTensor) parameters, as FSDP2's fully_shard makes: pass optimizer=, "
                "since their gradients only arrive, reduce-scattered, before optimizer.step()"
            )
        self._backward_queued = False
        self._pending: _Pending | None = None
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
        self._monitor = Monitor(health if isinstance(health, Thresholds) else None) if health else None
        self._health_via = health_via

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
            pending.before = [_local(p.detach())[0].clone() for _, p in pending.updated]
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
        if self.writer is not None:
            self.writer._summary([("amp/skipped_step", 1.0)], self.step, None)
        self._log_backward()  # the gradients, unscaled by scaler.step(), with their NaN/Inf counts

    def _log_loss_scale(self, scaler: torch.amp.GradScaler) -> None:
        step = self.step - 1  # the step this update() closes
        if step % self._every == 0 and self.writer is not None:
            self.writer._summary([("amp/loss_scale", scaler.get_scale())], step, None)

    def _finish_optimizer_step(self) -> None:
        pending = self._pending
        if pending is None:
            return
        if pending.before is not None:
            after = [_local(p.detach()) for _, p in pending.updated]
            differences = torch._foreach_sub([t for t, _ in after], pending.before)
            pending.update_norms = _full_norms(list(differences), [g for _, g in after])
        self._finish(pending)

    def _activation_hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and self._logged()[0] and torch.is_grad_enabled():
                self._activations.append((name or "output", output.detach()))

        return hook

    # -- what a logged step records ----------------------------------------------------

    def _reduce(self) -> _Pending | None:
        """Start the reductions of a logged step on the device; nothing waits for them yet.
        It runs on the training thread for hundreds of tensors, so it makes no tensor
        objects per tensor (no detach, no views): autograd is off instead."""
        with torch.no_grad():
            return self._reduce_without_grad()

    def _reduce_without_grad(self) -> _Pending | None:
        logged, histograms = self._logged()
        activations, self._activations = self._activations, []
        if not logged:
            return None
        groups: list[tuple[str, list[str], list[torch.Tensor]]] = []
        with_grad = [(name, p) for name, p in self._params if p.grad is not None]
        if self._log_gradients:
            grads = [_dense(p.grad) for _, p in with_grad]  # type: ignore[arg-type]
            groups.append(("gradients", [n for n, _ in with_grad], grads))
        if self._log_parameters:
            params = with_grad if self._has_optimizer else self._params
            groups.append(("parameters", [n for n, _ in params], [p for _, p in params]))
        if activations:
            groups.append(("activations", [n for n, _ in activations], [a for _, a in activations]))
        if self.writer is None and not self._sharded:
            return None  # a rank that does not write, with nothing to add to the ranks that do
        tensors = [t for _, _, ts in groups for t in ts]
        if not tensors:
            return None
        shards: list[tuple[Any, ...]] = [()] * len(tensors)
        if self._sharded:
            tensors, shards = (list(column) for column in zip(*map(_local, tensors)))
        if not any(shards) and _triton() is not None and all(_triton().supports(t) for t in tensors):
            pieces, order = _multi_tensor_rows(tensors, self._bins if histograms else 0)
            return _Pending(self.step, groups, tensors, shards, pieces, histograms, with_grad, rows=True, order=order)
        if histograms and not any(shards) and _numba() is not None and all(_compiled_on_cpu(t) for t in tensors):
            # the compiled rows count NaN/Inf and hold each sum of squares in float64:
            # the norms come from them, without a pass of their own
            rows = _compiled_rows(tensors, self._bins)
            order = list(range(len(tensors)))
            return _Pending(self.step, groups, tensors, shards, [rows], True, with_grad, rows=True, order=order)
        pieces = [_full_norms(tensors, shards)]
        if histograms:
            pieces += _full_rows(tensors, shards, self._bins, mask_nonfinite=False)
        return _Pending(self.step, groups, tensors, shards, pieces, histograms, with_grad)

    def _finish(self, pending: _Pending) -> None:
        """The one device-to-host transfer of a logged step, then the writing. When nothing
        can need a recount (the rows of the Triton path) on a GPU, the copy goes to pinned
        memory without waiting, and a background thread waits for it and writes, while
        training goes on; `unwatch`, `findings` and exit wait for that thread."""
        pieces = pending.pieces if pending.update_norms is None else [*pending.pieces, pending.update_norms]
        device = pieces[0].device
        joined = torch.cat([piece.reshape(-1).to(device) for piece in pieces])
        if pending.rows and joined.is_cuda:
            host = torch.empty(joined.shape, dtype=joined.dtype, pin_memory=True)
            host.copy_(joined, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
            # the device tensors are not needed again: let them go now
            pending.groups = [(kind, names, []) for kind, names, _ in pending.groups]
            pending.tensors, pending.pieces, pending.before, pending.update_norms = [], [], None, None
            self._background.submit(functools.partial(self._write_later, pending, host, event))
        else:
            self._write(pending, joined.cpu().numpy())

    def _write_later(self, pending: _Pending, host: torch.Tensor, event: torch.cuda.Event) -> None:
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

    def _write(self, pending: _Pending, host: np.ndarray) -> None:
        count = sum(len(names) for _, names, _ in pending.groups)
        counted: np.ndarray | None = None  # NaN/Inf counts, when the rows carry them
        if pending.rows:
            width = 8 + (self._bins if pending.histograms else 0)
            table = np.empty((count, width))
            table[pending.order] = host[: count * width].reshape(count, width)
            counted = table[:, 5:8].sum(axis=1)
            infinite = table[:, 6] + table[:, 7]
            with np.errstate(invalid="ignore"):  # as torch's norm: NaN if any NaN, else Inf if any Inf
                norms = np.where(table[:, 5] > 0, np.nan, np.where(infinite > 0, np.inf, np.sqrt(table[:, 3])))
            rows = table if pending.histograms else None
            update_norms = host[count * width :]
        else:
            width = 8 + self._bins
            norms = host[:count]
            end = count + (count * width if pending.histograms else 0)
            rows = host[count:end].reshape(count, width) if pending.histograms else None
            update_norms = host[end:]
        step = pending.step
        scalars: list[tuple[str, float]] = []
        parameter_norms: dict[str, float] = {}
        values = StepValues(step)
        index = 0
        for kind, names, _ in pending.groups:
            squares = 0.0
            for name in names:
                norm = float(norms[index])
                scalars.append((f"{kind}/{name}/norm", norm))
                squares += norm * norm
                if kind == "parameters":
                    parameter_norms[name] = norm
                    values.weight_norms[name] = norm
                elif kind == "gradients":
                    values.grad_norms[name] = norm
                if not math.isfinite(norm):
                    # Rare: NaN/Inf present (or a float32 overflow). Count them on the device.
                    # With an optimizer this runs after its update: a weight's count includes
                    # what a NaN gradient spread in that update (its norm is from before).
                    if counted is not None:  # the rows counted them, and are already masked
                        nonfinite, row = int(counted[index]), None
                    else:
                        shard = [pending.tensors[index]], [pending.shards[index]]
                        row = _full_rows(*shard, self._bins, mask_nonfinite=True)[0].cpu().numpy()
                        nonfinite = int(row[5:8].sum())
                    if nonfinite:
                        scalars.append((f"{kind}/{name}/nonfinite", nonfinite))
                        counts = values.grad_nonfinite if kind == "gradients" else values.weight_nonfinite
                        counts[name] = nonfinite
                        if self.writer is not None:  # one warning, from the rank that writes
                            self._guard.warn_once(
                                f"nonfinite:{kind}/{name}",
                                f"normlog: {nonfinite} NaN/Inf values in the {kind} of {name!r} at step {step}",
                            )
                    if rows is not None and row is not None:
                        rows[index] = row
                index += 1
            if kind == "gradients":
                scalars.append(("gradients/global_norm", math.sqrt(squares)))
                values.global_norm = math.sqrt(squares)
        histogram_rows = None
        if rows is not None:  # in the tensors' order, as the loop above went
            tags = [f"{kind}/{name}" for kind, names, _ in pending.groups for name in names]
            histogram_rows = (tags, rows, self._bins)
        if update_norms.size:
            for (name, _), update in zip(pending.updated, update_norms):
                weight = parameter_norms.get(name, math.nan)
                ratio = float(update) / weight if weight else math.inf
                scalars.append((f"updates/{name}/ratio", ratio))
                values.update_ratios[name] = ratio
        if self.writer is None:
            return
        self.writer._summary(scalars, step, None, rows=histogram_rows)
        if self._monitor is not None:
            announce(self._monitor.observe(values), self.writer, self._health_via)

    @property
    def findings(self) -> list[Finding]:
        """Every training-health finding so far (see `normlog.health`)."""
        self._guard.safely(self._wait_for_writing)
        return [] if self._monitor is None else list(self._monitor.findings)

    # -- errors and life cycle -----------------------------------------------------------

    def unwatch(self) -> None:
        """Write the step still in flight, remove every hook; close the writer if `watch` made it."""
        atexit.unregister(self._at_exit)
        try:
            self._guard.safely(self._wait_for_writing)  # with strict, raises after the clean-up below
        finally:
            self._background.stop()
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
    rank, world = _distributed()
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
