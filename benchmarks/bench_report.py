"""How fast `normlog report` reads: megabytes of event file per second, and many tags.

Two logs, written once into a temporary directory by `normlog.Writer`:

- *big file*: one run of 64 tensors, norms of gradients and weights and a 30-bucket
  histogram of each every step, until the file holds `--megabytes` (30 by default);
- *many tags*: one run of `--tags` tags (50,000 by default: half gradient norms, half
  weight norms, one per tensor), over 2 steps.

For each it times `normlog report LOGDIR --json` in this process (`normlog.report.main`:
reading, parsing the tags, the health rules, the JSON). On the big file it also times the
records alone (framing and CRC32C, no parsing): normlog's reader (`_eventreader.records`,
compiled CRC32C) against TensorBoard's TF-free reader (`RawEventFileLoader` without
TensorFlow, whose CRC32C is pure Python), which `normlog report` used before. It prints a
table; nothing here asserts a time: the numbers go into the README by hand.

With `--plot-runs N` it also writes N small runs (8 tensors, 50 steps) and times
`normlog plot` on them in a subprocess: paged (12 runs per image, the default) and on one
image (`--runs-per-image N`, as `plot` drew before), with the largest image's pixels and
the peak resident memory of the subprocess.

    python benchmarks/bench_report.py
    python benchmarks/bench_report.py --megabytes 300 --tags 50000
    python benchmarks/bench_report.py --plot-runs 250
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
import types

import numpy as np

import normlog
from normlog import _step
from normlog.report import main as normlog_main


def write_big_file(logdir: str, megabytes: float) -> int:
    names = [f"block{i}.weight" for i in range(64)]
    rng = np.random.default_rng(0)
    values = [rng.normal(size=256) for _ in names]
    target = megabytes * 2**20
    with normlog.Writer(logdir) as writer:
        step = 0
        while True:
            scalars = [(_step.norm_tag("gradients", n), 1.0 + 0.01 * (step % 7)) for n in names]
            scalars += [(_step.norm_tag("parameters", n), 2.0) for n in names]
            scalars.append((_step.GLOBAL_NORM, 8.0))
            writer.add_record(step, scalars)
            for name, array in zip(names, values):
                writer.add_histogram(_step.histogram_tag("gradients", name), array, step)
            step += 1
            if step % 50 == 0:
                writer.flush()
                if directory_bytes(logdir) >= target:
                    break
    return step


def records_seconds(path: str) -> float:
    """CPU seconds to read every record of `path` with normlog's reader, or NaN in a normlog
    older than it (to run this script against an older checkout)."""
    try:
        from normlog._eventreader import records
    except ImportError:
        return math.nan

    problems: list[str] = []
    start = time.process_time()
    count = sum(1 for _ in records(path, problems))
    seconds = time.process_time() - start
    assert count and not problems, problems
    return seconds


def tensorboard_records_seconds(path: str) -> float | None:
    """CPU seconds to read every record of `path` with TensorBoard's TF-free reader, or
    None without TensorBoard (or with TensorFlow loaded, whose reader is compiled)."""
    if "tensorflow" in sys.modules:
        return None
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    try:
        from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    except ImportError:
        return None
    start = time.process_time()
    count = sum(1 for _ in RawEventFileLoader(path).Load())
    seconds = time.process_time() - start
    assert count
    return seconds


def write_many_tags(logdir: str, tags: int) -> None:
    names = [f"module{i}.weight" for i in range(tags // 2)]
    with normlog.Writer(logdir) as writer:
        for step in range(2):
            scalars = [(_step.norm_tag("gradients", n), 1.0) for n in names]
            scalars += [(_step.norm_tag("parameters", n), 2.0) for n in names]
            writer.add_record(step, scalars)


def write_small_runs(logdir: str, runs: int) -> None:
    names = [f"layer{i}.weight" for i in range(8)]
    for run in range(runs):
        with normlog.Writer(os.path.join(logdir, f"run{run:05d}")) as writer:
            for step in range(50):
                scalars = [
                    (_step.norm_tag("gradients", n), (1.0 + run) / (1 + i) / (1 + step)) for i, n in enumerate(names)
                ]
                writer.add_record(step, scalars)


def timed_plot(logdir: str, output: str, *options: str) -> tuple[float, int, str, float]:
    """`normlog plot` in a fresh interpreter: wall seconds, images, largest image (WxH), and
    the subprocess's peak resident memory in MB."""
    import glob
    import struct
    import subprocess

    code = (
        "import resource, sys; from normlog.report import main; code = main(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)"
    )
    start = time.perf_counter()
    process = subprocess.run(
        [sys.executable, "-c", code, "plot", logdir, "-o", output, "--max-images", "100000", *options],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    assert process.returncode == 0, process.stderr
    peak_mb = int(process.stdout.split()[-1]) / 1024  # Linux: KiB
    stem = os.path.splitext(output)[0]
    sizes = []
    for path in glob.glob(stem + "*.png"):
        with open(path, "rb") as file:
            sizes.append(struct.unpack(">II", file.read(24)[16:24]))
        os.remove(path)
    width, height = max(sizes, key=lambda size: size[0] * size[1])
    return seconds, len(sizes), f"{width}x{height}", peak_mb


def directory_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(directory) for f in files)


