"""The core against numpy computed independently on the same data."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

import normlog
from helpers import requires

RNG = np.random.default_rng(1234)


def tf_rule_counts(x: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """tf.summary.histogram's bucketing, written out plainly on the whole array."""
    lo, hi = x.min(), x.max()
    width = (hi - lo) / bins
    index = np.minimum(np.floor((x - lo) / width).astype(np.int64), bins - 1)
    edges = np.linspace(lo, hi, bins + 1)
    edges[-1] = hi
    return edges, np.bincount(index, minlength=bins)


# -- l2_norm -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_l2_norm_matches_numpy(dtype: type) -> None:
    x = RNG.normal(size=(64, 33)).astype(dtype)
    assert normlog.l2_norm(x) == pytest.approx(np.linalg.norm(x.astype(np.float64)), rel=1e-12)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.full(4, 60000, dtype=np.float16), 120000.0),  # float16 squares overflow at 65504
        (np.full(100, 1e200), 1e201),
        (np.full(100, 1e-200), 1e-199),
        (np.array([3e-320, 4e-320]), 5e-320),  # subnormals
        (np.array([-3.0, 4.0]), 5.0),
    ],
)
def test_l2_norm_is_scale_safe(values: np.ndarray, expected: float) -> None:
    assert normlog.l2_norm(values) == pytest.approx(expected, rel=1e-12)


def test_l2_norm_follows_numpy_on_nonfinite() -> None:
    assert math.isnan(normlog.l2_norm([1.0, np.nan, np.inf]))
    assert normlog.l2_norm([1.0, -np.inf]) == math.inf
    assert normlog.l2_norm([]) == 0.0


def test_l2_norm_of_python_scalars_and_lists() -> None:
    assert normlog.l2_norm(3) == 3.0
    assert normlog.l2_norm([[3, 4], [0, 0]]) == 5.0


# -- summarize ----------------------------------------------------------------------


def test_summarize_matches_numpy_with_nonfinite_values() -> None:
    x = RNG.normal(3.0, 2.0, size=5000)
    x[1000:1500] = 0.0
    x[10] = np.nan
    x[11] = np.nan
    x[20] = np.inf
    x[30] = -np.inf
    finite = x[np.isfinite(x)]
    stats = normlog.summarize(x)
    assert (stats.count, stats.finite, stats.nan, stats.posinf, stats.neginf) == (5000, 4996, 2, 1, 1)
    assert stats.nonfinite == 4
    assert stats.zeros == 500
    assert stats.zero_fraction == 500 / 5000
    assert (stats.min, stats.max) == (finite.min(), finite.max())
    assert stats.mean == pytest.approx(finite.mean(), rel=1e-12)
    assert stats.std == pytest.approx(finite.std(), rel=1e-12)
    assert stats.norm == pytest.approx(np.linalg.norm(finite), rel=1e-12)


def test_summarize_empty_and_all_nonfinite() -> None:
    assert normlog.summarize(np.array([])) == normlog.Stats(0, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0)
    stats = normlog.summarize([np.nan, np.inf, -np.inf, np.nan])
    assert (stats.count, stats.finite, stats.nan, stats.posinf, stats.neginf) == (4, 0, 2, 1, 1)
    assert (stats.min, stats.max, stats.mean, stats.std, stats.norm) == (0.0, 0.0, 0.0, 0.0, 0.0)


def test_summarize_of_huge_values_has_finite_moments() -> None:
    x = np.array([1e300, -1e300, 3e300])
    stats = normlog.summarize(x)
    assert stats.mean == pytest.approx(1e300, rel=1e-12)
    assert stats.std == pytest.approx(np.std(x / 1e300) * 1e300, rel=1e-12)
    assert stats.norm == pytest.approx(math.sqrt(11) * 1e300, rel=1e-12)


# -- histogram ----------------------------------------------------------------------


@pytest.mark.parametrize("bins", [1, 7, 30, 64])
def test_default_histogram_follows_tensorflows_rule(bins: int) -> None:
    x = RNG.standard_t(3, size=20_000)
    hist = normlog.histogram(x, bins)
    edges, counts = tf_rule_counts(x, bins)
    np.testing.assert_array_equal(hist.edges, edges)
    np.testing.assert_array_equal(hist.counts, counts)
    assert hist.counts.sum() == hist.num == x.size


