"""The statistics of many JAX arrays inside a traced step: sums of squares, NaN/Inf counts and
histogram rows, with the core's rules.

Rules: jax.numpy only (no optax, no Keras). Norms and NaN/Inf counts are one reduction per
array, which XLA compiles into one loop each inside the step's one program: a concatenation
and `segment_sum` over all arrays, as the TensorFlow adapter does, measured 100x slower on
the CPU (243 ms against 2.7 ms for 2.1M float32 values: XLA's CPU scatter is slow). The
histogram rows, computed only on histogram steps, need a scatter anyway (the counts): the
arrays of one compute dtype are binned together there (`Fused`). Everything is worked
in float64 under a local `jax.enable_x64`, whatever the process's x64 setting, because the
core bins in float64 (`normlog._core.histogram`): rows follow `normlog._rows`' layout and
equal the core's row, range scale included. What crosses to the host is float64 carried as
uint32 pairs (`to_host`/`from_host`), since a callback's arguments are narrowed to float32
when x64 is off.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from normlog import _rows

__all__ = [
    "Fused",
    "from_host",
    "fuse",
    "histogram_rows",
    "is_float",
    "nonfinite",
    "rows",
    "sums_of_squares",
    "to_host",
    "x64",
]

_TINY = float(np.finfo(np.float64).tiny)


@contextmanager
def x64() -> Iterator[None]:
    """float64 arithmetic while tracing, without touching the process's setting."""
    with jax.enable_x64(True):
        yield


def is_float(array: Any) -> bool:
    """Whether the statistics take this leaf: real floating point (bfloat16, float8 too)."""
    return bool(jnp.issubdtype(jnp.result_type(array), jnp.floating))


def _compute_dtype(dtype: Any) -> Any:
    # narrower floats are read as float32 (exactly); float64 stays float64
    return jnp.float64 if np.dtype(dtype) == np.float64 else jnp.float32


@dataclass(frozen=True)
class Fused:
    """The arrays of one compute dtype: their positions in the watched list, their sizes, and
    the segment id of every element of their concatenation (static, a numpy array)."""

    dtype: Any
    positions: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def ids(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.sizes), dtype=np.int32), self.sizes)

    def flatten(self, arrays: Sequence[Any]) -> jax.Array:
        """One vector of this group's arrays (taken from `arrays` at `positions`) in the
        compute dtype."""
        parts = [jnp.reshape(arrays[p], (-1,)).astype(self.dtype) for p in self.positions]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def fuse(arrays: Sequence[Any]) -> list[Fused]:
    """The arrays grouped by compute dtype, in order of first appearance."""
    groups: dict[Any, tuple[list[int], list[int]]] = {}
    for position, array in enumerate(arrays):
        positions, sizes = groups.setdefault(_compute_dtype(jnp.result_type(array)), ([], []))
        positions.append(position)
        sizes.append(math.prod(jnp.shape(array)))
    return [Fused(dtype, tuple(positions), tuple(sizes)) for dtype, (positions, sizes) in groups.items()]


def _in_order(fused: Sequence[Fused], per_group: Sequence[jax.Array]) -> jax.Array:
    """Per-array values given group by group, back in the arrays' order."""
    order = [p for group in fused for p in group.positions]
    joined = per_group[0] if len(per_group) == 1 else jnp.concatenate(per_group)
    if order == sorted(order):
        return joined
    return joined[np.argsort(order)]


def sums_of_squares(arrays: Sequence[Any]) -> jax.Array:
    """Each array's sum of squares in float64 (inf or NaN where it holds Inf or NaN), in
    the arrays' order. Squares are added in float64: a sequential float32 sum of 0.15M
    squares drifts 1e-4 from numpy's norm (measured in the Keras adapter)."""
    with x64():
        if not arrays:
            return jnp.zeros(0, jnp.float64)
        return jnp.stack([jnp.sum(jnp.square(jnp.asarray(a).astype(jnp.float64))) for a in arrays])


