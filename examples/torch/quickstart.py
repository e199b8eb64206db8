"""normlog in one line: watch a PyTorch model and see its gradients and weights in TensorBoard.

A small classifier on synthetic data. `normlog.watch` logs every parameter's gradient and
weight norm at every step, the global gradient norm, update ratios and histograms every
100 steps, all from hooks: the training loop itself is unchanged.

    python examples/torch/quickstart.py [--logdir runs/quickstart] [--steps 500]
    tensorboard --logdir runs/quickstart
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import normlog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/quickstart")
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()

    torch.manual_seed(0)
    features = torch.randn(4096, 20)
    labels = (features[:, :5].sum(1) > 0).long() + (features[:, 5] > 1).long()  # 3 classes
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    watcher = normlog.watch(model, args.logdir, optimizer=optimizer)  # the one line

    for step in range(args.steps):
        batch = torch.randint(0, len(features), (128,))
        loss = nn.functional.cross_entropy(model(features[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        watcher.writer.add_scalar("loss", loss, step)  # the watcher's Writer takes your own scalars too

    watcher.unwatch()
    accuracy = (model(features).argmax(1) == labels).float().mean().item()
    print(f"trained {args.steps} steps: loss {loss.item():.3f}, accuracy {accuracy:.0%}")
    print(f"logs written to {args.logdir}; view them with: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
