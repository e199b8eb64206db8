"""normlog.watch on PyTorch models, against torch and the core computed independently."""

from __future__ import annotations

import gc
import math
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from helpers import assert_same_histogram, read_events, requires, row_histogram, scalars

torch = requires("torch")
from torch import nn  # noqa: E402

import normlog  # noqa: E402
from normlog._step import GLOBAL_NORM, histogram_tag, nonfinite_count_tag, norm_tag, ratio_tag  # noqa: E402

# The device paths (histc instead of bincount, no host waits) run where a GPU is present;
# CI has none, so the CUDA cases and tests run on the GPU machine (see the README).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(params=["compiled", "torch"])
def cpu_engine(request, monkeypatch) -> str:
    """Run a test with the CPU rows from normlog._numba (where numba is), then without."""
    import normlog.torch._engines

    if request.param == "compiled":
        if normlog.torch._engines.numba_kernel() is None:
            pytest.skip("numba is not installed")
    else:
        monkeypatch.setattr(normlog.torch._engines, "numba_kernel", lambda: None)
    return str(request.param)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(32, 6, generator=generator), torch.randn(32, 1, generator=generator)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, accumulate: int = 1) -> list[dict]:
    """Train and return, for each optimizer step, what torch says each gradient's norm is."""
    seen = []
    for step in range(steps):
        optimizer.zero_grad()
        for micro in range(accumulate):
            x, y = batch(step * accumulate + micro)
            nn.functional.mse_loss(model(x), y).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        seen.append(
            {
                "norms": {n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None},
                "total": torch.nn.utils.get_total_norm(grads).item(),
                "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
            }
        )
        optimizer.step()
    return seen


