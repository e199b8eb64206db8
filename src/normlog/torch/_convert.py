"""torch tensors as numpy, for the Writer: any device, dtype, layout, with or without grad.

Rules: called only for a value that is a torch tensor (`normlog._convert` checks, without
importing torch); returns a host numpy array the core can read, or raises TypeError saying
what to pass instead (the Writer puts the tag in front). No full-size float copy: bfloat16
and float8, which numpy lacks, become a view of their bits as ml_dtypes' types of the same
name, which the core reads in bounded float64 chunks, as it reads float16.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

__all__ = ["to_numpy"]

# torch's own floats (float16 to float64) convert to numpy's; these by ml_dtypes' dtype of
# the same name, which holds the same bits (a test compares every bit pattern with torch's
# .float()). float4_e2m1fn_x2 packs two values a byte and has no numpy counterpart.
_BIT_VIEWS = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def to_numpy(tensor: Any) -> np.ndarray:
    """A host numpy array of `tensor`'s values: a view where the tensor is on the CPU and
    numpy (or ml_dtypes) has its dtype, else one copy of its own size."""
    tensor = tensor.detach()
    _refuse_unreadable(tensor)
    if tensor.layout != torch.strided:  # sparse gradients (nn.Embedding(sparse=True))
        tensor = tensor.to_dense()
    tensor = tensor.resolve_conj().resolve_neg()  # lazy views, which .numpy() refuses
    bit_view = _bit_views().get(tensor.dtype)
    if bit_view is not None:
        bits = torch.int16 if tensor.element_size() == 2 else torch.uint8
        return _host(tensor.view(bits)).view(bit_view)
    if tensor.is_floating_point() and tensor.dtype not in _NUMPY_FLOATS:
        # without ml_dtypes: one float32 copy, which holds bfloat16 and float8 exactly
        try:
            tensor = tensor.float()
        except (RuntimeError, NotImplementedError) as error:
            raise TypeError(
                f"torch cannot read {tensor.dtype} values as numbers ({error}); convert them to float32 and pass that"
            ) from error
    return _host(tensor)  # complex: the core's TypeError names the dtype


def _refuse_unreadable(tensor: torch.Tensor) -> None:
    """TypeError for a tensor whose values cannot be read, saying what to pass instead."""
    if tensor.is_meta:
        raise TypeError(
            "a meta tensor has a shape but no values: log a tensor that holds data "
            "(made on 'cpu' or 'cuda', or after the model is materialised, e.g. with to_empty() and its init)"
        )
    if tensor.is_nested:
        raise TypeError(
            "nested tensors are not supported: pass one of its tensors (tensor.unbind()), or all of its values "
            "as one tensor (torch.cat([t.reshape(-1) for t in tensor.unbind()]))"
        )
    if tensor.is_quantized:
        raise TypeError(f"a quantized tensor ({tensor.dtype}) holds integers and a scale: pass tensor.dequantize()")
    if type(tensor) is not torch.Tensor:  # .detach() of an nn.Parameter is a plain Tensor
        kind = type(tensor).__name__
        if hasattr(tensor, "full_tensor"):  # DTensor: a shard on each rank
            raise TypeError(
                f"a {kind} is sharded: pass tensor.full_tensor(), or tensor.to_local() for this rank's part"
            )
        if type(tensor).__module__.startswith("torch._subclasses"):  # FakeTensor and kin: torch.compile's tracing
            raise TypeError(f"a {kind} has no values (it is made while tracing): log outside the compiled function")


def _host(tensor: torch.Tensor) -> np.ndarray:
    host = tensor.cpu()  # a device's own errors stay what they are
    try:
        return np.asarray(host.numpy())
    except RuntimeError as error:
        # a tensor subclass, or torch.func's transforms (vmap, grad): no storage to read
        raise TypeError(
            f"cannot read this {type(tensor).__name__}'s values ({error}): pass a plain tensor that holds data, "
            "logged outside torch.func transforms such as vmap and grad"
        ) from error


@functools.cache
def _bit_views() -> dict[torch.dtype, np.dtype]:
    """torch dtype -> the ml_dtypes dtype of its bits, for those both libraries have."""
    try:
        import ml_dtypes
    except ImportError:
        return {}
    views = {}
    for name in _BIT_VIEWS:
        if hasattr(torch, name) and hasattr(ml_dtypes, name):
            views[getattr(torch, name)] = np.dtype(getattr(ml_dtypes, name))
    return views
