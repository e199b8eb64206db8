"""Direct Writer calls in a hand-written PyTorch loop, the way the TensorBoard tutorials do it.

A two-layer network fits y = sin(3x) + noise. Two writers, `train/` and `test/`, share one
logdir so TensorBoard draws both loss curves on one chart. Every 10 steps the loop logs
layer1's weights, biases and gradients as histograms, their norms, and summary stats; at
the end it logs a matplotlib figure of the fit as an image.

    python examples/torch/custom_loop.py [--logdir runs/custom_loop] [--steps 300]
    tensorboard --logdir runs/custom_loop
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

import normlog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/custom_loop")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.linspace(-1, 1, 512).unsqueeze(1)
    y = torch.sin(3 * x) + 0.1 * torch.randn_like(x)
    test = torch.rand(128, 1) * 2 - 1
    test_y = torch.sin(3 * test)

    model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1))
    layer1 = model[0]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)

    with (
        normlog.Writer(os.path.join(args.logdir, "train")) as train,
        normlog.Writer(os.path.join(args.logdir, "test")) as test_writer,
    ):
        for step in range(args.steps):
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            if step % 10 == 0:  # the expensive summaries, once in a while
                train.add_histogram("layer1/weights", layer1.weight, step)
                train.add_histogram("layer1/biases", layer1.bias, step)
                train.add_histogram("layer1/weights/gradients", layer1.weight.grad, step)
                train.add_norm("layer1/weights/norm", layer1.weight, step)
                train.add_norm("layer1/weights/gradients/norm", layer1.weight.grad, step)
                train.add_stats("layer1/biases/gradients", layer1.bias.grad, step)
            optimizer.step()
            train.add_scalar("loss", loss, step)
            with torch.no_grad():
                test_writer.add_scalar("loss", nn.functional.mse_loss(model(test), test_y), step)

        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed (pip install 'normlog[plot]'): no figure logged")
        else:
            figure, axes = plt.subplots(figsize=(5, 3))
            axes.scatter(x.squeeze(), y.squeeze(), s=2, label="data")
            with torch.no_grad():
                axes.plot(x.squeeze(), model(x).squeeze(), color="C1", label="model")
            axes.legend()
            train.add_figure("fit", figure, args.steps)

    print(f"final train loss {loss.item():.4f}")
    print(f"logs written to {args.logdir}; view them with: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
