"""Statistics of many CUDA tensors in two Triton launches, the way torch's foreach kernels work.

Rules: tensors of one dtype (float32, float16 or bfloat16) on one CUDA device are read
through a table of their addresses, in blocks of BLOCK elements, one program per block,
which adds its sums and counts to the tensor's row atomically.
Each tensor gets its row (`normlog._rows`: [min, max, sum, sum_squares, finite, nan,
posinf, neginf, counts...] in float64), with NaN and Inf counted, never binned, and the
bucket of x = floor((x - min) / width) computed in float64 with correctly rounded division:
the core's rule (`normlog.histogram`), which a test holds it to. The host never waits: tables of
addresses and blocks cross to the device without a sync, and results stay there.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from normlog import _rows

__all__ = ["stats_rows"]

# Tried on an H100 with the 298 tensors of bench_torch.py --gpu (rows, norms alone):
# 16384/1024/4 warps 3.85/1.99 ms, 32768/1024/4 3.23/1.53, 65536/4096/8 7.16/1.77.
BLOCK = 32768  # elements per program
CHUNK = 1024  # elements per program per loop step: 8 per thread of 4 warps, no register spills
WARPS = 4
# The row's columns (normlog._rows), mirrored as constexprs for the kernels; a test holds them equal.
MIN, MAX, SUM, SUM_SQUARES = (tl.constexpr(c) for c in (_rows.MIN, _rows.MAX, _rows.SUM, _rows.SUM_SQUARES))
FINITE, NAN, POSINF, NEGINF = (tl.constexpr(c) for c in (_rows.FINITE, _rows.NAN, _rows.POSINF, _rows.NEGINF))
HEAD = tl.constexpr(_rows.HEAD)

_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def supports(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and tensor.dtype in _DTYPES and tensor.layout == torch.strided


@triton.jit
def _block(addresses, block_tensor, block_start, sizes, DTYPE: tl.constexpr):
    """The tensor this program reads, its first element, its size and its typed address."""
    tensor = tl.load(block_tensor + tl.program_id(0))
    base = tl.load(addresses + tensor).to(tl.pointer_type(DTYPE))
    return tensor, tl.load(block_start + tl.program_id(0)), tl.load(sizes + tensor), base


@triton.jit
def _chunk(base, offsets, size):
    inside = offsets < size
    x = tl.load(base + offsets, mask=inside, other=0.0).to(tl.float32)  # exact for all three
    finite = inside & (tl.abs(x) < float("inf"))  # NaN compares false
    return x, inside, finite


@triton.jit
def _bounds_kernel(
    addresses,
    block_tensor,
    block_start,
    sizes,
    lows,
    highs,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    _tensor, start, size, base = _block(addresses, block_tensor, block_start, sizes, DTYPE)
    low = tl.full([CHUNK], float("inf"), tl.float32)
    high = tl.full([CHUNK], -float("inf"), tl.float32)
    for step in range(0, BLOCK, CHUNK):
        x, _inside, finite = _chunk(base, start + step + tl.arange(0, CHUNK), size)
        low = tl.minimum(low, tl.where(finite, x, float("inf")))
        high = tl.maximum(high, tl.where(finite, x, -float("inf")))
    tl.store(lows + tl.program_id(0), tl.min(low, axis=0))
    tl.store(highs + tl.program_id(0), tl.max(high, axis=0))


@triton.jit
def _stats_kernel(
    addresses,
    block_tensor,
    block_start,
    sizes,
    rows,
    widths,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
    WIDTH: tl.constexpr,
    BINS: tl.constexpr,
    PADDED: tl.constexpr,
):
    # Sums and counts stay in registers over the program's BLOCK elements, read CHUNK at a
    # time, and reach the tensor's row in one atomic add each.
    tensor, start, size, base = _block(addresses, block_tensor, block_start, sizes, DTYPE)
    row = rows + tensor * WIDTH
    total = tl.zeros([CHUNK], tl.float64)
    squares = tl.zeros([CHUNK], tl.float64)
    finites = tl.zeros([CHUNK], tl.int32)
    nans = tl.zeros([CHUNK], tl.int32)
    posinfs = tl.zeros([CHUNK], tl.int32)
    neginfs = tl.zeros([CHUNK], tl.int32)
    counts = tl.zeros([PADDED], tl.int32)
    if BINS > 0:
        low = tl.load(row + MIN)
        width = tl.load(widths + tensor)
    for step in range(0, BLOCK, CHUNK):
        x, inside, finite = _chunk(base, start + step + tl.arange(0, CHUNK), size)
        wide = tl.where(finite, x, 0.0).to(tl.float64)
        total += wide
        squares += wide * wide  # exact products
        finites += finite.to(tl.int32)
        nans += (inside & (x != x)).to(tl.int32)
        posinfs += (x == float("inf")).to(tl.int32)
        neginfs += (x == -float("inf")).to(tl.int32)
        if BINS > 0:
            # float64 division is correctly rounded in PTX (div.rn.f64), as in torch and numpy
            bucket = tl.minimum(tl.maximum(tl.math.floor((wide - low) / width), 0.0), BINS - 1.0)
            counts += tl.histogram(tl.where(finite, bucket.to(tl.int32), PADDED - 1), PADDED)  # padding dropped
    tl.atomic_add(row + SUM, tl.sum(total, axis=0), sem="relaxed")
    tl.atomic_add(row + SUM_SQUARES, tl.sum(squares, axis=0), sem="relaxed")
    tl.atomic_add(row + FINITE, tl.sum(finites, axis=0).to(tl.float64), sem="relaxed")
    tl.atomic_add(row + NAN, tl.sum(nans, axis=0).to(tl.float64), sem="relaxed")
    tl.atomic_add(row + POSINF, tl.sum(posinfs, axis=0).to(tl.float64), sem="relaxed")
    tl.atomic_add(row + NEGINF, tl.sum(neginfs, axis=0).to(tl.float64), sem="relaxed")
    if BINS > 0:
        bins = tl.arange(0, PADDED)
        tl.atomic_add(row + HEAD + bins, counts.to(tl.float64), mask=bins < BINS, sem="relaxed")


@functools.lru_cache(maxsize=8)
def _blocks(sizes: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Which tensor each block reads and where it starts; depends on the sizes alone."""
    tensor_of: list[int] = []
    start_of: list[int] = []
    for index, size in enumerate(sizes):
        starts = range(0, size, BLOCK)
        tensor_of += [index] * len(starts)
        start_of += starts
    tensor_table, start_table, size_table = (
        _to_device(torch.tensor(values, dtype=torch.int64), device) for values in (tensor_of, start_of, list(sizes))
    )
    return tensor_table, start_table, size_table, len(tensor_of)


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    # From pinned memory, non_blocking: the copy is queued, and the host does not wait.
    return table.pin_memory().to(device, non_blocking=True)