def test_gradient_norms_equal_torch_and_global_norm_equals_get_total_norm(tmp_path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with normlog.watch(model, str(tmp_path), optimizer=optimizer):
        seen = train(model, optimizer, steps=5)
    events = read_events(str(tmp_path))
    for step, expected in enumerate(seen):
        for name, norm in expected["norms"].items():
            assert scalars(events, norm_tag("gradients", name))[step] == pytest.approx(norm, rel=1e-6)
            weight = expected["weights"][name].norm().item()
            assert scalars(events, norm_tag("parameters", name))[step] == pytest.approx(weight, rel=1e-6)
        assert scalars(events, GLOBAL_NORM)[step] == pytest.approx(expected["total"], rel=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_norms_of_large_tensors_agree_with_float64(device: str) -> None:
    from normlog.torch._engines import norms

    generator = torch.Generator().manual_seed(5)
    tensors = [torch.randn(2048, 1024, generator=generator), torch.rand(3_000_001, generator=generator) * 1e-3]
    tensors.append(torch.randn(1000, generator=generator).to(torch.bfloat16))
    tensors.append(torch.randn(77, generator=generator, dtype=torch.float64))
    expected = [np.linalg.norm(t.double().numpy()) for t in tensors]
    # dtypes interleaved, so the norms of each (device, dtype) group go back to their places
    tensors = [tensors[i].to(device) for i in (2, 0, 3, 1)]
    np.testing.assert_allclose(norms(tensors).cpu().numpy(), [expected[i] for i in (2, 0, 3, 1)], rtol=1e-5)


def test_update_ratio_is_the_relative_size_of_each_step(tmp_path) -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    with normlog.watch(model, str(tmp_path), optimizer=optimizer, update_every=1):
        seen = train(model, optimizer, steps=3)
    final = {n: p.detach() for n, p in model.named_parameters()}
    events = read_events(str(tmp_path))
    for step in range(3):
        for name, before in seen[step]["weights"].items():
            after = seen[step + 1]["weights"][name] if step + 1 < 3 else final[name]
            expected = (after - before).norm().item() / before.norm().item()
            assert scalars(events, ratio_tag(name))[step] == pytest.approx(expected, rel=1e-5)


def test_update_ratios_have_their_own_cadence(tmp_path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with normlog.watch(model, str(tmp_path), optimizer=optimizer, every=2, histogram_every=None, update_every=3):
        train(model, optimizer, steps=7)
    events = read_events(str(tmp_path))
    assert sorted(scalars(events, ratio_tag("0.weight"))) == [0, 3, 6]
    assert sorted(scalars(events, norm_tag("gradients", "0.weight"))) == [0, 2, 3, 4, 6]


def test_device_histograms_give_the_cores_numbers(tmp_path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with normlog.watch(model, str(tmp_path), optimizer=optimizer, histogram_every=2):
        seen = train(model, optimizer, steps=3)
    events = read_events(str(tmp_path))
    for step in (0, 2):
        for name, grad in seen[step]["grads"].items():
            (event,) = [e for e in events.Histograms(histogram_tag("gradients", name)) if e.step == step]
            core = normlog.histogram(grad.numpy())
            value = event.histogram_value
            filled = np.flatnonzero(core.counts)
            np.testing.assert_array_equal(value.bucket, core.counts[filled[0] : filled[-1] + 1])
            np.testing.assert_array_equal(value.bucket_limit, core.bucket_limits[filled[0] : filled[-1] + 1])
            assert (value.min, value.max, value.num) == (core.min, core.max, core.num)
            assert value.sum == pytest.approx(core.sum, rel=1e-9, abs=1e-12)
            assert value.sum_squares == pytest.approx(core.sum_squares, rel=1e-9)
    assert [e.step for e in events.Histograms(histogram_tag("parameters", "0.weight"))] == [0, 2]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_device_histogram_row_matches_the_core_exactly(dtype: str, device: str, cpu_engine: str) -> None:
    from normlog.torch._engines import histogram_row

    values = torch.randn(10_000, generator=torch.Generator().manual_seed(3)).to(getattr(torch, dtype))
    values[::97] = 0.0
    expected = normlog.histogram(values.double().numpy())
    for mask in (False, True):
        row = histogram_row(values.to(device), 30, mask).cpu().numpy()
        assert_same_histogram(row_histogram(row, 30), expected)


def test_device_histogram_row_of_a_tensor_of_many_blocks(cpu_engine: str) -> None:
    # the compiled row is counted in blocks of 65,536 values, shared among threads
    from normlog.torch._engines import histogram_row

    values = torch.randn(600_001, generator=torch.Generator().manual_seed(4)) * 5
    values[::100_003] = float("nan")
    values[7] = float("inf")
    expected = normlog.histogram(values.numpy())
    assert_same_histogram(row_histogram(histogram_row(values, 30, True).numpy(), 30), expected)


def test_compiled_rows_of_many_arrays_do_not_depend_on_the_threads() -> None:
    # normlog._numba cuts all the arrays of one call into blocks that its threads share:
    # arrays across block borders, of both dtypes, with NaN and Inf in some blocks
    numba = pytest.importorskip("numba")
    from normlog import _numba

    generator = np.random.default_rng(4)
    sizes = [600_001, 65_536, 65_537, 65_535, 0, 1, 3, 131_072]
    arrays = [
        generator.standard_normal(size).astype(np.float32 if i % 2 else np.float64) * (i + 1)
        for i, size in enumerate(sizes)
    ]
    arrays[0][::100_003] = np.nan
    arrays[0][7] = np.inf
    arrays[2][-1] = -np.inf
    arrays[7][70_000:70_010] = -np.nan  # sign bit set: its sort key is below -Inf's
    arrays.append(np.array([np.inf, -np.inf, np.nan, np.inf], dtype=np.float32))  # nothing to bin
    rows = _numba.rows(arrays, 30)
    for values, row in zip(arrays, rows, strict=True):
        got, expected = row_histogram(row, 30), normlog.histogram(values, 30)
        assert_same_histogram(got, expected)
        assert (got.sum, got.sum_squares) == pytest.approx((expected.sum, expected.sum_squares), rel=1e-9, abs=1e-9)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        alone = _numba.rows(arrays, 30)
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(alone, rows)  # the same bits, sums included


@pytest.mark.parametrize(
    "values",
    [[0.0, 5e-324, 1e-323, 2e-323], [-1e-309, 0.0, 3e-310], [-1.7e308, 0.0, 1e300, 1.7e308], [-1e300, 1.79e308]],
)
@pytest.mark.parametrize("device", DEVICES)
def test_device_histogram_of_float64_ranges_past_the_doubles_limits(values, device: str, cpu_engine: str) -> None:
    # ranges narrower than the smallest normal double, or wider than the largest: the
    # device scales by a power of two, as the core does
    from normlog.torch._engines import histogram_row

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    expected = normlog.histogram(np.array(values), 7)
    row = histogram_row(tensor, 7, mask_nonfinite=False).cpu().numpy()
    assert_same_histogram(row_histogram(row, 7), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_device_histogram_of_nonfinite_constant_and_empty_tensors(device: str, cpu_engine: str) -> None:
    from normlog.torch._engines import histogram_row

    cases = [
        torch.tensor([1.0, float("nan"), 3.0, float("inf"), -float("inf"), 2.0]),
        torch.full((7,), 0.25),
        torch.tensor([float("nan")] * 4),
        torch.zeros(0),
    ]
    for values in cases:
        got = row_histogram(histogram_row(values.to(device), 30, mask_nonfinite=True).cpu().numpy(), 30)
        expected = normlog.histogram(values.numpy())
        assert_same_histogram(got, expected)
        assert (got.sum, got.sum_squares) == pytest.approx((expected.sum, expected.sum_squares), rel=1e-12)


def test_gradient_accumulation_logs_once_per_optimizer_step(tmp_path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with normlog.watch(model, str(tmp_path), optimizer=optimizer):
        seen = train(model, optimizer, steps=3, accumulate=4)
    logged = scalars(read_events(str(tmp_path)), norm_tag("gradients", "0.weight"))
    assert sorted(logged) == [0, 1, 2]
    for step in range(3):
        assert logged[step] == pytest.approx(seen[step]["norms"]["0.weight"], rel=1e-6)


def test_without_an_optimizer_a_step_is_one_backward_pass(tmp_path) -> None:
    model = make_model()
    with normlog.watch(model, str(tmp_path), every=2, histogram_every=None) as watcher:
        norms = []
        for step in range(5):
            model.zero_grad()
            x, y = batch(step)
            nn.functional.mse_loss(model(x), y).backward()
            norms.append(model[0].weight.grad.norm().item())
        assert watcher.step == 5
    events = read_events(str(tmp_path))
    logged = scalars(events, norm_tag("gradients", "0.weight"))
    assert sorted(logged) == [0, 2, 4]
    assert all(logged[s] == pytest.approx(norms[s], rel=1e-6) for s in logged)
    assert events.Tags()["histograms"] == []


def test_every_and_histogram_every_pick_the_logged_steps(tmp_path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with normlog.watch(model, str(tmp_path), optimizer=optimizer, every=3, histogram_every=4):
        train(model, optimizer, steps=9)
    events = read_events(str(tmp_path))
    assert sorted(scalars(events, GLOBAL_NORM)) == [0, 3, 4, 6, 8]
    assert [e.step for e in events.Histograms(histogram_tag("gradients", "0.weight"))] == [0, 4, 8]


def test_frozen_unused_sparse_and_half_precision_parameters(tmp_path) -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 8, sparse=True)
            self.frozen = nn.Linear(8, 8)
            self.frozen.requires_grad_(False)
            self.unused = nn.Linear(8, 8)
            self.low = nn.Linear(8, 8).to(torch.bfloat16)
            self.head = nn.Linear(8, 1)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            h = self.frozen(self.embed(tokens).mean(1))
            return self.head(self.low(h.to(torch.bfloat16)).float())

    torch.manual_seed(0)
    model = Mixed()
    tokens = torch.randint(0, 50, (4, 5))
    with normlog.watch(model, str(tmp_path), histogram_every=1, strict=True):
        model(tokens).sum().backward()
    events = read_events(str(tmp_path))
    tags = set(events.Tags()["scalars"])
    dense = model.embed.weight.grad.to_dense()
    assert scalars(events, norm_tag("gradients", "embed.weight"))[0] == pytest.approx(dense.norm().item(), rel=1e-6)
    half_norm = model.low.weight.grad.float().norm().item()
    assert scalars(events, norm_tag("gradients", "low.weight"))[0] == pytest.approx(half_norm, rel=1e-3)
    assert norm_tag("gradients", "frozen.weight") not in tags and norm_tag("gradients", "unused.weight") not in tags
    assert {norm_tag("parameters", "frozen.weight"), norm_tag("parameters", "unused.weight")} <= tags
    assert histogram_tag("gradients", "embed.weight") in events.Tags()["histograms"]


def test_nonfinite_gradients_are_counted_and_warned_about(tmp_path, cpu_engine: str) -> None:
    # with the torch engine, the histogram row is recounted with NaN/Inf masked and replaced
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with normlog.watch(model, str(tmp_path), optimizer=optimizer, histogram_every=1):
        x, y = batch(0)

        def poison(grad: torch.Tensor) -> torch.Tensor:  # NaN/Inf made in the backward pass itself
            grad = grad.clone()
            grad[0, :3] = float("nan")
            grad[1, 0] = float("inf")
            return grad

        model[2].weight.register_hook(poison)
        nn.functional.mse_loss(model(x), y).backward()
        with pytest.warns(RuntimeWarning, match=r"4 NaN/Inf values in the gradients of '2.weight' at step 0"):
            optimizer.step()
    events = read_events(str(tmp_path))
    assert scalars(events, nonfinite_count_tag("gradients", "2.weight")) == {0: 4.0}
    assert math.isnan(scalars(events, norm_tag("gradients", "2.weight"))[0])
    value = events.Histograms(histogram_tag("gradients", "2.weight"))[0].histogram_value
    assert value.num == 16 * 16 - 4 and math.isfinite(value.sum)


def test_rewatching_replaces_hooks_and_unwatch_removes_them(tmp_path) -> None:
    model = make_model()
    first = normlog.watch(model, str(tmp_path / "a"))
    second = normlog.watch(model, str(tmp_path / "b"))
    x, y = batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    # without an optimizer, a backward pass is written as a step once the next one starts
    # from cleared gradients, or at unwatch
    assert (first.step, second.step) == (0, 0)
    normlog.unwatch(model)
    assert second.step == 1
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    assert second.step == 1
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def test_an_unwatched_model_is_garbage_collected(tmp_path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = normlog.watch(model, str(tmp_path), optimizer=optimizer)
    train(model, optimizer, steps=1)
    watcher.unwatch()
    ref = weakref.ref(model)
    del model, optimizer, watcher
    gc.collect()
    assert ref() is None


def test_a_failure_inside_logging_warns_once_and_training_goes_on(tmp_path) -> None:
    model = make_model()
    watcher = normlog.watch(model, str(tmp_path))
    watcher.writer.close()  # every write now fails
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            model.zero_grad()
            x, y = batch(step)
            nn.functional.mse_loss(model(x), y).backward()
    messages = [str(w.message) for w in caught if "normlog" in str(w.message)]
    assert len(messages) == 1 and "logging failed at step 0" in messages[0]
    assert watcher.step == 3


def test_strict_raises_instead(tmp_path) -> None:
    model = make_model()
    watcher = normlog.watch(model, str(tmp_path), strict=True)
    watcher.writer.close()

    def backward(step: int) -> None:
        model.zero_grad()
        x, y = batch(step)
        nn.functional.mse_loss(model(x), y).backward()

    backward(0)
    with pytest.raises(ValueError, match="closed"):  # at the step's writing: the second pass starts it
        backward(1)


def test_log_activations_records_leaf_module_outputs(tmp_path) -> None:
    model = make_model()
    with normlog.watch(model, str(tmp_path), log_activations=True, histogram_every=1):
        x, y = batch(0)
        out = model(x)
        hidden = torch.tanh(model[0](x))
        nn.functional.mse_loss(out, y).backward()
    events = read_events(str(tmp_path))
    assert scalars(events, norm_tag("activations", "1"))[0] == pytest.approx(hidden.norm().item(), rel=1e-6)
    assert histogram_tag("activations", "4") in events.Tags()["histograms"]


def test_watching_a_compiled_model_adds_no_graph_breaks(tmp_path) -> None:
    from torch._dynamo.utils import counters

    def breaks(watched: bool) -> int:
        torch._dynamo.reset()
        counters.clear()
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        compiled = torch.compile(model, backend="aot_eager")
        watcher = normlog.watch(model, str(tmp_path / str(watched)), optimizer=optimizer) if watched else None
        for step in range(3):
            optimizer.zero_grad()
            x, y = batch(step)
            nn.functional.mse_loss(compiled(x), y).backward()
            optimizer.step()
        if watcher is not None:
            watcher.unwatch()
            assert sorted(scalars(read_events(str(tmp_path / "True")), GLOBAL_NORM)) == [0, 1, 2]
        return sum(counters["graph_break"].values())

    assert breaks(watched=True) == breaks(watched=False)


class CountingBackend:
    """A torch.compile backend that runs each graph as traced and counts the graphs
    dynamo made: a count that grows with the steps is a recompile every step."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Callable[..., Any]:
        self.graphs += 1
        return graph.forward


@pytest.mark.parametrize("optimizer_inside", [False, True])
def test_a_compiled_training_step_with_backward_inside_logs_every_step_from_step_0(tmp_path, optimizer_inside) -> None:
    # dynamo traced into the after-backward hook (the backward pass runs from a frame it
    # compiles), into the numba kernel, where step 0's logging failed: the hooks run eagerly
    torch._dynamo.reset()
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    backend = CountingBackend()

    @torch.compile(backend=backend)
    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if optimizer_inside:
            optimizer.step()
        return loss

    seen, graphs = [], []
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="normlog")  # a failure inside logging
        with normlog.watch(model, str(tmp_path), optimizer=optimizer, histogram_every=1, strict=True):
            for step in range(5):
                optimizer.zero_grad()
                train_step(*batch(step))
                seen += [p.grad.clone() for p in model.parameters()]  # SGD's step leaves .grad as it was
                if not optimizer_inside:
                    optimizer.step()
                graphs.append(backend.graphs)
    names = [name for name, _ in model.named_parameters()]
    events = read_events(str(tmp_path))
    for i, name in enumerate(names):
        want = {step: seen[step * len(names) + i].norm().item() for step in range(5)}
        assert scalars(events, norm_tag("gradients", name)) == pytest.approx(want, rel=1e-6)
        assert sorted(e.step for e in events.Histograms(histogram_tag("gradients", name))) == list(range(5))
    assert graphs[1] == graphs[-1]  # compiled in the first steps, never again


def test_a_compiled_model_logging_activations_compiles_once_not_every_step(tmp_path) -> None:
    # traced into the graph, the forward hooks guarded on the watcher's step: a recompile
    # every step, until dynamo's limit, then the model ran uncompiled
    torch._dynamo.reset()
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    hidden, graphs = [], []
    with normlog.watch(model, str(tmp_path), optimizer=optimizer, log_activations=True, strict=True):
        for step in range(10):
            optimizer.zero_grad()
            x, y = batch(step)
            out = compiled(x)
            with torch.no_grad():
                hidden.append(torch.tanh(model[0](x)).norm().item())
            nn.functional.mse_loss(out, y).backward()
            optimizer.step()
            graphs.append(backend.graphs)
    assert graphs[1] == graphs[-1]
    logged = scalars(read_events(str(tmp_path)), norm_tag("activations", "1"))
    assert logged == pytest.approx(dict(enumerate(hidden)), rel=1e-6)


def test_steps_gradscaler_skips_are_still_reported(tmp_path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    def overflow(grad: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full_like(grad[:1], float("inf")), grad[1:]])

    with normlog.watch(model, str(tmp_path), optimizer=optimizer, scaler=scaler) as watcher:
        norms = []
        for step in range(4):
            optimizer.zero_grad()
            x, y = batch(step)
            handle = model[0].bias.register_hook(overflow) if step == 2 else None  # Inf in the backward pass
            scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
            if handle is not None:
                handle.remove()
            scaler.unscale_(optimizer)
            norms.append(model[0].weight.grad.norm().item())  # unscaled
            with (
                pytest.warns(RuntimeWarning, match="1 NaN/Inf values in the gradients of '0.bias' at step 2")
                if (step == 2)
                else warnings.catch_warnings()
            ):
                scaler.step(optimizer)
                scaler.update()
        assert watcher.step == 4
    assert scaler.update.__func__ is torch.amp.GradScaler.update  # unwatch restored it
    events = read_events(str(tmp_path))
    logged = scalars(events, norm_tag("gradients", "0.weight"))
    assert sorted(logged) == [0, 1, 2, 3]
    assert all(logged[s] == pytest.approx(norms[s], rel=1e-6) for s in range(4))
    assert scalars(events, "amp/skipped_step") == {2: 1.0}
    assert scalars(events, nonfinite_count_tag("gradients", "0.bias")) == {2: 1.0}
    assert scalars(events, "amp/loss_scale") == {0: 1024.0, 1: 1024.0, 2: 1024.0, 3: 512.0}


@needs_cuda
def test_a_model_spread_over_the_cpu_and_a_gpu(tmp_path) -> None:
    # a hand-made pipeline split: the first layer on the CPU, the rest on the GPU
    class Split(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(6, 16)
            self.rest = nn.Sequential(nn.Tanh(), nn.Linear(16, 1)).cuda()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rest(self.first(x).cuda())

    torch.manual_seed(0)
    model = Split()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with normlog.watch(model, str(tmp_path), optimizer=optimizer, histogram_every=1, strict=True):
        seen = []
        for step in range(2):
            optimizer.zero_grad()
            x, y = batch(step)
            nn.functional.mse_loss(model(x), y.cuda()).backward()
            seen.append({n: p.grad.clone() for n, p in model.named_parameters()})
            optimizer.step()
    events = read_events(str(tmp_path))
    for step, grads in enumerate(seen):
        total = torch.nn.utils.get_total_norm([g.cpu() for g in grads.values()]).item()
        assert scalars(events, GLOBAL_NORM)[step] == pytest.approx(total, rel=1e-6)
        for name, grad in grads.items():
            assert scalars(events, norm_tag("gradients", name))[step] == pytest.approx(grad.norm().item(), rel=1e-6)
            (event,) = [e for e in events.Histograms(histogram_tag("gradients", name)) if e.step == step]
            core = normlog.histogram(grad.cpu().numpy())
            assert (event.histogram_value.min, event.histogram_value.max) == (core.min, core.max)
            assert event.histogram_value.num == core.num


@needs_cuda
def test_steps_not_logged_never_wait_for_the_gpu_and_logged_ones_wait_once(tmp_path) -> None:
    # CUDA's sync debug mode reports each time the host waits for the device
    model = make_model().cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = [tuple(t.cuda() for t in batch(step)) for step in range(6)]
    waits = []
    with normlog.watch(model, str(tmp_path), optimizer=optimizer, every=3, histogram_every=3, strict=True):
        for x, y in data:
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    optimizer.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            waits.append(sum("synchronizing" in str(w.message) for w in caught))
    assert waits[1:3] == waits[4:] == [0, 0] and max(waits) <= 1


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_multi_tensor_rows_on_the_gpu_equal_the_per_tensor_rows(dtype: str) -> None:
    # the Triton path (one launch for all tensors) against the torch path, which the tests
    # above hold to the core; sizes around its block of 8192 elements, and the awkward cases
    pytest.importorskip("triton")
    from normlog.torch import _triton
    from normlog.torch._engines import histogram_row

    generator = torch.Generator().manual_seed(11)
    tensors = [torch.randn(n, generator=generator) * 3 for n in (1, 8191, 8192, 8193, 100_003)]
    tensors += [torch.zeros(0), torch.full((5,), 0.25), torch.tensor([float("nan")] * 3)]
    tensors.append(torch.tensor([1.0, float("nan"), -float("inf"), float("inf"), 2.0, -3.0, float("inf")]))
    tensors.append(torch.randn(64, 64, generator=generator).t())  # not contiguous
    tensors = [t.to(getattr(torch, dtype)).cuda() for t in tensors]
    rows = _triton.stats_rows(tensors, 30).cpu().numpy()
    for tensor, row in zip(tensors, rows):
        expected = histogram_row(tensor, 30, mask_nonfinite=True).cpu().numpy()
        assert_same_histogram(row_histogram(row, 30), row_histogram(expected, 30))
        np.testing.assert_allclose(row[2:4], expected[2:4], rtol=1e-12)
        np.testing.assert_array_equal(row[4:8], expected[4:8])
    norms = _triton.stats_rows(tensors, 0).cpu().numpy()  # without bins: the same sums and counts
    np.testing.assert_allclose(norms[:, 2:4], rows[:, 2:4], rtol=1e-12)  # atomics add in any order
    np.testing.assert_array_equal(norms[:, 4:], rows[:, 4:8])


@needs_cuda
def test_watching_a_gpu_model_gives_torchs_norms_and_the_cores_histograms(tmp_path) -> None:
    model = make_model().cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    seen = []
    with normlog.watch(model, str(tmp_path), optimizer=optimizer, histogram_every=1, strict=True):
        for step in range(3):
            optimizer.zero_grad()
            x, y = (t.cuda() for t in batch(step))
            nn.functional.mse_loss(model(x), y).backward()
            if step == 2:
                model[2].weight.grad[0, :3] = float("nan")
            seen.append({n: p.grad.clone() for n, p in model.named_parameters()})
            optimizer.step()
    # the last step is written when the watch ends, from the copy still in flight
    events = read_events(str(tmp_path))
    for step, grads in enumerate(seen):
        total = torch.nn.utils.get_total_norm(list(grads.values())).item()
        global_norm = scalars(events, GLOBAL_NORM)[step]
        assert math.isnan(global_norm) if step == 2 else global_norm == pytest.approx(total, rel=1e-6)
        for name, grad in grads.items():
            norm = scalars(events, norm_tag("gradients", name))[step]
            assert math.isnan(norm) if grad.isnan().any() else norm == pytest.approx(grad.norm().item(), rel=1e-6)
            (event,) = [e for e in events.Histograms(histogram_tag("gradients", name)) if e.step == step]
            core = normlog.histogram(grad.cpu().numpy())
            value = event.histogram_value
            assert (value.min, value.max, value.num) == (core.min, core.max, core.num)
            filled = np.flatnonzero(core.counts)
            np.testing.assert_array_equal(value.bucket, core.counts[filled[0] : filled[-1] + 1])
    assert scalars(events, nonfinite_count_tag("gradients", "2.weight")) == {2: 3.0}


@needs_cuda
@pytest.mark.parametrize("strict", [False, True])
def test_on_a_gpu_a_failure_in_the_background_writing_warns_once_or_raises_when_strict(tmp_path, strict) -> None:
    model = make_model().cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = normlog.watch(model, str(tmp_path), optimizer=optimizer, strict=strict)
    watcher.writer.close()  # every write now fails, on the background thread

    def steps() -> None:
        for step in range(3):
            optimizer.zero_grad()
            x, y = (t.cuda() for t in batch(step))
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        watcher.unwatch()

    if strict:  # raised on the training thread, at the next hook or at unwatch
        with pytest.raises(ValueError, match="closed"):
            steps()
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            steps()
        messages = [str(w.message) for w in caught if "logging failed" in str(w.message)]
        assert len(messages) == 1 and watcher.step == 3


class WithExcludedEmbedding(nn.Module):
    """A pretrained embedding the optimizer leaves out (it still gets gradients), then an MLP."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 6)
        self.mlp = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(tokens).mean(1))


def test_a_tensor_left_out_of_the_optimizer_has_no_update_ratio_and_is_never_stalled(tmp_path) -> None:
    from normlog.report import load_runs

    model = WithExcludedEmbedding()
    optimizer = torch.optim.Adam(model.mlp.parameters(), 1e-3)
    generator = torch.Generator().manual_seed(0)
    with normlog.watch(model, str(tmp_path), update_every=1) as watcher:
        for _ in range(8):
            tokens, y = torch.randint(0, 20, (32, 5), generator=generator), torch.randn(32, 1, generator=generator)
            optimizer.zero_grad()
            nn.functional.mse_loss(model(tokens), y).backward()
            assert model.embed.weight.grad.norm() > 0  # its gradient is fine: only the optimizer leaves it out
            optimizer.step()
        online = watcher.findings
    events = read_events(str(tmp_path))
    assert ratio_tag("embed.weight") not in events.Tags()["scalars"]
    assert sorted(scalars(events, ratio_tag("mlp.0.weight"))) == list(range(8))
    assert sorted(scalars(events, norm_tag("gradients", "embed.weight"))) == list(range(8))
    (run,), _ = load_runs(str(tmp_path))
    assert [f for f in online if f.rule == "stalled"] == [] == [f for f in run.findings if f.rule == "stalled"]
    assert all(
        values.owned in (None, {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}) for values in run.steps
    )


class Gained(nn.Module):
    """A 1-D gain whose name says nothing of its shape, large beside its small gradient, as a
    LayerNorm gain's ‖grad‖/‖weight‖ is small because its weight is all ones."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(6, 16)
        self.amplitude = nn.Parameter(torch.full((16,), 1e4))
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(x)) * self.amplitude * 1e-4)


def test_the_health_rules_know_each_tensors_shape_where_report_guesses_it_from_the_name(tmp_path) -> None:
    from normlog.report import load_runs

    model = Gained()
    optimizer = torch.optim.SGD(model.parameters(), 1e-3)
    quick = normlog.health.Thresholds(vanish_steps=5)
    with normlog.watch(model, str(tmp_path), health=quick) as watcher:
        for step in range(10):
            optimizer.zero_grad()
            x, y = batch(step)
            nn.functional.mse_loss(model(x), y).backward()
            ratio = (model.amplitude.grad.norm() / model.amplitude.norm()).item()
            assert ratio < 1e-3  # tiny, because the weight is large
            optimizer.step()
        online = watcher.findings
    # online, amplitude is known to be 1-D: a gain, never vanishing while its matrix learns
    assert [f for f in online if f.rule == "vanishing"] == []
    # the event files hold no shapes: read back, the same norms make it look like a matrix
    (run,), _ = load_runs(str(tmp_path))
    again = normlog.health.evaluate(run.steps, quick)
    assert [(f.rule, f.tensor) for f in again] == [("vanishing", "amplitude")]
