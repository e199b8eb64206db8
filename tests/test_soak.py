"""The soak benchmark's short version (benchmarks/soak.py runs 100,000 steps): memory
stays flat after warm-up and the event file grows linearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import requires

SOAK = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "soak.py")


def test_a_long_run_keeps_memory_flat_and_the_file_growing_linearly() -> None:
    # Guarantee: resident memory grows less than 20 MB after warm-up, and every tenth of the
    # run adds the same bytes per step (histograms every 100 steps: within 5%).
    requires("torch")
    process = subprocess.run(
        [sys.executable, "-W", "ignore", SOAK, "--steps", "4000", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    result = json.loads(process.stdout)
    assert result["rss_growth_mb"] < 20
    assert result["bytes_per_step_max_tenth"] <= 1.05 * result["bytes_per_step_min_tenth"]
    assert 200 < result["bytes_per_step"] < 2000
