"""Keras 3 on the torch backend: `normlog.keras.watch` logs through the PyTorch adapter, with the
Keras variable paths as names.

This process imports Keras on the TensorFlow backend (the other Keras tests), and Keras reads
KERAS_BACKEND once: each scenario runs in a subprocess with KERAS_BACKEND=torch. The
references are torch's own: a post-accumulate-grad hook the scenario registers on each
underlying parameter records `p.grad.norm()` and the weight of every step, independently of
normlog; this process reads the written files back with TensorBoard's reader.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

from helpers import read_events, requires, scalars

requires("torch")
if importlib.util.find_spec("keras") is None:  # imported only in the subprocesses: this process may
    requires("keras")  # have Keras on TensorFlow already, or no TensorFlow at all (normlog[keras-torch])

import normlog  # noqa: E402
from normlog._step import GLOBAL_NORM, histogram_tag, norm_tag, ratio_tag  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)
EXAMPLE = os.path.join(ROOT, "examples", "keras", "torch_backend.py")


def run_on_torch(args: list[str], tmp_path: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": os.path.join(ROOT, "src")}
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    return result


# Steps 0-3 are trained before watch (a resumed run); watch, fit two epochs (4-11), fit again (12-15).
SCENARIO = textwrap.dedent(
    """
    import copy, json, os, shutil, sys, warnings
    import numpy as np
    import keras, torch
    import normlog.keras

    assert keras.backend.backend() == "torch"
    # (keras.utils.set_random_seed would import TensorFlow where installed: Keras' own doing)
    logdir, out = sys.argv[1], sys.argv[2]
    results = {}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.normal(size=(32, 3)).astype("float32")

    def recorded(model):
        # torch's own view of every step: p.grad.norm() and the weights, by Keras path
        seen = {}
        for variable in model.trainable_weights:
            name = variable.path.removeprefix(model.name + "/")
            def hook(p, name=name):
                steps = seen.setdefault(name, [])
                steps.append({"grad_norm": float(p.grad.norm()), "grad": p.grad.detach().numpy().copy(),
                              "weight": p.detach().numpy().copy()})
            variable.value.register_post_accumulate_grad_hook(hook)
        return seen

    # -- the main run: norms, weights, histograms, update ratios, resumed steps, two fits
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="tanh", name="dense"),
                              keras.layers.Dense(3, name="head")], name="mlp")
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    seen = recorded(model)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)  # steps 0-3, not watched
    watcher = normlog.keras.watch(model, logdir, histogram_every=2, update_every=3)
    results["step_at_watch"] = watcher.step
    results["deepcopy_is_itself"] = copy.deepcopy(watcher) is watcher
    results["optimizers"] = [o is model.optimizer for o in watcher.optimizers]
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[watcher])
    os.makedirs(os.path.join(out, "after_first_fit"))
    for name in os.listdir(logdir):  # what a reader sees once fit returned, before unwatch
        shutil.copy(os.path.join(logdir, name), os.path.join(out, "after_first_fit", name))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[watcher])
    results["step_after"] = watcher.step
    results["iterations"] = int(model.optimizer.iterations.numpy())
    results["findings"] = [f.as_dict() for f in watcher.findings]
    watcher.unwatch()
    results["apply_restored"] = "apply" not in vars(model.optimizer)
    np.savez(os.path.join(out, "seen.npz"), **{
        f"{name}|{step}|{field}": np.asarray(value)
        for name, steps in seen.items() for step, record in enumerate(steps) for field, value in record.items()
    })

    # -- a layer frozen mid-training, then unfrozen: followed, never stalled
    frozen = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu", name="base"),
                               keras.layers.Dense(3, name="head")], name="tl")
    optimizer = keras.optimizers.SGD(0.05)
    frozen.compile(optimizer=optimizer, loss="mse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frozen_watcher = normlog.keras.watch(frozen, os.path.join(out, "frozen"), update_every=1)
        frozen.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[frozen_watcher])  # steps 0-3
        frozen.get_layer("base").trainable = False
        frozen.compile(optimizer=optimizer, loss="mse")
        frozen.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[frozen_watcher])  # steps 4-7
        frozen.get_layer("base").trainable = True
        frozen.compile(optimizer=optimizer, loss="mse")
        frozen.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[frozen_watcher])  # steps 8-11
    results["frozen_findings"] = [f.as_dict() for f in frozen_watcher.findings]
    results["frozen_warnings"] = [str(w.message) for w in caught if "normlog" in str(w.message)]
    frozen_watcher.unwatch()

    # -- what is refused, before any file is made
    refused = {}
    class Gan(keras.Model):
        def __init__(self):
            super().__init__()
            self.generator = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
            self.discriminator = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        def compile(self, d_optimizer, g_optimizer):
            super().compile()
            self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer
    gan = Gan()
    gan.compile(keras.optimizers.Adam(), keras.optimizers.Adam())
    scaled = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    scaled.compile(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()), loss="mse")
    plain = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    plain.compile(optimizer="sgd", loss="mse")
    cases = [("gan", gan, {}), ("loss_scale", scaled, {}), ("torch_module", torch.nn.Linear(2, 2), {}),
             ("every_0", plain, {"every": 0}), ("step_-1", plain, {"step": -1})]
    for label, target, options in cases:
        path = os.path.join(out, "refused", label)
        try:
            normlog.keras.watch(target, path, **options)
            refused[label] = None
        except (TypeError, ValueError) as error:
            refused[label] = {"error": str(error), "made_files": os.path.exists(path)}
    results["refused"] = refused

    results["tensorflow_imported"] = "tensorflow" in sys.modules
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f)
    """
)


# Custom loops: an optimizer watched alone in a hand-written loop, and a GAN's two sub-models each
# watched with its own optimizer (the discriminator's parameters get gradients from both losses).
LOOPS = textwrap.dedent(
    """
    import json, os, sys, warnings
    import numpy as np
    import keras, torch
    import normlog.keras
    from normlog.health import Thresholds

    logdir, out = sys.argv[1], sys.argv[2]
    results = {}
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(32, 6)).astype("float32"))
    y = torch.tensor(rng.normal(size=(32, 3)).astype("float32"))

    def recorded(model, prefix):
        seen = {}
        for variable in model.trainable_weights:
            name = prefix + variable.path.removeprefix(model.name + "/")
            def hook(p, name=name):
                seen.setdefault(name, []).append(float(p.grad.norm()))
            variable.value.register_post_accumulate_grad_hook(hook)
        return seen

    # -- a hand-written loop (Keras' "training loop from scratch" for torch), watching the optimizer
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="dense")], name="loop")
    optimizer = keras.optimizers.SGD(0.05)
    watcher = normlog.keras.watch(optimizer, os.path.join(logdir, "loop"), log="gradients")
    seen = recorded(model, "loop/")
    for step in range(3):
        model.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[8 * step : 8 * step + 8])[:, :3], y[8 * step : 8 * step + 8])
        loss.backward()
        variables = model.trainable_weights
        with torch.no_grad():
            optimizer.apply([v.value.grad for v in variables], variables)
    results["loop_step"] = watcher.step
    watcher.unwatch()
    results["loop_seen"] = seen

    # -- a GAN: watch each sub-model with the optimizer that trains it, each in its own run
    class Gan(keras.Model):
        def __init__(self):
            super().__init__()
            self.generator = keras.Sequential([keras.Input((2,)), keras.layers.Dense(6, name="g")], name="generator")
            self.discriminator = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1, name="d")],
                                                  name="discriminator")

        def call(self, x):
            return self.discriminator(x)

        def compile(self, d_optimizer, g_optimizer):
            super().compile()
            self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer

        def train_step(self, data):
            real = data[0] if isinstance(data, tuple) else data
            noise = torch.randn(real.shape[0], 2)
            softplus = torch.nn.functional.softplus
            self.zero_grad()
            fake = self.generator(noise).detach()
            d_loss = (softplus(-self.discriminator(real)) + softplus(self.discriminator(fake))).mean()
            d_loss.backward()
            d_vars = self.discriminator.trainable_weights
            with torch.no_grad():
                self.d_optimizer.apply([v.value.grad for v in d_vars], d_vars)
            self.zero_grad()
            g_loss = softplus(-self.discriminator(self.generator(noise))).mean()
            g_loss.backward()  # the discriminator's parameters get gradients here too: not its update's
            g_vars = self.generator.trainable_weights
            with torch.no_grad():
                self.g_optimizer.apply([v.value.grad for v in g_vars], g_vars)
            return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach()}

    gan = Gan()
    gan.compile(keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3))
    d_seen = recorded(gan.discriminator, "")
    g_seen = recorded(gan.generator, "")
    watchers = [
        normlog.keras.watch(gan.discriminator, logdir, optimizer=gan.d_optimizer, name="discriminator"),
        normlog.keras.watch(gan.generator, logdir, optimizer=gan.g_optimizer, name="generator"),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gan.fit(x.numpy(), batch_size=8, epochs=1, verbose=0, callbacks=watchers)
    results["gan_steps"] = [w.step for w in watchers]
    results["gan_warnings"] = [str(w.message) for w in caught if "normlog" in str(w.message)]
    for w in watchers:
        w.unwatch()
    results["d_seen"], results["g_seen"] = d_seen, g_seen

    # -- watched before it is built or compiled: the watcher starts when fit does
    class Mlp(keras.Model):
        def __init__(self):
            super().__init__(name="late")
            self.hidden = keras.layers.Dense(5, name="hidden")

        def call(self, x):
            return self.hidden(x)

    late = Mlp()
    late_watcher = normlog.keras.watch(late, os.path.join(logdir, "late"))
    results["late_weights_at_watch"] = len(late.weights)
    late.compile(optimizer="sgd", loss="mse")
    late.fit(x.numpy(), np.zeros((32, 5), "float32"), batch_size=16, epochs=1, verbose=0, callbacks=[late_watcher])
    results["late_step"] = late_watcher.step
    late_watcher.unwatch()

    # -- a gradient that explodes at step 4 brings histograms at the steps after it
    blown = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="dense")], name="blown")
    blown.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")  # Adam's step stays small
    inputs = x.numpy().copy()
    inputs[16:20] *= 1e6  # the fifth batch of four
    thresholds = Thresholds(explode_bound=1e3, explode_early_factor=1e9)  # the bound alone
    blown_watcher = normlog.keras.watch(blown, os.path.join(logdir, "blown"), histogram_every=None, health=thresholds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the finding's own warning
        blown.fit(
            inputs, np.zeros((32, 4), "float32"), batch_size=4, shuffle=False, verbose=0, callbacks=[blown_watcher]
        )
    results["blown_findings"] = [(f.rule, f.step) for f in blown_watcher.findings]
    blown_watcher.unwatch()

    # -- gradients that never went through .grad (torch.autograd.grad) are said to be unseen
    grad_model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, name="dense")], name="autograd")
    grad_optimizer = keras.optimizers.SGD(0.01)
    grad_watcher = normlog.keras.watch(grad_optimizer, os.path.join(logdir, "autograd"))
    variables = grad_model.trainable_weights
    torch.nn.functional.mse_loss(grad_model(x[:8]), y[:8]).backward()  # a step as Keras' trainer takes it
    with torch.no_grad():
        grad_optimizer.apply([v.value.grad for v in variables], variables)
    grad_model.zero_grad()
    loss = torch.nn.functional.mse_loss(grad_model(x[8:16]), y[8:16])
    grads = torch.autograd.grad(loss, [v.value for v in variables])  # then one that leaves .grad alone
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            grad_optimizer.apply(list(grads), variables)
    results["autograd_warnings"] = [str(w.message) for w in caught if "normlog" in str(w.message)]
    grad_watcher.unwatch()

    # -- Keras' own clipping happens on copies inside apply, out of normlog's sight: said once
    clipped = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)])
    clipped.compile(optimizer=keras.optimizers.SGD(global_clipnorm=1.0), loss="mse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        normlog.keras.watch(clipped, os.path.join(logdir, "clipped")).unwatch()
    results["clip_warnings"] = [str(w.message) for w in caught if "normlog" in str(w.message)]

    results["tensorflow_imported"] = "tensorflow" in sys.modules
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f)
    """
)


@pytest.fixture(scope="module")
def loops(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("keras_torch_loops")
    logdir, out = base / "logs", base / "out"
    out.mkdir()
    run_on_torch([sys.executable, "-c", LOOPS, str(logdir), str(out)], base)
    with open(out / "results.json") as f:
        return {"results": json.load(f), "logdir": logdir}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("keras_torch")
    logdir, out = base / "logs", base / "out"
    out.mkdir()
    run_on_torch([sys.executable, "-c", SCENARIO, str(logdir), str(out)], base)
    with open(out / "results.json") as f:
        results = json.load(f)
    seen: dict[tuple[str, int, str], np.ndarray] = {}
    with np.load(out / "seen.npz") as arrays:
        for key in arrays.files:
            name, step, field = key.split("|")
            seen[name, int(step), field] = arrays[key]
    return {"results": results, "seen": seen, "events": read_events(str(logdir)), "out": out}


NAMES = ["dense/kernel", "dense/bias", "head/kernel", "head/bias"]
WATCHED = range(4, 16)  # steps 0-3 ran before watch


def test_gradient_and_weight_norms_equal_torchs_own_of_the_underlying_parameters(run) -> None:
    events, seen = run["events"], run["seen"]
    for name in NAMES:
        grads = scalars(events, norm_tag("gradients", name))
        weights = scalars(events, norm_tag("parameters", name))
        assert sorted(grads) == sorted(weights) == list(WATCHED)
        for step in WATCHED:
            assert grads[step] == pytest.approx(float(seen[name, step, "grad_norm"]), rel=1e-6)
            # the weights the gradients were computed at (before that step's update)
            assert weights[step] == pytest.approx(float(np.linalg.norm(seen[name, step, "weight"])), rel=1e-6)
    global_norm = scalars(events, GLOBAL_NORM)
    for step in WATCHED:
        expected = np.sqrt(sum(float(seen[n, step, "grad_norm"]) ** 2 for n in NAMES))
        assert global_norm[step] == pytest.approx(expected, rel=1e-6)


def test_tags_are_keras_variable_paths_not_torch_module_names(run) -> None:
    tags = run["events"].Tags()
    assert {norm_tag("gradients", n) for n in NAMES} <= set(tags["scalars"])
    assert not [t for t in tags["scalars"] + tags["histograms"] if "_torch_params" in t or "mlp/" in t]


def test_histograms_equal_the_cores(run) -> None:
    events, seen = run["events"], run["seen"]
    for kind, field in (("gradients", "grad"), ("parameters", "weight")):
        logged = {e.step: e.histogram_value for e in events.Histograms(histogram_tag(kind, "dense/kernel"))}
        assert sorted(logged) == [4, 6, 8, 10, 12, 14]
        for step in (4, 10):
            core = normlog.histogram(seen["dense/kernel", step, field])
            value = logged[step]
            filled = np.flatnonzero(core.counts)
            np.testing.assert_array_equal(value.bucket, core.counts[filled[0] : filled[-1] + 1])
            np.testing.assert_array_equal(value.bucket_limit, core.bucket_limits[filled[0] : filled[-1] + 1])
            assert (value.min, value.max, value.num) == (core.min, core.max, core.num)
            assert value.sum_squares == pytest.approx(core.sum_squares, rel=1e-9)


def test_update_ratios_are_the_step_the_keras_optimizer_took(run) -> None:
    events, seen = run["events"], run["seen"]
    ratios = scalars(events, ratio_tag("dense/kernel"))
    assert sorted(ratios) == [6, 9, 12, 15]  # every 3 steps, on the optimizer's step count
    for step in (6, 9, 12):  # torch's hook saw the weights after these updates at the next step
        before, after = seen["dense/kernel", step, "weight"], seen["dense/kernel", step + 1, "weight"]
        assert ratios[step] == pytest.approx(np.linalg.norm(after - before) / np.linalg.norm(before), rel=1e-5)


def test_steps_follow_the_optimizers_iterations_and_fit_flushes_at_its_end(run) -> None:
    results = run["results"]
    assert results["step_at_watch"] == 4  # a resumed run continues at optimizer.iterations
    assert results["step_after"] == results["iterations"] == 16  # the second fit continued the steps
    after_first = read_events(str(run["out"] / "after_first_fit"))
    assert sorted(scalars(after_first, norm_tag("gradients", "dense/kernel"))) == list(range(4, 12))
    assert results["deepcopy_is_itself"] and results["optimizers"] == [True]
    assert results["apply_restored"]


def test_a_frozen_layer_has_no_gradient_no_update_ratio_and_is_never_stalled(run) -> None:
    results = run["results"]
    events = read_events(str(run["out"] / "frozen"))
    for name in ("base/kernel", "base/bias"):
        # trained at 0-3, frozen at 4-7, trained again at 8-11 (followed after the recompile)
        assert sorted(scalars(events, norm_tag("gradients", name))) == [0, 1, 2, 3, 8, 9, 10, 11]
        # (a bias starts at zero: its step-0 ratio has no denominator and is not written)
        ratios = [1, 2, 3, 8, 9, 10, 11] if name == "base/bias" else [0, 1, 2, 3, 8, 9, 10, 11]
        assert sorted(scalars(events, ratio_tag(name))) == ratios
        assert sorted(scalars(events, norm_tag("parameters", name))) == list(range(12))  # still its weight
    assert sorted(scalars(events, norm_tag("gradients", "head/kernel"))) == list(range(12))
    assert not [f for f in results["frozen_findings"] if f["tensor"].startswith("base/")]
    assert results["frozen_warnings"] == []


def test_what_cannot_be_watched_is_refused_before_any_file(run) -> None:
    refused = run["results"]["refused"]
    assert refused["gan"] is not None and "d_optimizer" in refused["gan"]["error"]
    assert "LossScaleOptimizer" in refused["loss_scale"]["error"]
    assert "normlog.watch" in refused["torch_module"]["error"]
    assert "every" in refused["every_0"]["error"] and "step" in refused["step_-1"]["error"]
    assert not any(entry["made_files"] for entry in refused.values())


def test_importing_and_watching_on_the_torch_backend_needs_no_tensorflow(run) -> None:
    assert run["results"]["tensorflow_imported"] is False


def test_the_example_runs_and_writes_its_logs_without_tensorflow(tmp_path) -> None:
    logdir = tmp_path / "logs"
    # TensorFlow made unimportable, as where it is not installed (normlog[keras-torch])
    without_tensorflow = (
        "import runpy, sys; sys.modules['tensorflow'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    args = [sys.executable, "-c", without_tensorflow, EXAMPLE, "--logdir", str(logdir), "--epochs", "1"]
    result = run_on_torch(args, tmp_path)
    assert "backend torch" in result.stdout and "steps logged: 16" in result.stdout  # 1024 points, batches of 64
    events = read_events(str(logdir))
    for name in ("dense/kernel", "hidden/kernel", "logit/bias"):
        assert sorted(scalars(events, norm_tag("gradients", name))) == list(range(16))
    assert [e.step for e in events.Histograms(histogram_tag("gradients", "dense/kernel"))] == [0]
    assert sorted(scalars(events, ratio_tag("dense/kernel"))) == [0]


def test_an_optimizer_watched_alone_in_a_hand_written_loop(loops) -> None:
    results = loops["results"]
    assert results["loop_step"] == 3
    events = read_events(str(loops["logdir"] / "loop"))
    for name in ("loop/dense/kernel", "loop/dense/bias"):  # no model to strip: the whole path
        logged = scalars(events, norm_tag("gradients", name))
        assert sorted(logged) == [0, 1, 2]
        assert [logged[step] for step in range(3)] == pytest.approx(results["loop_seen"][name], rel=1e-6)
    assert not [t for t in events.Tags()["scalars"] if t.startswith(norm_tag("parameters", ""))]  # log="gradients"


def test_a_gans_sub_models_each_log_the_gradients_their_own_update_used(loops) -> None:
    results = loops["results"]
    assert results["gan_steps"] == [4, 4] and results["gan_warnings"] == []
    discriminator = read_events(str(loops["logdir"] / "discriminator"))
    generator = read_events(str(loops["logdir"] / "generator"))
    for name in ("d/kernel", "d/bias"):
        logged = scalars(discriminator, norm_tag("gradients", name))
        # torch's hook fires twice a step on the discriminator (its loss, then the generator's):
        # its update used the first
        assert [logged[step] for step in range(4)] == pytest.approx(results["d_seen"][name][0::2], rel=1e-6)
    for name in ("g/kernel", "g/bias"):
        logged = scalars(generator, norm_tag("gradients", name))
        assert [logged[step] for step in range(4)] == pytest.approx(results["g_seen"][name], rel=1e-6)
    assert not [t for t in generator.Tags()["scalars"] if "/d/" in t]


def test_a_model_watched_before_it_is_built_or_compiled_is_logged_from_its_first_step(loops) -> None:
    assert loops["results"]["late_weights_at_watch"] == 0 and loops["results"]["late_step"] == 2
    events = read_events(str(loops["logdir"] / "late"))
    assert sorted(scalars(events, norm_tag("gradients", "hidden/kernel"))) == [0, 1]


def test_keras_own_clipping_is_said_to_be_out_of_sight_once(loops) -> None:
    (message,) = loops["results"]["clip_warnings"]
    assert "global_clipnorm" in message and "before that clipping" in message


def test_an_exploding_gradient_brings_histograms_at_the_steps_after_it(loops) -> None:
    assert ("exploding", 4) in [tuple(f) for f in loops["results"]["blown_findings"]]
    events = read_events(str(loops["logdir"] / "blown"))
    # histogram_every=None: only the burst after the finding (histograms_after_finding=5), cut at the last step
    assert [e.step for e in events.Histograms(histogram_tag("gradients", "dense/kernel"))] == [5, 6, 7]


def test_gradients_that_never_reached_dot_grad_are_said_to_be_unseen(loops) -> None:
    (message,) = loops["results"]["autograd_warnings"]
    assert "autograd/dense/kernel" in message and "loss.backward()" in message


def test_custom_loops_on_the_torch_backend_need_no_tensorflow(loops) -> None:
    assert loops["results"]["tensorflow_imported"] is False


JIT = textwrap.dedent(
    """
    import json, sys, warnings
    import numpy as np
    import keras
    import normlog.keras

    logdir, out = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4)).astype("float32"), rng.normal(size=(32, 1)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu", name="dense")], name="jit")
    model.compile(optimizer="adam", loss="mse", jit_compile=True)  # Keras: torch.compile of the train step
    seen = []
    kernel = model.get_layer("dense").kernel.value
    kernel.register_post_accumulate_grad_hook(lambda p: seen.append(float(p.grad.norm())))
    watcher = normlog.keras.watch(model, logdir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's own notes on graph breaks
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[watcher])
    results = {"step": watcher.step, "iterations": int(model.optimizer.iterations.numpy()), "seen": seen}
    watcher.unwatch()
    with open(out, "w") as f:
        json.dump(results, f)
    """
)


def test_a_train_step_compiled_by_jit_compile_runs_its_update_eagerly_and_is_logged(tmp_path) -> None:
    logdir, out = tmp_path / "logs", tmp_path / "results.json"
    run_on_torch([sys.executable, "-c", JIT, str(logdir), str(out)], tmp_path)
    with open(out) as f:
        results = json.load(f)
    # dynamo traced into the wrapped apply before it was kept out of the graph: Keras then counted 1 update of 4
    assert results["step"] == results["iterations"] == 4
    logged = scalars(read_events(str(logdir)), norm_tag("gradients", "dense/kernel"))
    # Step 0 is lost today: dynamo traces the PyTorch adapter's backward hooks in the first
    # compiled step and the read fails (normlog.torch with torch.compile alike); the rest are torch's
    assert {1, 2, 3} <= set(logged)
    for step in sorted(logged):
        assert logged[step] == pytest.approx(results["seen"][step], rel=1e-6)
