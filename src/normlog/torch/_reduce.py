"""One logged step's reductions: started on the device, read back in one transfer, decoded.

Rules: `Reduction.start` chooses the engine (Triton rows on CUDA, compiled rows on the CPU,
torch ops elsewhere and for shards) and starts every reduction without waiting for the
device. `joined` is the one tensor that crosses to the host; `decode` turns the host copy
into the framework-free `normlog._step.Group`s and `Updates`. A reduction is started when a
backward pass ends and may be read only at the optimizer's step, after clipping and
unscaling changed the gradients in place: nothing read late may depend on their values. Column numbers come from
`normlog._rows`; tags and everything written are `normlog._step`'s business. `KeptRows` is
the ring of `histograms_before_finding`: rows split off a step (`keep_rows`) stay on the
device until a finding has them written.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from normlog import _rows
from normlog._step import Group, Kind, Updates
from normlog.torch import _engines
from normlog.torch._distributed import full_norms, full_rows, local
from normlog.torch._engines import compiled_on_cpu, compiled_rows, multi_tensor_rows

__all__ = ["KeptRows", "Reduction"]


@dataclass
class Reduction:
    """A logged step's reductions, started on the device and not yet read."""

    step: int
    groups: list[tuple[Kind, list[str], list[torch.Tensor]]]
    tensors: list[torch.Tensor]  # this rank's part of each: shards of FSDP2 parameters
    shards: list[tuple[Any, ...]]  # the process groups each tensor is sharded over
    pieces: list[torch.Tensor]
    histograms: bool
    bins: int
    # the parameters that had a gradient: the before/after snapshots and the ratios follow this order
    updated: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    before: list[torch.Tensor] | None = None
    update_norms: torch.Tensor | None = None
    # rows: pieces hold one row per tensor (NaN/Inf already counted), in the tensors' order
    # after `order`. Norms come from the rows and nothing is recounted, so the device
    # tensors can go before the host reads them.
    rows: bool = False
    order: list[int] | None = None
    extra_sizes: tuple[int, int, int] = (0, 0, 0)  # what `joined` put after the pieces
    # the GradScaler scale the gradients were multiplied by (a 1-element device tensor), or None
    scale: torch.Tensor | None = None
    # norms of the gradients as optimizer.step() received them (after clipping), or None
    applied: torch.Tensor | None = None
    # (id, version) of each gradient when read: unchanged at the step, it was applied as read
    versions: list[tuple[int, int]] = field(default_factory=list)
    # rows of the tensors whose NaN/Inf the torch-ops path recounted when the step started,
    # by tensor index: on the CPU that costs nothing, and the gradients may change later
    recounted: dict[int, np.ndarray] = field(default_factory=dict)
    # the histogram rows were split off into the ring (`keep_rows`): `joined` has the norms only
    rows_kept: bool = False
    # each parameter's number of dimensions, by name, for the health rules (1-D gains and biases)
    ndims: dict[str, int] | None = None
    # False: a burst step no cadence made due (`Watcher._logged`). Its groups decode to
    # histogram rows alone (no norms, no NaN/Inf counts): the health rules do not judge it
    norms: bool = True

    @classmethod
    def start(
        cls,
        step: int,
        groups: list[tuple[Kind, list[str], list[torch.Tensor]]],
        updated: list[tuple[str, nn.Parameter]],
        bins: int,
        histograms: bool,
        sharded: bool,
    ) -> Reduction | None:
        tensors = [t for _, _, ts in groups for t in ts]
        if not tensors:
            return None
        shards: list[tuple[Any, ...]] = [()] * len(tensors)
        if sharded:
            tensors, shards = (list(column) for column in zip(*map(local, tensors)))
        common = dict(step=step, groups=groups, tensors=tensors, shards=shards, bins=bins, updated=updated)
        triton, numba = _engines.triton_kernel(), _engines.numba_kernel()
        if not any(shards) and triton is not None and all(triton.supports(t) for t in tensors):
            pieces, order = multi_tensor_rows(tensors, bins if histograms else 0)
            reduction = cls(**common, pieces=pieces, histograms=histograms, rows=True, order=order)  # type: ignore[arg-type]
            reduction.release_inputs()
            return reduction
        if histograms and not any(shards) and numba is not None and all(map(compiled_on_cpu, tensors)):
            # the compiled rows count NaN/Inf and hold each sum of squares in float64:
            # the norms come from them, without a pass of their own
            rows = compiled_rows(tensors, bins)
            order = list(range(len(tensors)))
            reduction = cls(**common, pieces=[rows], histograms=True, rows=True, order=order)  # type: ignore[arg-type]
            reduction.release_inputs()
            return reduction
        pieces = [full_norms(tensors, shards)]
        if histograms:
            pieces += full_rows(tensors, shards, bins, mask_nonfinite=False)
        reduction = cls(**common, pieces=pieces, histograms=histograms)  # type: ignore[arg-type]
        if pieces[0].device.type == "cpu" and not any(shards):
            reduction.recount_now()
        return reduction

    def keep_rows(self) -> Reduction:
        """Split the histogram rows off this step, for the ring: they stay on the device in
        the Reduction returned (no copy: the pieces are this step's own), and from now on
        `joined` takes only what the norms need. The ring's Reduction decodes as a
        histogram step of its own."""
        kept = Reduction(
            step=self.step,
            groups=[(kind, names, []) for kind, names, _ in self.groups],
            tensors=[],
            shards=self.shards,
            pieces=list(self.pieces),
            histograms=True,
            bins=self.bins,
            rows=self.rows,
            order=self.order,
            scale=self.scale,
            recounted=self.recounted,
        )
        if self.rows:  # rows hold the sums of squares and NaN/Inf counts the norms come from
            self.pieces = [piece[:, : _rows.HEAD] for piece in self.pieces]
        else:  # the torch-ops path: the norms are the first piece
            self.pieces = self.pieces[:1]
        self.histograms = False
        self.rows_kept = True
        return kept

    def recount_now(self) -> None:
        """Recount the NaN/Inf of every tensor whose norm is not finite, now, while the
        tensors hold the values the norms were taken from; then let the tensors go."""
        for i in np.flatnonzero(~np.isfinite(self.pieces[0].numpy())):
            row = full_rows([self.tensors[i]], [self.shards[i]], self.bins, mask_nonfinite=True)[0]
            self.recounted[int(i)] = row.cpu().numpy()
        self.release_inputs()

    def release_inputs(self) -> None:
        """The tensors measured are not read again (their reductions have started)."""
        self.groups = [(kind, names, []) for kind, names, _ in self.groups]
        self.tensors = []

    def measure_updates(self) -> None:
        """After the optimizer's step: ‖w_after - w_before‖ of every snapshotted weight. No
        weight snapshotted (no parameter had a gradient at the step): no update ratios."""
        if self.before:
            after = [local(p.detach()) for _, p in self.updated]
            differences = torch._foreach_sub([t for t, _ in after], self.before)
            self.update_norms = full_norms(list(differences), [g for _, g in after])

    def measure_applied(self, gradients: list[torch.Tensor]) -> None:
        """The norms of the gradients the optimizer applies: after clipping and unscaling.
        None left (zero_grad(set_to_none=True) before the step): it applied none, a global
        norm of 0, as clip_grad_norm_ returns for them, not the norm read at backward."""
        if not gradients:
            self.applied = torch.zeros(1, dtype=torch.float64, device=self.pieces[0].device)
            return
        parts = [local(g) for g in gradients]
        self.applied = full_norms([t for t, _ in parts], [g for _, g in parts])

    def joined(self) -> torch.Tensor:
        """Everything the host needs, as one flat float64 tensor on the first piece's device:
        the pieces, then the update norms, the applied norms and the scale where present."""
        extras = (self.update_norms, self.applied, self.scale)
        updated, measured, scaled = (0 if extra is None else extra.numel() for extra in extras)
        self.extra_sizes = (updated, measured, scaled)
        pieces = [*self.pieces, *(extra for extra in extras if extra is not None)]
        device = pieces[0].device
        return torch.cat([piece.reshape(-1).to(device, torch.float64) for piece in pieces])

    def release(self) -> None:
        """Let the device tensors go (the rows path needs nothing of them after `joined`)."""
        self.groups = [(kind, names, []) for kind, names, _ in self.groups]
        self.tensors, self.pieces, self.before, self.update_norms = [], [], None, None
        self.applied = self.scale = None

    def decode(self, host: np.ndarray) -> tuple[list[Group], Updates | None, float | None]:
        """The host copy of `joined()` as the step's groups, update norms and the global norm
        of the applied gradients (None where not measured). A tensor whose norm is not
        finite and whose NaN/Inf were not counted on the device is recounted (rare: NaN/Inf
        present, or a float32 overflow), its histogram row with it. Gradients scaled by a
        GradScaler are unscaled here: norms, bounds and sums divided by the scale, and the
        counts kept, which is exact for the power-of-two scales GradScaler uses."""
        updated, measured, scaled = self.extra_sizes
        cut = len(host) - updated - measured - scaled
        scale = float(host[-1]) if scaled else None
        update_norms, applied_norms = host[cut : cut + updated], host[cut + updated : cut + updated + measured]
        host = host[:cut]
        applied = float(np.sqrt(np.sum(np.square(applied_norms)))) if measured else None
        count = sum(len(names) for _, names, _ in self.groups)
        width = _rows.width(self.bins)
        counted: np.ndarray | None = None
        if self.rows:
            width = _rows.width(self.bins if self.histograms else 0)
            table = np.empty((count, width))
            table[self.order] = host[: count * width].reshape(count, width)
            norms, counted = _rows.norms(table), _rows.nonfinite(table)
            rows = table if self.histograms else None
        else:
            norms = host[:count]
            end = count + (count * width if self.histograms else 0)
            rows = host[count:end].reshape(count, width) if self.histograms else None
        if counted is None:
            counted = np.zeros(count)
            for i in np.flatnonzero(~np.isfinite(norms)):
                row = self.recounted.get(int(i))
                if row is None and i >= len(self.tensors):
                    # rows kept in the ring, read after the tensor changed: its NaN/Inf
                    # spoiled the row and cannot be recounted now, so it has no histogram
                    if rows is not None:
                        rows[i, _rows.FINITE] = 0
                    continue
                if row is None:
                    tensor, shards = self.tensors[i], self.shards[i]
                    row = full_rows([tensor], [shards], self.bins, mask_nonfinite=True)[0].cpu().numpy()
                counted[i] = _rows.nonfinite(row[None])[0]
                if rows is not None:
                    rows[i] = row
        groups, start = [], 0
        weights: dict[str, float] = {}  # the weight norms update ratios divide by, due or not
        for kind, names, _ in self.groups:
            stop = start + len(names)
            group_norms, group_rows = norms[start:stop], None if rows is None else rows[start:stop]
            if kind == "gradients" and scale is not None:
                group_norms = group_norms / scale
                if group_rows is not None:
                    group_rows = group_rows.copy()
                    group_rows[:, [_rows.MIN, _rows.MAX, _rows.SUM]] /= scale
                    group_rows[:, _rows.SUM_SQUARES] /= scale * scale
            ndims = None if kind == "activations" else self.ndims
            if kind == "parameters":
                weights.update(zip(names, group_norms))
            if self.norms:
                groups.append(Group(kind, names, group_norms, counted[start:stop], group_rows, ndims))
            else:
                groups.append(Group(kind, names, rows=group_rows, ndims=ndims))
            start = stop
        updates = None
        if update_norms.size:
            names = [name for name, _ in self.updated]
            updates = Updates(names, update_norms, np.array([weights.get(n, np.nan) for n in names]))
        return groups, updates, applied


