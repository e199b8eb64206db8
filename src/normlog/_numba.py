"""The histogram row of a CPU array in two passes over its memory: numpy's min and max,
then one compiled pass (numba) that counts and sums.

Rules: the row is `normlog.torch._histogram_row(..., mask_nonfinite=True)`'s: [min, max,
sum, sum_squares, finite, nan, posinf, neginf, counts...] in float64, with NaN and Inf
counted, never binned. The bucket of x is the core's floor((x * scale - min * scale) /
width) in float64, scale being the core's power of two for float64 ranges past the
doubles' limits (1 otherwise, which changes nothing). float32 and float64 arrays only;
each is compiled once and cached on disk. The compiled pass splits a large array among
numba's threads, each with its own counts and sums, added up in a fixed order.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from normlog._core import _range_scale

__all__ = ["row"]

_CHUNK = 2048  # values per block: the bucket buffer stays in the L1 cache
# Fewer values per thread are counted on the calling thread. Measured with bench_torch.py
# (2 cores), histograms every step: 262144 gave 1.27x-1.29x; 32768 gave 1.38x (each
# parallel region leaves numba's OpenMP threads spinning against torch's), and a thread
# pool of our own instead of parallel=True, 1.34x-1.40x.
_PER_THREAD = 262144


@numba.njit(cache=True, nogil=True)
def _bounds(values: np.ndarray) -> tuple[float, float, int, int, int]:
    """min and max of the finite values, and the NaN, +Inf and -Inf counts: the slow,
    branching pass, for the rare array that holds NaN or Inf."""
    lo, hi = np.inf, -np.inf
    nan = posinf = neginf = 0
    for x in values:
        if abs(x) < np.inf:  # false for NaN
            lo = min(lo, x)
            hi = max(hi, x)
        elif x != x:
            nan += 1
        elif x > 0:
            posinf += 1
        else:
            neginf += 1
    return float(lo), float(hi), nan, posinf, neginf


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "nsz", "contract"})
def _sums(values: np.ndarray, start: int, stop: int) -> tuple[float, float]:
    """Sum and sum of squares of the finite values in float64, in any order (so in SIMD
    lanes): sums, unlike buckets, are not bit-exact anywhere."""
    total = squares = 0.0
    for i in range(start, stop):
        x = np.float64(values[i])
        finite = x if abs(x) < np.inf else np.float64(0.0)  # a select, not a branch: the loop vectorizes
        total += finite
        squares += finite * finite
    return total, squares


@numba.njit(cache=True, nogil=True)
def _fill_part(
    values: np.ndarray, start: int, stop: int, low: float, width: float, scale: float, counts: np.ndarray
) -> tuple[float, float]:
    """Adds the bucket counts of values[start:stop] to `counts`; returns its sum and sum of
    squares.

    Blocks of _CHUNK values go in two loops: bucket numbers into a buffer, branch-free so
    that it vectorizes, then the counting. The bucket floor(offset / width) is found as
    floor(offset * (1 / width)), which can differ from it only within `near` of a whole
    number (|q - offset/width| <= 2.3e-16 q, and q <= bins); a block with such a value, or
    with NaN or Inf, is redone with the division, so every bucket is the core's. Four
    copies of the counts, taken in turn, let increments of one bucket overlap."""
    bins = counts.size
    inverse = 1.0 / width
    near = 1e-15 * (bins + 2)
    top = np.float64(bins)  # NaN and Inf give any int32 in the first loop; the redo drops them
    local = np.zeros(4 * bins, dtype=np.int64)
    buffer = np.empty(_CHUNK, dtype=np.int32)
    total = squares = 0.0
    for first in range(start, stop, _CHUNK):
        count = min(_CHUNK, stop - first)
        redo = False
        for j in range(count):
            x = np.float64(values[first + j])
            q = (x * scale - low) * inverse
            bucket = np.floor(q)  # a float (math.floor's int64 would not vectorize)
            redo |= (q - bucket < near) | (q - bucket > 1.0 - near) | (not abs(x) < np.inf)
            buffer[j] = min(max(np.int32(min(bucket, top)), 0), bins - 1)  # type: ignore[assignment]
        if redo:
            for j in range(count):
                x = np.float64(values[first + j])
                if abs(x) < np.inf:
                    bucket = np.floor((x * scale - low) / width)
                    buffer[j] = min(max(np.int32(min(bucket, top)), 0), bins - 1)  # type: ignore[assignment]
                else:
                    buffer[j] = -1
        for j in range(count):
            if buffer[j] >= 0:
                local[(j & 3) * bins + buffer[j]] += 1
        block_total, block_squares = _sums(values, first, first + count)
        total += block_total
        squares += block_squares
    for k in range(bins):
        counts[k] += local[k] + local[bins + k] + local[2 * bins + k] + local[3 * bins + k]
    return total, squares


@numba.njit(cache=True, nogil=True, parallel=True)
def _fill(values: np.ndarray, low: float, width: float, scale: float, counts: np.ndarray, sums: np.ndarray) -> None:
    """`_fill_part` of each of len(counts) parts of `values`, one per thread."""
    parts, size = counts.shape[0], values.size
    for part in numba.prange(parts):
        start, stop = part * size // parts, (part + 1) * size // parts
        sums[part, 0], sums[part, 1] = _fill_part(values, start, stop, low, width, scale, counts[part])


def row(values: np.ndarray, bins: int) -> np.ndarray:
    """The row of a 1-d float32 or float64 array (see the module's rules)."""
    out = np.zeros(8 + bins)
    if not values.size:
        return out
    lo, hi = float(values.min()), float(values.max())  # numpy's SIMD passes; NaN and Inf show here
    nan = posinf = neginf = 0
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi, nan, posinf, neginf = _bounds(values)
    finite = values.size - nan - posinf - neginf
    out[4:8] = finite, nan, posinf, neginf
    if not finite:
        return out
    scale = _range_scale(bins, lo, hi)
    low, high = lo * scale, hi * scale
    width = (high - low) / bins if high > low else 1.0
    parts = max(1, min(numba.get_num_threads(), values.size // _PER_THREAD))
    counts = np.zeros((parts, bins), dtype=np.int64)
    sums = np.zeros((parts, 2))
    if parts == 1:  # starting threads would cost more than it saves
        sums[0] = _fill_part(values, 0, values.size, low, width, scale, counts[0])
    else:
        _fill(values, low, width, scale, counts, sums)
    out[:4] = lo, hi, sums[:, 0].sum(), sums[:, 1].sum()
    out[8:] = counts.sum(axis=0)
    return out
