"""The JAX statistics (`normlog.jax._stats`) against the core, on the shared input set of
tests/test_engines.py: bounds, counts, NaN/Inf counts and edges bit for bit, sums to 1e-12;
and sums of squares and NaN/Inf counts of a mixed-dtype list against numpy, under jit."""

from __future__ import annotations

import numpy as np
import pytest
from tests import test_engines as shared

import normlog
from helpers import requires
from normlog import _rows

BINS = shared.BINS


def _jax_rows(arrays: list[np.ndarray]) -> np.ndarray:
    jax = requires("jax")
    jnp = jax.numpy
    from normlog.jax import _stats

    def as_jax(values: np.ndarray) -> object:
        if values.dtype == np.float64:
            with _stats.x64():
                return jnp.asarray(values)
        return jnp.asarray(values)

    leaves = [as_jax(a) for a in arrays]
    fused = _stats.fuse(leaves)

    @jax.jit
    def rows(*leaves: object) -> object:
        return _stats.to_host(_stats.rows(fused, list(leaves), BINS))

    return _stats.from_host(rows(*leaves))


@pytest.mark.parametrize("dtype", shared.DTYPES)
@pytest.mark.parametrize("case", list(shared._inputs()))
def test_jax_rows_are_the_cores(case: str, dtype: str) -> None:
    if case == "subnormal" and dtype == "float64":
        pytest.skip("XLA's CPU kernels flush subnormal float64 values to zero (as TensorFlow's do)")
    values = shared._as(dtype, shared._inputs()[case])
    expected_row = _rows.core_row(values, BINS)
    (got_row,) = _jax_rows([values])
    exact = [_rows.MIN, _rows.MAX, _rows.FINITE, _rows.NAN, _rows.POSINF, _rows.NEGINF]
    np.testing.assert_array_equal(got_row[exact], expected_row[exact])
    largest = max(abs(expected_row[_rows.MIN]), abs(expected_row[_rows.MAX]))
    slack = 1e-12 * max(1.0, expected_row[_rows.FINITE])
    assert got_row[_rows.SUM] == pytest.approx(expected_row[_rows.SUM], rel=1e-12, abs=slack * largest)
    assert got_row[_rows.SUM_SQUARES] == pytest.approx(expected_row[_rows.SUM_SQUARES], rel=slack)
    (got,) = _rows.histograms(got_row[None], BINS)
    expected = normlog.histogram(values, BINS)
    np.testing.assert_array_equal(got.edges, expected.edges)
    np.testing.assert_array_equal(got.counts, expected.counts)
