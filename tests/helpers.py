"""Test helpers: the one skip rule for optional frameworks, and TensorBoard's own reader."""

from __future__ import annotations

import glob
import importlib
import os
import sys
from types import ModuleType
from typing import Any

import numpy as np
import pytest


def requires(module: str) -> ModuleType:
    """Import an optional framework, or skip the test without it.

    NORMLOG_REQUIRE (comma-separated module names) turns that skip into a failure, so an
    environment that must have the framework (CI, tox -e torch) cannot pass by skipping.
    """
    required = {name.strip() for name in os.environ.get("NORMLOG_REQUIRE", "").split(",") if name.strip()}
    if module in required:
        found = importlib.import_module(module)
    else:
        found = pytest.importorskip(module)
    if getattr(found, "__file__", None) is None and not hasattr(found, "__version__"):
        # Not installed, but tests/torch or tests/keras (which mirror the package) were found
        # on sys.path as an empty namespace package of that name: forget it.
        del sys.modules[module]
        if module in required:
            raise ImportError(f"{module} is required (NORMLOG_REQUIRE) but not installed")
        pytest.skip(f"could not import {module!r}: not installed", allow_module_level=True)
    return found


def event_files(logdir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True))


def read_events(path: str) -> Any:
    """An EventAccumulator over one event file or run directory, with nothing sampled away."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(path, size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalars(accumulator: Any, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def histogram_buckets(value: Any) -> np.ndarray:
    """(left, right, count) rows, the way TensorBoard's histogram plugin reads a HistogramProto."""
    rights = [*value.bucket_limit[:-1], value.max]
    lefts = [value.min, *value.bucket_limit[:-1]]
    return np.array([lefts, rights, list(value.bucket)], dtype=np.float64).T


def assert_same_histogram(got: Any, expected: Any) -> None:
    """Two normlog.Histograms with the same edges, counts, bounds and non-finite counts."""
    np.testing.assert_array_equal(got.edges, expected.edges)
    np.testing.assert_array_equal(got.counts, expected.counts)
    fields = ("min", "max", "num", "nan", "posinf", "neginf")
    assert [getattr(got, f) for f in fields] == [getattr(expected, f) for f in fields]


def row_histogram(row: Any, bins: int) -> Any:
    """The normlog.Histogram an adapter's row describes (`normlog._rows`)."""
    from normlog import _rows

    return _rows.histograms(np.asarray(row, dtype=np.float64)[None], bins)[0]


CHROMIUM = "/usr/bin/chromium"  # Debian's package; playwright never downloads a browser here


def chromium() -> str:
    """The browser's path, or a skip (a failure when NORMLOG_REQUIRE names chromium)."""
    required = {name.strip() for name in os.environ.get("NORMLOG_REQUIRE", "").split(",") if name.strip()}
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    if "chromium" in required:
        pytest.fail(f"NORMLOG_REQUIRE names chromium, and there is no {CHROMIUM} (apt-get install chromium)")
    pytest.skip(f"no {CHROMIUM}")
