"""The reductions of many tensors, where they live: norms, and histogram rows by engine.

Rules: every function here gives the core's numbers (`normlog.histogram`, `l2_norm`) in
the row layout of `normlog._rows`, and makes no tensor from host numbers (on an
accelerator that copy would make the host wait). The engines: Triton on CUDA
(`_triton`), the compiled CPU kernel (`normlog._numba`) where numba is installed, and torch
ops everywhere else. Tests compare each with the core, bucket for bucket.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "by_device_and_dtype",
    "compiled_on_cpu",
    "compiled_rows",
    "dense",
    "histogram_row",
    "multi_tensor_rows",
    "norms",
    "numba_kernel",
    "triton_kernel",
]

_TINY = float(torch.finfo(torch.float64).tiny)


def by_device_and_dtype(tensors: Sequence[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """The positions of the tensors on each device with each dtype: one launch's worth."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, tensor in enumerate(tensors):
        groups.setdefault((tensor.device, tensor.dtype), []).append(i)
    return groups


def norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each tensor as one float64 vector on the first tensor's device, reduced per
    (device, dtype) group and accumulated in float32 (float64 for float64)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    parts, order = [], []
    for (device, dtype), indices in by_device_and_dtype(tensors).items():
        group = [tensors[i] for i in indices]
        if device.type == "cpu" and dtype in (torch.float32, torch.float64):
            # BLAS dot on the CPU: ~4x faster than _foreach_norm there, and more accurate
            # (torch's float32 CPU norm drifts ~1e-4 from float64 on multi-million-element
            # tensors; dot stays within ~1e-5). On accelerators, one foreach launch wins.
            result = torch.stack([torch.dot(flat, flat) for flat in (t.reshape(-1) for t in group)]).sqrt_()
        elif dtype in (torch.float32, torch.float64):
            result = torch.stack(torch._foreach_norm(group, 2))  # the dtype= path is slower for these
        else:  # accumulate float16 and bfloat16 in float32, as p.grad.float().norm() does
            result = torch.stack(torch._foreach_norm(group, 2, dtype=torch.float32))
        parts.append(result.to(tensors[0].device, torch.float64))
        order += indices
    joined = torch.cat(parts) if len(parts) > 1 else parts[0]
    if order == sorted(order):  # one group, or groups in the tensors' order: no per-tensor work
        return joined
    # Put in the tensors' order without an index tensor, whose copy to an accelerator would
    # make the host wait for it.
    position = {index: k for k, index in enumerate(order)}
    by_tensor = joined.unbind()
    return torch.stack([by_tensor[position[i]] for i in range(len(tensors))])


def histogram_row(
    tensor: torch.Tensor, bins: int, mask_nonfinite: bool, span: torch.Tensor | None = None
) -> torch.Tensor:
    """The row (`normlog._rows`) of one tensor, in float64 on its device, bucketed as
    `normlog.histogram(values, bins)` does: floor((x - min) / width) in float64, clamped to
    the last bucket, worked in place on one float64 copy. Without `mask_nonfinite`, NaN and
    Inf are not counted and spoil the row (callers recount such a tensor with it).
    `span` ([min, max] in float64) bins a shard with the whole tensor's rule; every column
    in `_rows.MERGE_SUM` is then a sum over the shards. On the CPU, with numba, the row
    comes from `normlog._numba` instead: the same numbers, NaN and Inf always counted."""
    if span is None and compiled_on_cpu(tensor) and numba_kernel() is not None:
        return compiled_rows([tensor], bins)[0]
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
    nonfinite = torch.stack(counts_nonfinite).to(values)
    if size == 0:  # min, max, sum, sum_squares, finite: zeros (or the whole's span)
        bounds = values.new_zeros(2) if span is None else span.to(values)
        return torch.cat([bounds, values.new_zeros(3), nonfinite, values.new_zeros(bins)])
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
    return torch.cat([stats, nonfinite, counts])


def compiled_rows(tensors: Sequence[torch.Tensor], bins: int) -> torch.Tensor:
    """The rows of CPU tensors from `normlog._numba`, all in one call: its threads share
    the blocks of every tensor, however small each is."""
    exact = (t.detach() if t.dtype in (torch.float32, torch.float64) else t.detach().float() for t in tensors)
    return torch.from_numpy(numba_kernel().rows([t.reshape(-1).numpy() for t in exact], bins))


def multi_tensor_rows(tensors: list[torch.Tensor], bins: int) -> tuple[list[torch.Tensor], list[int]]:
    """Rows of every tensor, one pair of Triton launches per (device, dtype); the rows come
    grouped, and `order` lists the tensor each row belongs to."""
    groups = by_device_and_dtype(tensors)
    pieces = [triton_kernel().stats_rows([tensors[i] for i in members], bins) for members in groups.values()]
    return pieces, [i for members in groups.values() for i in members]


def dense(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.layout == torch.strided:
        return tensor
    return tensor.detach().coalesce().to_dense()  # sparse gradients of nn.Embedding(sparse=True)


def compiled_on_cpu(tensor: torch.Tensor) -> bool:
    """Whether `histogram_row` takes the compiled CPU path for this tensor."""
    return tensor.device.type == "cpu" and tensor.layout == torch.strided


@functools.cache
def numba_kernel() -> Any:
    """normlog._numba where numba is installed (normlog[torch] brings it), else None."""
    try:
        from normlog import _numba as module
    except ImportError:
        return None
    return module


@functools.cache
def triton_kernel() -> Any:
    """normlog.torch._triton where Triton and a CUDA device are there, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        from normlog.torch import _triton as module
    except ImportError:
        return None
    return module
