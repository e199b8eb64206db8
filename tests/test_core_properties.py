"""Property tests of the core (hypothesis): any shape and real dtype, with NaN, ±Inf,
subnormals, ±1e300, empty and 0-d arrays. The promises: bucket counts sum to the finite
count, limits increase, min <= every finite value <= max, the parts merge into the whole,
and nothing raises but the documented TypeError for non-real input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import normlog

# numpy's overflow and invalid-value warnings would mean a wrong intermediate: fail on them
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

SPECIAL = [np.nan, np.inf, -np.inf, 0.0, -0.0, 5e-324, -5e-324, 2.2e-308, 1e300, -1e300, 1.7976931348623157e308]
REAL_DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8, np.uint64, np.bool_]


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(REAL_DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6))
    if dtype.kind == "f":
        info = np.finfo(dtype)
        specials = [v for v in SPECIAL if not math.isfinite(v) or abs(v) <= float(info.max)]
        elements = st.one_of(
            st.floats(width=8 * dtype.itemsize, allow_nan=True, allow_infinity=True, allow_subnormal=True),
            st.sampled_from(specials),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # 1e300 as float16 and such
            return draw(hnp.arrays(dtype, shape, elements=elements))
    return draw(hnp.arrays(dtype, shape))


def finite_float64(values: np.ndarray) -> np.ndarray:
    flat = values.astype(np.float64).reshape(-1)
    return flat[np.isfinite(flat)]


@settings(deadline=None)
@given(values=arrays(), bins=st.integers(1, 40))
def test_histogram_counts_every_finite_value_once_within_increasing_limits(values, bins) -> None:
    hist = normlog.histogram(values, bins)
    finite = finite_float64(values)
    flat = values.astype(np.float64).reshape(-1)
    assert int(hist.counts.sum()) == hist.num == finite.size
    assert (hist.nan, hist.posinf, hist.neginf) == (
        int(np.isnan(flat).sum()),
        int((flat == np.inf).sum()),
        int((flat == -np.inf).sum()),
    )
    with np.errstate(over="ignore"):  # the gap from -1e300 to 1.8e308 is inf, and still >= 0
        assert np.all(np.diff(hist.edges) >= 0) and np.all(np.diff(hist.bucket_limits) >= 0)
    assert np.all(np.isfinite(hist.edges))
    if finite.size:
        assert hist.min <= finite.min() and finite.max() <= hist.max
        assert hist.min == finite.min() and hist.max == finite.max()
        # each value sits in the bucket whose edges hold it, up to the rounding of TF's rule
        # floor((x - min) / width), a few ulps of the range (TensorFlow bins alike)
        index = np.repeat(np.arange(hist.counts.size), hist.counts)
        ordered = np.sort(finite)
        slack = 4 * np.finfo(np.float64).eps * max(abs(hist.min), abs(hist.max))
        with np.errstate(over="ignore"):  # edges near DBL_MAX plus slack are inf: still a bound
            assert np.all(hist.edges[index] - slack <= ordered) and np.all(ordered <= hist.edges[index + 1] + slack)


@settings(deadline=None)
@given(values=arrays())
def test_summarize_counts_and_bounds(values) -> None:
    stats = normlog.summarize(values)
    finite = finite_float64(values)
    assert stats.count == values.size and stats.finite == finite.size
    assert stats.nan + stats.posinf + stats.neginf == values.size - finite.size == stats.nonfinite
    assert stats.zeros == int((finite == 0).sum())
    if finite.size:
        assert stats.min == finite.min() and stats.max == finite.max()
        assert stats.min <= stats.mean <= stats.max or not math.isfinite(stats.mean)
        assert stats.std >= 0 and stats.norm >= 0
    norm = normlog.l2_norm(values)
    assert norm >= 0 or math.isnan(norm)


@settings(deadline=None)
@given(values=arrays(), cuts=st.lists(st.integers(0, 300), max_size=4), bins=st.integers(1, 40))
def test_parts_merge_into_the_whole(values, cuts, bins) -> None:
    flat = values.reshape(-1)
    parts = np.split(flat, sorted(c % (flat.size + 1) for c in cuts))
    whole = normlog.histogram(flat, bins)
    if whole.num and whole.min < whole.max:
        span = (whole.min, whole.max)
        merged = normlog.histogram(parts[0], bins, range=span).merge(
            *(normlog.histogram(part, bins, range=span) for part in parts[1:])
        )
        np.testing.assert_array_equal(merged.edges, whole.edges)
        np.testing.assert_array_equal(merged.counts, whole.counts)
        assert (merged.num, merged.nan, merged.posinf, merged.neginf) == (
            whole.num,
            whole.nan,
            whole.posinf,
            whole.neginf,
        )
    stats = normlog.summarize(parts[0]).merge(*(normlog.summarize(part) for part in parts[1:]))
    alone = normlog.summarize(flat)
    for field in ("count", "finite", "nan", "posinf", "neginf", "zeros", "min", "max"):
        assert getattr(stats, field) == getattr(alone, field), field
    if math.isfinite(alone.norm):
        assert stats.norm == pytest.approx(alone.norm, rel=1e-9, abs=1e-300)


@settings(deadline=None)
@given(
    values=st.one_of(
        hnp.arrays(np.complex128, hnp.array_shapes(min_dims=0, max_dims=2)),
        hnp.arrays(hnp.unicode_string_dtypes(), hnp.array_shapes(min_dims=0, max_dims=2)),
        st.builds(np.array, st.lists(st.text(), min_size=1)),
    )
)
def test_non_real_input_is_the_only_thing_that_raises_and_it_is_a_type_error(values) -> None:
    for function in (normlog.histogram, normlog.summarize, normlog.l2_norm):
        with pytest.raises(TypeError):
            function(values)


def row(hist: normlog.Histogram, bins: int) -> np.ndarray:
    """The row an adapter hands over for `hist` (see normlog._rows)."""
    from normlog import _rows

    return _rows.from_histogram(hist, bins)


@settings(deadline=None)
@given(parts=st.lists(arrays(), min_size=1, max_size=6), bins=st.integers(1, 40))
def test_histograms_from_many_rows_equal_the_histogram_of_each(parts, bins) -> None:
    # adapters hand over one row per tensor and convert them all at once; the edges of the
    # batch must be those the core gives each tensor alone, to the last bit
    from normlog._rows import histograms

    alone = [normlog.histogram(part, bins) for part in parts]
    batch = histograms(np.array([row(hist, bins) for hist in alone]), bins)
    for got, expected in zip(batch, alone):
        np.testing.assert_array_equal(got.edges, expected.edges)
        np.testing.assert_array_equal(got.counts, expected.counts)


@settings(deadline=None)
@given(parts=st.lists(arrays(), min_size=1, max_size=6), bins=st.integers(1, 40))
def test_rows_encode_to_the_bytes_of_their_histograms(parts, bins) -> None:
    # the writer packs the rows of a logged step without making Histogram objects; each
    # value must be the bytes it writes for that row's Histogram
    from normlog._proto import encode_histogram_rows, encode_summary
    from normlog._rows import HistogramRows, histograms

    rows = np.array([row(normlog.histogram(part, bins), bins) for part in parts])
    tags = [f"gradients/layer{i}" for i in range(len(parts))]
    expected = [encode_summary([], [(tag, h)]) for tag, h in zip(tags, histograms(rows, bins))]
    assert encode_histogram_rows(HistogramRows(tags, rows, bins)) == expected
