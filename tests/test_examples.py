"""Every example runs, finishes, and writes the charts it promises."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from helpers import read_events, requires
from normlog import _step

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


def test_torch_quickstart(tmp_path) -> None:
    requires("torch")
    out = run_example("torch/quickstart.py", "--logdir", str(tmp_path), "--steps", "120")
    assert f"tensorboard --logdir {tmp_path}" in out
    events = read_events(str(tmp_path))
    tags = events.Tags()
    assert {
        "loss",
        _step.GLOBAL_NORM,
        _step.norm_tag("gradients", "0.weight"),
        _step.norm_tag("parameters", "4.bias"),
    } <= set(tags["scalars"])
    assert len(events.Scalars(_step.GLOBAL_NORM)) == 120
    assert [e.step for e in events.Histograms(_step.histogram_tag("gradients", "0.weight"))] == [0, 100]
    assert [e.step for e in events.Scalars(_step.ratio_tag("2.weight"))] == [0, 100]


def test_torch_vanishing_gradients_shows_tanh_early_layers_vanishing(tmp_path) -> None:
    requires("torch")
    run_example("torch/vanishing_gradients.py", "--logdir", str(tmp_path), "--epochs", "30")

    def late_norm(run: str, layer: int) -> float:
        norms = [
            e.value
            for e in read_events(str(tmp_path / run)).Scalars(_step.norm_tag("gradients", f"layers.{layer}.weight"))
        ]
        return float(np.median(norms[-100:]))

    # What a user reads off the two runs: tanh's first layer gets a tiny fraction of the
    # gradient its last hidden layer gets; relu's layers stay within the same order.
    assert late_norm("tanh", 0) < 0.02 * late_norm("tanh", 9)
    assert late_norm("relu", 0) > 0.2 * late_norm("relu", 9)


def keras_run(path: str, *args: str) -> str:
    requires("tensorflow")
    requires("keras")
    return run_example(path, *args)


def test_keras_quickstart(tmp_path) -> None:
    out = keras_run("keras/quickstart.py", "--logdir", str(tmp_path), "--epochs", "1")
    assert f"tensorboard --logdir {tmp_path}" in out
    events = read_events(str(tmp_path))
    assert len(events.Scalars(_step.norm_tag("gradients", "conv/kernel"))) == 64  # 4096 images / 64 per batch
    assert {_step.histogram_tag("gradients", "dense/kernel"), _step.histogram_tag("parameters", "logits/bias")} <= set(
        events.Tags()["histograms"]
    )
    assert [e.step for e in events.Scalars(_step.ratio_tag("conv/kernel"))] == [0]


def test_keras_gradient_tape_loop(tmp_path) -> None:
    keras_run("keras/gradient_tape_loop.py", "--logdir", str(tmp_path), "--epochs", "5")
    events = read_events(str(tmp_path))
    for tag in (
        _step.histogram_tag("gradients", "layer1/kernel"),
        _step.histogram_tag("gradients", "layer1/bias"),
        _step.histogram_tag("parameters", "layer1/kernel"),
    ):
        assert [e.step for e in events.Histograms(tag)] == [0, 1, 2, 3, 4]
    assert len(events.Scalars("loss")) == 5


def test_keras_vanishing_gradients_shows_tanh_early_layers_vanishing(tmp_path) -> None:
    keras_run("keras/vanishing_gradients.py", "--logdir", str(tmp_path))

    def late_norm(run: str, layer: int) -> float:
        norms = [
            e.value
            for e in read_events(str(tmp_path / run)).Scalars(_step.norm_tag("gradients", f"hidden_{layer}/kernel"))
        ]
        return float(np.median(norms[-100:]))

    assert late_norm("tanh", 0) < 0.1 * late_norm("tanh", 9)
    assert late_norm("relu", 0) > 0.5 * late_norm("relu", 9)


def test_keras_binary_classifier(tmp_path) -> None:
    keras_run("keras/binary_classifier.py", "--logdir", str(tmp_path), "--epochs", "2")
    events = read_events(str(tmp_path / "gradients"))
    assert len(events.Scalars(_step.norm_tag("gradients", "layer1/kernel"))) == 64  # 2000 / 64 -> 32 batches x 2 epochs
    assert [e.step for e in events.Histograms(_step.histogram_tag("gradients", "layer3/kernel"))] == [0, 20, 40, 60]
