"""Training-health rules, `normlog report` and `normlog plot`, and the issue's scenarios
through both adapters."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import normlog
from helpers import read_events, requires, scalars
from normlog import _step
from normlog.health import Monitor, StepValues, Thresholds, evaluate
from normlog.report import load_runs, main

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


def example(path: str):
    spec = importlib.util.spec_from_file_location(path.replace("/", "_")[:-3], os.path.join(EXAMPLES, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rules(findings, rule: str) -> dict[str, int]:
    """tensor -> step of its first finding of `rule`, as an episode's origin or member"""
    out: dict[str, int] = {}
    for finding in sorted((f for head in findings for f in (head, *head.members)), key=lambda f: f.step):
        if finding.rule == rule:
            out.setdefault(finding.tensor, finding.step)
    return out


# -- the rules on synthetic norms ---------------------------------------------------------


def test_exploding_is_a_jump_over_the_recent_largest_reported_once() -> None:
    steps = [StepValues(s, grad_norms={"w": 1.0 + 0.1 * (s % 3)}) for s in range(30)]
    steps[20].grad_norms["w"] = 50.0
    steps[21].grad_norms["w"] = 60.0
    found = evaluate(steps)
    assert [(f.rule, f.tensor, f.step) for f in found] == [("exploding", "w", 20)]
    assert "50" in found[0].message and "largest of its last 20" in found[0].message
    assert evaluate(steps, Thresholds(explode_bound=1.15)) != []  # an absolute bound works too


def test_vanishing_needs_a_later_layer_that_learns() -> None:
    def step(s: int, late: float) -> StepValues:
        return StepValues(s, grad_norms={"early": 1e-5, "late": late}, weight_norms={"early": 1.0, "late": 1.0})

    assert rules(evaluate([step(s, 0.1) for s in range(60)]), "vanishing") == {"early": 49}
    assert rules(evaluate([step(s, 1e-6) for s in range(60)]), "vanishing") == {}  # nothing learns


def test_dead_stalled_and_diverging() -> None:
    steps = [
        StepValues(
            s,
            grad_norms={"dead": 0.0, "alive": 1.0, "stuck": 0.1, "fine": 0.1},
            weight_norms={"grows": 1.0 * 1.01**s, "flat": 1.0, "stuck": 1.0, "fine": 1.0},
            update_ratios={"stuck": 1e-8, "fine": 1e-3},
        )
        for s in range(220)
    ]
    found = evaluate(steps)
    assert rules(found, "dead") == {"dead": 9}
    assert rules(found, "stalled") == {"stuck": 2}
    # 3x its first norm, rising, and not slowing over the last 100 steps
    assert rules(found, "diverging") == {"grows": 111}
    assert len(found) == 3  # once per episode: no flood


def test_what_other_rules_explain_is_not_reported() -> None:
    steps = [
        StepValues(
            s,
            grad_norms={"zero": 0.0, "tiny": 1e-7, "lr0": 0.1, "last": 0.1},
            weight_norms={"zero": 1.0, "tiny": 1.0, "lr0": 1.0, "last": 1.0},
            # an update of zero is explained by a zero gradient, a tiny one by a vanishing
            # gradient; a tensor the optimizer does not own is never stalled
            update_ratios={"zero": 0.0, "tiny": 1e-10, "lr0": 0.0, "last": 1e-3},
            owned={"zero", "tiny", "last"},
        )
        for s in range(60)
    ]
    found = evaluate(steps)
    assert [(f.rule, f.tensor) for f in found] == [("dead", "zero"), ("vanishing", "tiny")]


