"""Op layer: torch.library custom ops (``fusednorm::*``) and the autograd.Functions that call them.

One file per op family. Each custom op's implementation asks ``fusednorm.backends.select`` which backend runs
it, so the choice happens at run time (also under ``torch.compile``, where the op is opaque). Custom ops cannot
return ``None``, so absent gradients travel as 0-size tensors and are turned back into ``None`` here.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

from fusednorm.backends import get_backend, use_backend


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


class BackendPinnedFunction(torch.autograd.Function):
    """``torch.autograd.Function`` whose backward runs on the backend that was in force during its forward.

    A ``use_backend`` scope is context-local, and autograd runs CUDA backward passes on its own device threads,
    where the caller's scope is not visible; without this, ``with use_backend("native"): loss.backward()`` could
    run the backward on another backend than the forward. Subclasses define ``forward``/``backward`` as usual.
    Under ``torch.compile`` nothing is recorded: compiled code runs on the backend selected at run time.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        forward, backward = cls.forward, cls.backward

        @functools.wraps(forward)
        def pinned_forward(ctx, *args, **kw):
            ctx.fusednorm_backend = None if torch.compiler.is_compiling() else get_backend()
            return forward(ctx, *args, **kw)

        @functools.wraps(backward)
        def pinned_backward(ctx, *grads):
            name = getattr(ctx, "fusednorm_backend", None)
            with use_backend(name) if name is not None else contextlib.nullcontext():
                return backward(ctx, *grads)

        cls.forward = staticmethod(pinned_forward)
        cls.backward = staticmethod(pinned_backward)
