"""What a step is in the recipes people train with: one optimizer update, its gradients as the
last backward pass before it left them (accumulated, unscaled, before clipping), each checked
against torch's own numbers (clip_grad_norm_'s return, p.grad.norm()) read back from the files."""

from __future__ import annotations

import copy
import gc
import io
import os
import pickle
import threading
import warnings
from collections.abc import Callable

import pytest

from helpers import read_events, requires, scalars

torch = requires("torch")
from torch import nn  # noqa: E402

import normlog  # noqa: E402
from normlog._step import (  # noqa: E402
    CLIPPED_GLOBAL_NORM,
    GLOBAL_NORM,
    histogram_tag,
    norm_tag,
    ratio_tag,
)

MAX_NORM = 0.05  # below every step's gradient norm on this model and data: clipping always engages


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(32, 6, generator=generator), torch.randn(32, 1, generator=generator) * 3


def loss_of(model: nn.Module, seed: int) -> torch.Tensor:
    x, y = batch(seed)
    return nn.functional.mse_loss(model(x), y)


def global_norm(model: nn.Module) -> float:
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]).item()


def logged(logdir: str, tag: str = GLOBAL_NORM) -> dict[int, float]:
    return scalars(read_events(logdir), tag)


def assert_steps(got: dict[int, float], want: list[float], rel: float = 1e-6) -> None:
    assert sorted(got) == list(range(len(want)))
    for step, value in enumerate(want):
        assert got[step] == pytest.approx(value, rel=rel), step


