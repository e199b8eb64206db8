"""Turn what users log (numpy, Python numbers, torch and TensorFlow tensors) into numpy.

Rules: no framework is imported here. A value is recognised as a torch tensor only if
torch is already in `sys.modules` (whoever made the tensor imported it), the way einops
and array-api-compat detect backends. Anything else goes through `np.asarray`, which
TensorFlow tensors, Keras and JAX arrays support through `__array__`.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np


def _is_torch_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    import torch

    tensor = tensor.detach()
    if tensor.layout != torch.strided:  # sparse gradients (nn.Embedding(sparse=True))
        tensor = tensor.to_dense()
    if tensor.is_complex():
        return np.asarray(tensor.cpu().numpy())  # the core names the dtype in its TypeError
    if tensor.dtype not in (torch.float64, torch.float32, torch.float16) and tensor.is_floating_point():
        tensor = tensor.float()  # bfloat16 and float8 have no numpy dtype; float32 holds them exactly
    return np.asarray(tensor.cpu().numpy())


def to_numpy(value: Any) -> np.ndarray:
    """A numpy view or copy of `value`, on the host."""
    if isinstance(value, np.ndarray):
        return value
    if _is_torch_tensor(value):
        return _torch_to_numpy(value)
    return np.asarray(value)
