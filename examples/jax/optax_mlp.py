"""normlog for JAX without Keras: wrap the optax optimizer, and every jitted step logs its
gradients, weights and update ratios.

An MLP on synthetic data (a noisy linear target), trained with optax.adamw under jax.jit.
`normlog.jax.watch` wraps the transformation: per step, every parameter's gradient and weight
norm and the global gradient norm; histograms and update ratios every 100 steps. The step
counter lives in the optimizer state, so a restored state continues its steps.

    python examples/jax/optax_mlp.py [--logdir runs/jax_optax_mlp] [--steps 300]
    tensorboard --logdir runs/jax_optax_mlp
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import normlog.jax


def init_mlp(key: jax.Array, sizes: list[int]) -> dict[str, dict[str, jax.Array]]:
    """{"layer0": {"kernel", "bias"}, ...}: the names normlog logs are these pytree paths."""
    params = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        key, sub = jax.random.split(key)
        params[f"layer{i}"] = {
            "kernel": jax.random.normal(sub, (fan_in, fan_out)) * jnp.sqrt(2.0 / fan_in),
            "bias": jnp.zeros(fan_out),
        }
    return params


def forward(params: dict[str, dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    layers = [params[f"layer{i}"] for i in range(len(params))]
    for layer in layers[:-1]:
        x = jax.nn.relu(x @ layer["kernel"] + layer["bias"])
    return x @ layers[-1]["kernel"] + layers[-1]["bias"]


def loss_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((forward(params, x) - y) ** 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/jax_optax_mlp")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2048, 32)).astype("float32")
    y = (x @ rng.normal(size=(32, 1)) + 0.1 * rng.normal(size=(2048, 1))).astype("float32")
    params = init_mlp(jax.random.PRNGKey(0), [32, 64, 64, 1])

    optimizer = normlog.jax.watch(optax.adamw(1e-3), args.logdir)  # the one line normlog adds
    state = optimizer.init(params)

    @jax.jit
    def train_step(params: Any, state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = optimizer.update(grads, state, params)  # params: weight norms and update ratios
        return optax.apply_updates(params, updates), state, loss

    batch = 64
    for step in range(args.steps):
        start = (step * batch) % len(x)
        params, state, loss = train_step(params, state, x[start : start + batch], y[start : start + batch])
        if step % 100 == 0:
            print(f"step {step}: loss {float(loss):.4f}")
    optimizer.close()  # waits for the last steps' numbers, then closes the event file
    print(f"steps logged: {int(state.step)}; findings: {len(optimizer.findings)}; logdir: {args.logdir}")


if __name__ == "__main__":
    main()
