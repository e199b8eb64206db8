"""The histogram row: the one layout in which every engine hands a tensor's statistics over.

Rules: numpy and the core only. A row is float64 `[min, max, sum, sum_squares, finite, nan,
posinf, neginf, counts...]`: min, max, the sums and `finite` describe the finite values,
NaN and ±Inf are only counted, and the counts follow the core's equal-width rule. Every
engine (torch ops, numba, Triton, the Keras graph) takes its column numbers from here, and
no other file indexes a row by a bare number. What a sharded all-reduce does to each column
is `MERGE_MAX` / `MERGE_SUM`, and `merge` is its reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from normlog._core import Histogram, binning, histogram, range_scale

__all__ = [
    "COUNTS",
    "FINITE",
    "HEAD",
    "MAX",
    "MIN",
    "NAN",
    "NEGINF",
    "NONFINITE",
    "POSINF",
    "SUM",
    "SUM_SQUARES",
    "HistogramRows",
    "from_histogram",
    "histograms",
    "merge",
    "nonfinite",
    "norms",
    "ordinary_edges",
    "range_scale",
    "width",
]

MIN, MAX, SUM, SUM_SQUARES, FINITE, NAN, POSINF, NEGINF = range(8)
HEAD = 8  # the fields before the counts
COUNTS = slice(HEAD, None)
NONFINITE = slice(NAN, NEGINF + 1)  # nan, posinf, neginf
# Parts of one tensor (shards) merge into the whole's row when each was binned over the
# whole's [min, max]: the bounds by MAX (of -min and max), every other column by SUM.
MERGE_MAX = (MIN, MAX)
MERGE_SUM = slice(SUM, None)


def width(bins: int) -> int:
    """The length of a row with `bins` counts."""
    return HEAD + bins


def merge(rows: np.ndarray) -> np.ndarray:
    """The row of the whole tensor from its parts' rows, [parts, width], each binned over
    the whole's bounds: what the adapters' all-reduces compute on the device."""
    rows = np.asarray(rows, dtype=np.float64)
    whole = rows[:, MERGE_SUM].sum(axis=0)
    filled = rows[rows[:, FINITE] > 0]
    low, high = (filled[:, MIN].min(), filled[:, MAX].max()) if filled.size else (0.0, 0.0)
    return np.concatenate([[low, high], whole])


def from_histogram(hist: Histogram, bins: int) -> np.ndarray:
    """The row of a core Histogram with `bins` equal-width buckets (a constant input's one
    bucket [c, c] becomes the last count, as `histograms` reads it back)."""
    counts = np.zeros(bins)
    counts[bins - hist.counts.size :] = hist.counts
    head = [hist.min, hist.max, hist.sum, hist.sum_squares, hist.num, hist.nan, hist.posinf, hist.neginf]
    return np.concatenate([head, counts])


def core_row(values: np.ndarray, bins: int) -> np.ndarray:
    """The row the core gives `values`: the reference every engine is compared with."""
    return from_histogram(histogram(values, bins), bins)


def norms(rows: np.ndarray) -> np.ndarray:
    """Each row's L2 norm, as `numpy.linalg.norm` and torch give it: NaN if any value is
    NaN, else inf if any is infinite, else the square root of the sum of squares."""
    rows = np.asarray(rows, dtype=np.float64)
    infinite = rows[:, POSINF] + rows[:, NEGINF]
    with np.errstate(invalid="ignore"):
        return np.where(rows[:, NAN] > 0, np.nan, np.where(infinite > 0, np.inf, np.sqrt(rows[:, SUM_SQUARES])))


def nonfinite(rows: np.ndarray) -> np.ndarray:
    """Each row's count of NaN and ±Inf."""
    counts: np.ndarray = np.asarray(rows, dtype=np.float64)[:, NONFINITE].sum(axis=1)
    return counts


def ordinary_edges(rows: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Which rows are ordinary (finite values over a range whose width is a normal double),
    and the edges of those, [ordinary rows, bins + 1], from one linspace over all of them,
    which does each row's arithmetic exactly as a linspace of that row alone. As TensorBoard
    does, each range ends exactly at min and max."""
    lo, hi, finite = rows[:, MIN], rows[:, MAX], rows[:, FINITE]
    ordinary = (finite > 0) & (hi > lo) & (range_scale(bins, lo, hi) == 1.0)
    with np.errstate(over="ignore"):  # linspace's intermediate near DBL_MAX, as in the core
        edges = np.linspace(lo[ordinary], hi[ordinary], bins + 1, axis=1)
    edges[:, 0], edges[:, -1] = lo[ordinary], hi[ordinary]
    return ordinary, edges


def histograms(rows: np.ndarray, bins: int) -> list[Histogram]:
    """The core Histogram of each row of a [tensors, width(bins)] array; the edges of the
    ordinary rows are computed together (adapters convert hundreds of rows per step)."""
    rows = np.asarray(rows, dtype=np.float64)
    ordinary, ordinary_edges_ = ordinary_edges(rows, bins)
    edges = iter(ordinary_edges_)
    result = []
    for row, regular in zip(rows, ordinary):
        count = int(row[FINITE])
        counts = row[COUNTS]
        if regular:
            row_edges = next(edges)
        else:  # constant, empty, or a range past the doubles' limits: the per-value rule
            row_edges, index = binning(bins, count, float(row[MIN]), float(row[MAX]), False)
            if index is None:  # constant or empty: the one bucket [c, c], or empty buckets at 0
                counts = np.zeros(row_edges.size - 1)
                counts[-1] = count
        result.append(
            Histogram(
                edges=row_edges,
                counts=counts,
                min=float(row[MIN]),
                max=float(row[MAX]),
                num=count,
                sum=float(row[SUM]),
                sum_squares=float(row[SUM_SQUARES]),
                nan=int(row[NAN]),
                posinf=int(row[POSINF]),
                neginf=int(row[NEGINF]),
            )
        )
    return result


@dataclass(frozen=True)
class HistogramRows:
    """Histograms to write, as rows: `tags[i]`'s histogram is `rows[i]`, with `bins` counts."""

    tags: Sequence[str]
    rows: np.ndarray
    bins: int

    def __post_init__(self) -> None:
        if self.rows.shape != (len(self.tags), width(self.bins)):
            raise ValueError(f"{len(self.tags)} tags need rows of shape ({len(self.tags)}, {width(self.bins)})")
