"""Where a CPU histogram's time goes: each pass of the exact row, and the alternatives tried.

Times, on the gradients and weights of bench_torch.py's CPU model after one step (14.8M
elements in 106 tensors), each pass that `normlog.torch._histogram_row` makes, the whole
row, and the other ways to count that were measured and rejected. Prints nanoseconds per
element (the median of `--repeat` runs over all tensors).

    python benchmarks/histogram_passes.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_torch import make, step

from normlog.torch import _histogram_row

BINS = 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    model, optimizer, tokens = make(gpu=False)
    step(model, optimizer, tokens, gpu=False)
    tensors = [p.grad.reshape(-1) for p in model.parameters()] + [p.detach().reshape(-1) for p in model.parameters()]
    elements = sum(t.numel() for t in tensors)
    bounds = [(lo.double(), hi.double()) for lo, hi in (torch.aminmax(t) for t in tensors)]
    widths = [(hi - lo) / BINS for lo, hi in bounds]
    wide = [t.double() for t in tensors]
    index = [
        w.sub(lo).div_(width).to(torch.int32).clamp_(0, BINS - 1) for w, (lo, _), width in zip(wide, bounds, widths)
    ]
    edges = [torch.linspace(float(lo), float(hi), BINS + 1)[1:-1] for lo, hi in bounds]
    pool = ThreadPoolExecutor(2)

    def halves(i: torch.Tensor) -> torch.Tensor:
        half = i.numel() // 2
        first = pool.submit(torch.bincount, i[:half], minlength=BINS)
        return torch.bincount(i[half:], minlength=BINS) + first.result()

    passes: dict[str, Callable[[int], object]] = {
        "min and max (aminmax)": lambda k: torch.aminmax(tensors[k]),
        "float64 copy": lambda k: tensors[k].double(),
        "sum and dot in float64": lambda k: (wide[k].sum(), wide[k].dot(wide[k])),
        "offset, divide (float64)": lambda k: wide[k].sub(bounds[k][0]).div_(widths[k]),
        "int32 index and clamp": lambda k: wide[k].to(torch.int32).clamp_(0, BINS - 1),
        "bincount (serial)": lambda k: torch.bincount(index[k], minlength=BINS),
        "the whole exact row (_histogram_row)": lambda k: _histogram_row(tensors[k], BINS, mask_nonfinite=False),
        "rejected: bincount in 2 threads": lambda k: halves(index[k]),
        "rejected: torch.bucketize on float32": lambda k: torch.bucketize(tensors[k], edges[k], out_int32=True),
        "rejected: torch.histogram on float32": lambda k: torch.histogram(
            tensors[k], BINS, range=(float(bounds[k][0]), float(bounds[k][1]))
        ),
    }
    print(f"{elements / 1e6:.1f}M elements in {len(tensors)} tensors, {torch.get_num_threads()} threads\n")
    print("| pass | ns per element |\n| --- | ---: |")
    for name, run in passes.items():
        samples = []
        for _ in range(args.repeat + 1):
            start = time.perf_counter()
            for k in range(len(tensors)):
                run(k)
            samples.append(time.perf_counter() - start)
        print(f"| {name} | {statistics.median(samples[1:]) / elements * 1e9:.2f} |")


if __name__ == "__main__":
    main()