def nonfinite(arrays: Sequence[Any], sums: jax.Array) -> jax.Array:
    """NaN/Inf counts per array (float64). An array with a NaN or Inf has a sum of squares
    that is not finite, so the counting pass runs only when some sum is not finite."""
    with x64():

        def counted(_: None) -> jax.Array:
            return jnp.stack([jnp.sum(~jnp.isfinite(jnp.asarray(a))).astype(jnp.float64) for a in arrays])

        counts: jax.Array = lax.cond(
            jnp.all(jnp.isfinite(sums)), lambda _: jnp.zeros(len(arrays), jnp.float64), counted, None
        )
        return counts


def histogram_rows(flat: jax.Array, ids: np.ndarray, count: int, bins: int) -> jax.Array:
    """The rows [count, width(bins)] of the `count` arrays laid end to end in `flat`, array k
    where `ids == k`: floor((x * scale - min * scale) / width) over each array's finite
    values in float64, clamped to the last bucket; scale is the core's power of two for
    float64 ranges past the largest double or whose width underflows (`_rows.range_scale`).
    Every element goes through the core's float64 arithmetic, so the counts are the core's."""
    with x64():
        float64_input = flat.dtype == jnp.float64
        x = flat.astype(jnp.float64)
        finite = jnp.isfinite(x)

        def per_array(values: jax.Array) -> jax.Array:
            return jax.ops.segment_sum(values, ids, count, indices_are_sorted=True)

        filled = per_array(finite.astype(jnp.float64))
        zeroed = jnp.where(finite, x, 0.0)
        lowest = jax.ops.segment_min(jnp.where(finite, x, jnp.inf), ids, count, indices_are_sorted=True)
        highest = jax.ops.segment_max(jnp.where(finite, x, -jnp.inf), ids, count, indices_are_sorted=True)
        lo = jnp.where(filled > 0, lowest, 0.0)
        hi = jnp.where(filled > 0, highest, 0.0)
        scaled, lo_s, hi_s = zeroed, lo, hi
        if float64_input:  # only float64 ranges can overflow or underflow
            extent = hi - lo
            scale = jnp.where(jnp.isfinite(extent), jnp.where(extent / bins < _TINY, 2.0**600, 1.0), 0.5)
            scaled, lo_s, hi_s = zeroed * scale[ids], lo * scale, hi * scale
        width = jnp.where(hi_s > lo_s, (hi_s - lo_s) / bins, 1.0)
        index = jnp.floor((scaled - lo_s[ids]) / width[ids])
        # NaN and Inf go to an extra bucket per array that is dropped
        index = jnp.where(finite, jnp.clip(index, 0, bins - 1), bins).astype(jnp.int32)
        slots = jnp.asarray(ids) * (bins + 1) + index
        counts = jax.ops.segment_sum(jnp.ones_like(x), slots, count * (bins + 1))
        counts = jnp.reshape(counts, (count, bins + 1))[:, :bins]
        head: list[Any] = [None] * _rows.HEAD
        head[_rows.MIN], head[_rows.MAX], head[_rows.FINITE] = lo, hi, filled
        head[_rows.SUM], head[_rows.SUM_SQUARES] = per_array(zeroed), per_array(zeroed * zeroed)
        head[_rows.NAN] = per_array(jnp.isnan(x).astype(jnp.float64))
        head[_rows.POSINF] = per_array((x == jnp.inf).astype(jnp.float64))
        head[_rows.NEGINF] = per_array((x == -jnp.inf).astype(jnp.float64))
        return jnp.concatenate([jnp.stack(head, axis=1), counts], axis=1)


def rows(fused: Sequence[Fused], arrays: Sequence[Any], bins: int) -> jax.Array:
    """The histogram row of every array, [arrays, width(bins)], in the arrays' order."""
    with x64():
        per_group = [histogram_rows(group.flatten(arrays), group.ids, len(group.sizes), bins) for group in fused]
        return _in_order(fused, per_group)


def to_host(values: jax.Array) -> jax.Array:
    """A float64 array as uint32 pairs: what a host callback receives unchanged."""
    with x64():
        return lax.bitcast_convert_type(values.astype(jnp.float64), jnp.uint32)


def from_host(bits: Any) -> np.ndarray:
    """The float64 array `to_host` carried (the last axis of pairs folded back)."""
    array = np.ascontiguousarray(np.asarray(bits, dtype=np.uint32))
    return array.view(np.float64).reshape(array.shape[:-1])