def test_default_histogram_matches_numpy_histogram_on_random_data() -> None:
    x = RNG.normal(size=100_000).astype(np.float32)
    hist = normlog.histogram(x)
    counts, edges = np.histogram(x.astype(np.float64), bins=30)
    np.testing.assert_array_equal(hist.counts, counts)
    np.testing.assert_allclose(hist.edges, edges, rtol=1e-15)
    x64 = x.astype(np.float64)
    assert (hist.min, hist.max, hist.num) == (x64.min(), x64.max(), x.size)
    assert hist.sum == pytest.approx(x64.sum(), rel=1e-9, abs=1e-9)
    assert hist.sum_squares == pytest.approx(x64 @ x64, rel=1e-12)
    np.testing.assert_array_equal(hist.bucket_limits, hist.edges[1:])


def test_nonfinite_values_are_counted_not_binned() -> None:
    hist = normlog.histogram([1.0, np.nan])
    assert (hist.min, hist.max, hist.sum, hist.num, hist.nan) == (1.0, 1.0, 1.0, 1, 1)
    x = np.concatenate([RNG.normal(size=1000), [np.nan] * 3, [np.inf] * 2, [-np.inf]])
    hist = normlog.histogram(x)
    finite = x[np.isfinite(x)]
    assert (hist.nan, hist.posinf, hist.neginf, hist.nonfinite) == (3, 2, 1, 6)
    assert (hist.min, hist.max) == (finite.min(), finite.max())
    assert hist.sum == pytest.approx(finite.sum())
    np.testing.assert_array_equal(hist.counts, np.histogram(finite, bins=30)[0])


@pytest.mark.parametrize("values", [np.array([]), np.full(5, np.nan), np.array([np.inf, -np.inf, np.nan])])
def test_empty_and_all_nonfinite_give_an_empty_histogram(values: np.ndarray) -> None:
    hist = normlog.histogram(values)
    assert hist.num == 0 and hist.counts.sum() == 0 and hist.counts.size == 30
    np.testing.assert_array_equal(hist.edges, np.zeros(31))
    assert (hist.min, hist.max, hist.sum, hist.sum_squares) == (0.0, 0.0, 0.0, 0.0)
    assert hist.nonfinite == int(np.count_nonzero(~np.isfinite(values)))


def test_constant_input_gives_one_bucket() -> None:
    hist = normlog.histogram(np.full(17, 2.5))
    np.testing.assert_array_equal(hist.edges, [2.5, 2.5])
    np.testing.assert_array_equal(hist.counts, [17])
    assert (hist.min, hist.max, hist.sum) == (2.5, 2.5, 42.5)
    assert hist.sum_squares == pytest.approx(17 * 6.25, rel=1e-15)


def test_tensorflow_bins_are_tensorboardx_default_bins_plus_outer_buckets(tmp_path) -> None:
    tensorboardx = pytest.importorskip("tensorboardX")
    expected = np.array(tensorboardx.SummaryWriter(str(tmp_path)).default_bins)
    x = np.concatenate([RNG.normal(size=1000), [1e25, -3e30, 0.0]])  # tensorboardX raises beyond 1e20
    hist = normlog.histogram(x, bins="tensorflow")
    np.testing.assert_array_equal(hist.edges[1:-1], expected)
    assert hist.edges[0] == -np.finfo(np.float64).max and hist.edges[-1] == np.finfo(np.float64).max
    assert hist.counts.sum() == x.size
    assert hist.counts[0] == 1 and hist.counts[-1] == 1
    inner, _ = np.histogram(x[np.abs(x) < 1e20], bins=expected)
    np.testing.assert_array_equal(hist.counts[1:-1], inner)


def test_explicit_edges_clamp_out_of_range_values_into_the_end_buckets() -> None:
    x = RNG.uniform(-2, 2, size=5000)
    edges = [-1.0, -0.5, 0.0, 0.5, 1.0]
    hist = normlog.histogram(x, bins=edges)
    inside, _ = np.histogram(np.clip(x, -1.0, 1.0), bins=edges)
    np.testing.assert_array_equal(hist.counts, inside)
    assert hist.counts.sum() == x.size
    assert (hist.min, hist.max) == (x.min(), x.max())


@pytest.mark.parametrize("bins", [0, -3, "auto", [1.0], [1.0, 1.0], [0.0, np.inf], True])
def test_bad_bins_raise_value_error(bins: object) -> None:
    with pytest.raises(ValueError, match="bins"):
        normlog.histogram([1.0, 2.0], bins=bins)  # type: ignore[arg-type]


# -- dtypes -------------------------------------------------------------------------

REAL_DTYPES = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
REAL_DTYPES += [np.float16, np.float32, np.float64, np.longdouble]


