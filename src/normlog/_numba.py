"""Histogram rows of many CPU arrays at once, in two compiled passes (numba) over their
memory, each split among numba's threads.

Rules: numpy and numba only, no framework. A row is `normlog._rows`' layout, [min, max,
sum, sum_squares, finite, nan, posinf, neginf, counts...] in float64, with NaN and Inf
counted, never binned; its spec is the core (`normlog.histogram`). The bucket of x is the
core's floor((x * scale - min * scale) / width) in float64, scale being the core's power
of two (`_rows.range_scale`). float32 and
float64 arrays only; each kernel is compiled once per dtype and cached on disk. All the
arrays of a call are cut into blocks of `_BLOCK` values; the threads take whole blocks, and
each block's counts and sums are added up in block order, so a row does not depend on how
many threads there are. That lets `Threads` pick each call's thread count from what it
measures: on a machine whose cores are busy with other work, a fork-join over numba's
threads waits for the one the scheduler left out, so such calls run serial.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic
from numba.np.numpy_support import carray

from normlog import _rows

__all__ = ["Threads", "rows", "usable_cores"]

_BLOCK = 65536  # values per unit of work for a thread: ~230 of them in a 15M-value step
_CHUNK = 2048  # values per inner loop: the bucket buffer stays in the L1 cache
_KEYS: dict[np.dtype, np.dtype] = {np.dtype(np.float32): np.dtype(np.int32), np.dtype(np.float64): np.dtype(np.int64)}


@intrinsic
def _pointer(typingctx: Any, address: Any, like: Any) -> Any:
    """The integer `address` as a pointer to `like`'s dtype: how a compiled loop reaches
    arrays of different sizes without copying them into one."""
    signature = types.CPointer(like.dtype)(types.int64, like)  # type: ignore[no-untyped-call]

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


@numba.njit(cache=True, nogil=True)
def _block(address: int, start: int, stop: int, like: np.ndarray) -> np.ndarray:
    """values[start:stop] of the array at `address`, with `like`'s dtype."""
    return carray(_pointer(address + start * like.itemsize, like), stop - start)  # type: ignore[call-arg]


@numba.njit(cache=True, nogil=True)
def _key_bounds(bits: np.ndarray, shift: Any, magnitude: Any) -> tuple[Any, Any]:
    """The least and greatest sort key of a block of floats, read as integers of their
    width. The key (flip a negative float's magnitude bits) orders floats as numbers, with
    NaN beyond ±Inf, and its integer min and max vectorize without a branch."""
    lo, hi = magnitude, ~magnitude  # the largest and the smallest integer
    for i in range(bits.size):
        key = bits[i] ^ ((bits[i] >> shift) & magnitude)
        lo = key if key < lo else lo
        hi = key if key > hi else hi
    return lo, hi


@numba.njit(cache=True, nogil=True, parallel=True)
def _bounds_of_blocks(
    addresses: np.ndarray,
    block: np.ndarray,
    start: np.ndarray,
    stop: np.ndarray,
    shift: Any,
    magnitude: Any,
    keys: np.ndarray,
) -> None:
    """keys[i] = the least and greatest key of block i (see `_key_bounds`); `shift` and
    `magnitude` are the width less one and the largest integer, in the keys' dtype."""
    for i in numba.prange(block.size):
        bits = _block(addresses[block[i]], start[i], stop[i], keys)
        keys[i, 0], keys[i, 1] = _key_bounds(bits, shift, magnitude)


@numba.njit(cache=True, nogil=True)
def _nonfinite(values: np.ndarray) -> tuple[float, float, int, int, int]:
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
def _sums(values: np.ndarray, finite: bool) -> tuple[float, float]:
    """Sum and sum of squares of the finite values in float64, in any order (so in SIMD
    lanes): sums, unlike buckets, are not bit-exact anywhere."""
    total = squares = 0.0
    if finite:
        for i in range(values.size):
            x = np.float64(values[i])
            total += x
            squares += x * x
    else:
        for i in range(values.size):
            x = np.float64(values[i])
            kept = x if abs(x) < np.inf else np.float64(0.0)  # a select, not a branch: it vectorizes
            total += kept
            squares += kept * kept
    return total, squares


