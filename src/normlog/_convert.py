"""Turn what users log (numpy, Python numbers, torch and TensorFlow tensors) into numpy.

Rules: no framework is imported here. A value is recognised as a torch tensor only if
torch is already in `sys.modules` (whoever made the tensor imported it), the way einops
and array-api-compat detect backends, and converted by `normlog.torch._convert`. Anything
else goes through `np.asarray`, which TensorFlow tensors, Keras and JAX arrays support
through `__array__`.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np


def _is_torch_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def to_numpy(value: Any) -> np.ndarray:
    """A numpy view or copy of `value`, on the host."""
    if isinstance(value, np.ndarray):
        return value
    if _is_torch_tensor(value):
        from normlog.torch._convert import to_numpy as torch_to_numpy  # torch is loaded: the user made the tensor

        return torch_to_numpy(value)
    return np.asarray(value)
