"""The in-graph statistics of the Keras adapter: norms, NaN/Inf counts, histogram rows, update
norms, computed inside the traced train step into tf.Variables of normlog's own.

Rules: TensorFlow ops with static shapes only (no boolean masks), so XLA can compile them.
Rows follow `normlog._rows`' layout and the core's rule, range scale included: they equal
`normlog.histogram`. The variables here are held by no model or optimizer, so checkpoints
do not change. `Summary` owns the layout of the one vector the host reads per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from normlog import _rows

__all__ = ["State", "Summary", "histogram_row", "nonfinite", "norm"]

_TINY = float(np.finfo(np.float64).tiny)


def histogram_row(values: tf.Tensor, bins: int) -> tf.Tensor:
    """The row of `values` in float64: floor((x * scale - min * scale) / width) over the finite
    values, clamped to the last bucket, scale being the core's power of two for float64
    ranges that pass the largest double or whose width underflows (`_rows.range_scale`)."""
    x = tf.reshape(tf.cast(values, tf.float64), [-1])
    finite = tf.math.is_finite(x)
    count = tf.reduce_sum(tf.cast(finite, tf.float64))
    zeroed = tf.where(finite, x, tf.zeros_like(x))
    lo = tf.where(count > 0, tf.reduce_min(tf.where(finite, x, math.inf)), 0.0)
    hi = tf.where(count > 0, tf.reduce_max(tf.where(finite, x, -math.inf)), 0.0)
    scaled, lo_s, hi_s = zeroed, lo, hi
    if values.dtype == tf.float64:  # only float64 ranges can overflow or underflow
        extent = hi - lo
        scale = tf.where(
            tf.math.is_finite(extent), tf.where(extent / bins < _TINY, tf.constant(2.0**600, tf.float64), 1.0), 0.5
        )
        scaled, lo_s, hi_s = zeroed * scale, lo * scale, hi * scale
    width = tf.where(hi_s > lo_s, (hi_s - lo_s) / bins, 1.0)
    index = tf.cast(tf.floor((scaled - lo_s) / width), tf.int32)
    # non-finite values go to an extra bucket that is dropped
    index = tf.where(finite, tf.clip_by_value(index, 0, bins - 1), bins)
    counts = tf.math.unsorted_segment_sum(tf.ones_like(x), index, bins + 1)[:bins]
    head: list[Any] = [None] * _rows.HEAD
    head[_rows.MIN], head[_rows.MAX], head[_rows.FINITE] = lo, hi, count
    head[_rows.SUM], head[_rows.SUM_SQUARES] = tf.reduce_sum(zeroed), tf.reduce_sum(zeroed * zeroed)
    head[_rows.NAN] = tf.reduce_sum(tf.cast(tf.math.is_nan(x), tf.float64))
    head[_rows.POSINF] = tf.reduce_sum(tf.cast(tf.equal(x, math.inf), tf.float64))
    head[_rows.NEGINF] = tf.reduce_sum(tf.cast(tf.equal(x, -math.inf), tf.float64))
    return tf.concat([tf.stack(head), counts], 0)


def norm(values: tf.Tensor) -> tf.Tensor:
    # float32 accumulation as tf.norm does, reported as float64
    as_float = tf.cast(values, tf.float32) if values.dtype != tf.float64 else values
    return tf.cast(tf.sqrt(tf.reduce_sum(tf.square(as_float))), tf.float64)


def nonfinite(values: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(tf.cast(tf.logical_not(tf.math.is_finite(values)), tf.float64))


@dataclass(frozen=True)
class Summary:
    """The vector a traced step publishes and the callback reads in one transfer per batch:
    [step, histogram step, update step, loss scale, then per variable: gradient norms,
    gradient NaN/Inf counts (NaN where a variable had no gradient), weight norms, weight
    NaN/Inf counts]."""

    count: int  # variables

    STEPS = 3
    FIELDS = ("grad_norms", "grad_nonfinite", "weight_norms", "weight_nonfinite")

    @property
    def size(self) -> int:
        return self.STEPS + 1 + len(self.FIELDS) * self.count

    def initial(self) -> tf.Tensor:
        return tf.concat([tf.constant([-1.0, -1.0, -1.0, 1.0], tf.float64), tf.zeros([self.size - 4], tf.float64)], 0)

    def read(self, vector: np.ndarray) -> tuple[tuple[int, int, int], float, dict[str, np.ndarray]]:
        """(step, histogram step, update step), the loss scale, and each field by name."""
        steps = tuple(int(v) for v in vector[: self.STEPS])
        start = self.STEPS + 1
        fields = {
            name: vector[start + k * self.count : start + (k + 1) * self.count] for k, name in enumerate(self.FIELDS)
        }
        return steps, float(vector[self.STEPS]), fields  # type: ignore[return-value]


class State:
    """The tf.Variables a traced step writes its statistics into. Plain tf.Variables held
    here, never by the model or the optimizer, so checkpoints do not change."""

    def __init__(self, variables: list[Any], bins: int, kinds: int, shadows: bool, model_name: str) -> None:
        count = len(variables)
        self.variables = variables
        # Keras' variable path, without the watched model's own name: "dense/kernel"
        paths = [getattr(v, "path", None) or v.name.split(":")[0] for v in variables]
        self.names = [path.removeprefix(f"{model_name}/") for path in paths]
        self.layout = Summary(count)

        def make(value: Any) -> tf.Variable:
            # Under a tf.distribute strategy these are mirrored and, with no aggregation, each
            # replica writes its own copy: the same statistics of the same summed gradients.
            # The host reads the first replica's.
            return tf.Variable(value, trainable=False)

        self.step = make(tf.constant(0, tf.int64))
        self.summary = make(self.layout.initial())
        self.histogram_step = make(tf.constant(-1, tf.int64))
        # one block of rows per kind logged (gradients, then weights)
        self.histograms = make(tf.zeros([kinds * count, _rows.width(bins)], tf.float64))
        self.update_step = make(tf.constant(-1, tf.int64))
        self.updates = make(tf.zeros([2, count], tf.float64))  # ‖w_after - w_before‖, ‖w_before‖
        self.shadows = [make(tf.zeros(v.shape, tf.as_dtype(v.dtype))) for v in variables] if shadows else []
