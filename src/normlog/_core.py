"""Norms, summaries and histograms of weights and gradients, from numpy arrays alone.

Rules: this module imports numpy and nothing else, and it is the specification: every
faster path elsewhere (a device reduction, a graph-mode reduction) must give its numbers.
NaN and ±Inf are counted, never binned, and never reach min, max, sum or the moments.
Input is read in float64 chunks, so extra memory stays bounded whatever the input size.
Input that is not real numbers raises TypeError; no real input of any shape or value raises.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Histogram", "Stats", "histogram", "l2_norm", "summarize"]

Bins = int | str | Sequence[float] | np.ndarray
_BucketIndex = Callable[[np.ndarray], np.ndarray]

# 1M float64 values (8 MB) per chunk: large enough that numpy's per-call overhead vanishes,
# small enough that a 100M-element tensor costs a few chunk-sized temporaries, not a copy.
_CHUNK = 1 << 20


def _as_real_array(values: Any) -> np.ndarray:
    array = np.asarray(values)
    kind = array.dtype.kind
    if kind in "biuf":
        return array
    # ml_dtypes' bfloat16, float8 and int4 are numpy "void" dtypes that convert to float64.
    if kind == "V" and array.dtype.type.__module__.startswith("ml_dtypes"):
        return array
    if kind == "c":
        raise TypeError(
            f"complex values ({array.dtype}) are not supported: "
            "log the real and imaginary parts, or np.abs(values), instead"
        )
    raise TypeError(f"expected real numbers, got values of dtype {array.dtype}")


def _float64_chunks(array: np.ndarray) -> Iterator[np.ndarray]:
    flat = array.reshape(-1) if array.flags.c_contiguous else None
    for start in range(0, array.size, _CHUNK):
        # `.flat[a:b]` copies only that slice of a non-contiguous array.
        part = flat[start : start + _CHUNK] if flat is not None else array.flat[start : start + _CHUNK]
        yield np.asarray(part, dtype=np.float64)


def _split_finite(chunk: np.ndarray) -> tuple[np.ndarray, int, int, int]:
    """The finite values of a float64 chunk, and its NaN, +Inf and -Inf counts."""
    finite = np.isfinite(chunk)
    n_finite = int(np.count_nonzero(finite))
    if n_finite == chunk.size:
        return chunk, 0, 0, 0
    nan = int(np.count_nonzero(np.isnan(chunk)))
    posinf = int(np.count_nonzero(chunk == np.inf))
    return chunk[finite], nan, posinf, chunk.size - n_finite - nan - posinf


def _sum_of_squares(terms: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Add terms `scale**2 * weight` without squaring a scale: returns one (scale, weight).

    Norms and variances of values near 1e200 (or 1e-200) stay representable this way,
    where squaring first would overflow to inf (or underflow to 0).
    """
    scale = max(s for s, _ in terms)
    if scale == 0.0 or not math.isfinite(scale):
        return scale, float(sum(w for s, w in terms if s == scale))
    return scale, float(sum(w * (s / scale) ** 2 for s, w in terms if s))


@dataclass(frozen=True)
class Stats:
    """Summary of one tensor. Moments, min and max describe the finite values only.

    `std` is the population standard deviation (ddof=0, as `np.std`). With no finite
    values, min, max, mean, std and norm are 0.0: read `finite` before trusting them.
    """

    count: int
    finite: int
    nan: int
    posinf: int
    neginf: int
    zeros: int
    min: float
    max: float
    mean: float
    std: float
    norm: float

    @property
    def nonfinite(self) -> int:
        return self.nan + self.posinf + self.neginf

    @property
    def zero_fraction(self) -> float:
        """Fraction of all values that are exactly zero (0.0 for empty input)."""
        return self.zeros / self.count if self.count else 0.0

    @property
    def sum(self) -> float:
        return self.mean * self.finite

    def merge(self, *others: Stats) -> Stats:
        """Stats of the concatenation of the parts these Stats describe."""
        return functools.reduce(_merge_stats, others, self)


_EMPTY_STATS = Stats(0, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0)


def _merge_stats(a: Stats, b: Stats) -> Stats:
    counts = dict(
        count=a.count + b.count,
        finite=a.finite + b.finite,
        nan=a.nan + b.nan,
        posinf=a.posinf + b.posinf,
        neginf=a.neginf + b.neginf,
        zeros=a.zeros + b.zeros,
    )
    if not b.finite or not a.finite:
        moments = a if a.finite else b
        return Stats(**counts, min=moments.min, max=moments.max, mean=moments.mean, std=moments.std, norm=moments.norm)
    n = a.finite + b.finite
    # Chan et al.'s pairwise update, on scaled sums of squares so that nothing overflows.
    mean = a.mean + (b.mean - a.mean) * (b.finite / n)
    m2_scale, m2_weight = _sum_of_squares(
        [(a.std, a.finite), (b.std, b.finite), (abs(b.mean - a.mean), a.finite * b.finite / n)]
    )
    norm_scale, norm_weight = _sum_of_squares([(a.norm, 1.0), (b.norm, 1.0)])
    return Stats(
        **counts,
        min=min(a.min, b.min),
        max=max(a.max, b.max),
        mean=mean,
        std=m2_scale * math.sqrt(m2_weight / n),
        norm=norm_scale * math.sqrt(norm_weight),
    )