@pytest.mark.parametrize("dtype", REAL_DTYPES)
def test_every_real_numpy_dtype(dtype: type) -> None:
    x = (RNG.normal(size=300) * 50).astype(dtype)
    as64 = x.astype(np.float64)
    assert normlog.l2_norm(x) == pytest.approx(np.linalg.norm(as64), rel=1e-12)
    np.testing.assert_array_equal(normlog.histogram(x).counts, normlog.histogram(as64).counts)


@pytest.mark.parametrize("name", ["bfloat16", "float8_e4m3fn", "float8_e5m2"])
def test_ml_dtypes_floats(name: str) -> None:
    ml_dtypes = requires("ml_dtypes")
    x = RNG.normal(size=300).astype(getattr(ml_dtypes, name))
    as64 = x.astype(np.float64)
    assert normlog.summarize(x).norm == pytest.approx(np.linalg.norm(as64[np.isfinite(as64)]), rel=1e-12)
    np.testing.assert_array_equal(normlog.histogram(x).counts, normlog.histogram(as64).counts)


@pytest.mark.parametrize("values", [np.array([1 + 2j]), np.array(["a", "b"]), np.array([object()])])
def test_non_real_input_raises_type_error(values: np.ndarray) -> None:
    for function in (normlog.l2_norm, normlog.summarize, normlog.histogram):
        with pytest.raises(TypeError):
            function(values)


# -- merging parts --------------------------------------------------------------------


def test_stats_of_parts_merge_into_stats_of_the_whole() -> None:
    x = np.concatenate([RNG.normal(5, 3, size=10_000), [np.nan, np.inf, 0.0, -np.inf]])
    RNG.shuffle(x)
    parts = np.array_split(x, [3, 4000, 4000, 9000])  # one part is empty
    merged = normlog.summarize(parts[0]).merge(*(normlog.summarize(part) for part in parts[1:]))
    whole = normlog.summarize(x)
    for field in ("count", "finite", "nan", "posinf", "neginf", "zeros", "min", "max"):
        assert getattr(merged, field) == getattr(whole, field), field
    for field in ("mean", "std", "norm"):
        assert getattr(merged, field) == pytest.approx(getattr(whole, field), rel=1e-12), field


def test_histograms_of_parts_merge_into_the_histogram_of_the_whole() -> None:
    x = np.concatenate([RNG.normal(size=50_000), [np.nan, np.inf]])
    parts = np.array_split(x, 7)
    whole = normlog.histogram(x, bins=30)
    part_hists = [normlog.histogram(part, bins=30, range=(whole.min, whole.max)) for part in parts]
    merged = part_hists[0].merge(*part_hists[1:])
    np.testing.assert_array_equal(merged.edges, whole.edges)
    np.testing.assert_array_equal(merged.counts, whole.counts)
    assert (merged.min, merged.max, merged.num, merged.nan, merged.posinf) == (
        whole.min,
        whole.max,
        whole.num,
        whole.nan,
        whole.posinf,
    )
    assert merged.sum == pytest.approx(whole.sum, rel=1e-9, abs=1e-9)
    assert merged.sum_squares == pytest.approx(whole.sum_squares, rel=1e-12)


def test_merging_histograms_with_other_edges_raises() -> None:
    with pytest.raises(ValueError, match="edges"):
        normlog.histogram([1.0, 2.0]).merge(normlog.histogram([1.0, 3.0]))


def test_results_are_frozen() -> None:
    hist = normlog.histogram([1.0, 2.0, 3.0])
    with pytest.raises(AttributeError):
        hist.num = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="read-only"):
        hist.counts[0] = 5


# -- size ---------------------------------------------------------------------------


@pytest.mark.parametrize("contiguous", [True, False])
def test_hundred_million_elements_in_bounded_memory(contiguous: bool) -> None:
    n = 100_000_001
    if contiguous:
        x = np.ones(n, dtype=np.float16)
        x[::1000] = -3.0
        x[5] = np.nan
    else:  # a strided view: no reshape may copy it whole
        x = np.broadcast_to(np.float32(0.5), (n // 1000 + 1, 1000))[:, ::1]
        x = x.T  # Fortran-ordered view of 100M elements
    tracemalloc.start()
    try:
        hist = normlog.histogram(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert hist.num + hist.nan == x.size
    assert peak < 80e6, f"peak extra memory {peak / 1e6:.0f} MB for a {x.nbytes / 1e6:.0f} MB input"
    if contiguous:
        assert (hist.counts[0], hist.counts[-1], hist.nan) == (
            len(range(0, n, 1000)),
            n - len(range(0, n, 1000)) - 1,
            1,
        )
