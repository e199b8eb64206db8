"""torch.distributed: which rank writes, and whole-tensor statistics from FSDP2's shards.

Rules: outside torch.distributed everything here is a no-op. Sharded (DTensor) tensors are
reduced on each rank and merged with the column rules of `normlog._rows` (`MERGE_MAX`,
`MERGE_SUM`) in a few all-reduces per logged step, never one per tensor.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from normlog import _rows
from normlog.torch import _engines
from normlog.torch._engines import compiled_on_cpu, compiled_rows, histogram_row, norms

__all__ = ["dtensor_type", "full_norms", "full_rows", "local", "rank_and_world", "unwrapped"]


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) if isinstance(model, nn.parallel.DistributedDataParallel) else None
        inner = inner if inner is not None else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside torch.distributed."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[Any, ...]]:
    """The part of `tensor` on this rank, and the process groups its shards are spread over
    (none for an ordinary tensor or a replicated DTensor, as FSDP2's `fully_shard` makes)."""
    dtensor = dtensor_type()
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
def dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _all_reduce(values: torch.Tensor, groups: tuple[Any, ...], op: Any) -> None:
    for group in groups:
        torch.distributed.all_reduce(values, op=op, group=group)


def full_norms(locals_: list[torch.Tensor], groups: list[tuple[Any, ...]]) -> torch.Tensor:
    """Norms of whole tensors from their local shards: one all-reduce of the squares per
    set of groups (in practice one per logged step), none without shards."""
    result = norms(locals_)
    for key in dict.fromkeys(g for g in groups if g):
        index = torch.tensor([i for i, g in enumerate(groups) if g == key], device=result.device)
        squares = result[index].square()
        _all_reduce(squares, key, torch.distributed.ReduceOp.SUM)
        result[index] = squares.sqrt()
    return result


def full_rows(
    locals_: list[torch.Tensor], groups: list[tuple[Any, ...]], bins: int, mask_nonfinite: bool
) -> list[torch.Tensor]:
    """Histogram rows of whole tensors from their shards: the global min and max in one
    all-reduce, then each shard binned with them and the other columns added in another,
    which is `_rows.merge` done on the device."""
    rows: list[torch.Tensor | None] = [None] * len(locals_)
    whole = [i for i, g in enumerate(groups) if not g]
    compiled = [i for i in whole if compiled_on_cpu(locals_[i])] if _engines.numba_kernel() is not None else []
    if compiled:  # in one call, as its threads share blocks of every tensor
        for i, row in zip(compiled, compiled_rows([locals_[i] for i in compiled], bins), strict=True):
            rows[i] = row
    for i in whole:
        if rows[i] is None:
            rows[i] = histogram_row(locals_[i], bins, mask_nonfinite)
    for key in dict.fromkeys(g for g in groups if g):
        members = [i for i, g in enumerate(groups) if g == key]
        bounds = torch.stack([_negated_bounds(locals_[i], mask_nonfinite) for i in members])
        _all_reduce(bounds, key, torch.distributed.ReduceOp.MAX)  # [-min, max] per tensor
        spans = torch.stack([-bounds[:, 0], bounds[:, 1]], dim=1)
        shard_rows = torch.stack(
            [histogram_row(locals_[i], bins, mask_nonfinite, span) for i, span in zip(members, spans)]
        )
        sums = shard_rows[:, _rows.MERGE_SUM].contiguous()
        _all_reduce(sums, key, torch.distributed.ReduceOp.SUM)
        for i, span, tail in zip(members, spans, sums):
            empty = tail[_rows.FINITE - _rows.SUM] == 0  # no finite value on any rank: the core's empty histogram
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
