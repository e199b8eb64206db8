"""normlog._numba, the compiled CPU histogram kernel, on a shared machine: whatever thread
count a call runs on (chosen per call, capped at the usable cores), its rows are the core's
and the same bits; launching it leaves torch's thread count alone; the choice between
serial and parallel follows what the calls cost."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import normlog
from helpers import requires, row_histogram

numba = requires("numba")
from normlog import _numba  # noqa: E402  (numba first: a skip without it)

BLOCK = 65536  # _numba's block: arrays across its borders


def arrays_across_blocks() -> list[np.ndarray]:
    """Both dtypes, sizes across block borders, empty ones, NaN and Inf in some blocks."""
    generator = np.random.default_rng(7)
    sizes = [600_001, BLOCK, BLOCK + 1, BLOCK - 1, 0, 1, 3, 2 * BLOCK, 300_000]
    arrays = [
        generator.standard_normal(size).astype(np.float32 if i % 2 else np.float64) * (i + 1)
        for i, size in enumerate(sizes)
    ]
    arrays[0][::100_003] = np.nan
    arrays[2][-1] = -np.inf
    arrays[8][BLOCK * 3 + 5] = np.inf
    arrays.append(np.array([np.inf, -np.inf, np.nan], dtype=np.float32))
    return arrays


def core_rows(arrays: list[np.ndarray], bins: int) -> list[normlog.Histogram]:
    return [normlog.histogram(a, bins) for a in arrays]


def assert_row_is(row: np.ndarray, expected: normlog.Histogram, bins: int) -> None:
    got = row_histogram(row, bins)
    np.testing.assert_array_equal(got.counts, expected.counts)
    np.testing.assert_array_equal(got.edges, expected.edges)
    assert (got.min, got.max, got.num) == (expected.min, expected.max, expected.num)
    assert (got.nan, got.posinf, got.neginf) == (expected.nan, expected.posinf, expected.neginf)
    assert (got.sum, got.sum_squares) == pytest.approx((expected.sum, expected.sum_squares), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_rows_are_the_cores_and_the_same_bits_on_any_thread_count(threads: int) -> None:
    # more threads than cores too: numba allows up to NUMBA_NUM_THREADS, and a forced count
    # above that is clamped by numba itself, so go no higher
    arrays = arrays_across_blocks()
    count = min(threads, numba.config.NUMBA_NUM_THREADS)
    forced = _numba.rows(arrays, 30, threads=count)
    for row, expected in zip(forced, core_rows(arrays, 30), strict=True):
        assert_row_is(row, expected, 30)
    np.testing.assert_array_equal(forced, _numba.rows(arrays, 30, threads=1))  # sums included
    np.testing.assert_array_equal(forced, _numba.rows(arrays, 30))  # whatever the chooser picks


def test_rows_from_many_python_threads_at_once_are_the_same_bits() -> None:
    # a watcher's background thread and the training thread may both call it: one shared
    # chooser, numba's thread count set per calling thread
    arrays = arrays_across_blocks()
    expected = _numba.rows(arrays, 30, threads=1)
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                results.append(_numba.rows(arrays, 30))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    workers = [threading.Thread(target=work) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors and len(results) == 20
    for got in results:
        np.testing.assert_array_equal(got, expected)


def feed(chooser: _numba.Threads, cost: dict[bool, float], calls: int, blocks: int = 40) -> list[int]:
    """`calls` calls through `chooser`, each costing cost[parallel] seconds per value."""
    chosen = []
    for _ in range(calls):
        threads = chooser.choose(blocks)
        chosen.append(threads)
        values = blocks * BLOCK
        chooser.record(np.dtype(np.float32), threads, blocks, values, cost[threads > 1] * values)
    return chosen


def test_chooser_runs_serial_while_parallel_costs_more_and_probes_less_and_less_often() -> None:
    # contention: a fork-join waits for a descheduled thread, 3x the serial cost per value
    chooser = _numba.Threads(most=4)
    chosen = feed(chooser, {True: 3e-9, False: 1e-9}, 200)
    assert chosen[0] == 4  # the warm-up call (kernels loading) is not counted...
    assert chosen[1:3] == [4, 1]  # ...then one of each is measured
    probes = [i for i, threads in enumerate(chosen) if threads > 1 and i > 2]
    gaps = np.diff([2, *probes])
    assert chooser.parallel is False and set(chosen[3:]) == {1, 4}
    # each probe that loses doubles the wait before the next, up to 64 calls
    assert list(gaps[:6]) == [5, 9, 17, 33, 65, 65]
    assert sum(t > 1 for t in chosen[100:]) <= 2


def test_chooser_stays_parallel_on_idle_cores_and_switches_when_cores_get_busy() -> None:
    chooser = _numba.Threads(most=4)
    idle = feed(chooser, {True: 0.3e-9, False: 1e-9}, 100)
    assert chooser.parallel is True and sum(t == 1 for t in idle[3:]) <= 5
    # the cores fill up: the parallel calls get dearer than serial was, so the next is serial
    busy = feed(chooser, {True: 5e-9, False: 1e-9}, 3)
    assert busy[-1] == 1 and chooser.parallel is False
    # and when they are idle again, a probe finds parallel cheaper and takes it back
    again = feed(chooser, {True: 0.3e-9, False: 1e-9}, 80)
    assert chooser.parallel is True and again[-10:] == [4] * 10


def test_chooser_gives_small_calls_one_thread_and_counts_them_nowhere() -> None:
    chooser = _numba.Threads(most=4)
    assert chooser.choose(1) == 1  # one block: nothing to share
    assert chooser.choose(3) == 3  # fewer blocks than threads: a thread per block
    feed(chooser, {True: 1e-9, False: 5e-9}, 10, blocks=1)
    assert chooser.cost == {}
    assert _numba.Threads(most=1).choose(100) == 1


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "150000 100000\n"}, 2),  # docker --cpus=1.5
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "20000 100000\n"}, 1),
        ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu.max": "garbage"}, None),
        ({}, None),
    ],
)
def test_cgroup_cpu_quota(tmp_path, files: dict[str, str], expected: int | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert _numba.cgroup_cpu_quota(tmp_path) == expected


def run_python(code: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_threads_are_capped_at_the_cores_the_process_may_use() -> None:
    # taskset / a scheduler's CPU set: numba's default is every core of the machine
    out = run_python(
        """
        import os
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        import numba, numpy as np, normlog
        from normlog import _numba
        values = np.random.default_rng(1).standard_normal(10 * 65536).astype(np.float32)
        row = _numba.rows([values], 30)[0]
        chooser = _numba.Threads.shared()
        expected = normlog.histogram(values, 30).counts
        print(numba.config.NUMBA_NUM_THREADS, chooser.most, chooser.choose(10), (row[-30:] == expected).all())
        """,
        env={"NUMBA_NUM_THREADS": "4"},
    )
    assert out == "4 1 1 True"


def test_launching_the_kernel_leaves_torchs_thread_count_alone() -> None:
    # numba's OpenMP layer calls omp_set_num_threads(NUMBA_NUM_THREADS) on the thread that
    # launches it, and with torch loaded that is torch's OpenMP: a user's
    # torch.set_num_threads(1), made to share the machine, became every core (fails so
    # before the kernel launched numba's threads on a thread of its own)
    requires("torch")
    out = run_python(
        """
        import torch, numpy as np
        torch.set_num_threads(1)
        torch.randn(1000, 1000).sum()  # torch applies its count lazily, on first use
        assert torch.get_num_threads() == 1
        from normlog import _numba
        values = np.ones(10 * 65536, dtype=np.float32)
        _numba.rows([values], 30)
        _numba.rows([values], 30, threads=2)
        print(torch.get_num_threads())
        """,
        env={"NUMBA_NUM_THREADS": "2"},
    )
    assert out == "1"
