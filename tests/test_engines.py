"""Every engine that reduces a tensor to a histogram row gives the core's row: one shared set of
inputs, fed to the core (the spec), torch ops, the compiled CPU kernel (numba), the Keras graph
and, on CUDA, Triton. Bounds, counts, NaN/Inf counts and edges are compared bit for bit; the
sums, which each engine adds in its own order, to 1e-12."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import normlog
from helpers import requires
from normlog import _rows

BINS = 30
BIG = np.finfo(np.float64).max


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    normal = rng.normal(size=5000)
    return {
        "normal": normal,
        "nan and inf": np.concatenate([normal[:300], [np.nan, np.inf, -np.inf, np.nan]]),
        "all nan": np.full(7, np.nan),
        "empty": np.zeros(0),
        "constant": np.full(40, 0.25),
        "one value": np.array([-3.5]),
        "subnormal": np.array([1e-310, -2e-310, 0.0, 5e-324]),
        "near the largest double": np.array([-1.7e308, 0.0, 1e300, 1.7e308]),
        "wide": np.concatenate([normal * 1e30, [-1e35, 1e35]]),
        "ties at bucket borders": np.arange(0.0, 3.01, 0.1),
        "many blocks": rng.standard_cauchy(size=70_000),
    }


DTYPES = ["float16", "bfloat16", "float32", "float64"]


def _as(dtype: str, values: np.ndarray) -> np.ndarray:
    """`values` in `dtype` (what each engine then holds; past its range, ±inf); bfloat16
    through ml_dtypes."""
    with np.errstate(over="ignore"):
        if dtype == "bfloat16":
            return values.astype(requires("ml_dtypes").bfloat16)
        return values.astype(dtype)


def _float32_or_64(values: np.ndarray) -> np.ndarray:
    # float16 and bfloat16 are exact in float32: how the adapters feed the compiled kernel
    return values if values.dtype in (np.float32, np.float64) else values.astype(np.float32)


def _torch_ops(values: np.ndarray) -> np.ndarray:
    torch = requires("torch")
    from normlog.torch import _engines

    tensor = torch.from_numpy(_float32_or_64(values).copy())
    if values.dtype.name in ("float16", "bfloat16"):
        tensor = tensor.to(getattr(torch, values.dtype.name))
    saved = _engines.numba_kernel
    _engines.numba_kernel = lambda: None  # type: ignore[assignment]
    try:
        return _engines.histogram_row(tensor, BINS, mask_nonfinite=True).numpy()
    finally:
        _engines.numba_kernel = saved  # type: ignore[method-assign]


def _numba(values: np.ndarray) -> np.ndarray:
    requires("numba")
    from normlog import _numba

    return _numba.rows([_float32_or_64(values)], BINS)[0]


def _keras_graph(values: np.ndarray) -> np.ndarray:
    tf = requires("tensorflow")
    requires("keras")
    from normlog.keras._graph import histogram_row

    tensor = tf.constant(_float32_or_64(values))
    if values.dtype.name in ("float16", "bfloat16"):
        tensor = tf.cast(tensor, getattr(tf, values.dtype.name))
    return histogram_row(tensor, BINS).numpy()


def _triton(values: np.ndarray) -> np.ndarray:
    torch = requires("torch")
    if not torch.cuda.is_available():
        pytest.skip("Triton rows need a CUDA device")
    from normlog.torch import _triton

    tensor = torch.from_numpy(_float32_or_64(values).copy()).cuda()
    if values.dtype.name in ("float16", "bfloat16"):
        tensor = tensor.to(getattr(torch, values.dtype.name))
    if not _triton.supports(tensor):
        pytest.skip(f"Triton rows take float32, float16 and bfloat16, not {values.dtype}")
    return _triton.stats_rows([tensor], BINS)[0].cpu().numpy()


ENGINES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "torch ops": _torch_ops,
    "numba": _numba,
    "keras graph": _keras_graph,
    "triton": _triton,
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(_inputs()))
@pytest.mark.parametrize("engine", list(ENGINES))
def test_every_engine_gives_the_cores_row(engine: str, case: str, dtype: str) -> None:
    values = _as(dtype, _inputs()[case])
    if engine == "keras graph" and case == "subnormal" and dtype == "float64":
        pytest.skip("TensorFlow's CPU kernels flush subnormal float64 values to zero")
    expected_row = _rows.core_row(values, BINS)
    got_row = np.asarray(ENGINES[engine](values), dtype=np.float64)
    assert got_row.shape == expected_row.shape
    exact = [_rows.MIN, _rows.MAX, _rows.FINITE, _rows.NAN, _rows.POSINF, _rows.NEGINF]
    np.testing.assert_array_equal(got_row[exact], expected_row[exact])
    # sums: up to the rounding of n additions of values up to the largest magnitude
    largest = max(abs(expected_row[_rows.MIN]), abs(expected_row[_rows.MAX]))
    slack = 1e-12 * max(1.0, expected_row[_rows.FINITE])
    assert got_row[_rows.SUM] == pytest.approx(expected_row[_rows.SUM], rel=1e-12, abs=slack * largest)
    assert got_row[_rows.SUM_SQUARES] == pytest.approx(expected_row[_rows.SUM_SQUARES], rel=slack)
    (got,) = _rows.histograms(got_row[None], BINS)
    expected = normlog.histogram(values, BINS)
    np.testing.assert_array_equal(got.edges, expected.edges)
    np.testing.assert_array_equal(got.counts, expected.counts)


def test_the_triton_kernel_mirrors_the_rows_columns() -> None:
    torch = requires("torch")
    if not torch.cuda.is_available():
        pytest.skip("Triton is imported only with a CUDA device")
    from normlog.torch import _triton

    for name in ("MIN", "MAX", "SUM", "SUM_SQUARES", "FINITE", "NAN", "POSINF", "NEGINF", "HEAD"):
        assert getattr(_triton, name).value == getattr(_rows, name), name