def test_a_bias_or_gain_vanishes_only_with_its_matrix() -> None:
    def step(s: int, matrix: float) -> StepValues:
        grads = {"norm.weight": 1e-5, "fc.weight": matrix, "fc.bias": 1e-5, "out.weight": 0.1}
        return StepValues(s, grad_norms=grads, weight_norms=dict.fromkeys(grads, 1.0))

    assert evaluate([step(s, 0.1) for s in range(80)]) == []  # a LayerNorm gain and a bias alone
    (finding,) = evaluate([step(s, 1e-5) for s in range(80)])
    assert (finding.rule, finding.tensor) == ("vanishing", "fc.weight")
    assert [m.tensor for m in finding.members] == ["fc.bias"]  # one episode for the module


def test_nonfinite_reports_the_first_step_of_each_episode() -> None:
    steps = [StepValues(s, grad_norms={"g": 1.0}, weight_norms={"w": 1.0}) for s in range(60)]
    steps[5].weight_nonfinite["w"] = 3.0
    steps[6].weight_norms["w"] = math.nan  # a norm that is itself NaN counts too
    steps[40].grad_nonfinite["g"] = 1.0  # after w's episode has ended: a new one
    found = evaluate(steps)
    assert [(f.rule, f.tensor, f.step, f.kind) for f in found] == [
        ("nonfinite", "w", 5, "parameters"),
        ("nonfinite", "g", 40, "gradients"),
    ]


def nan_step(s: int, grads: dict[str, float], weights: dict[str, float]) -> StepValues:
    values = StepValues(s, grad_norms=dict(grads), weight_norms=dict(weights))
    for name, norm in grads.items():
        if not math.isfinite(norm):
            values.grad_nonfinite[name] = 1.0
    for name, norm in weights.items():
        if not math.isfinite(norm):
            values.weight_nonfinite[name] = 1.0
    return values


def test_a_nan_gradient_is_one_episode_whose_origin_is_first_in_the_backward_pass() -> None:
    names = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    nan = math.nan
    steps = [nan_step(s, dict.fromkeys(names, 1.0), dict.fromkeys(names, 2.0)) for s in range(10)]
    # a NaN born in layer 2's backward: layer 4's gradients stay finite
    steps.append(nan_step(10, {**dict.fromkeys(names, nan), "4.weight": 1.0, "4.bias": 1.0}, dict.fromkeys(names, 2.0)))
    steps += [nan_step(s, dict.fromkeys(names, nan), dict.fromkeys(names, nan)) for s in range(11, 20)]
    (finding,) = evaluate(steps)
    assert (finding.rule, finding.tensor, finding.kind, finding.step) == ("nonfinite", "2.bias", "gradients", 10)
    assert "first in the backward pass" in finding.message and "and 5 more tensors" in finding.message
    members = {(m.tensor, m.kind, m.step) for m in finding.members}
    assert ("4.weight", "gradients", 11) in members and ("0.weight", "parameters", 11) in members
    assert finding.as_dict()["members"][0].keys() == finding.as_dict().keys()  # every member, for tools


def test_a_nan_weight_goes_first_before_the_gradients_it_poisons() -> None:
    names = ["0.weight", "2.weight", "4.weight"]
    steps = [nan_step(s, dict.fromkeys(names, 1.0), dict.fromkeys(names, 2.0)) for s in range(5)]
    steps.append(nan_step(5, dict.fromkeys(names, math.nan), {**dict.fromkeys(names, 2.0), "2.weight": math.nan}))
    (finding,) = evaluate(steps)
    assert (finding.tensor, finding.kind) == ("2.weight", "parameters")
    assert "the weight went first" in finding.message


def test_an_episode_rearms_only_after_it_has_cleared() -> None:
    monitor = Monitor(Thresholds(rearm_steps=5))
    pattern = [True, True, False, True, False, False, False, False, False, True]
    found = [
        monitor.observe(StepValues(s, grad_nonfinite={"g": float(bad)}, grad_norms={"g": 1.0}))
        for s, bad in enumerate(pattern)
    ]
    assert [s for s, f in enumerate(found) if f] == [0, 9]