def _chunk_stats(chunk: np.ndarray) -> Stats:
    finite, nan, posinf, neginf = _split_finite(chunk)
    zeros = int(np.count_nonzero(chunk == 0))
    if not finite.size:
        return Stats(chunk.size, 0, nan, posinf, neginf, zeros, 0.0, 0.0, 0.0, 0.0, 0.0)
    lo, hi = float(finite.min()), float(finite.max())
    scale = max(-lo, hi)
    if scale == 0.0:
        mean = std = norm = 0.0
    else:
        # Divide by the largest magnitude first: squares of values near 1e200 overflow,
        # squares of values near 1e-200 underflow, squares of values in [-1, 1] do neither.
        unit = finite / scale
        unit_mean = float(unit.mean())
        centred = unit - unit_mean
        mean = unit_mean * scale
        std = scale * math.sqrt(float(np.dot(centred, centred)) / finite.size)
        norm = scale * math.sqrt(float(np.dot(unit, unit)))
    return Stats(chunk.size, finite.size, nan, posinf, neginf, zeros, lo, hi, mean, std, norm)


def summarize(values: Any) -> Stats:
    """Count, non-finite counts, zeros, min, max, mean, std and L2 norm of `values`."""
    array = _as_real_array(values)
    return _EMPTY_STATS.merge(*(_chunk_stats(chunk) for chunk in _float64_chunks(array)))


def l2_norm(values: Any) -> float:
    """L2 norm of all values, accumulated in float64 without overflow or underflow.

    As `numpy.linalg.norm` and `torch.linalg.vector_norm`: NaN if any value is NaN,
    else inf if any is ±Inf. `summarize(values).norm` is the norm of the finite values.
    """
    stats = summarize(values)
    if stats.nan:
        return math.nan
    return math.inf if stats.nonfinite else stats.norm


@dataclass(frozen=True, eq=False)
class Histogram:
    """What TensorBoard's HistogramProto holds, plus the non-finite counts.

    Bucket i is [edges[i], edges[i+1]); the last bucket is closed. `num`, `sum`,
    `sum_squares`, `min` and `max` describe the finite values, which are all in a bucket:
    `counts.sum() == num`. NaN and ±Inf are only counted.
    """

    edges: np.ndarray
    counts: np.ndarray
    min: float
    max: float
    num: int
    sum: float
    sum_squares: float
    nan: int = 0
    posinf: int = 0
    neginf: int = 0

    def __post_init__(self) -> None:
        for name in ("edges", "counts"):
            array = np.array(getattr(self, name), dtype=np.float64 if name == "edges" else np.int64)
            array.flags.writeable = False
            object.__setattr__(self, name, array)

    @property
    def bucket_limits(self) -> np.ndarray:
        """Right edge of each bucket: HistogramProto's `bucket_limit`."""
        return self.edges[1:]

    @property
    def nonfinite(self) -> int:
        return self.nan + self.posinf + self.neginf

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        return (
            np.array_equal(self.edges, other.edges)
            and np.array_equal(self.counts, other.counts)
            and (self.min, self.max, self.num, self.sum, self.sum_squares, self.nan, self.posinf, self.neginf)
            == (other.min, other.max, other.num, other.sum, other.sum_squares, other.nan, other.posinf, other.neginf)
        )

    __hash__ = None  # type: ignore[assignment]

    def merge(self, *others: Histogram) -> Histogram:
        """Histogram of the concatenation of the parts, which must share their edges.

        Parts of one tensor merge into the whole's histogram when each part is binned
        with the whole's rule: `histogram(part, bins, range=(whole_min, whole_max))`.
        """
        return functools.reduce(_merge_histograms, others, self)


def _merge_histograms(a: Histogram, b: Histogram) -> Histogram:
    if not np.array_equal(a.edges, b.edges):
        raise ValueError(
            "cannot merge histograms with different edges: bin every part with the same "
            "bins and range, e.g. range=(min, max) of the merged Stats"
        )
    low, high = (a, b) if a.num else (b, a)
    return Histogram(
        edges=a.edges,
        counts=a.counts + b.counts,
        min=min(low.min, high.min) if high.num else low.min,
        max=max(low.max, high.max) if high.num else low.max,
        num=a.num + b.num,
        sum=a.sum + b.sum,
        sum_squares=a.sum_squares + b.sum_squares,
        nan=a.nan + b.nan,
        posinf=a.posinf + b.posinf,
        neginf=a.neginf + b.neginf,
    )