class KeptRows:
    """The ring of `watch(histograms_before_finding=K)`: the histogram rows of the latest
    logged steps that wrote none, kept as their Reductions on the device where they were
    computed (no host copy until they are written), at most `size + slack` of them, and
    only of steps after the last one whose histograms were written, so that written at
    their own steps they never arrive after a later step of the same tag. `slack` covers
    the steps the training thread runs ahead of the writing thread (on a GPU). The writing
    thread takes from it while the training thread adds to it: a lock guards it."""

    def __init__(self, size: int, slack: int) -> None:
        self.size = size
        self._entries: deque[Reduction] = deque(maxlen=size + slack)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def keep(self, kept: Reduction) -> None:
        with self._lock:
            self._entries.append(kept)

    def take(self, step: int) -> list[Group] | None:
        """The histograms kept of `step` (now to be written with it), or None."""
        with self._lock:
            found = next((kept for kept in self._entries if kept.step == step), None)
            if found is not None:
                self._entries.remove(found)
        return None if found is None else _decoded(found)

    def through(self, step: int) -> list[tuple[int, list[Group]]]:
        """The histograms of the last `size` steps kept up to `step`, in step order, each as
        (step, groups); every entry up to `step` leaves the ring."""
        with self._lock:
            chosen = [kept for kept in self._entries if kept.step <= step]
            self._drop_through(step)
        return [(kept.step, _decoded(kept)) for kept in chosen[-self.size :]]

    def forget_through(self, step: int) -> None:
        """Histograms were written at `step`: what was kept up to it can no longer be."""
        with self._lock:
            self._drop_through(step)

    def _drop_through(self, step: int) -> None:
        while self._entries and self._entries[0].step <= step:
            self._entries.popleft()
        for kept in [kept for kept in self._entries if kept.step <= step]:  # a step axis moved back
            self._entries.remove(kept)


def _decoded(kept: Reduction) -> list[Group]:
    """A kept step's histogram rows, read to the host (the one copy), as histogram-only groups."""
    groups, _, _ = kept.decode(kept.joined().cpu().numpy())
    return [Group(group.kind, group.names, rows=group.rows) for group in groups]