def resumable_run(steps: int) -> list[StepValues]:
    """Every rule at work: a spike that stays elevated, a streak, a dead tensor, a stalled one,
    a growing weight and a NaN episode, each crossing step 120 where the run is resumed."""
    rng = np.random.default_rng(0)
    run = []
    for s in range(steps):
        noise = float(rng.uniform(0.9, 1.1))
        run.append(
            StepValues(
                s,
                grad_norms={
                    "early": 1e-5 * noise,
                    "late": noise * (30.0 if 110 <= s < 125 else 1.0),
                    "dead": 0.0,
                    "stuck": 0.1,
                },
                weight_norms={"early": 1.0, "late": 1.0, "grows": 1.01**s, "stuck": 1.0},
                update_ratios={"stuck": 1e-8 if s >= 118 else 1e-3, "fine": 1e-3 * noise},
                grad_nonfinite={"late": 1.0} if s in (115, 130) else {},
                global_norm=noise,
            )
        )
    return run


@pytest.mark.parametrize("codec", ["json", "pickle"])
def test_a_resumed_monitor_finds_what_one_monitor_finds(codec: str) -> None:
    import pickle

    run = resumable_run(260)
    whole = evaluate(run)
    # what crosses the resume point at step 120: the open vanishing episode of "early", the
    # exploding and nonfinite episodes of "late" (opened at 110 and 115; a second NaN at 130
    # falls inside the episode), the stalled streak (from 118, a member of the blow-up's
    # episode), the weight window of "grows" and the recent norms
    assert {(f.rule, f.tensor) for head in whole for f in (head, *head.members)} >= {
        ("vanishing", "early"),
        ("exploding", "late"),
        ("nonfinite", "late"),
        ("dead", "dead"),
        ("stalled", "stuck"),
        ("diverging", "grows"),
    }
    first = Monitor()
    for values in run[:120]:
        first.observe(values)
    state = first.state_dict()
    encoded = json.loads(json.dumps(state)) if codec == "json" else pickle.loads(pickle.dumps(state))
    resumed = Monitor()
    resumed.load_state_dict(encoded)
    later = [finding for values in run[120:] for finding in resumed.observe(values)]
    assert later == [f for f in whole if f.step >= 120]
    assert resumed.findings == whole
    # without the state, a fresh monitor would report the open episodes again, too early
    fresh = [finding for values in run[120:] for finding in Monitor().observe(values)]
    assert fresh != later


def test_a_vanishing_streak_that_spans_the_resume_point() -> None:
    run = [
        StepValues(s, grad_norms={"early": 1e-5, "late": 0.1}, weight_norms={"early": 1.0, "late": 1.0})
        for s in range(60)
    ]
    first = Monitor()
    for values in run[:30]:
        first.observe(values)
    resumed = Monitor()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    found = [finding for values in run[30:] for finding in resumed.observe(values)]
    assert [(f.rule, f.tensor, f.step) for f in found] == [("vanishing", "early", 49)]


def test_a_state_from_another_version_is_refused() -> None:
    state = Monitor().state_dict()
    state["version"] = -1
    with pytest.raises(ValueError, match="version"):
        Monitor().load_state_dict(state)


def benchmark_run(name: str):
    """One run of the findings benchmark (benchmarks/findings), recorded now with torch."""
    requires("torch")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "findings"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    return bench.fresh(name)


def test_one_nan_from_log0_is_one_episode_from_the_first_tensor_that_turned_nonfinite() -> None:
    _, values, findings = benchmark_run("nan_from_log0")
    first = next(v for v in values if v.grad_nonfinite or v.weight_nonfinite)
    assert first.step == 150 and not first.weight_nonfinite  # the gradient went first
    # the backward pass meets the last tensor in model order first
    turned = [name for name in first.grad_norms if name in first.grad_nonfinite]
    (finding,) = findings
    assert (finding.rule, finding.step, finding.tensor, finding.kind) == ("nonfinite", 150, turned[-1], "gradients")
    others = {m.tensor for m in finding.members} - {finding.tensor}
    assert f"and {len(others)} more tensors" in finding.message
    assert {m.kind for m in finding.members} == {"gradients", "parameters"}  # weights followed