@numba.njit(cache=True, nogil=True)
def _fill(
    values: np.ndarray, low: float, width: float, scale: float, finite: bool, counts: np.ndarray
) -> tuple[float, float]:
    """Adds the bucket counts of `values` to `counts`; returns their sum and sum of squares.

    Chunks of _CHUNK values go in two loops: bucket numbers into a buffer, branch-free so
    that it vectorizes, then the counting. The bucket floor(offset / width) is found as
    floor(offset * (1 / width)), which can differ from it only within `near` of a whole
    number (|q - offset/width| <= 2.3e-16 q, and q <= bins); a chunk with such a value, or
    with NaN or Inf, is redone with the division, so every bucket is the core's. NaN and
    Inf go to a spare bucket past the last, which is not counted. Four copies of the
    counts, taken in turn, let increments of one bucket overlap."""
    bins = counts.size
    stride = bins + 1  # the spare bucket
    inverse = 1.0 / width
    near = 1e-15 * (bins + 2)
    top = np.float64(bins)  # NaN and Inf give any int32 in the first loop; the redo drops them
    local = np.zeros(4 * stride, dtype=np.int64)
    buffer = np.empty(_CHUNK, dtype=np.int32)
    total = squares = 0.0
    for first in range(0, values.size, _CHUNK):
        chunk = values[first : first + _CHUNK]
        where = buffer[: chunk.size]
        redo = False
        for j in range(chunk.size):
            x = np.float64(chunk[j])
            q = (x * scale - low) * inverse
            bucket = np.floor(q)  # a float (math.floor's int64 would not vectorize)
            redo |= (q - bucket < near) | (q - bucket > 1.0 - near) | (not abs(x) < np.inf)
            where[j] = min(max(np.int32(min(bucket, top)), 0), bins - 1)
        if redo:
            for j in range(chunk.size):
                x = np.float64(chunk[j])
                if abs(x) < np.inf:
                    bucket = np.floor((x * scale - low) / width)
                    where[j] = min(max(np.int32(min(bucket, top)), 0), bins - 1)
                else:
                    where[j] = bins
        whole = chunk.size // 4 * 4
        for j in range(0, whole, 4):
            local[where[j]] += 1
            local[stride + where[j + 1]] += 1
            local[2 * stride + where[j + 2]] += 1
            local[3 * stride + where[j + 3]] += 1
        for j in range(whole, chunk.size):
            local[where[j]] += 1
        chunk_total, chunk_squares = _sums(chunk, finite)
        total += chunk_total
        squares += chunk_squares
    for k in range(bins):
        counts[k] += local[k] + local[stride + k] + local[2 * stride + k] + local[3 * stride + k]
    return total, squares


@numba.njit(cache=True, nogil=True, parallel=True)
def _fill_blocks(
    addresses: np.ndarray,
    block: np.ndarray,
    start: np.ndarray,
    stop: np.ndarray,
    like: np.ndarray,
    low: np.ndarray,
    width: np.ndarray,
    scale: np.ndarray,
    finite: np.ndarray,
    counts: np.ndarray,
    sums: np.ndarray,
) -> None:
    """`_fill` of each block, into counts[i] and sums[i]; a width of 0 marks an array with
    no finite value, whose blocks are skipped."""
    for i in numba.prange(block.size):
        a = block[i]
        if width[a] > 0:
            values = _block(addresses[a], start[i], stop[i], like)
            sums[i, 0], sums[i, 1] = _fill(values, low[a], width[a], scale[a], finite[a], counts[i])


def rows(arrays: Sequence[np.ndarray], bins: int, threads: int | None = None) -> np.ndarray:
    """The rows of float32 and float64 arrays, one per array (see the module's rules), on
    `threads` of numba's threads, or on as many as `Threads.shared()` picks for the call."""
    out = np.zeros((len(arrays), _rows.width(bins)))
    flat = [np.ascontiguousarray(a).reshape(-1) for a in arrays]  # held until the kernels are done
    if any(a.dtype not in _KEYS for a in flat):
        raise TypeError(f"rows of float32 and float64 arrays only; got {sorted({str(a.dtype) for a in flat})}")
    chooser = Threads.shared()
    for dtype in _KEYS:
        group = [i for i, a in enumerate(flat) if a.dtype == dtype]
        if group:
            blocks = _Blocks.of([flat[i] for i in group])
            count = chooser.choose(blocks.array.size) if threads is None else threads
            start = time.perf_counter()
            out[group] = _rows_of_one_dtype(blocks, bins, count)
            if threads is None:
                seconds = time.perf_counter() - start
                chooser.record(dtype, count, blocks.array.size, sum(flat[i].size for i in group), seconds)
    return out