def stats_rows(tensors: Sequence[torch.Tensor], bins: int) -> torch.Tensor:
    """[len(tensors), _rows.width(bins)] rows on the tensors' device (bins=0: the head alone,
    no min and max), for tensors of one dtype on one CUDA device that `supports`."""
    # contiguous tensors are read where they are; the others are copied, and kept alive below
    flat = [t if t.is_contiguous() else t.reshape(-1) for t in tensors]
    device, dtype = flat[0].device, _DTYPES[flat[0].dtype]
    width = _rows.width(bins)
    rows = torch.zeros(len(flat), width, dtype=torch.float64, device=device)
    # an empty tensor has no blocks: its row stays zeros, the core's empty histogram
    block_tensor, block_start, sizes, count = _blocks(tuple(t.numel() for t in flat), device)
    if not count:
        return rows
    addresses = _to_device(torch.tensor([t.data_ptr() for t in flat], dtype=torch.int64), device)
    tables = (addresses, block_tensor, block_start, sizes)
    widths = rows[:, _rows.MIN]  # unused without bins
    with torch.cuda.device(device):
        if bins:
            lows = torch.empty(count, dtype=torch.float32, device=device)
            highs = torch.empty_like(lows)
            _bounds_kernel[(count,)](*tables, lows, highs, DTYPE=dtype, BLOCK=BLOCK, CHUNK=CHUNK, num_warps=WARPS)
            low = torch.full((len(flat),), float("inf"), device=device).scatter_reduce_(0, block_tensor, lows, "amin")
            high = torch.full_like(low, -float("inf")).scatter_reduce_(0, block_tensor, highs, "amax")
            none = low > high  # no finite value: the core's empty histogram, min = max = 0
            low, high = torch.where(none, 0.0, low).double(), torch.where(none, 0.0, high).double()
            rows[:, _rows.MIN], rows[:, _rows.MAX] = low, high
            widths = torch.where(high > low, (high - low) / bins, 1.0)
        padded = triton.next_power_of_2(bins + 1) if bins else 1
        _stats_kernel[(count,)](
            *tables,
            rows,
            widths,
            DTYPE=dtype,
            BLOCK=BLOCK,
            CHUNK=CHUNK,
            WIDTH=width,
            BINS=bins,
            PADDED=padded,
            num_warps=WARPS,
        )
    return rows
