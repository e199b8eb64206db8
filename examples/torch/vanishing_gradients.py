"""Vanishing gradients, seen in TensorBoard: a deep tanh MLP against the same MLP with relu.

Two concentric circles (generated here, no scikit-learn needed), ten hidden layers of 16
units. With tanh (and PyTorch's default initialisation) each layer passes back a smaller
gradient than the one after it: the first layer's gradient norm ends about 100x below the
last's, and accuracy sticks at chance. relu with He initialisation keeps the norms level
across layers and learns the circles.
Both runs go to one logdir, so TensorBoard overlays them: compare
`grad_norm/layers.0.weight` between the `tanh` and `relu` runs (Custom Scalars: every layer on one
chart), and `normlog/grad_norm_by_depth` in Images.

    python examples/torch/vanishing_gradients.py [--logdir runs/vanishing_gradients] [--epochs 60]
    tensorboard --logdir runs/vanishing_gradients
"""

from __future__ import annotations

import argparse
import itertools
import math
import os

import torch
from torch import nn

import normlog


def two_circles(samples: int, noise: float, factor: float = 0.5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Points on an outer circle (label 0) and an inner one of radius `factor` (label 1), plus noise."""
    generator = torch.Generator().manual_seed(seed)
    label = torch.arange(samples) % 2
    angle = torch.rand(samples, generator=generator) * 2 * math.pi
    radius = torch.where(label == 1, factor, 1.0)
    points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], 1)
    return points + noise * torch.randn(samples, 2, generator=generator), label.float().unsqueeze(1)


class MLP(nn.Module):
    def __init__(self, activation: str, hidden: int = 16, depth: int = 10) -> None:
        super().__init__()
        sizes = [2] + [hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.out = nn.Linear(hidden, 1)
        self.activation = torch.tanh if activation == "tanh" else torch.relu
        if activation == "relu":  # tanh keeps PyTorch's default initialisation
            for layer in self.layers:
                nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.activation(layer(x))
        return self.out(x)


def train(activation: str, logdir: str, epochs: int) -> tuple[float, dict[str, float]]:
    torch.manual_seed(0)
    x, y = two_circles(1000, noise=0.1)
    train_x, train_y, test_x, test_y = x[:500], y[:500], x[500:], y[500:]
    model = MLP(activation)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    recent: dict[str, list[float]] = {"first layer": [], "last layer": []}
    with normlog.watch(model, os.path.join(logdir, activation), optimizer=optimizer, histogram_every=50):
        for _ in range(epochs):
            for batch in torch.randperm(500).split(32):
                loss = nn.functional.binary_cross_entropy_with_logits(model(train_x[batch]), train_y[batch])
                optimizer.zero_grad()
                loss.backward()
                recent["first layer"].append(model.layers[0].weight.grad.norm().item())
                recent["last layer"].append(model.layers[-1].weight.grad.norm().item())
                optimizer.step()
    with torch.no_grad():
        accuracy = ((model(test_x) > 0).float() == test_y).float().mean().item()
    last = {name: sum(norms[-50:]) / 50 for name, norms in recent.items()}
    return accuracy, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/vanishing_gradients")
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    for activation in ("tanh", "relu"):
        accuracy, norms = train(activation, args.logdir, args.epochs)
        print(
            f"{activation}: test accuracy {accuracy:.0%}; mean gradient norm over the last 50 steps: "
            f"first layer {norms['first layer']:.2e}, last hidden layer {norms['last layer']:.2e}"
        )
    print(f"logs written to {args.logdir}; view them with: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
