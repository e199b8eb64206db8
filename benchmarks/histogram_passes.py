"""Where a CPU histogram's time goes: each pass of the exact row, and the alternatives tried.

Times, on the gradients and weights of bench_torch.py's CPU model after one step (14.8M
elements in 106 tensors), each pass that `normlog.torch._histogram_row` makes in torch
ops; the whole row in torch ops; the rows of all tensors in one compiled call
(normlog._numba, with numba installed), and each of its two passes; and the other ways to
count that were measured and rejected. With --gpu, the GPU model, and the Triton launches
of normlog.torch._triton. Prints nanoseconds per element (the median of `--repeat` runs over all
tensors).

    python benchmarks/histogram_passes.py          # CPU config of bench_torch.py
    python benchmarks/histogram_passes.py --gpu    # its GPU config (GPT-2-sized, 160M parameters)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_torch import make, step

import normlog.torch
from normlog.torch import _histogram_row


def torch_row(tensor: torch.Tensor, bins: int, mask_nonfinite: bool) -> torch.Tensor:
    """_histogram_row without the compiled CPU kernel: the torch ops alone."""
    compiled, normlog.torch._engines.numba_kernel = normlog.torch._engines.numba_kernel, lambda: None  # type: ignore[method-assign]
    try:
        return _histogram_row(tensor, bins, mask_nonfinite)
    finally:
        normlog.torch._engines.numba_kernel = compiled  # type: ignore[method-assign]


BINS = 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()
    sync = torch.cuda.synchronize if args.gpu else (lambda: None)
    model, optimizer, tokens = make(args.gpu)
    step(model, optimizer, tokens, args.gpu)
    tensors = [p.grad.reshape(-1) for p in model.parameters()] + [p.detach().reshape(-1) for p in model.parameters()]
    elements = sum(t.numel() for t in tensors)
    bounds = [(lo.double(), hi.double()) for lo, hi in (torch.aminmax(t) for t in tensors)]
    widths = [(hi - lo) / BINS for lo, hi in bounds]
    wide = [t.double() for t in tensors]
    index = [
        w.sub(lo).div_(width).to(torch.int32).clamp_(0, BINS - 1) for w, (lo, _), width in zip(wide, bounds, widths)
    ]
    buckets = [i.double() for i in index]
    edges = [
        torch.linspace(float(lo), float(hi), BINS + 1, device=t.device)[1:-1] for t, (lo, hi) in zip(tensors, bounds)
    ]
    pool = ThreadPoolExecutor(2)

    def halves(i: torch.Tensor) -> torch.Tensor:
        half = i.numel() // 2
        first = pool.submit(torch.bincount, i[:half], minlength=BINS)
        return torch.bincount(i[half:], minlength=BINS) + first.result()

    def each(run: Callable[[int], object]) -> Callable[[], None]:
        def over_all() -> None:
            for k in range(len(tensors)):
                run(k)  # each result freed before the next, as in the row

        return over_all

    passes: dict[str, Callable[[], object]] = {
        "min and max (aminmax)": each(lambda k: torch.aminmax(tensors[k])),
        "float64 copy": each(lambda k: tensors[k].double()),
        "sum and dot in float64": each(lambda k: (wide[k].sum(), wide[k].dot(wide[k]))),
        "offset, divide (float64)": each(lambda k: wide[k].sub(bounds[k][0]).div_(widths[k])),
        "int32 index and clamp": each(lambda k: wide[k].to(torch.int32).clamp_(0, BINS - 1)),
        "bincount (serial)": each(lambda k: torch.bincount(index[k], minlength=BINS)),
        "histc over whole bucket numbers (float64)": each(lambda k: torch.histc(buckets[k], BINS, min=0, max=BINS)),
        "the whole exact row, per tensor, in torch ops": each(
            lambda k: torch_row(tensors[k], BINS, mask_nonfinite=False)
        ),
        "rejected: bincount in 2 threads": each(lambda k: halves(index[k])),
        "rejected: torch.bucketize on float32": each(lambda k: torch.bucketize(tensors[k], edges[k], out_int32=True)),
        "rejected: torch.histogram on float32": each(
            lambda k: torch.histogram(tensors[k], BINS, range=(float(bounds[k][0]), float(bounds[k][1])))
        ),
    }
    if not args.gpu and normlog.torch._engines.numba_kernel() is not None:
        from normlog import _numba

        arrays = [t.numpy() for t in tensors]
        blocks = _numba._Blocks.of(arrays)
        low = np.array([float(lo) for lo, _ in bounds])
        width = np.array([float(w) for w in widths])
        ones = np.ones(len(arrays))
        passes["compiled, all rows in one call, blocks shared by the threads"] = lambda: _numba.rows(arrays, BINS)
        passes["compiled, its first pass: min and max"] = blocks.bounds
        passes["compiled, its second pass: counts and sums"] = lambda: blocks.fill(low, width, ones, ones > 0, BINS)
    if args.gpu:
        from normlog.torch import _triton

        del passes["rejected: bincount in 2 threads"], passes["rejected: torch.histogram on float32"]
        passes["all rows in one Triton pair of launches (normlog.torch._triton)"] = lambda: _triton.stats_rows(
            tensors, BINS
        )
        passes["all norms and NaN/Inf counts in one Triton launch"] = lambda: _triton.stats_rows(tensors, 0)
        passes["torch._foreach_norm, for comparison"] = lambda: torch._foreach_norm(tensors)
    where = torch.cuda.get_device_name() if args.gpu else f"{torch.get_num_threads()} threads"
    print(f"{elements / 1e6:.1f}M elements in {len(tensors)} tensors, {where}\n")
    print("| pass | ns per element | ms for all |\n| --- | ---: | ---: |")
    for name, run in passes.items():
        samples = []
        for _ in range(args.repeat + 1):
            sync()
            start = time.perf_counter()
            run()
            sync()
            samples.append(time.perf_counter() - start)
        median = statistics.median(samples[1:])
        print(f"| {name} | {median / elements * 1e9:.3f} | {median * 1e3:.2f} |")


if __name__ == "__main__":
    main()