def test_a_dead_relu_layer_is_one_finding_not_three() -> None:
    _, _, findings = benchmark_run("dead_relu")
    (finding,) = findings  # not dead, vanishing and stalled, nor one per tensor
    assert finding.rule == "dead" and finding.tensor == "2.weight"  # the layer whose bias is -10
    assert {m.tensor for m in finding.members} == {"0.weight", "0.bias", "2.bias", "4.weight"}
    assert {m.rule for m in finding.members} == {"dead"}


# -- report and plot ----------------------------------------------------------------------


def write_run(logdir: str, grad_norms: dict[str, list[float]], weight_norms: dict[str, list[float]]) -> None:
    """Logs made with direct Writer calls only: no adapter, no online rules."""
    with normlog.Writer(logdir) as writer:
        for step in range(len(next(iter(grad_norms.values())))):
            for name, norms in grad_norms.items():
                writer.add_scalar(f"gradients/{name}/norm", norms[step], step)
            for name, norms in weight_norms.items():
                writer.add_scalar(f"parameters/{name}/norm", norms[step], step)


def test_report_json_contract_and_fail_on(tmp_path, capsys) -> None:
    spikes = [1.0] * 30
    spikes[25] = 100.0
    write_run(str(tmp_path / "spiky"), {"layer.weight": spikes}, {"layer.weight": [2.0] * 30})
    write_run(str(tmp_path / "calm"), {"layer.weight": [1.0] * 30}, {"layer.weight": [2.0] * 30})
    assert main(["report", str(tmp_path), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert set(document["runs"]) == {"spiky", "calm"}
    (finding,) = document["runs"]["spiky"]["findings"]
    assert (finding["rule"], finding["tensor"], finding["step"]) == ("exploding", "layer.weight", 25)
    assert set(finding) == {"rule", "tensor", "step", "message", "kind", "origin", "members"}
    table = document["runs"]["spiky"]["tensors"]["layer.weight"]
    assert table["grad_norm"] == {"last": 1.0, "median": 1.0, "max": 100.0}
    assert (table["weight_norm"], table["flags"]) == (2.0, ["exploding"])
    assert document["runs"]["calm"]["findings"] == []
    assert main(["report", str(tmp_path), "--fail-on", "exploding"]) == 1
    assert main(["report", str(tmp_path), "--fail-on", "vanishing,dead"]) == 0
    assert main(["report", str(tmp_path), "--fail-on", "bogus"]) == 2


def test_report_prints_a_plain_table_off_a_terminal(tmp_path) -> None:
    write_run(str(tmp_path / "run"), {"a": [1.0] * 12, "b": [0.0] * 12}, {"a": [1.0] * 12, "b": [1.0] * 12})
    result = subprocess.run(
        [sys.executable, "-m", "normlog", "report", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "run run: 12 logged steps, 1 findings" in result.stdout
    assert "[dead] step 9" in result.stdout
    assert "\x1b[" not in result.stdout  # no terminal styling in a pipe


def test_plot_writes_a_png_and_can_write_it_to_tensorboard(tmp_path) -> None:
    requires("matplotlib")
    write_run(str(tmp_path / "run"), {"a": [1.0, 0.5, 0.25], "b": [2.0, 2.0, 2.0]}, {"a": [1.0] * 3, "b": [1.0] * 3})
    target = tmp_path / "norms.png"
    assert main(["plot", str(tmp_path), "-o", str(target), "--tensorboard"]) == 0
    assert target.read_bytes().startswith(b"\x89PNG")
    (image,) = read_events(str(tmp_path / "normlog_plot")).Images("health/gradient_norms")
    assert image.width > 100


def test_report_on_an_empty_or_missing_logdir(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert main(["report", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"runs": {}}


# -- the scenarios, through both adapters ------------------------------------------------------


def torch_vanishing(logdir: str, activation: str):
    torch = requires("torch")
    from torch import nn

    module = example("torch/vanishing_gradients.py")
    torch.manual_seed(0)
    x, y = module.two_circles(1000, noise=0.1)
    model = module.MLP(activation)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", normlog.health.HealthWarning)
        with normlog.watch(model, logdir, optimizer=optimizer, histogram_every=None) as watcher:
            for _ in range(15):
                for batch in torch.randperm(500).split(32):
                    loss = nn.functional.binary_cross_entropy_with_logits(model(x[:500][batch]), y[:500][batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
    return watcher.findings


def test_torch_deep_tanh_vanishes_in_its_early_layers_and_relu_does_not(tmp_path) -> None:
    tanh = torch_vanishing(str(tmp_path / "tanh"), "tanh")
    vanishing = rules(tanh, "vanishing")
    assert {"layers.0.weight", "layers.1.weight"} <= set(vanishing)
    assert not {"layers.8.weight", "layers.9.weight"} & set(vanishing)
    assert rules(torch_vanishing(str(tmp_path / "relu"), "relu"), "vanishing") == {}
    # report, from the event files alone, finds what the online monitor found
    (run,) = [r for r in load_runs(str(tmp_path))[0] if r.name == "tanh"]
    assert [(f.rule, f.tensor, f.step) for f in run.findings] == [(f.rule, f.tensor, f.step) for f in tanh]


def test_torch_a_huge_learning_rate_explodes(tmp_path) -> None:
    torch = requires("torch")
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=10.0)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    watcher = normlog.watch(model, str(tmp_path), optimizer=optimizer)

    def train() -> None:
        for _ in range(20):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()

    with pytest.warns(normlog.health.HealthWarning, match=r"\[exploding\]"):
        train()
    watcher.unwatch()
    assert rules(watcher.findings, "exploding")
    events = read_events(str(tmp_path))
    assert _step.finding_scalar_tag("exploding") in events.Tags()["scalars"]


def test_torch_a_nan_weight_is_found_at_its_step_with_its_name(tmp_path) -> None:
    torch = requires("torch")
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with normlog.watch(model, str(tmp_path), optimizer=optimizer) as watcher:
            for step in range(10):
                if step == 6:
                    with torch.no_grad():
                        model[2].weight[0, 3] = float("nan")
                optimizer.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                optimizer.step()
    weights = [(f.tensor, f.step) for f in watcher.findings if f.rule == "nonfinite" and f.kind == "parameters"]
    assert weights[0] == ("2.weight", 6)
    events = read_events(str(tmp_path))
    texts = [
        e.tensor_proto.string_val[0].decode()
        for e in events.Tensors(_step.finding_text_tag("nonfinite") + "/text_summary")
    ]
    # the count is taken after the optimizer's update, which spreads the NaN: the finding,
    # its tensor and its step are exact
    assert any("at step 6" in text and "weight of '2.weight' holds NaN/Inf at step 6" in text for text in texts)
    assert scalars(events, _step.finding_scalar_tag("nonfinite"))[6] >= 1  # tensors flagged at step 6


def test_torch_a_frozen_layer_is_neither_dead_nor_stalled(tmp_path) -> None:
    torch = requires("torch")
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    model[0].requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    with normlog.watch(model, str(tmp_path), optimizer=optimizer, update_every=1) as watcher:
        for _ in range(30):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    assert not [f for f in watcher.findings if f.tensor.startswith("0.")]
    assert not [f for f in watcher.findings if f.rule in ("dead", "stalled")]


def keras_vanishing(logdir: str, activation: str):
    keras = requires("keras")
    requires("tensorflow")
    import normlog.keras

    module = example("keras/vanishing_gradients.py")
    x, y = module.two_circles(1000, noise=0.1)
    keras.utils.set_random_seed(0)
    model = module.build(activation)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss=keras.losses.BinaryCrossentropy(from_logits=True)
    )
    watcher = normlog.keras.watch(model, logdir, histogram_every=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", normlog.health.HealthWarning)
        model.fit(x[:500], y[:500], batch_size=32, epochs=15, verbose=0, callbacks=[watcher])
    watcher.unwatch()
    return watcher.findings


def test_keras_deep_tanh_vanishes_in_its_early_layers_and_relu_does_not(tmp_path) -> None:
    tanh = keras_vanishing(str(tmp_path / "tanh"), "tanh")
    vanishing = rules(tanh, "vanishing")
    assert {"hidden_0/kernel", "hidden_1/kernel"} <= set(vanishing)
    assert not {"hidden_8/kernel", "hidden_9/kernel"} & set(vanishing)
    assert rules(keras_vanishing(str(tmp_path / "relu"), "relu"), "vanishing") == {}
    (run,) = [r for r in load_runs(str(tmp_path))[0] if r.name == "tanh"]
    assert [(f.rule, f.tensor, f.step) for f in run.findings] == [(f.rule, f.tensor, f.step) for f in tanh]


def keras_model(frozen: bool = False):
    keras = requires("keras")
    requires("tensorflow")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(32, activation="relu", name="first", trainable=not frozen),
            keras.layers.Dense(1, name="out"),
        ],
        name="net",
    )
    return model


def test_keras_a_huge_learning_rate_explodes(tmp_path) -> None:
    keras = requires("keras")
    import normlog.keras

    model = keras_model()
    model.compile(optimizer=keras.optimizers.SGD(10.0), loss="mse")
    x = np.random.default_rng(0).normal(size=(640, 4)).astype("float32")
    y = np.random.default_rng(1).normal(size=(640, 1)).astype("float32")
    watcher = normlog.keras.watch(model, str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, batch_size=64, epochs=2, verbose=0, callbacks=[watcher])
    assert rules(watcher.findings, "exploding")


def test_keras_a_nan_weight_is_found_at_its_step_with_its_name(tmp_path) -> None:
    keras = requires("keras")
    import normlog.keras

    model = keras_model()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    x = np.random.default_rng(0).normal(size=(640, 4)).astype("float32")
    y = np.random.default_rng(1).normal(size=(640, 1)).astype("float32")

    class PoisonAt(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 6:
                kernel = self.model.get_layer("out").kernel
                value = kernel.numpy()
                value[3, 0] = np.nan
                kernel.assign(value)

    watcher = normlog.keras.watch(model, str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, batch_size=64, epochs=1, verbose=0, callbacks=[PoisonAt(), watcher])
    weights = [(f.tensor, f.step) for f in watcher.findings if f.rule == "nonfinite" and f.kind == "parameters"]
    assert weights[0] == ("out/kernel", 6)


def test_keras_a_frozen_layer_is_neither_dead_nor_stalled(tmp_path) -> None:
    keras = requires("keras")
    import normlog.keras

    model = keras_model(frozen=True)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    x = np.random.default_rng(0).normal(size=(640, 4)).astype("float32")
    y = np.random.default_rng(1).normal(size=(640, 1)).astype("float32")
    watcher = normlog.keras.watch(model, str(tmp_path), update_every=1)
    model.fit(x, y, batch_size=64, epochs=3, verbose=0, callbacks=[watcher])
    assert not [f for f in watcher.findings if f.tensor.startswith("first/")]
    assert not [f for f in watcher.findings if f.rule in ("dead", "stalled")]
    assert scalars(read_events(str(tmp_path)), _step.norm_tag("gradients", "out/kernel"))


def test_the_normlog_console_script(tmp_path) -> None:
    import shutil

    script = shutil.which("normlog", path=os.path.dirname(sys.executable))
    assert script is not None, "pip install should put the normlog console script beside python"
    write_run(str(tmp_path / "run"), {"a": [1.0] * 3}, {"a": [1.0] * 3})
    result = subprocess.run([script, "report", str(tmp_path), "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["runs"]["run"]["findings"] == []
