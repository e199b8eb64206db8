"""normlog.keras._variables, the helpers every Keras backend's adapter shares: the optimizers a
model holds, the names variables are logged under, and an optimizer's applied-update count.

The references are what the test itself built (the layer and model names it chose, the
optimizer instances it set, the number of `apply` calls it made) and Keras' own counters. The
same checks run on the TensorFlow backend in this process, and on JAX and torch in a
subprocess each (Keras reads KERAS_BACKEND once per process), which also shows that the module
works there without importing TensorFlow.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from helpers import requires

# The checks, as a script: run here on TensorFlow, and in subprocesses on JAX and torch.
CHECKS = textwrap.dedent(
    """
    import json, sys, warnings
    import numpy as np
    import keras
    from normlog.keras._variables import applied_steps, find_optimizers, step_counter, variable_names

    results = {"backend": keras.backend.backend()}

    # -- names: the model's own name stripped, nothing else -------------------------------
    net = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, name="dense"), keras.layers.Dense(1, name="head")], name="net"
    )
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="dense")], name="network")
    results["paths"] = [v.path for v in net.trainable_variables]
    results["names"] = variable_names(net.trainable_variables, net.name)
    results["unstripped"] = variable_names(net.trainable_variables)  # a lone optimizer: no model name
    results["other_model"] = variable_names(other.trainable_variables, "net")  # "network/..." is not "net/..."

    # -- a GAN's optimizers, set in its own compile ------------------------------------------
    class GAN(keras.Model):
        def __init__(self):
            super().__init__(name="gan")
            self.generator = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8)], name="generator")
            self.discriminator = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)], name="discriminator")

        def compile(self, d_optimizer, g_optimizer):
            super().compile(optimizer=keras.optimizers.SGD(0.5))
            self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer
            self.same_d_optimizer = d_optimizer  # one optimizer under two attributes is found once

    gan = GAN()
    d_optimizer, g_optimizer = keras.optimizers.Adam(1e-3), keras.optimizers.SGD(0.1)
    gan.compile(d_optimizer, g_optimizer)
    found = find_optimizers(gan)
    results["gan_found"] = list(found)
    results["gan_found_are_the_instances"] = found.get("d_optimizer") is d_optimizer and found.get(
        "g_optimizer"
    ) is g_optimizer
    results["gan_primary_excluded"] = all(o is not gan.optimizer for o in found.values())
    results["plain_model_found"] = list(find_optimizers(net))

    # -- applied updates: every apply, not iterations ------------------------------------------
    weight = keras.Variable(np.ones(3, "float32"), name="w")
    ones = keras.ops.ones((3,))
    accumulating = keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)
    for _ in range(4):
        accumulating.apply([ones], [weight])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read quietly (np.array(a Keras variable) warns under NumPy 2)
        applied = applied_steps(accumulating)
    results["accumulating"] = [applied, int(keras.ops.convert_to_numpy(accumulating.iterations))]
    inner = keras.optimizers.SGD(0.1)
    scaled = keras.optimizers.LossScaleOptimizer(inner)
    scaled.build([weight])
    for value in (1.0, 1.0, float("inf"), 1.0):  # the Inf step is skipped: the inner optimizer does not update
        grad = keras.ops.full((3,), value)
        if keras.backend.backend() == "jax":  # as Keras' JAX trainer applies it (stateful apply fails eagerly there)
            state = [v.value for v in scaled.variables]
            _, state = scaled.stateless_apply(state, [grad], [weight.value])
            for variable, new in zip(scaled.variables, state):
                variable.assign(new)
        else:  # TensorFlow refuses stateless_apply
            scaled.apply([grad], [weight])
    results["loss_scaled"] = [
        applied_steps(scaled),
        int(keras.ops.convert_to_numpy(inner.iterations)),
        int(keras.ops.convert_to_numpy(step_counter(scaled).value)),
    ]
    results["tensorflow_imported"] = "tensorflow" in sys.modules
    print(json.dumps(results))
    """
)

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)


def check(results: dict[str, object]) -> None:
    assert results["paths"] == ["net/dense/kernel", "net/dense/bias", "net/head/kernel", "net/head/bias"]
    assert results["names"] == ["dense/kernel", "dense/bias", "head/kernel", "head/bias"]
    assert results["unstripped"] == results["paths"]
    assert results["other_model"] == ["network/dense/kernel", "network/dense/bias"]
    assert results["gan_found"] == ["d_optimizer", "g_optimizer"]
    assert results["gan_found_are_the_instances"] is True
    assert results["gan_primary_excluded"] is True
    assert results["plain_model_found"] == []
    assert results["accumulating"] == [4, 2]  # 4 applies; Keras' iterations counts 2 accumulated updates
    assert results["loss_scaled"] == [3, 3, 3]  # 3 finite steps applied by the inner optimizer


def test_the_helpers_on_the_tensorflow_backend(capsys: pytest.CaptureFixture[str]) -> None:
    requires("tensorflow")
    keras = requires("keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("this process runs Keras on another backend")
    exec(compile(CHECKS, "checks", "exec"), {"__name__": "checks"})
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    check(results)


def test_a_tf_variable_without_a_path_is_named_without_its_output_index() -> None:
    tf = requires("tensorflow")
    from normlog.keras._variables import variable_names

    plain = tf.Variable([1.0, 2.0], name="w")
    assert (getattr(plain, "path", None), plain.name) == (None, "w:0")  # what TensorFlow names it
    assert variable_names([plain], "net") == ["w"]
    assert variable_names([plain]) == ["w"]


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_the_helpers_on_the_other_backends_without_tensorflow(backend: str, tmp_path: pathlib.Path) -> None:
    requires(backend)
    if importlib.util.find_spec("keras") is None:
        requires("keras")
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": os.path.join(ROOT, "src")}
    result = subprocess.run(
        [sys.executable, "-c", CHECKS], capture_output=True, text=True, env=env, timeout=300, cwd=str(tmp_path)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert results["backend"] == backend
    check(results)
    assert results["tensorflow_imported"] is False
