"""The histograms around a finding: the burst after an exploding or nonfinite finding
(`histograms_after_finding`) and the ring of the steps before it (`histograms_before_finding`),
in realistic torch runs, read back with TensorBoard's own reader."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator

import numpy as np
import pytest

from helpers import read_events, requires, scalars

torch = requires("torch")
from torch import nn  # noqa: E402

import normlog  # noqa: E402
from normlog._step import GLOBAL_NORM, histogram_tag, norm_tag, ratio_tag  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(params=["compiled", "torch"])
def cpu_engine(request, monkeypatch) -> str:
    """Run a test with the CPU rows from normlog._numba (where numba is), then with torch ops
    (whose rows of a tensor holding NaN are recounted when the step is read)."""
    import normlog.torch._engines

    if request.param == "compiled":
        if normlog.torch._engines.numba_kernel() is None:
            pytest.skip("numba is not installed")
    else:
        monkeypatch.setattr(normlog.torch._engines, "numba_kernel", lambda: None)
    return str(request.param)


STEPS, CAUSE = 60, 40  # the cause comes after the exploding rule's 20-step warm-up
RARELY = 1000  # histogram_every: only step 0 is due


def blobs(
    seed: int, device: str, classes: int = 10, dim: int = 20, batch: int = 64
) -> Iterator[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator) * 2
    while True:
        labels = torch.randint(0, classes, (batch,), generator=generator)
        yield (centres[labels] + torch.randn(batch, dim, generator=generator)).to(device), labels.to(device)


def noisy_binary(seed: int, device: str, dim: int = 20, batch: int = 64) -> Iterator[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(dim, generator=generator)
    while True:
        x = torch.randn(batch, dim, generator=generator)
        flip = torch.rand(batch, generator=generator) < 0.1
        y = ((x @ direction > 0) ^ flip).float()[:, None]
        yield x.to(device), y.to(device)


def mlp(widths: list[int], device: str) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        layers += [nn.Linear(n_in, n_out)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers).to(device)


def corrupted_batch(
    logdir: str, device: str, flush: bool = True, rules: dict | None = None, **options
) -> tuple[normlog.health.Finding, dict]:
    """An MLP classifier with Adam; the batch at step CAUSE comes from a bad shard: features
    in the wrong units (x1000) and labels out of step. Returns the exploding finding and, per
    step, the gradients and weights torch had when the step's gradients were read; `rules`,
    where given, receives what the health rules remember at the end (`Monitor.state_dict`)."""
    model = mlp([20, 64, 64, 10], device)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    data = blobs(0, device)
    seen: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with normlog.watch(model, logdir, histogram_every=RARELY, **options) as watcher:
            for step in range(STEPS):
                x, y = next(data)
                if step == CAUSE:
                    x, y = x * 1000, y.roll(1)
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                seen[step] = snapshot(model)
                optimizer.step()
                if flush:  # the finding is known before the next step is read, on a GPU too
                    watcher.flush()
            found = watcher.findings
            if rules is not None:
                rules.update(watcher._recorder.monitor.state_dict())
    (exploding,) = [f for f in found if f.rule == "exploding"]
    return exploding, seen


def nan_from_log0(logdir: str, device: str, **options) -> tuple[normlog.health.Finding, dict]:
    """A hand-written binary cross-entropy under a GradScaler (AMP's loop): at step CAUSE one
    sample's features come 10^4 too large, its sigmoid saturates to exactly 0 or 1 and the
    loss takes log(0); the scaler skips that update, and training goes on."""
    model = mlp([20, 64, 64, 1], device)
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)
    scaler = torch.amp.GradScaler(device, init_scale=1024.0)
    data = noisy_binary(0, device)
    seen: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with normlog.watch(model, logdir, histogram_every=RARELY, scaler=scaler, **options) as watcher:
            for step in range(STEPS):
                x, y = next(data)
                if step == CAUSE:
                    x = x.clone()
                    x[0] *= 1e4
                optimizer.zero_grad()
                p = torch.sigmoid(model(x))
                loss = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                seen[step] = snapshot(model)
                scaler.step(optimizer)
                scaler.update()
                watcher.flush()
            found = watcher.findings
    assert not torch.isnan(next(model.parameters())).any()  # the scaler skipped the NaN update
    (nonfinite,) = [f for f in found if f.rule == "nonfinite"]
    return nonfinite, seen


def snapshot(model: nn.Module) -> dict[str, dict[str, np.ndarray]]:
    return {
        "gradients": {n: p.grad.detach().cpu().double().numpy().copy() for n, p in model.named_parameters()},
        "parameters": {n: p.detach().cpu().double().numpy().copy() for n, p in model.named_parameters()},
    }


def histogram_steps(logdir: str) -> dict[str, list[int]]:
    """Each histogram tag's steps, in the order TensorBoard's reader holds them."""
    events = read_events(logdir)
    return {tag: [e.step for e in events.Histograms(tag)] for tag in events.Tags()["histograms"]}


def assert_core_histogram(logdir: str, kind: str, name: str, step: int, values: np.ndarray) -> None:
    """The histogram written at `step` is the core's of `values`, bucket for bucket."""
    (event,) = [e for e in read_events(logdir).Histograms(histogram_tag(kind, name)) if e.step == step]
    core = normlog.histogram(values.astype(np.float32))
    value = event.histogram_value
    filled = np.flatnonzero(core.counts)
    np.testing.assert_array_equal(value.bucket, core.counts[filled[0] : filled[-1] + 1])
    assert (value.min, value.max, value.num) == (core.min, core.max, core.num)


@pytest.mark.parametrize("device", DEVICES)
def test_an_exploding_finding_brings_histograms_of_every_tensor_at_the_k_steps_after_it(tmp_path, device) -> None:
    finding, seen = corrupted_batch(str(tmp_path), device, histograms_after_finding=4)
    s = finding.step
    assert CAUSE <= s <= CAUSE + 2
    steps = histogram_steps(str(tmp_path))
    names = list(seen[0]["gradients"])
    assert sorted(steps) == sorted(histogram_tag(k, n) for k in ("gradients", "parameters") for n in names)
    for tag, logged in steps.items():
        assert logged == [0, s + 1, s + 2, s + 3, s + 4], tag  # and none at the 15 steps after those
    for kind in ("gradients", "parameters"):
        assert_core_histogram(str(tmp_path), kind, "0.weight", s + 2, seen[s + 2][kind]["0.weight"])


@pytest.mark.parametrize("device", DEVICES)
def test_a_nan_from_log0_brings_histograms_at_the_k_steps_after_it(tmp_path, device) -> None:
    finding, seen = nan_from_log0(str(tmp_path), device)  # the default burst: 5 steps
    assert finding.step == CAUSE
    for tag, logged in histogram_steps(str(tmp_path)).items():
        assert logged == [0, *range(CAUSE + 1, CAUSE + 6)], tag
    assert_core_histogram(str(tmp_path), "gradients", "4.weight", CAUSE + 1, seen[CAUSE + 1]["gradients"]["4.weight"])


@pytest.mark.parametrize("device", DEVICES)
def test_burst_steps_that_every_skips_log_histograms_alone_and_the_rules_never_see_them(tmp_path, device) -> None:
    # every=10: the rules judge steps 0, 10, 20, 30 (warm-up 3), and the corrupted batch at 40,
    # a due step, explodes. Steps 41..45 then log histograms, and nothing else: no norms, no
    # update ratios (update_every=20), and the rules' history holds the due steps' norms only,
    # as the Keras adapter writes and judges such steps
    thresholds, rules = normlog.health.Thresholds(explode_warmup=3), {}
    finding, seen = corrupted_batch(
        str(tmp_path), device, rules=rules, every=10, update_every=20, health=thresholds, histograms_after_finding=5
    )
    assert finding.step == CAUSE
    due = list(range(0, STEPS, 10))
    for tag, logged in histogram_steps(str(tmp_path)).items():
        assert logged == [0, *range(CAUSE + 1, CAUSE + 6)], tag
    assert_core_histogram(str(tmp_path), "gradients", "0.weight", CAUSE + 3, seen[CAUSE + 3]["gradients"]["0.weight"])
    events = read_events(str(tmp_path))
    assert sorted(scalars(events, GLOBAL_NORM)) == due
    names = list(seen[0]["gradients"])
    for name in names:
        assert sorted(scalars(events, norm_tag("gradients", name))) == due
        assert sorted(scalars(events, norm_tag("parameters", name))) == due
        assert sorted(scalars(events, ratio_tag(name))) == [0, 20, 40]
    for tag in events.Tags()["scalars"]:
        assert all(step % 10 == 0 for step in scalars(events, tag)), tag
    # the norms written, and all the exploding rule remembers of 0.weight: its gradient's
    # norm at the due steps (computed here from what torch held), at no other step
    expected = [float(np.linalg.norm(seen[step]["gradients"]["0.weight"])) for step in due]
    logged = scalars(events, norm_tag("gradients", "0.weight"))
    assert [logged[step] for step in due] == pytest.approx(expected, rel=1e-5)
    assert rules["grad_history"]["0.weight"] == pytest.approx(expected, rel=1e-5)


def test_with_every_10_the_ring_keeps_the_due_steps_before_the_finding_and_the_burst_the_steps_after(tmp_path) -> None:
    thresholds = normlog.health.Thresholds(explode_warmup=3)
    finding, seen = corrupted_batch(
        str(tmp_path), "cpu", every=10, health=thresholds, histograms_after_finding=3, histograms_before_finding=2
    )
    assert finding.step == CAUSE
    for tag, logged in histogram_steps(str(tmp_path)).items():
        assert logged == [0, CAUSE - 10, CAUSE, CAUSE + 1, CAUSE + 2, CAUSE + 3], tag
    for step in (CAUSE - 10, CAUSE + 2):
        assert_core_histogram(str(tmp_path), "parameters", "2.weight", step, seen[step]["parameters"]["2.weight"])
    events = read_events(str(tmp_path))
    assert sorted(scalars(events, GLOBAL_NORM)) == list(range(0, STEPS, 10))


def test_zero_turns_the_burst_off(tmp_path) -> None:
    corrupted_batch(str(tmp_path), "cpu", histograms_after_finding=0)
    assert {tuple(logged) for logged in histogram_steps(str(tmp_path)).values()} == {(0,)}


def test_bad_burst_and_ring_options_are_refused_saying_what_to_pass(tmp_path) -> None:
    model = mlp([4, 1], "cpu")
    with pytest.raises(ValueError, match=r"histograms_after_finding must be an int >= 0"):
        normlog.watch(model, str(tmp_path), histograms_after_finding=-1)
    with pytest.raises(ValueError, match=r"histograms_before_finding must be an int >= 0"):
        normlog.watch(model, str(tmp_path), histograms_before_finding=-2)
    with pytest.raises(TypeError, match=r"histograms_before_finding must be an int \(steps\), got 2.5"):
        normlog.watch(model, str(tmp_path), histograms_before_finding=2.5)
    with pytest.raises(TypeError, match=r"histograms_after_finding must be an int \(steps\), got True"):
        normlog.watch(model, str(tmp_path), histograms_after_finding=True)
    with pytest.raises(ValueError, match=r"with health=False it would compute histograms every step for nothing"):
        normlog.watch(model, str(tmp_path), health=False, histograms_before_finding=3)


@pytest.mark.parametrize("device", DEVICES)
def test_the_ring_writes_the_steps_before_an_exploding_finding_at_their_own_steps(tmp_path, device, cpu_engine) -> None:
    finding, seen = corrupted_batch(str(tmp_path), device, histograms_after_finding=3, histograms_before_finding=5)
    s = finding.step
    for tag, logged in histogram_steps(str(tmp_path)).items():
        assert logged == [0, *range(s - 4, s + 4)], tag  # the ring (s-4..s, the finding's own), then the burst
    for step in (s - 4, s - 1, s):  # what the tensors held when the step's gradients were read
        for kind in ("gradients", "parameters"):
            assert_core_histogram(str(tmp_path), kind, "2.weight", step, seen[step][kind]["2.weight"])


def test_the_ring_before_a_nan_skips_only_the_histograms_with_no_finite_value(tmp_path, cpu_engine) -> None:
    finding, seen = nan_from_log0(str(tmp_path), "cpu", histograms_before_finding=3)
    s = finding.step
    steps = histogram_steps(str(tmp_path))
    spoiled = [n for n, g in seen[s]["gradients"].items() if not np.isfinite(g).any()]
    assert spoiled  # log(0) left these gradients without a finite value
    for kind in ("gradients", "parameters"):
        for name, values in seen[s][kind].items():
            at_cause = [s] if np.isfinite(values).any() else []
            assert steps[histogram_tag(kind, name)] == [0, s - 2, s - 1, *at_cause, *range(s + 1, s + 6)]
    assert_core_histogram(str(tmp_path), "parameters", "0.bias", s, seen[s]["parameters"]["0.bias"])
    partly = seen[s]["gradients"]["0.weight"]  # some NaN: the histogram of its finite values
    assert np.isnan(partly).any() and np.isfinite(partly).any()
    assert_core_histogram(str(tmp_path), "gradients", "0.weight", s, partly)


def test_the_ring_keeps_only_steps_after_the_last_histogram_step_so_every_tag_stays_in_order(tmp_path) -> None:
    # histograms due at step 38 (histogram_every=38): of the 5 steps before the finding at 40,
    # only 39 and 40 are kept; 36 and 37, written after 38, would make TensorBoard's data
    # server drop 38 (a step that arrives again preempts the series' records from it on)
    model = mlp([20, 64, 64, 10], "cpu")
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    data = blobs(0, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with normlog.watch(
            model, str(tmp_path), histogram_every=38, histograms_after_finding=2, histograms_before_finding=5
        ) as watcher:
            for step in range(STEPS):
                x, y = next(data)
                if step == CAUSE:
                    x, y = x * 1000, y.roll(1)
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
            (finding,) = [f for f in watcher.findings if f.rule == "exploding"]
            kept = len(watcher._ring)
    assert finding.step == CAUSE
    for tag, logged in histogram_steps(str(tmp_path)).items():
        assert logged == [0, 38, 39, 40, 41, 42], tag  # in the file's order: increasing
    assert kept <= 5 + 3  # bounded: steps 43..59 kept, the oldest let go


@needs_cuda
def test_the_ring_holds_its_rows_on_the_gpu(tmp_path) -> None:
    model = mlp([20, 64, 64, 10], "cuda")
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    data = blobs(0, "cuda")
    with normlog.watch(model, str(tmp_path), histogram_every=RARELY, histograms_before_finding=4) as watcher:
        for _ in range(12):
            x, y = next(data)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        watcher.flush()
        entries = list(watcher._ring._entries)
        assert 4 <= len(entries) <= 4 + 3
        assert all(piece.is_cuda for entry in entries for piece in entry.pieces)


@needs_cuda
def test_on_a_gpu_without_flush_the_burst_misses_at_most_its_first_three_steps_and_the_ring_fills_them(
    tmp_path,
) -> None:
    burst = tmp_path / "burst"
    finding, _ = corrupted_batch(str(burst), "cuda", flush=False, histograms_after_finding=6)
    s = finding.step
    for tag, logged in histogram_steps(str(burst)).items():
        assert set(range(s + 4, s + 7)) <= set(logged) <= {0, *range(s + 1, s + 7)}, tag
    ring = tmp_path / "ring"
    finding, _ = corrupted_batch(
        str(ring), "cuda", flush=False, histograms_after_finding=6, histograms_before_finding=2
    )
    s = finding.step
    for tag, logged in histogram_steps(str(ring)).items():
        assert logged == [0, s - 1, s, *range(s + 1, s + 7)], tag
