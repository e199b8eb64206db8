"""torch.distributed with 2 processes on the CPU (gloo), through torchrun as users launch it:
the logged norms and histograms are those of a single-process run of the same model and
data, and under FSDP2 those of the whole tensors, not of one rank's shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import event_files, histogram_buckets, read_events, requires, scalars

torch = requires("torch")

from normlog._step import (  # noqa: E402
    CLIPPED_GLOBAL_NORM,
    GLOBAL_NORM,
    histogram_tag,
    norm_tag,
)

if not torch.distributed.is_available():
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
STEPS = 3


def run(mode: str, logdir: str) -> None:
    if mode.startswith("single"):
        command = [sys.executable, WORKER, mode, logdir]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        command += [WORKER, mode, logdir]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("distributed")
    runs = {}
    for mode in ("single", "ddp", "ddp-hooks", "ddp-per-rank", "fsdp", "single-accumulate", "ddp-accumulate"):
        runs[mode] = str(root / mode)
        run(mode, runs[mode])
    return runs


def all_scalars(logdir: str) -> dict[str, dict[int, float]]:
    events = read_events(logdir)
    return {tag: scalars(events, tag) for tag in events.Tags()["scalars"]}


def assert_same_scalars(got: dict[str, dict[int, float]], want: dict[str, dict[int, float]]) -> None:
    assert sorted(got) == sorted(want)
    for tag in want:
        assert sorted(got[tag]) == sorted(want[tag]), tag
        for step, value in want[tag].items():
            assert got[tag][step] == pytest.approx(value, rel=1e-5, abs=1e-7), (tag, step)


@pytest.mark.parametrize("mode", ["ddp", "ddp-hooks", "fsdp"])
def test_two_ranks_log_the_single_process_numbers_once(logs, mode) -> None:
    # Guarantee: DDP's logged gradients are the all-reduced ones (with optimizer= and with
    # backward hooks alone), FSDP2's norms are the whole tensors'; rank 0 alone writes.
    single = all_scalars(logs["single"])
    got = all_scalars(logs[mode])
    assert_same_scalars(got, single)
    assert sorted(got[norm_tag("gradients", "0.weight")]) == list(range(STEPS))
    assert len(event_files(logs[mode])) == 1
    assert not any(name.startswith("rank") for name in os.listdir(logs[mode]))


def test_ddp_with_no_sync_accumulation_and_clipping_logs_the_single_process_numbers(logs) -> None:
    # the first micro-batch's gradients stay local (no_sync); the second's backward
    # all-reduces the accumulated sum: the logged step is that, before clip_grad_norm_
    single = all_scalars(logs["single-accumulate"])
    assert_same_scalars(all_scalars(logs["ddp-accumulate"]), single)
    assert sorted(single[GLOBAL_NORM]) == list(range(STEPS))
    assert all(norm > 0.01 for norm in single[GLOBAL_NORM].values())  # clipping engaged
    assert all(norm == pytest.approx(0.01, rel=1e-4) for norm in single[CLIPPED_GLOBAL_NORM].values())


def test_per_rank_gives_each_rank_its_own_run(logs) -> None:
    root = logs["ddp-per-rank"]
    assert sorted(os.listdir(root)) == ["rank0", "rank1"]
    single = all_scalars(logs["single"])
    for rank in ("rank0", "rank1"):
        assert_same_scalars(all_scalars(os.path.join(root, rank)), single)


def test_fsdp_histograms_and_norms_are_the_whole_tensors_exactly(logs) -> None:
    # Each rank bins its shard with the global min and max and the counts are added: the
    # result must be the core's histogram of the gathered tensor, bucket for bucket.
    with open(os.path.join(logs["fsdp"], "expected.json")) as file:
        expected = json.load(file)
    events = read_events(logs["fsdp"])
    norms = all_scalars(logs["fsdp"])
    for step, record in enumerate(expected["steps"]):
        for key, want in record.items():
            kind, name = key.split(" ")
            tag = histogram_tag(kind, name)
            assert norms[norm_tag(kind, name)][step] == pytest.approx(want["norm"], rel=1e-6)
            if step % 2:  # histograms every 2 steps
                assert not [e for e in events.Histograms(tag) if e.step == step]
                continue
            (value,) = [e.histogram_value for e in events.Histograms(tag) if e.step == step]
            assert (value.min, value.max) == (want["min"], want["max"])
            counts = histogram_buckets(value)[:, 2]
            nonzero = np.flatnonzero(want["counts"])
            np.testing.assert_array_equal(counts, np.array(want["counts"])[nonzero[0] : nonzero[-1] + 1])


def test_fsdp_costs_one_all_reduce_per_logged_step_and_more_only_for_histograms_and_updates(logs) -> None:
    # step 0: norms (1), histograms (global min/max, then sums: 2), update ratios (1);
    # step 1: norms alone; step 2: norms and histograms. Never one per tensor (there are 8).
    with open(os.path.join(logs["fsdp"], "expected.json")) as file:
        assert json.load(file)["all_reduces"] == [4, 1, 3]


def test_fsdp_without_an_optimizer_is_refused_with_the_reason(tmp_path) -> None:
    # FSDP2's sharded gradients arrive (reduce-scattered) just before optimizer.step(); the
    # backward hooks of the sharded parameters never fire, so logging needs optimizer=.
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import normlog

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(ValueError, match="pass optimizer="):
            normlog.watch(model, tmp_path / "run")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with normlog.watch(model, tmp_path / "run", optimizer=optimizer, health=False):
            model(torch.ones(1, 2)).sum().backward()
            optimizer.step()
    finally:
        dist.destroy_process_group()
    norms = scalars(read_events(str(tmp_path / "run")), norm_tag("gradients", "0.weight"))
    assert norms[0] == pytest.approx(2.0, rel=1e-6)  # d(sum)/dW = ones((2, 2)), whose norm is 2