@functools.lru_cache(maxsize=1)
def _tensorflow_edges() -> np.ndarray:
    # TF1's histogram.cc default buckets, which tensorboardX also uses: ±1e-12 growing by
    # 1.1x up to 1e20, zero in the middle, and ±DBL_MAX outermost so every finite value fits.
    positive = []
    v = 1e-12
    while v < 1e20:
        positive.append(v)
        v *= 1.1
    big = float(np.finfo(np.float64).max)
    edges = np.array([-big, *(-p for p in reversed(positive)), 0.0, *positive, big])
    edges.flags.writeable = False
    return edges


def _check_bins(bins: Bins) -> int | np.ndarray:
    if isinstance(bins, str):
        if bins != "tensorflow":
            raise ValueError(f"bins must be a positive int, 'tensorflow' or an array of edges; got {bins!r}")
        return _tensorflow_edges()
    if isinstance(bins, (int, np.integer)) and not isinstance(bins, bool):
        if bins <= 0:
            raise ValueError(f"bins must be a positive int, 'tensorflow' or an array of edges; got {bins}")
        return int(bins)
    edges = np.asarray(bins, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
        raise ValueError("bins given as edges must be at least two finite, strictly increasing numbers")
    return edges


def range_scale(count: int, lo: Any, hi: Any) -> np.ndarray:
    """The power of two (so scaling is exact) that values and bounds are multiplied by
    before binning: 0.5 for a range wider than the largest double, 2**600 for a width
    that would underflow, else 1. Elementwise over arrays of bounds too: every engine's
    rows use this rule (through `normlog._rows`), and it is part of the core's spec."""
    with np.errstate(over="ignore", invalid="ignore"):
        extent = np.subtract(hi, lo, dtype=np.float64)
        return np.where(~np.isfinite(extent), 0.5, np.where(extent / count < np.finfo(np.float64).tiny, 2.0**600, 1.0))


def _equal_width_rule(count: int, lo: float, hi: float) -> tuple[np.ndarray, _BucketIndex]:
    """Edges and bucket index of `tf.summary.histogram`: floor((x - lo) / width), in float64."""
    scale = float(range_scale(count, lo, hi))
    lo_s, hi_s = lo * scale, hi * scale
    width = (hi_s - lo_s) / count
    with np.errstate(over="ignore"):  # linspace's intermediate near DBL_MAX; its edges are right
        edges = np.linspace(lo_s, hi_s, count + 1) / scale
    edges[0], edges[-1] = lo, hi  # as TensorBoard does: the range ends exactly at min and max

    def index(finite: np.ndarray) -> np.ndarray:
        offsets = finite * scale - lo_s if scale != 1.0 else finite - lo_s
        return np.floor(offsets / width)

    return edges, index


def binning(
    rule: int | np.ndarray, finite: int, lo: float, hi: float, ranged: bool
) -> tuple[np.ndarray, _BucketIndex | None]:
    """Edges, and the function from finite values to bucket indices (None: all in the last)."""
    if not isinstance(rule, int):
        return rule, lambda values: np.searchsorted(rule, values, side="right") - 1
    if not finite and not ranged:
        return np.zeros(rule + 1), None
    if lo == hi:
        return np.array([lo, hi]), None
    return _equal_width_rule(rule, lo, hi)


def histogram(values: Any, bins: Bins = 30, range: tuple[float, float] | None = None) -> Histogram:  # noqa: A002
    """Histogram of the finite values; NaN and ±Inf are counted beside it.

    - `bins=30` (an int): equal-width buckets over [min, max] of the finite values, or over
      `range` if given, with the edges and counts of `tf.summary.histogram`.
    - `bins="tensorflow"`: TF1's exponential edges (tensorboardX's default).
    - `bins=edges`: an increasing array of edges.

    Finite values outside the edges or `range` go to the first or last bucket, so every
    finite value is in a bucket. A constant input gets one bucket [c, c]; an input with no
    finite values gets `bins` empty buckets at 0, as TensorBoard's own summary does.
    """
    array = _as_real_array(values)
    rule = _check_bins(bins)
    stats = summarize(array)
    lo, hi = (float(range[0]), float(range[1])) if range is not None else (stats.min, stats.max)
    if range is not None and not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"range must be two finite numbers with min <= max; got {range}")

    edges, index = binning(rule, stats.finite, lo, hi, range is not None)
    buckets = edges.size - 1
    counts = np.zeros(buckets, dtype=np.int64)
    if index is None:
        counts[-1] = stats.finite
    elif stats.finite:
        for chunk in _float64_chunks(array):
            finite = _split_finite(chunk)[0]
            if finite.size:
                bucket = np.clip(index(finite), 0, buckets - 1).astype(np.intp)
                counts += np.bincount(bucket, minlength=buckets)
    return Histogram(
        edges=edges,
        counts=counts,
        min=stats.min,
        max=stats.max,
        num=stats.finite,
        sum=stats.sum,
        sum_squares=stats.norm * stats.norm,  # inf past 1e154, as the proto's double must be
        nan=stats.nan,
        posinf=stats.posinf,
        neginf=stats.neginf,
    )