def timed_report(logdir: str, repeat: int) -> tuple[float, float]:
    """The best of `repeat` runs of `normlog report LOGDIR --json`: wall seconds, and CPU
    seconds of this process (the steadier figure on a shared machine)."""
    wall = cpu = float("inf")
    for _ in range(repeat):
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            start, start_cpu = time.perf_counter(), time.process_time()
            code = normlog_main(["report", logdir, "--json"])
            wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
        assert code == 0, code
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=float, default=30.0)
    parser.add_argument("--tags", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--plot-runs", type=int, default=0, help="also time `normlog plot` on this many runs")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, normlog {normlog.__version__}")
    rows = []
    plots: list[tuple[str, float, int, str, float]] = []
    with tempfile.TemporaryDirectory() as root:
        big = os.path.join(root, "big", "run")
        steps = write_big_file(big, args.megabytes)
        size = directory_bytes(big) / 2**20
        wall, cpu = timed_report(os.path.dirname(big), args.repeat)
        rows.append(("big file", f"{size:.1f} MB, {steps} steps, 64 tensors", wall, cpu, f"{size / cpu:.1f} MB/s"))
        (path,) = [os.path.join(big, name) for name in os.listdir(big)]
        cpu = records_seconds(path)
        rows.append(("records", "normlog's reader, compiled CRC32C", math.nan, cpu, f"{size / cpu:.1f} MB/s"))
        tensorboard_cpu = tensorboard_records_seconds(path)
        if tensorboard_cpu is not None:
            rate = f"{size / tensorboard_cpu:.1f} MB/s"
            rows.append(("records", "TensorBoard's TF-free reader", math.nan, tensorboard_cpu, rate))

        many = os.path.join(root, "many", "run")
        write_many_tags(many, args.tags)
        size = directory_bytes(many) / 2**20
        wall, cpu = timed_report(os.path.dirname(many), args.repeat)
        rows.append(
            ("many tags", f"{args.tags} tags, 2 steps, {size:.1f} MB", wall, cpu, f"{args.tags / cpu:,.0f} tags/s")
        )
        if args.plot_runs:
            logdir, output = os.path.join(root, "runs"), os.path.join(root, "plot.png")
            write_small_runs(logdir, args.plot_runs)
            for label, options in (("paged", ()), ("one image", ("--runs-per-image", str(args.plot_runs)))):
                seconds, images, largest, peak = timed_plot(logdir, output, *options)
                plots.append((label, seconds, images, largest, peak))
    print(f"{'log':<10}  {'what':<34}  {'wall':>8}  {'CPU':>8}  rate (per CPU second)")
    for name, what, wall, cpu, rate in rows:
        wall_text = "-" if math.isnan(wall) else f"{wall:.2f}s"
        print(f"{name:<10}  {what:<34}  {wall_text:>8}  {cpu:>7.2f}s  {rate}")

    if plots:
        print(f"\nnormlog plot, {args.plot_runs} runs of 8 tensors x 50 steps")
        print(f"{'layout':<10}  {'wall':>8}  {'images':>6}  {'largest image':>15}  peak memory")
        for label, seconds, images, largest, peak in plots:
            print(f"{label:<10}  {seconds:>7.1f}s  {images:>6}  {largest:>15}  {peak:.0f} MB")


if __name__ == "__main__":
    main()
