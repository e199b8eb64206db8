"""Keras under tf.distribute.MirroredStrategy, on two logical CPUs in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import event_files, read_events, requires, scalars
from normlog._step import histogram_tag, norm_tag


def test_keras_mirrored_strategy_logs_the_summed_gradients_once(tmp_path) -> None:
    # Guarantee: under MirroredStrategy (two logical CPUs) the logged gradients are the
    # replicas' summed ones, the gradients of the whole batch, and one event file is written.
    requires("tensorflow")
    requires("keras")
    worker = os.path.join(os.path.dirname(__file__), "keras_mirrored_worker.py")
    process = subprocess.run(
        [sys.executable, worker, str(tmp_path)], capture_output=True, text=True, timeout=300, env=dict(os.environ)
    )
    assert process.returncode == 0, process.stderr[-5000:]
    result = json.loads(process.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    events = read_events(str(tmp_path))
    for name, norms in result["expected"].items():
        logged = scalars(events, norm_tag("gradients", name))
        assert [logged[step] for step in range(len(norms))] == pytest.approx(norms, rel=1e-5), name
        assert len(events.Histograms(histogram_tag("gradients", name))) == len(norms)
    assert len(event_files(str(tmp_path))) == 1
