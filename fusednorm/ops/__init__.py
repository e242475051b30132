"""Op layer: torch.library custom ops (``fusednorm::*``) and the autograd.Functions that call them.

One file per op family. Each custom op's implementation asks ``fusednorm.backends.select`` which backend runs
it, so the choice happens at run time (also under ``torch.compile``, where the op is opaque). Custom ops cannot
return ``None``, so absent gradients travel as 0-size tensors and are turned back into ``None`` here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def absent_like(ref: Tensor) -> Tensor:
    """The 0-size placeholder a backward op returns for a gradient whose parameter is absent."""
    return ref.new_empty(0)


def grad_or_empty(g: Tensor | None, ref: Tensor) -> Tensor:
    """A backend's gradient, or the 0-size placeholder when the backend returned None."""
    return absent_like(ref) if g is None else g


def none_if_absent(g: Tensor, present: bool) -> Tensor | None:
    """Turn a backward op's placeholder back into ``None`` for autograd."""
    return g if present else None


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
