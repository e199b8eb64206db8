"""Overhead of normlog.keras.watch on `fit`, against plain `fit` and Keras' TensorBoard callback.

Two measurements per model:

- per step: one model per mode in one process, each traced by a first epoch, then `--rounds`
  timed epochs of `--batches` batches, interleaved (each round starts at another mode).
  CPU time (process time) is the steadier figure on a shared machine; wall time is printed
  beside it. Two unwatched copies show how far two identical runs differ here.
- the first call (tracing plus one step), the size of the traced train step (nodes of its
  graph and of the functions it calls: cond branches) and the peak resident memory: one
  fresh process per mode, so that each peak is its own.

    python benchmarks/bench_keras.py --model mobilenetv2 [--size 32] [--rounds 3]
    python benchmarks/bench_keras.py --model resnet50
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import normlog.keras

MODES = (
    "plain fit",
    "plain fit, second copy",
    "watch defaults",
    "watch, histograms every step",
    "keras TensorBoard(histogram_freq=1)",
)


def make(model: str, size: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    if model == "convnet":
        net = keras.Sequential(
            [
                keras.Input((size, size, 3)),
                keras.layers.Conv2D(16, 3, activation="relu"),
                keras.layers.MaxPooling2D(2),
                keras.layers.Conv2D(32, 3, activation="relu"),
                keras.layers.MaxPooling2D(2),
                keras.layers.Flatten(),
                keras.layers.Dense(128, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
    else:
        build = {"mobilenetv2": keras.applications.MobileNetV2, "resnet50": keras.applications.ResNet50}[model]
        net = build(weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None)
    net.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return net


def callbacks_for(mode: str, model: keras.Model, logdir: str) -> list[Any]:
    if mode == "watch defaults":
        return [normlog.keras.watch(model, logdir)]
    if mode == "watch, histograms every step":
        return [normlog.keras.watch(model, logdir, histogram_every=1)]
    if mode.startswith("keras TensorBoard"):
        return [keras.callbacks.TensorBoard(logdir, histogram_freq=1)]
    return []


def data(size: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(count, size, size, 3)).astype("float32"), rng.integers(0, 10, count)


def graph_nodes(model: keras.Model, x: np.ndarray, y: np.ndarray) -> int:
    """Nodes of the traced train step (with the hooks `watch` put on the optimizer), counting
    the functions it calls (each tf.cond branch is one)."""
    step = tf.function(model.train_step)
    concrete = step.get_concrete_function((tf.constant(x), tf.constant(y)))
    graph = concrete.graph.as_graph_def()
    return len(graph.node) + sum(len(function.node_def) for function in graph.library.function)


def peak_resident_mib() -> float:
    """This process's peak resident memory. Linux's VmHWM, not getrusage's ru_maxrss, which
    a child keeps from the parent that forked it (every mode read the parent's 3.3 GB)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def first_call(args: argparse.Namespace, mode: str) -> None:
    """One fresh process: the first fit call of one batch, the graph size, the peak memory."""
    x, y = data(args.size, args.batch)
    model = make(args.model, args.size)
    callbacks = callbacks_for(mode, model, tempfile.mkdtemp(prefix="normlog-bench-keras-"))
    wall, cpu = time.perf_counter(), time.process_time()
    model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0, callbacks=callbacks)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    nodes = graph_nodes(model, x, y)
    peak = peak_resident_mib()
    print(json.dumps({"wall": wall, "cpu": cpu, "nodes": nodes, "peak_mib": peak}))


def per_step(args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    x, y = data(args.size, args.batch * args.batches)
    root = tempfile.mkdtemp(prefix="normlog-bench-keras-")
    models = {}
    for index, mode in enumerate(MODES):
        model = make(args.model, args.size)
        callbacks = callbacks_for(mode, model, f"{root}/{index}")
        model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0, callbacks=callbacks)  # traces
        models[mode] = (model, callbacks)
    cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
    wall: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        for mode in MODES[round_ % len(MODES) :] + MODES[: round_ % len(MODES)]:
            model, callbacks = models[mode]
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0, callbacks=callbacks)
            cpu[mode].append((time.process_time() - start_cpu) / args.batches)
            wall[mode].append((time.perf_counter() - start_wall) / args.batches)
    return {mode: (statistics.median(cpu[mode]), statistics.median(wall[mode])) for mode in MODES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("convnet", "mobilenetv2", "resnet50"), default="mobilenetv2")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--first-call", dest="first_call", help=argparse.SUPPRESS)
    parser.add_argument("--skip-first-call", action="store_true")
    parser.add_argument("--skip-per-step", action="store_true")
    args = parser.parse_args()
    if args.first_call:
        first_call(args, args.first_call)
        return
    model = make(args.model, args.size)
    print(
        f"{args.model}, {args.size}x{args.size} inputs, {model.count_params() / 1e6:.2f}M parameters in "
        f"{len(model.trainable_variables)} trainable variables, batches of {args.batch}; "
        f"load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    if not args.skip_per_step:
        steps = per_step(args)
        plain_cpu = statistics.mean([steps[m][0] for m in MODES[:2]])
        plain_wall = statistics.mean([steps[m][1] for m in MODES[:2]])
        print(
            f"\nper step: median over {args.rounds} interleaved epochs of {args.batches} batches "
            f"(load average now {os.getloadavg()[0]:.2f})\n"
        )
        print("| mode | CPU s/step | vs plain | wall s/step | vs plain |\n| --- | ---: | ---: | ---: | ---: |")
        for mode, (cpu, wall) in steps.items():
            print(f"| {mode} | {cpu:.3f} | {cpu / plain_cpu:.2f}x | {wall:.3f} | {wall / plain_wall:.2f}x |")
    if not args.skip_first_call:
        print("\nfirst fit call (trace + one step), one fresh process per mode\n")
        print("| mode | CPU s | vs plain | wall s | graph nodes | peak RSS MiB |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        plain = None
        for mode in MODES[:1] + MODES[2:]:
            command = [sys.executable, __file__, "--model", args.model, "--size", str(args.size)]
            command += ["--batch", str(args.batch), "--first-call", mode]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            plain = plain or result
            print(
                f"| {mode} | {result['cpu']:.1f} | {result['cpu'] / plain['cpu']:.2f}x | {result['wall']:.1f} | "
                f"{result['nodes']} | {result['peak_mib']:.0f} |"
            )
    print(f"\nload average at the end (1, 5, 15 min): {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
