"""Soak: a long run of a small PyTorch model watched by normlog, for memory and file growth.

Norms every step and histograms every 100 steps (the defaults), for `--steps` optimizer
steps. Prints resident memory after warm-up and at the end, the event file's size, the
bytes per logged step, and how evenly the file grew over the run (bytes per step in each
tenth of it, after warm-up). The README's figures come from the default 100,000 steps;
tests/test_soak.py runs a short version.

    python benchmarks/soak.py                  # 100,000 steps, a few minutes on 2 cores
    python benchmarks/soak.py --steps 3000 --json
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import resource
import tempfile
import time

import torch
from torch import nn

import normlog


def resident_mb() -> float:
    """Resident memory now (Linux /proc), else the peak so far."""
    try:
        with open("/proc/self/statm") as file:
            pages = int(file.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def soak(steps: int, histogram_every: int, logdir: str) -> dict[str, float]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 32), torch.randn(64, 1)
    watcher = normlog.watch(model, logdir, optimizer=optimizer, histogram_every=histogram_every)
    path = watcher.writer._file.path if watcher.writer is not None else ""
    warmup = max(steps // 10, 1)
    # each tenth after warm-up spans a whole number of histogram steps (each with its pictures)
    tenth = max(histogram_every, (steps - warmup) // 10 // histogram_every * histogram_every)
    checkpoints = {warmup + tenth * k: 0 for k in range(11) if warmup + tenth * k <= steps}
    sizes: list[tuple[int, int]] = []
    rss_warm = 0.0
    start = time.perf_counter()
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        if step in checkpoints:
            watcher.flush()  # the pictures being drawn too
            sizes.append((step, os.path.getsize(path)))
            if step == warmup:
                gc.collect()
                rss_warm = resident_mb()
    seconds = time.perf_counter() - start
    gc.collect()
    rss_end = resident_mb()
    watcher.unwatch()
    per_step = [(b1 - b0) / (s1 - s0) for (s0, b0), (s1, b1) in itertools.pairwise(sizes)]
    return {
        "steps": steps,
        "histogram_every": histogram_every,
        "seconds": seconds,
        "rss_after_warmup_mb": rss_warm,
        "rss_end_mb": rss_end,
        "rss_growth_mb": rss_end - rss_warm,
        "file_bytes": os.path.getsize(path),
        "bytes_per_step": os.path.getsize(path) / steps,
        "bytes_per_step_min_tenth": min(per_step),
        "bytes_per_step_max_tenth": max(per_step),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--histogram-every", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as logdir:
        result = soak(args.steps, args.histogram_every, logdir)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['steps']:,} steps, norms every step, histograms every {result['histogram_every']}:")
    print(f"| resident memory after warm-up (first 10%) | {result['rss_after_warmup_mb']:.1f} MB |")
    print(f"| resident memory at the end | {result['rss_end_mb']:.1f} MB |")
    print(f"| growth after warm-up | {result['rss_growth_mb']:+.1f} MB |")
    print(f"| event file | {result['file_bytes'] / 2**20:.1f} MB |")
    print(f"| bytes per logged step | {result['bytes_per_step']:.0f} |")
    print(
        f"| bytes per step, each tenth after warm-up | {result['bytes_per_step_min_tenth']:.0f}"
        f" to {result['bytes_per_step_max_tenth']:.0f} |"
    )
    print(f"| wall time | {result['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
