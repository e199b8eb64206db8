"""torch tensors as numpy, for the Writer: any device, dtype, layout, with or without grad.

Rules: called only for a value that is a torch tensor (`normlog._convert` checks, without
importing torch); returns a host numpy array the core can read.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["to_numpy"]


def to_numpy(tensor: Any) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.layout != torch.strided:  # sparse gradients (nn.Embedding(sparse=True))
        tensor = tensor.to_dense()
    if tensor.is_complex():
        return np.asarray(tensor.cpu().numpy())  # the core names the dtype in its TypeError
    if tensor.dtype not in (torch.float64, torch.float32, torch.float16) and tensor.is_floating_point():
        tensor = tensor.float()  # bfloat16 and float8 have no numpy dtype; float32 holds them exactly
    return np.asarray(tensor.cpu().numpy())
