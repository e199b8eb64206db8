"""Every example runs, finishes, and writes the charts it promises."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import read_events, requires

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


def run_example(path: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, path), *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_torch_custom_loop(tmp_path) -> None:
    requires("torch")
    requires("matplotlib")
    out = run_example("torch/custom_loop.py", "--logdir", str(tmp_path), "--steps", "40")
    assert f"tensorboard --logdir {tmp_path}" in out
    train = read_events(str(tmp_path / "train"))
    tags = train.Tags()
    assert {"layer1/weights", "layer1/biases", "layer1/weights/gradients"} <= set(tags["histograms"])
    assert {"loss", "layer1/weights/norm", "layer1/biases/gradients/std"} <= set(tags["scalars"])
    assert [event.step for event in train.Histograms("layer1/weights")] == [0, 10, 20, 30]
    assert tags["images"] == ["fit"]
    assert len(read_events(str(tmp_path / "test")).Scalars("loss")) == 40