# Probing the thread count not in use: after _PROBE_FIRST calls, then after twice as many
# each time the probe confirms the choice, up to _PROBE_MOST. A probe that loses costs one
# call's kernel time (3x the serial time, measured under contention on 2 cores), so at the
# longest interval it adds a few percent to the kernel, which is itself a small part of a step.
_PROBE_FIRST, _PROBE_MOST = 4, 64
_MARGIN = 0.9  # the other choice must be 10% cheaper per value to win: noise does not flip it


class Threads:
    """How many of numba's threads each call gets: serial or parallel, whichever costs less
    per value as measured on the calls themselves, trying the other now and then.

    Parallel means min(`most`, blocks) threads, `most` being numba's thread count capped at
    the cores this process may use (`usable_cores`). An idle machine favours parallel; a
    busy one (DataLoader workers, a second job) makes each fork-join wait for a thread the
    scheduler left out, and serial wins. The count never changes a row (see the module).
    Calls from several threads share one `Threads`; numba's own count is per thread, and is
    set and restored around each kernel call. `fixed`, when set, is every call's count.
    """

    _shared: Threads | None = None
    _shared_lock = threading.Lock()

    def __init__(self, most: int) -> None:
        self.most = max(1, most)
        self.cost: dict[bool, float] = {}  # parallel or not -> seconds per value, smoothed
        self.parallel = True
        self.interval = self.countdown = _PROBE_FIRST
        self.fixed: int | None = None
        self._warm: set[np.dtype] = set()
        self._lock = threading.Lock()

    @classmethod
    def shared(cls) -> Threads:
        """The process's `Threads`, made on first use, once numba's threads are launched."""
        with cls._shared_lock:
            if cls._shared is None:
                _launch_numba_threads()
                cls._shared = cls(min(numba.config.NUMBA_NUM_THREADS, usable_cores()))  # type: ignore[attr-defined]
            return cls._shared

    def choose(self, blocks: int) -> int:
        """The thread count for a call over `blocks` blocks."""
        if self.fixed is not None:
            return self.fixed
        most = min(self.most, blocks)
        if most < 2:
            return 1
        with self._lock:
            if len(self.cost) < 2:  # measure both, parallel first
                parallel = True not in self.cost
            else:
                parallel = self.parallel if self.countdown > 0 else not self.parallel
        return most if parallel else 1

    def record(self, dtype: np.dtype, threads: int, blocks: int, values: int, seconds: float) -> None:
        """What a call with `threads` threads over `blocks` blocks of `values` values took.
        The first call of a dtype loads its kernels and is not counted; nor is a call that
        had no choice (`choose` gave it one thread whatever was measured)."""
        if dtype not in self._warm:
            self._warm.add(dtype)
            return
        if min(self.most, blocks) < 2 or self.fixed is not None:
            return
        parallel, per_value = threads > 1, seconds / values
        with self._lock:
            current = parallel == self.parallel
            old = self.cost.get(parallel)
            # the choice in use is smoothed; a probe's one sample replaces its stale figure
            self.cost[parallel] = per_value if old is None or not current else (old + per_value) / 2
            if len(self.cost) < 2:
                return
            other = self.cost[not self.parallel]
            better = other < _MARGIN * self.cost[self.parallel]
            if current and not better:
                self.countdown = max(self.countdown - 1, 0)
            elif current or better:  # the choice in use got dearer, or a probe won: switch
                self.parallel = not self.parallel
                self.interval = self.countdown = _PROBE_FIRST
            else:  # a probe lost: wait longer before the next
                self.interval = self.countdown = min(2 * self.interval, _PROBE_MOST)


def _launch_numba_threads() -> None:
    """Start numba's threading layer on a thread of its own. Its OpenMP layer starts by
    calling omp_set_num_threads on the thread that launches it, and with torch loaded that
    is torch's OpenMP: on the training thread it reset a `torch.set_num_threads(1)` to all
    cores (measured: 57 ms steps became 1,000 ms on a busy 2-core machine). OpenMP keeps
    that setting per thread, so a short-lived thread takes it away with it."""
    launcher = threading.Thread(target=numba.get_num_threads, name="normlog-numba-launch", daemon=True)
    launcher.start()
    launcher.join()


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask, capped by a cgroup CPU quota
    (a container's --cpus), both of which os.cpu_count() and numba's default ignore."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(Path("/sys/fs/cgroup"))
    return max(1, min(cores, quota)) if quota is not None else cores


def cgroup_cpu_quota(root: Path) -> int | None:
    """The CPU quota under the cgroup mount `root`, rounded up to whole cores, or None
    where there is none: cgroup v2's cpu.max ("quota period", or "max ..."), else v1's
    cpu.cfs_quota_us and cpu.cfs_period_us (-1: none)."""
    try:
        if (root / "cpu.max").exists():
            quota, period = (root / "cpu.max").read_text().split()[:2]
        else:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1"):
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError, ZeroDivisionError):
        return None


