"""watch(names=...): a parameter logged under the name given for it, in every tag it has."""

from __future__ import annotations

import warnings

import pytest

from helpers import read_events, requires, scalars

torch = requires("torch")
from torch import nn  # noqa: E402

import normlog  # noqa: E402
from normlog._step import (  # noqa: E402
    finding_text_tag,
    histogram_tag,
    nonfinite_count_tag,
    norm_tag,
    ratio_tag,
)
from normlog.health import HealthWarning  # noqa: E402


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(32, 6, generator=generator), torch.randn(32, 1, generator=generator)


def keras_names(model: nn.Sequential) -> dict[torch.Tensor, str]:
    """Names as Keras' torch backend would give them; the last bias keeps its torch name."""
    return {model[0].weight: "dense/kernel", model[0].bias: "dense/bias", model[2].weight: "dense_1/kernel"}


def test_renamed_parameters_have_every_tag_under_their_new_name(tmp_path) -> None:
    model = make_model()
    names = keras_names(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    grads: list[dict[str, float]] = []
    weights: list[dict[str, float]] = []
    with normlog.watch(model, str(tmp_path), names=names, histogram_every=2, update_every=1):
        for step in range(4):
            optimizer.zero_grad()
            x, y = batch(step)
            nn.functional.mse_loss(model(x), y).backward()
            logged_as = {p: names.get(p, "2.bias") for p in model.parameters()}
            grads.append({logged_as[p]: p.grad.norm().item() for p in model.parameters()})
            weights.append({logged_as[p]: p.detach().norm().item() for p in model.parameters()})
            optimizer.step()
    events = read_events(str(tmp_path))
    tags = events.Tags()
    for name in ["dense/kernel", "dense/bias", "dense_1/kernel", "2.bias"]:
        got = scalars(events, norm_tag("gradients", name))
        assert sorted(got) == [0, 1, 2, 3]
        assert all(got[s] == pytest.approx(grads[s][name], rel=1e-6) for s in got)
        weight = scalars(events, norm_tag("parameters", name))
        assert all(weight[s] == pytest.approx(weights[s][name], rel=1e-6) for s in weight)
        assert sorted(scalars(events, ratio_tag(name))) == [0, 1, 2, 3]
        assert histogram_tag("gradients", name) in tags["histograms"]
        assert histogram_tag("parameters", name) in tags["histograms"]
    # the renamed parameters' torch names are gone from every tag
    every_tag = [tag for kind in ("scalars", "histograms") for tag in tags[kind]]
    assert not [tag for tag in every_tag if tag.endswith(("/0.weight", "/0.bias", "/2.weight"))]


def test_names_in_a_loop_without_an_optimizer_as_keras_torch_backend_trains(tmp_path) -> None:
    # Keras' torch backend: zero the gradients, loss.backward(), then its own optimizer
    # applies them (no torch.optim): each backward pass is a step.
    model = make_model()
    names = {p: f"keras/{i}" for i, p in enumerate(model.parameters())}
    norms: list[dict[str, float]] = []
    with normlog.watch(model, str(tmp_path), names=names, histogram_every=None) as watcher:
        for step in range(5):
            model.zero_grad()
            x, y = batch(step)
            nn.functional.mse_loss(model(x), y).backward()
            norms.append({names[p]: p.grad.norm().item() for p in model.parameters()})
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
        assert watcher.step == 5
    events = read_events(str(tmp_path))
    for name in names.values():
        got = scalars(events, norm_tag("gradients", name))
        assert sorted(got) == [0, 1, 2, 3, 4]
        assert all(got[s] == pytest.approx(norms[s][name], rel=1e-6) for s in got)
    assert not [tag for tag in events.Tags()["scalars"] if tag.endswith((".weight", ".bias"))]


def test_nonfinite_counts_and_findings_use_the_given_name(tmp_path) -> None:
    model = make_model()
    names = keras_names(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    counted = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with normlog.watch(model, str(tmp_path), names=names) as watcher:
            for step in range(3):
                optimizer.zero_grad()
                x, y = batch(step)
                if step == 2:
                    x[0, 0] = float("nan")  # one NaN input: NaN gradients from the first layer on
                nn.functional.mse_loss(model(x), y).backward()
                counted = int((~torch.isfinite(model[0].weight.grad)).sum())
                optimizer.step()
            found = watcher.findings
    # one episode: its origin and members (the other tensors) under the names given
    flagged = {m.tensor for f in found if f.rule == "nonfinite" for m in (f, *f.members)}
    assert flagged == {*names.values(), "2.bias"}
    events = read_events(str(tmp_path))
    assert counted > 0
    assert scalars(events, nonfinite_count_tag("gradients", "dense/kernel"))[2] == counted
    table = events.Tensors(finding_text_tag("nonfinite") + "/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "`dense/kernel`" in table and "0.weight" not in table
    messages = [str(w.message) for w in caught]
    assert any("'dense/kernel' at step 2" in message for message in messages)  # the NaN/Inf count's warning
    assert any(issubclass(w.category, HealthWarning) for w in caught)
    assert not any("0.weight" in message or "0.bias" in message for message in messages)


def test_bad_names_are_refused_saying_what_to_pass(tmp_path) -> None:
    model = make_model()
    w, b = model[0].weight, model[0].bias
    with pytest.raises(ValueError, match=r"two parameters as 'layer'.*give each parameter its own name"):
        normlog.watch(model, str(tmp_path), names={w: "layer", b: "layer"})
    with pytest.raises(ValueError, match=r"two parameters as '2\.weight'"):
        normlog.watch(model, str(tmp_path), names={w: "2.weight"})  # another parameter's own name
    with pytest.raises(TypeError, match="maps each parameter to a str"):
        normlog.watch(model, str(tmp_path), names={w: 3})
    with pytest.raises(TypeError, match=r"keyed by the parameter tensors themselves.*got a key of type str"):
        normlog.watch(model, str(tmp_path), names={"0.weight": "dense/kernel"})
    with pytest.raises(ValueError, match="not parameters of the model"):
        normlog.watch(model, str(tmp_path), names={w.detach().clone(): "copy"})
    with pytest.raises(ValueError, match="non-empty name"):
        normlog.watch(model, str(tmp_path), names={w: ""})
    with pytest.raises(TypeError, match="takes a mapping"):
        normlog.watch(model, str(tmp_path), names=[(w, "dense/kernel")])
    assert not list(tmp_path.iterdir())  # nothing was written: each was refused before a Writer was made