def test_with_clipping_engaged_every_step_the_logged_norm_is_what_clip_grad_norm_returned(tmp_path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    returned, applied = [], []
    with normlog.watch(model, str(tmp_path), optimizer=optimizer):
        for step in range(5):
            optimizer.zero_grad()
            loss_of(model, step).backward()
            returned.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
            applied.append(global_norm(model))
            optimizer.step()
    assert all(norm > MAX_NORM for norm in returned)  # clipping engaged at every step
    assert_steps(logged(str(tmp_path)), returned)
    assert_steps(logged(str(tmp_path), CLIPPED_GLOBAL_NORM), applied, rel=1e-5)


@pytest.mark.parametrize("pass_optimizer", [True, False])
def test_accumulating_four_micro_batches_with_clipping_logs_one_step_per_update(tmp_path, pass_optimizer) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    returned, layer = [], []
    with normlog.watch(model, str(tmp_path), optimizer=optimizer if pass_optimizer else None, every=2):
        for step in range(6):
            optimizer.zero_grad()
            for micro in range(4):
                (loss_of(model, 4 * step + micro) / 4).backward()
            layer.append(model[0].weight.grad.norm().item())
            returned.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
            optimizer.step()
    got = logged(str(tmp_path))
    assert sorted(got) == [0, 2, 4]  # every=2 counts updates, not micro-batches
    for step in (0, 2, 4):
        assert got[step] == pytest.approx(returned[step], rel=1e-6)
        assert logged(str(tmp_path), norm_tag("gradients", "0.weight"))[step] == pytest.approx(layer[step], rel=1e-6)


def test_sgd_step_with_a_closure_logs_the_closures_gradients_at_that_step(tmp_path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    seen: list[float] = []

    def closure_for(step: int) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = loss_of(model, step)
            loss.backward()
            seen.append(global_norm(model))
            return loss

        return closure

    with normlog.watch(model, str(tmp_path)):
        for step in range(4):
            optimizer.step(closure_for(step))
    assert_steps(logged(str(tmp_path)), seen)


def test_lbfgs_logs_the_first_closure_evaluation_of_each_step(tmp_path) -> None:
    model = make_model()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=4)
    first_of_each_step: list[float] = []
    evaluations = [0]

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_of(model, 0)
        loss.backward()
        if evaluations[0] == 0:
            first_of_each_step.append(global_norm(model))
        evaluations[0] += 1
        return loss

    with normlog.watch(model, str(tmp_path), optimizer=optimizer):
        for _ in range(3):
            evaluations[0] = 0
            optimizer.step(closure)
            assert evaluations[0] > 1  # LBFGS evaluated the closure again within the step
    assert_steps(logged(str(tmp_path)), first_of_each_step)


def test_gradscaler_with_clipping_after_unscale_logs_the_unscaled_norms_before_clipping(tmp_path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    returned = []
    with normlog.watch(model, str(tmp_path), scaler=scaler):
        for step in range(4):
            optimizer.zero_grad()
            scaler.scale(loss_of(model, step)).backward()
            scaler.unscale_(optimizer)
            returned.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
            scaler.step(optimizer)
            scaler.update()
    assert all(norm > MAX_NORM for norm in returned)
    assert_steps(logged(str(tmp_path)), returned)


def test_an_optimizer_made_again_mid_run_keeps_the_logging_going(tmp_path) -> None:
    model = make_model()
    norms = []
    with normlog.watch(model, str(tmp_path)):
        for step in range(6):
            if step % 3 == 0:  # a restart: a new optimizer, made after watch()
                optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            optimizer.zero_grad()
            loss_of(model, step).backward()
            norms.append(global_norm(model))
            optimizer.step()
    assert_steps(logged(str(tmp_path)), norms)


def test_a_resumed_run_continues_its_steps_and_rewatching_continues_the_count(tmp_path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def train(steps: int) -> None:
        for step in range(steps):
            optimizer.zero_grad()
            loss_of(model, step).backward()
            optimizer.step()

    for _ in range(3):  # watch() at the top of each epoch
        with normlog.watch(model, str(tmp_path / "epochs"), optimizer=optimizer):
            train(4)
    assert sorted(logged(str(tmp_path / "epochs"))) == list(range(12))
    resumed = make_model()
    optimizer = torch.optim.SGD(resumed.parameters(), lr=0.01)
    model = resumed
    with normlog.watch(resumed, str(tmp_path / "resumed"), optimizer=optimizer, step=500):
        train(3)
    assert sorted(logged(str(tmp_path / "resumed"))) == [500, 501, 502]


def test_two_named_models_in_one_logdir_keep_their_own_runs(tmp_path) -> None:
    generator, discriminator = make_model(1), make_model(2)
    g_optimizer = torch.optim.SGD(generator.parameters(), lr=0.01)
    d_optimizer = torch.optim.SGD(discriminator.parameters(), lr=0.01)
    g_norms, d_norms = [], []
    with (
        warnings.catch_warnings(),
        normlog.watch(generator, str(tmp_path), name="generator"),
        normlog.watch(discriminator, str(tmp_path), name="discriminator"),
    ):
        warnings.simplefilter("error", RuntimeWarning)  # named: no warning that runs mix
        for step in range(3):
            for model, optimizer, norms in ((discriminator, d_optimizer, d_norms), (generator, g_optimizer, g_norms)):
                for _ in range(2 if model is discriminator else 1):  # two discriminator updates per generator one
                    optimizer.zero_grad()
                    loss_of(model, step).backward()
                    norms.append(global_norm(model))
                    optimizer.step()
    assert sorted(os.listdir(tmp_path)) == ["discriminator", "generator"]
    assert_steps(logged(str(tmp_path / "generator")), g_norms)
    assert_steps(logged(str(tmp_path / "discriminator")), d_norms)


def test_a_second_unnamed_watcher_on_one_writer_warns(tmp_path) -> None:
    writer = normlog.Writer(str(tmp_path))
    first = normlog.watch(make_model(1), writer=writer)
    with pytest.warns(RuntimeWarning, match="Pass name="):
        second = normlog.watch(make_model(2), writer=writer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        third = normlog.watch(make_model(3), writer=writer, name="third")  # its own run: no warning
    assert third.writer is not writer and third.writer.logdir == os.path.join(str(tmp_path), "third")
    for watcher in (first, second, third):
        watcher.unwatch()
    writer.close()


def test_wrapped_optimizers_are_accepted_and_anything_else_is_refused_saying_what_to_pass(tmp_path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    class Wrapper:  # what accelerate's AcceleratedOptimizer and Lightning's LightningOptimizer look like
        def __init__(self, inner: torch.optim.Optimizer) -> None:
            self.optimizer = inner

        def step(self) -> None:
            self.optimizer.step()

    wrapped = Wrapper(optimizer)
    norms = []
    with normlog.watch(model, str(tmp_path), optimizer=wrapped):
        for step in range(2):
            optimizer.zero_grad()
            loss_of(model, step).backward()
            norms.append(global_norm(model))
            wrapped.step()
    assert_steps(logged(str(tmp_path)), norms)
    with pytest.raises(TypeError, match=r"torch.optim.Optimizer.*leave optimizer= out"):
        normlog.watch(model, str(tmp_path / "refused"), optimizer=object())
    assert not os.path.exists(tmp_path / "refused")


def test_a_failed_backward_does_not_stop_the_logging(tmp_path) -> None:
    model = make_model()
    norms = []
    with normlog.watch(model, str(tmp_path)) as watcher:
        for step in range(4):
            model.zero_grad()
            if step == 1:  # a real autograd error inside backward, caught by the loop

                def fail(grad: torch.Tensor) -> torch.Tensor:
                    raise RuntimeError("bad batch")

                handle = model[2].weight.register_hook(fail)
                with pytest.raises(RuntimeError, match="bad batch"):
                    loss_of(model, step).backward()
                handle.remove()
                model.zero_grad()
            loss_of(model, step).backward()
            norms.append(global_norm(model))
    assert watcher.step == 4
    assert_steps(logged(str(tmp_path)), norms)


def test_a_layer_replaced_after_watch_is_followed_and_named_in_a_warning(tmp_path) -> None:
    model = make_model()
    weights, grads = [], []
    with normlog.watch(model, str(tmp_path)), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            if step == 2:
                torch.manual_seed(9)
                model[4] = nn.Linear(16, 1)  # the old layer's tensors are gone from the model
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            optimizer.zero_grad()
            loss_of(model, step).backward()
            weights.append(model[4].weight.norm().item())
            grads.append(model[4].weight.grad.norm().item())
            optimizer.step()
    messages = [str(w.message) for w in caught if "parameters changed" in str(w.message)]
    assert len(messages) == 1 and "4.weight, 4.bias" in messages[0]
    assert_steps(logged(str(tmp_path), norm_tag("parameters", "4.weight")), weights)
    assert_steps(logged(str(tmp_path), norm_tag("gradients", "4.weight")), grads)


def test_a_frozen_parameter_with_a_stale_zero_gradient_is_never_dead_and_keeps_its_weight_norm(tmp_path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with normlog.watch(model, str(tmp_path), optimizer=optimizer, health=normlog.health.Thresholds(dead_steps=2)) as w:
        for step in range(6):
            if step == 1:
                model[0].requires_grad_(False)  # frozen mid-run
            optimizer.zero_grad(set_to_none=False)  # its .grad stays, all zeros
            loss_of(model, step).backward()
            optimizer.step()
        findings = w.findings
    assert not [f for f in findings if f.rule in ("dead", "stalled") and f.tensor.startswith("0.")]
    assert sorted(logged(str(tmp_path), norm_tag("parameters", "0.weight"))) == list(range(6))
    assert sorted(logged(str(tmp_path), norm_tag("gradients", "0.weight"))) == [0]


def test_activation_hooks_survive_pickle_torch_save_and_deepcopy_and_a_copy_records_nothing(tmp_path) -> None:
    model = make_model()
    with normlog.watch(model, str(tmp_path), log_activations=True):
        copied = copy.deepcopy(model)  # an EMA copy
        restored = pickle.loads(pickle.dumps(model))
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        x, y = batch(0)
        hidden = torch.tanh(model[0](x))
        for other in (copied, restored, loaded):  # their forwards and backward write nothing
            nn.functional.mse_loss(other(x * 100), y).backward()
        nn.functional.mse_loss(model(x), y).backward()
    events = read_events(str(tmp_path))
    assert scalars(events, norm_tag("activations", "1")) == {0: pytest.approx(hidden.norm().item(), rel=1e-6)}


def test_forwards_without_a_backward_hold_one_batch_of_activations_at_most(tmp_path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with normlog.watch(model, str(tmp_path), log_activations=True, optimizer=optimizer) as watcher:
        for _ in range(50):  # a validation loop without no_grad
            model(torch.randn(256, 6))
        held = sum(t.numel() for t in watcher._activations.values())
        optimizer.zero_grad()
        loss_of(model, 0).backward()
        optimizer.step()
    leaf_outputs_of_one_batch = 256 * (16 + 16 + 16 + 16 + 1)
    assert held == leaf_outputs_of_one_batch


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_a_dropped_watcher_releases_its_thread_and_its_writers_descriptor(tmp_path) -> None:
    def watch_and_drop(i: int) -> None:
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        normlog.watch(model, str(tmp_path / str(i)), optimizer=optimizer)
        optimizer.zero_grad()
        loss_of(model, i).backward()
        optimizer.step()  # no unwatch: model, optimizer and watcher just go

    watch_and_drop(0)
    gc.collect()
    descriptors, threads = _open_descriptors(), threading.active_count()
    for i in range(1, 6):
        watch_and_drop(i)
        gc.collect()
    assert _open_descriptors() == descriptors
    assert threading.active_count() == threads
    assert sorted(logged(str(tmp_path / "5"))) == [0]


# Steps with no gradient, or gradients on only some parameters: the optimizer updates what
# has a gradient and skips the rest (torch.optim skips p.grad is None), so a step logs the
# weights, and gradient norms, histograms and update ratios only where a gradient is, as
# wandb.watch and Lightning's grad-norm logging log nothing for a missing gradient. It is a
# normal step, not a failure: no warning, and strict=True does not raise.


def tags_of(logdir: str) -> set[str]:
    tags = read_events(logdir).Tags()
    return set(tags["scalars"]) | set(tags["histograms"])


def test_an_optimizer_step_before_any_backward_pass_logs_the_weights_and_no_gradients(tmp_path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    names = [name for name, _ in model.named_parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failure inside logging would warn, or raise under strict
        with normlog.watch(model, str(tmp_path), optimizer=optimizer, strict=True, histogram_every=1):
            weights = {name: p.norm().item() for name, p in model.named_parameters()}
            optimizer.step()  # no backward pass yet: no parameter has a gradient
            optimizer.zero_grad()
            loss_of(model, 1).backward()
            grads = {name: p.grad.norm().item() for name, p in model.named_parameters()}
            optimizer.step()
    events = read_events(str(tmp_path))
    for name in names:
        assert scalars(events, norm_tag("parameters", name))[0] == pytest.approx(weights[name], rel=1e-6)
        assert 0 in {e.step for e in events.Histograms(histogram_tag("parameters", name))}
        # the gradients begin with the first backward pass, at the step it belongs to
        assert scalars(events, norm_tag("gradients", name)) == {1: pytest.approx(grads[name], rel=1e-6)}
        assert 0 not in {e.step for e in events.Histograms(histogram_tag("gradients", name))}
        assert ratio_tag(name) not in tags_of(str(tmp_path))  # nothing was updated at step 0 ...
    assert sorted(scalars(events, GLOBAL_NORM)) == [1]  # ... and no global gradient norm either


def test_a_step_where_only_some_parameters_have_gradients_logs_theirs_and_every_weight(tmp_path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    head = {"4.weight", "4.bias"}  # the only parameters the loss reaches
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with normlog.watch(model, str(tmp_path), optimizer=optimizer, strict=True, histogram_every=1):
            x, y = batch(0)
            nn.functional.mse_loss(model[4](torch.tanh(x @ torch.ones(6, 16))), y).backward()
            assert {name for name, p in model.named_parameters() if p.grad is not None} == head
            grads = {name: p.grad.norm().item() for name, p in model.named_parameters() if p.grad is not None}
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()  # skips None grads
            before = {name: p.detach().clone() for name, p in model.named_parameters()}
            optimizer.step()
            ratios = {
                name: ((p.detach() - before[name]).norm() / before[name].norm()).item()
                for name, p in model.named_parameters()
            }
    events = read_events(str(tmp_path))
    tags = tags_of(str(tmp_path))
    assert scalars(events, GLOBAL_NORM) == {0: pytest.approx(total, rel=1e-6)}
    for name in before:
        assert scalars(events, norm_tag("parameters", name))[0] == pytest.approx(before[name].norm().item(), rel=1e-6)
        if name in head:
            assert scalars(events, norm_tag("gradients", name)) == {0: pytest.approx(grads[name], rel=1e-6)}
            assert scalars(events, ratio_tag(name)) == {0: pytest.approx(ratios[name], rel=1e-5)}
            assert histogram_tag("gradients", name) in tags
        else:
            assert ratios[name] == 0.0  # SGD left it alone: no gradient, no update, nothing logged
            assert not {norm_tag("gradients", name), histogram_tag("gradients", name), ratio_tag(name)} & tags


def test_gradients_set_to_none_before_the_step_leave_the_backward_passes_norms_and_apply_none(tmp_path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with normlog.watch(model, str(tmp_path), optimizer=optimizer, strict=True):
            loss_of(model, 0).backward()
            read = global_norm(model)  # what the backward pass left, read before clearing
            optimizer.zero_grad(set_to_none=True)
            applied = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()  # no gradient: 0
            optimizer.step()  # step 0: every .grad is None, the optimizer changes nothing
            optimizer.zero_grad(set_to_none=True)
            optimizer.step()  # no backward pass since step 0: the same update, as a second optimizer's
            loss_of(model, 1).backward()
            second = global_norm(model)
            optimizer.step()
    assert applied == 0.0
    assert logged(str(tmp_path)) == {0: pytest.approx(read, rel=1e-6), 1: pytest.approx(second, rel=1e-6)}
    assert logged(str(tmp_path), CLIPPED_GLOBAL_NORM) == {0: applied, 1: pytest.approx(second, rel=1e-6)}
    tags = tags_of(str(tmp_path))
    assert not {ratio_tag(name) for name, _ in model.named_parameters()} & tags  # step 0 updated nothing
