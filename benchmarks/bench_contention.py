"""Watched CPU training with histograms every step, on idle cores and on cores kept busy by
other processes (as DataLoader workers or a second job keep them).

Each measurement runs in a fresh child process (numba's and OpenMP's thread state is per
process), with N = os.cpu_count() busy-loop processes beside it in the busy column. The
busy loops stop by themselves after --busy-seconds and are killed when each child ends.
Modes, rounds and the two columns are interleaved, so drift in the machine's load hits
them alike; the table gives the median over rounds of each child's median step. The
norm-by-depth pictures, drawn with matplotlib on each histogram step, are left out (matplotlib
is hidden from the children) unless --with-pictures: they cost the same on idle and busy
cores and would hide the kernel; bench_torch.py measures a watched step whole.

    python benchmarks/bench_contention.py                      # torch's default thread count
    python benchmarks/bench_contention.py --torch-threads 1    # a user who set torch.set_num_threads(1)

Modes:
- plain: no watching.
- watch, kernel before the fix: every call of the compiled histogram kernel on all of
  numba's threads, its threading layer launched on the training thread (as it was: numba's
  OpenMP layer then set torch's OpenMP thread count to NUMBA_NUM_THREADS).
- watch: normlog as it is (`normlog._numba.Threads` picks serial or parallel per call).
- watch, NUMBA_NUM_THREADS=1: the workaround users found.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

MODES = {
    "plain": {},
    "watch, kernel before the fix": {},
    "watch": {},
    "watch, NUMBA_NUM_THREADS=1": {"NUMBA_NUM_THREADS": "1"},
}


def child(mode: str, steps: int, torch_threads: int | None, pictures: bool) -> None:
    """Train a small model in this process and print its step times as JSON."""
    import tempfile

    if not pictures:
        sys.modules["matplotlib"] = None  # type: ignore[assignment]  # normlog then skips the pictures
    import warnings

    import numba
    import torch
    from torch import nn

    import normlog
    import normlog.health

    warnings.simplefilter("ignore", normlog.health.HealthWarning)
    warnings.filterwarnings("ignore", message="normlog: the norm-by-depth images need matplotlib")
    if torch_threads:
        torch.set_num_threads(torch_threads)
    torch.manual_seed(0)
    # ~1.3M parameters in 8 tensors: each logged step bins 2.6M values (gradients and weights)
    model = nn.Sequential(
        nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 512), nn.GELU(), nn.Linear(512, 512), nn.Linear(512, 64)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs, targets = torch.randn(64, 256), torch.randn(64, 64)

    def step() -> None:
        loss = nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # torch applies its thread count on first use; the old kernel launched after that
    if mode == "watch, kernel before the fix":
        from normlog import _numba

        numba.get_num_threads()  # launches numba's layer on this, the training, thread
        _numba.Threads.shared().fixed = numba.config.NUMBA_NUM_THREADS
    if mode != "plain":
        normlog.watch(model, tempfile.mkdtemp(prefix="normlog-bench-"), optimizer=optimizer, every=1, histogram_every=1)
    for _ in range(3):
        step()
    print("ready", flush=True)
    sys.stdin.readline()  # the parent starts the busy loops, then says go
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    layer = numba.threading_layer() if mode != "plain" else None
    print(json.dumps({"times": times, "torch_threads": torch.get_num_threads(), "layer": layer}), flush=True)


BUSY_LOOP = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end: pass\n"


def measure(mode: str, busy: int, args: argparse.Namespace) -> tuple[float, dict[str, Any]]:
    """One child's median step (seconds), and what else it reported."""
    command = [sys.executable, __file__, "--child", mode, "--steps", str(args.steps)]
    if args.torch_threads:
        command += ["--torch-threads", str(args.torch_threads)]
    if args.with_pictures:
        command.append("--with-pictures")
    env = {**os.environ, **MODES[mode]}
    loops: list[subprocess.Popen[bytes]] = []
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdin is not None and process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{mode}: the child failed before training")
        loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(args.busy_seconds)]) for _ in range(busy)]
        time.sleep(0.2 if busy else 0.0)  # let the loops get going
        process.stdin.write("go\n")
        process.stdin.flush()
        result = json.loads(process.stdout.readline())
        process.wait(timeout=60)
    finally:
        for loop in loops:
            loop.kill()
        for loop in loops:
            loop.wait()
        if process.poll() is None:
            process.kill()
            process.wait()
    return statistics.median(result["times"]), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per child")
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads in each child (default: torch's)")
    parser.add_argument("--busy-seconds", type=float, default=300.0, help="the longest a busy loop may live")
    parser.add_argument("--with-pictures", action="store_true", help="let normlog draw its matplotlib pictures")
    parser.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.torch_threads, args.with_pictures)
        return

    busy = os.cpu_count() or 1
    samples: dict[tuple[str, int], list[float]] = {}
    reported: dict[tuple[str, int], dict[str, Any]] = {}
    for round_ in range(args.rounds):
        order = list(MODES)
        order = order[round_ % len(order) :] + order[: round_ % len(order)]
        for load in (0, busy) if round_ % 2 == 0 else (busy, 0):
            for mode in order:
                median, reported[mode, load] = measure(mode, load, args)
                samples.setdefault((mode, load), []).append(median)
                print(f"round {round_ + 1}, {load} busy, {mode}: {median * 1e3:.1f} ms", file=sys.stderr, flush=True)

    import numba
    import torch

    setting = f"torch.set_num_threads({args.torch_threads})" if args.torch_threads else "torch's default thread count"
    print(
        f"{os.cpu_count()} cores; {setting}; NUMBA_NUM_THREADS {numba.config.NUMBA_NUM_THREADS}, threading layer "
        f"{reported['watch', 0]['layer']!r}; torch {torch.__version__}; load average at the end (other work on the "
        f"machine, and ours): {os.getloadavg()[0]:.1f}\n"
        f"median over {args.rounds} rounds of each child's median of {args.steps} steps\n"
    )
    idle_plain = statistics.median(samples["plain", 0])
    busy_plain = statistics.median(samples["plain", busy])
    print(
        f"| mode | idle cores (ms/step) | {busy} busy-loop processes (ms/step) | busy vs plain, busy "
        "| torch threads at the end (idle / busy) |\n| --- | ---: | ---: | ---: | --- |"
    )
    for mode in MODES:
        idle, loaded = (statistics.median(samples[mode, load]) for load in (0, busy))
        torch_threads = " / ".join(str(reported[mode, load]["torch_threads"]) for load in (0, busy))
        print(
            f"| {mode} | {idle * 1e3:.1f} ({idle / idle_plain:.2f}x plain) | {loaded * 1e3:.1f} "
            f"| {loaded / busy_plain:.2f}x | {torch_threads} |"
        )


if __name__ == "__main__":
    main()
