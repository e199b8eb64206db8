"""The JAX examples run and write what they promise (read back with TensorBoard's reader):
the optax MLP, and Keras on the JAX backend with TensorFlow blocked."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import read_events, requires, scalars

requires("jax")

from normlog._step import GLOBAL_NORM, histogram_tag, norm_tag, ratio_tag  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "examples", "jax")


def run(script: str, *args: str, block_tensorflow: bool = False) -> str:
    command = [sys.executable, os.path.join(EXAMPLES, script), *args]
    if block_tensorflow:  # as where TensorFlow is not installed
        code = "import runpy, sys; sys.modules['tensorflow'] = None; sys.argv = sys.argv[1:]; "
        command = [sys.executable, "-c", code + "runpy.run_path(sys.argv[0], run_name='__main__')", *command[1:]]
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_optax_mlp_example(tmp_path) -> None:
    requires("optax")
    out = run("optax_mlp.py", "--logdir", str(tmp_path), "--steps", "120")
    assert "steps logged: 120" in out
    events = read_events(str(tmp_path))
    assert sorted(scalars(events, GLOBAL_NORM)) == list(range(120))
    assert sorted(scalars(events, norm_tag("gradients", "layer0/kernel"))) == list(range(120))
    assert [e.step for e in events.Histograms(histogram_tag("gradients", "layer2/kernel"))] == [0, 100]
    assert sorted(scalars(events, ratio_tag("layer1/kernel"))) == [0, 100]


def test_keras_jax_fit_example(tmp_path) -> None:
    requires("keras")
    out = run("keras_jax_fit.py", "--logdir", str(tmp_path), "--epochs", "1", block_tensorflow=True)
    assert "accuracy" in out
    events = read_events(str(tmp_path))
    assert sorted(scalars(events, GLOBAL_NORM)) == list(range(32))  # 2048 / 64 batches
    assert sorted(scalars(events, norm_tag("parameters", "hidden/kernel"))) == list(range(32))
    assert [e.step for e in events.Histograms(histogram_tag("gradients", "logits/kernel"))] == [0]
