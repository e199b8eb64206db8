"""What the Keras adapters of all three backends (TensorFlow, JAX, torch) read alike from a
model and its optimizers: which optimizers a model holds, what a variable is named, and how
many updates an optimizer has applied.

Rules: imports Keras only, never TensorFlow, torch or jax, so every backend's adapter uses
these functions as they are (one rule, one copy). A variable's name is its Keras path without
the watched model's own name; an optimizer's step count is the raw update counter of the
optimizer that really updates (a LossScaleOptimizer's `inner_optimizer`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import keras

__all__ = ["applied_steps", "find_optimizers", "step_counter", "variable_names"]


def find_optimizers(model: Any) -> dict[str, keras.optimizers.Optimizer]:
    """The optimizers a model holds as attributes besides `model.optimizer`, by attribute name.

    A GAN sets `d_optimizer` and `g_optimizer` in its own `compile` and applies them in its
    `train_step`: those are found. `model.optimizer` itself (stored by Keras as `_optimizer`)
    is not, and an optimizer held under two attributes is found once, under the first.

    Args:
        model: a keras.Model (any object with attributes works).

    Returns:
        {attribute name: optimizer}, in the order the attributes were set.

    Example:
        >>> find_optimizers(gan)  # doctest: +SKIP
        {'d_optimizer': <Adam ...>, 'g_optimizer': <Adam ...>}
    """
    primary = getattr(model, "optimizer", None)
    found: dict[str, keras.optimizers.Optimizer] = {}
    for name, value in vars(model).items():
        if isinstance(value, keras.optimizers.Optimizer) and value is not primary and name != "_optimizer":
            if all(value is not other for other in found.values()):
                found[name] = value
    return found


def variable_names(variables: Iterable[Any], model_name: str = "") -> list[str]:
    """The names normlog logs variables under: Keras' variable paths, without the watched
    model's own name ("net/dense/kernel" -> "dense/kernel").

    A variable with no `path` (a plain `tf.Variable` handed to `log_gradients`) is named by
    its `name` without TensorFlow's output index ("w:0" -> "w").

    Args:
        variables: Keras variables (or objects with a `name`).
        model_name: the watched model's name, stripped where a path starts with it and "/";
            "" (a lone optimizer) strips nothing.

    Returns:
        One name per variable, in order.

    Example:
        >>> variable_names(model.trainable_variables, model.name)  # doctest: +SKIP
        ['dense/kernel', 'dense/bias']
    """
    paths = [getattr(v, "path", None) or v.name.split(":")[0] for v in variables]
    return [path.removeprefix(f"{model_name}/") if model_name else path for path in paths]


def step_counter(optimizer: Any) -> Any:
    """The optimizer's raw update counter, a Keras variable that every `apply` advances
    (every micro-batch under gradient accumulation: `iterations` divides it by
    `gradient_accumulation_steps`). Under a LossScaleOptimizer it is the inner optimizer's,
    which does not count the steps skipped for Inf/NaN gradients.

    Returns the variable itself, so that a traced step can read it (`.value`) as it runs.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    counter = getattr(inner, "_iterations", None)
    return inner.iterations if counter is None else counter


def applied_steps(optimizer: Any) -> int:
    """How many updates the optimizer has applied so far, read on the host: the value of
    `step_counter(optimizer)`.

    Args:
        optimizer: a Keras optimizer, a LossScaleOptimizer, or any object with `iterations`.

    Returns:
        The count, as an int.

    Example:
        >>> applied_steps(model.optimizer)  # doctest: +SKIP
        8
    """
    # int() of the variable itself, quiet on every backend: keras.ops.convert_to_numpy warns
    # (NumPy 2's DeprecationWarning for an __array__ without copy=) on TensorFlow and torch
    counter = step_counter(optimizer)
    try:
        return int(counter)
    except TypeError:  # under tf.distribute the value is a MirroredVariable, which int() refuses
        return int(counter.value.numpy())
