"""One training run for tests/test_distributed.py: `python distributed_worker.py MODE LOGDIR`,
under `torchrun --standalone --nproc-per-node 2` for the distributed modes.

MODE: single (one process, the whole batch), ddp, ddp-hooks (no optimizer=: backward
hooks), ddp-per-rank, fsdp (FSDP2 fully_shard). Every run trains the same model on the same
8 examples for 3 SGD steps; each of 2 ranks takes 4 of them, so the averaged gradients
equal the single run's. The fsdp run also writes, from rank 0, the core's histogram and
norm of every whole (gathered) gradient and weight before each step, to expected.json.
"""

from __future__ import annotations

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
    distributed = mode != "single"
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
        if mode == "ddp-hooks":  # hooks made before DDP's: ours must still see the reduced gradients
            watcher = normlog.watch(model, logdir, histogram_every=HISTOGRAM_EVERY, health=False)
        trained = nn.parallel.DistributedDataParallel(model)
    else:
        trained = model
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    if mode != "ddp-hooks":
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