@dataclass(frozen=True)
class _Blocks:
    """Arrays of one dtype cut into blocks of up to _BLOCK values: block i is
    values[start[i]:stop[i]] of the array at addresses[array[i]]. `first` holds each
    nonempty array's first block; a pass's results per array are over the nonempty ones."""

    arrays: list[np.ndarray]  # held, with their memory, until the kernels are done
    addresses: np.ndarray
    array: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    first: np.ndarray
    nonempty: np.ndarray

    @property
    def like(self) -> np.ndarray:
        """One of the arrays: the dtype of them all."""
        return self.arrays[0]

    @classmethod
    def of(cls, arrays: list[np.ndarray]) -> _Blocks:
        sizes = np.array([a.size for a in arrays], dtype=np.int64)
        per_array = -(-sizes // _BLOCK)
        array = np.repeat(np.arange(len(arrays)), per_array)
        first = np.cumsum(per_array) - per_array
        start = (np.arange(array.size) - first[array]) * _BLOCK
        stop = np.minimum(start + _BLOCK, sizes[array])
        addresses = np.array([a.ctypes.data for a in arrays], dtype=np.int64)
        return cls(arrays, addresses, array, start, stop, first[per_array > 0], per_array > 0)

    def bounds(self) -> np.ndarray:
        """The first pass: each array's least and greatest value, NaN where it holds NaN."""
        keys_dtype = _KEYS[self.like.dtype]
        shift, magnitude = keys_dtype.type(keys_dtype.itemsize * 8 - 1), keys_dtype.type(np.iinfo(keys_dtype).max)
        keys = np.empty((self.array.size, 2), dtype=keys_dtype)
        _bounds_of_blocks(self.addresses, self.array, self.start, self.stop, shift, magnitude, keys)
        ends = np.stack([np.minimum.reduceat(keys[:, 0], self.first), np.maximum.reduceat(keys[:, 1], self.first)])
        ends ^= (ends >> shift) & magnitude  # the key is its own inverse
        return ends.view(self.like.dtype).astype(np.float64)

    def fill(
        self, low: np.ndarray, width: np.ndarray, scale: np.ndarray, finite: np.ndarray, bins: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The second pass: each array's bucket counts, and its [sum, sum of squares]. The
        arguments are per array (all of them); a width of 0 skips one."""
        counts = np.zeros((self.array.size, bins), dtype=np.int64)
        sums = np.zeros((self.array.size, 2))
        _fill_blocks(
            self.addresses, self.array, self.start, self.stop, self.like, low, width, scale, finite, counts, sums
        )
        return np.add.reduceat(counts, self.first), np.add.reduceat(sums, self.first)


def _rows_of_one_dtype(blocks: _Blocks, bins: int, threads: int) -> np.ndarray:
    arrays = blocks.arrays
    out = np.zeros((len(arrays), _rows.width(bins)))
    if not blocks.array.size:
        return out
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        return _fill_rows(blocks, bins, out)
    finally:
        numba.set_num_threads(previous)


def _fill_rows(blocks: _Blocks, bins: int, out: np.ndarray) -> np.ndarray:
    arrays = blocks.arrays
    lo, hi = np.zeros((2, len(arrays)))
    lo[blocks.nonempty], hi[blocks.nonempty] = blocks.bounds()
    finite = np.isfinite(lo) & np.isfinite(hi)
    for a in np.flatnonzero(blocks.nonempty & ~finite):  # NaN or Inf: the bounds of the finite values
        lo[a], hi[a], nan, posinf, neginf = _nonfinite(arrays[a])
        out[a, _rows.NONFINITE] = nan, posinf, neginf
    out[:, _rows.FINITE] = [a.size for a in arrays] - _rows.nonfinite(out)
    counted = out[:, _rows.FINITE] > 0
    scale = np.where(counted, _rows.range_scale(bins, lo, hi), 1.0)
    low, high = lo * scale, hi * scale
    width = np.where(high > low, (high - low) / bins, 1.0) * counted  # 0: nothing to count
    counts, sums = blocks.fill(low, width, scale, finite, bins)
    out[blocks.nonempty, _rows.COUNTS] = counts
    out[blocks.nonempty, _rows.SUM], out[blocks.nonempty, _rows.SUM_SQUARES] = sums.T
    out[counted, _rows.MIN], out[counted, _rows.MAX] = lo[counted], hi[counted]
    return out
