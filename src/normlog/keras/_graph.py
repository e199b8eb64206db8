"""The in-graph statistics of the Keras adapter: norms, NaN/Inf counts, histogram rows, update
norms, computed inside the traced train step into tf.Variables of normlog's own.

Rules: every variable of one dtype is reduced together (`Fused`): the flattened tensors are
concatenated and reduced by segment, so a step's graph grows by a reshape per variable, not
by a chain of ops per variable. Histogram rows are not in the train step at all: a due step
stashes its flat tensors and the callback bins them in a tf.function of their own
(`State.histograms`). Rows follow `normlog._rows`' layout and the core's rule, range scale
included: they equal `normlog.histogram`. Static shapes only, so XLA can compile the step.
The variables here are held by no model or optimizer, so checkpoints do not change.
`Summary` owns the layout of the one vector the host reads per logged step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from normlog import _rows

__all__ = ["Fused", "State", "Summary", "histogram_row", "histogram_rows", "variable_names"]

_TINY = float(np.finfo(np.float64).tiny)


def histogram_rows(flat: tf.Tensor, ids: tf.Tensor, count: int, bins: int) -> tf.Tensor:
    """The rows [count, width] of the `count` tensors laid end to end in `flat`, tensor k
    where `ids == k`: floor((x * scale - min * scale) / width) over each tensor's finite
    values in float64, clamped to the last bucket, scale being the core's power of two for
    float64 ranges that pass the largest double or whose width underflows
    (`_rows.range_scale`). Each element goes through the same float64 arithmetic as the
    core's, so the counts are the core's."""
    x = tf.cast(flat, tf.float64)
    finite = tf.math.is_finite(x)

    def per_tensor(values: tf.Tensor) -> tf.Tensor:
        return tf.math.unsorted_segment_sum(values, ids, count)

    filled = per_tensor(tf.cast(finite, tf.float64))
    zeroed = tf.where(finite, x, tf.zeros_like(x))
    lo = tf.where(filled > 0, tf.math.unsorted_segment_min(tf.where(finite, x, math.inf), ids, count), 0.0)
    hi = tf.where(filled > 0, tf.math.unsorted_segment_max(tf.where(finite, x, -math.inf), ids, count), 0.0)
    scaled, lo_s, hi_s = zeroed, lo, hi
    if flat.dtype == tf.float64:  # only float64 ranges can overflow or underflow
        extent = hi - lo
        scale = tf.where(
            tf.math.is_finite(extent), tf.where(extent / bins < _TINY, tf.constant(2.0**600, tf.float64), 1.0), 0.5
        )
        scaled, lo_s, hi_s = zeroed * tf.gather(scale, ids), lo * scale, hi * scale
    width = tf.where(hi_s > lo_s, (hi_s - lo_s) / bins, 1.0)
    index = tf.cast(tf.floor((scaled - tf.gather(lo_s, ids)) / tf.gather(width, ids)), tf.int32)
    # non-finite values go to an extra bucket per tensor that is dropped
    index = tf.where(finite, tf.clip_by_value(index, 0, bins - 1), bins)
    counts = tf.math.unsorted_segment_sum(tf.ones_like(x), ids * (bins + 1) + index, count * (bins + 1))
    counts = tf.reshape(counts, [count, bins + 1])[:, :bins]
    head: list[Any] = [None] * _rows.HEAD
    head[_rows.MIN], head[_rows.MAX], head[_rows.FINITE] = lo, hi, filled
    head[_rows.SUM], head[_rows.SUM_SQUARES] = per_tensor(zeroed), per_tensor(zeroed * zeroed)
    head[_rows.NAN] = per_tensor(tf.cast(tf.math.is_nan(x), tf.float64))
    head[_rows.POSINF] = per_tensor(tf.cast(tf.equal(x, math.inf), tf.float64))
    head[_rows.NEGINF] = per_tensor(tf.cast(tf.equal(x, -math.inf), tf.float64))
    return tf.concat([tf.stack(head, axis=1), counts], 1)


def histogram_row(values: tf.Tensor, bins: int) -> tf.Tensor:
    """The row of one tensor (`histogram_rows` of a single segment)."""
    flat = tf.reshape(values, [-1])
    return histogram_rows(flat, tf.zeros(tf.shape(flat), tf.int32), 1, bins)[0]


def _compute_dtype(dtype: Any) -> tf.DType:
    # narrower floats are read as float32 (exactly); float64 stays float64
    return tf.float64 if tf.as_dtype(dtype) == tf.float64 else tf.float32


class Fused:
    """The variables of one compute dtype, reduced together: their positions in the watched
    list, their sizes, and the segment id of every element of their concatenation."""

    def __init__(self, dtype: tf.DType, positions: list[int], shapes: list[tf.TensorShape]) -> None:
        self.dtype = dtype
        self.positions = positions
        self.shapes = shapes
        self.sizes = [int(np.prod(shape.as_list())) for shape in shapes]
        self.total = sum(self.sizes)

    def ids(self) -> tf.Tensor:
        return tf.repeat(tf.range(len(self.sizes), dtype=tf.int32), self.sizes)

    def flatten(self, tensors: list[Any]) -> tf.Tensor:
        """One vector of `tensors` (this group's, in order) in the compute dtype."""
        parts = [tf.reshape(tf.cast(tf.convert_to_tensor(t), self.dtype), [-1]) for t in tensors]
        return parts[0] if len(parts) == 1 else tf.concat(parts, 0)

    def sums_of_squares(self, flat: tf.Tensor, ids: tf.Tensor) -> tf.Tensor:
        # In float64: a segment sum adds in sequence, and over 0.15M float32 squares that
        # drifted 1e-4 from numpy's norm (MobileNetV2's block_16_project/kernel).
        return tf.math.unsorted_segment_sum(tf.square(tf.cast(flat, tf.float64)), ids, len(self.sizes))

    def nonfinite(self, flat: tf.Tensor, ids: tf.Tensor, sums: tf.Tensor) -> tf.Tensor:
        """NaN/Inf counts per tensor. A tensor with a NaN or Inf has a sum of squares that is
        not finite, so the counting pass runs only on a step where some sum is not finite."""
        count = len(self.sizes)

        def counted() -> tf.Tensor:
            bad = tf.cast(tf.logical_not(tf.math.is_finite(flat)), tf.int32)
            return tf.cast(tf.math.unsorted_segment_sum(bad, ids, count), tf.float64)

        return tf.cond(tf.reduce_all(tf.math.is_finite(sums)), lambda: tf.zeros([count], tf.float64), counted)


def fuse(variables: list[Any]) -> list[Fused]:
    """The watched variables grouped by compute dtype, in order of first appearance."""
    groups: dict[tf.DType, tuple[list[int], list[tf.TensorShape]]] = {}
    for position, variable in enumerate(variables):
        positions, shapes = groups.setdefault(_compute_dtype(variable.dtype), ([], []))
        positions.append(position)
        shapes.append(tf.TensorShape(variable.shape))
    return [Fused(dtype, positions, shapes) for dtype, (positions, shapes) in groups.items()]


def in_order(fused: list[Fused], per_group: list[tf.Tensor]) -> tf.Tensor:
    """Per-tensor values given group by group, back in the watched variables' order."""
    return gather_positions([(group.positions, values) for group, values in zip(fused, per_group)])


def gather_positions(parts: list[tuple[list[int], tf.Tensor]]) -> tf.Tensor:
    """One vector in the watched variables' order from parts holding the values of the
    variables at `positions`, in that order."""
    order = [p for positions, _ in parts for p in positions]
    values = [v for _, v in parts]
    joined = values[0] if len(values) == 1 else tf.concat(values, 0)
    if order == sorted(order):
        return joined
    return tf.gather(joined, np.argsort(order).astype(np.int32))


def sparse_values(grad: tf.IndexedSlices) -> tf.Tensor:
    """The nonzero rows of a sparse gradient as the dense gradient holds them: rows of a
    repeated index summed, as densifying sums them, without building the dense tensor."""
    unique, position = tf.unique(grad.indices)
    return tf.math.unsorted_segment_sum(grad.values, position, tf.size(unique))


def reduce_tensors(fused: list[Fused], tensors: list[Any]) -> tuple[tf.Tensor, tf.Tensor]:
    """L2 norms (float64) and NaN/Inf counts of `tensors`, in order: the dense ones of a
    compute dtype in one fused reduction, each sparse gradient (`tf.IndexedSlices`) from its
    rows alone."""
    norms, counts = [], []
    for group in fused:
        dense = [
            (p, shape)
            for p, shape in zip(group.positions, group.shapes)
            if not isinstance(tensors[p], tf.IndexedSlices)
        ]
        if dense:
            part = group if len(dense) == len(group.positions) else Fused(group.dtype, *map(list, zip(*dense)))
            ids = part.ids()
            flat = part.flatten([tensors[p] for p in part.positions])
            sums = part.sums_of_squares(flat, ids)
            norms.append((part.positions, tf.cast(tf.sqrt(sums), tf.float64)))
            counts.append((part.positions, part.nonfinite(flat, ids, sums)))
        for p in group.positions:
            if isinstance(tensors[p], tf.IndexedSlices):
                rows = tf.cast(sparse_values(tensors[p]), group.dtype)
                norms.append(([p], tf.reshape(tf.cast(tf.norm(rows), tf.float64), [1])))
                bad = tf.reduce_sum(tf.cast(tf.logical_not(tf.math.is_finite(rows)), tf.float64))
                counts.append(([p], tf.reshape(bad, [1])))
    return gather_positions(norms), gather_positions(counts)


def variable_names(variables: list[Any], model_name: str) -> list[str]:
    """Keras' variable paths, without the watched model's own name: "dense/kernel"."""
    paths = [getattr(v, "path", None) or v.name.split(":")[0] for v in variables]
    return [path.removeprefix(f"{model_name}/") if model_name else path for path in paths]


@dataclass(frozen=True)
class Summary:
    """The vector a traced step publishes on logged steps and the callback reads in one
    transfer: [step, loss scale, skipped (1 where a loss-scale optimizer skips this step),
    then per variable: gradient norms, gradient NaN/Inf counts (NaN where a variable had no
    gradient), weight norms, weight NaN/Inf counts]."""

    count: int  # variables

    HEAD = 3
    FIELDS = ("grad_norms", "grad_nonfinite", "weight_norms", "weight_nonfinite")

    @property
    def size(self) -> int:
        return self.HEAD + len(self.FIELDS) * self.count

    def initial(self) -> tf.Tensor:
        return tf.concat([tf.constant([-1.0, 1.0, 0.0], tf.float64), tf.zeros([self.size - 3], tf.float64)], 0)

    def read(self, vector: np.ndarray) -> tuple[int, float, bool, dict[str, np.ndarray]]:
        """The step, the loss scale, whether the step was skipped, and each field by name."""
        start = self.HEAD
        fields = {
            name: vector[start + k * self.count : start + (k + 1) * self.count] for k, name in enumerate(self.FIELDS)
        }
        return int(vector[0]), float(vector[1]), bool(vector[2]), fields


class State:
    """The tf.Variables a traced step writes its statistics into, for one set of watched
    variables (a recompile that changes the trainable set makes a new State). Plain
    tf.Variables held here, never by the model or the optimizer, so checkpoints do not
    change."""

    def __init__(
        self,
        variables: list[Any],
        names: list[str],
        bins: int,
        gradients: bool,
        parameters: bool,
        *,
        stash: bool,
        shadows: bool,
    ) -> None:
        count = len(variables)
        self.variables = variables
        self.keys = tuple(id(v) for v in variables)
        self.names = names
        self.layout = Summary(count)
        self.fused = fuse(variables)
        self.bins = bins
        self.gradients, self.parameters = gradients, parameters

        def make(value: Any) -> tf.Variable:
            # Under a tf.distribute strategy these are mirrored and, with no aggregation, each
            # replica writes its own copy: the same statistics of the same summed gradients.
            # The host reads the first replica's.
            return tf.Variable(value, trainable=False)

        self.summary = make(self.layout.initial())
        self.histogram_step = make(tf.constant(-1, tf.int64))
        self.histogram_scale = make(tf.constant(1.0, tf.float64))
        self.histogram_present = make(tf.ones([count], tf.float64))  # 0 for a variable without a gradient
        # the flat tensors of the last due histogram step, one per fused group and kind
        self.grad_stash = [make(tf.zeros([g.total], g.dtype)) for g in self.fused] if stash and gradients else []
        self.weight_stash = [make(tf.zeros([g.total], g.dtype)) for g in self.fused] if stash and parameters else []
        self.update_step = make(tf.constant(-1, tf.int64))
        self.updates = make(tf.zeros([2, count], tf.float64))  # ‖w_after - w_before‖, ‖w_before‖
        self.shadows = [make(tf.zeros([g.total], g.dtype)) for g in self.fused] if shadows else []
        self._histograms = tf.function(self._rows, autograph=False) if stash else None

    def _rows(self) -> tf.Tensor:
        rows = []
        for stashes, divide in ((self.grad_stash, True), (self.weight_stash, False)):
            if not stashes:
                continue
            per_group = []
            for group, stash in zip(self.fused, stashes):
                flat = tf.convert_to_tensor(stash)
                if divide:  # undo the loss scale as the optimizer does
                    flat = flat / tf.cast(self.histogram_scale, group.dtype)
                per_group.append(histogram_rows(flat, group.ids(), len(group.sizes), self.bins))
            rows.append(in_order(self.fused, per_group))
        return tf.concat(rows, 0)

    def histograms(self) -> np.ndarray:
        """The rows of the last stashed step: [gradients..., weights...] in variable order."""
        assert self._histograms is not None
        return np.asarray(self._histograms())
