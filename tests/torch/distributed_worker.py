"""One training run for tests/test_distributed.py: `python distributed_worker.py MODE LOGDIR`,
under `torchrun --standalone --nproc-per-node 2` for the distributed modes.

MODE: single (one process, the whole batch), ddp, ddp-hooks (no optimizer=, and watch
before the DDP wrap), ddp-per-rank, fsdp (FSDP2 fully_shard); single-accumulate and
ddp-accumulate: two micro-batches per step (under DDP the first in `no_sync`), then
clip_grad_norm_. Every run trains the same model on the same 8 examples for 3 SGD steps;
each of 2 ranks takes 4 of them, so the averaged gradients equal the single run's. The fsdp
run also writes, from rank 0, the core's histogram and norm of every whole (gathered)
gradient and weight before each step, to expected.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import normlog
import normlog.torch

STEPS = 3
HISTOGRAM_EVERY, UPDATE_EVERY = 2, 3  # step 0: norms, histograms, updates; 1: norms; 2: norms, histograms


def main(mode: str, logdir: str) -> None:
    distributed = not mode.startswith("single")
    accumulate = mode.endswith("-accumulate")
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))  # 7 and 3 rows: uneven shards
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    y = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    expected: list[dict[str, object]] = []
    all_reduces = [0] * STEPS  # normlog's own all-reduces, per step

    if distributed:
        real_all_reduce = dist.all_reduce

        def counted(*args: object, **kwargs: object) -> object:
            if sys._getframe(1).f_globals.get("__name__", "").startswith("normlog.torch"):
                all_reduces[watcher.step] += 1
            return real_all_reduce(*args, **kwargs)  # type: ignore[arg-type]

        dist.all_reduce = counted  # type: ignore[assignment]

    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        trained: nn.Module = model
    elif distributed:
        if mode in ("ddp-hooks", "ddp-accumulate"):  # hooks before DDP's: ours must see the reduced gradients
            watcher = normlog.watch(model, logdir, histogram_every=HISTOGRAM_EVERY, health=False)
        trained = nn.parallel.DistributedDataParallel(model)
    else:
        trained = model
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    if accumulate and not distributed:
        watcher = normlog.watch(model, logdir, histogram_every=HISTOGRAM_EVERY, health=False)
    if mode not in ("ddp-hooks", "single-accumulate", "ddp-accumulate"):
        watcher = normlog.watch(
            trained,
            logdir,
            optimizer=optimizer,
            histogram_every=HISTOGRAM_EVERY,
            update_every=UPDATE_EVERY,
            per_rank=mode == "ddp-per-rank",
            health=False,
        )
    for _ in range(STEPS):
        optimizer.zero_grad()
        if accumulate:  # each micro-batch half of this rank's (or the single process's) examples
            half = (rows.stop - rows.start) // 2
            for micro in range(2):
                part = slice(rows.start + micro * half, rows.start + (micro + 1) * half)
                quiet = trained.no_sync() if distributed and micro == 0 else contextlib.nullcontext()
                with quiet:
                    (nn.functional.mse_loss(trained(x[part]), y[part]) / 2).backward()
            torch.nn.utils.clip_grad_norm_(trained.parameters(), 0.01)
            optimizer.step()
            continue
        nn.functional.mse_loss(trained(x[rows]), y[rows]).backward()
        if mode == "fsdp":  # the whole tensors, gathered, through the core
            record: dict[str, object] = {}
            for name, p in model.named_parameters():
                for kind, tensor in (("gradients", p.grad), ("parameters", p.detach())):
                    full = tensor.full_tensor().numpy()  # type: ignore[union-attr]
                    hist = normlog.histogram(full, 30)
                    record[f"{kind} {name}"] = {
                        "norm": normlog.l2_norm(full),
                        "counts": hist.counts.tolist(),
                        "min": hist.min,
                        "max": hist.max,
                    }
            expected.append(record)
        optimizer.step()
    watcher.unwatch()
    if rank == 0 and expected:
        with open(os.path.join(logdir, "expected.json"), "w") as file:
            json.dump({"steps": expected, "all_reduces": all_reduces}, file)
    if distributed:
        dist.barrier()  # no rank tears gloo down while the other still talks to it
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
