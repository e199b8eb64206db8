"""The fastest cases of the findings benchmark (benchmarks/findings), recorded afresh with
torch on the CPU: a healthy run raises no finding, a broken one has its problem found."""

from __future__ import annotations

import os
import sys

import pytest

from helpers import requires

BENCHMARK = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "findings")

# the quickest of each kind: a second or less each on one CPU thread
HEALTHY = ("mlp_adam", "frozen_backbone", "logistic_separable", "unused_and_excluded", "zero_init_head")
BROKEN = ("lr_too_high", "corrupted_batch", "dead_relu", "nan_from_log0", "nan_weight", "stalled_group")


def run(name: str, seed: int = 0):
    """The scenario recorded now, its StepValues and its findings, scored as bench.py does."""
    requires("torch")
    sys.path.insert(0, BENCHMARK)
    try:
        import bench
    finally:
        sys.path.remove(BENCHMARK)
    return bench.fresh(name, seed)


@pytest.mark.parametrize("name", HEALTHY)
def test_a_healthy_run_raises_no_finding(name: str) -> None:
    score, _, findings = run(name)
    assert score.healthy
    assert findings == []


@pytest.mark.parametrize("name", BROKEN)
def test_a_broken_run_has_its_problem_found_and_nothing_else(name: str) -> None:
    score, _, _ = run(name)
    assert not score.healthy
    assert [rule for rule, delay in score.found if delay is None] == []  # nothing missed
    assert [f.message for f, true in score.findings if not true] == []  # no false finding
    delays = {rule: delay for rule, delay in score.found}
    if "exploding" in delays or "nonfinite" in delays:
        assert min(delays.values()) <= 4
