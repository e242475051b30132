"""Weight normalization ops: ``fusednorm::weight_norm_fwd`` / ``fusednorm::weight_norm_bwd``.

w = g * v / ||v|| with the norm over every dim of v except ``dim`` (torch's ``_weight_norm`` semantics;
``dim=-1`` means the norm of the whole tensor). The ops take v as (O, K) rows; ``weight_norm_apply`` moves ``dim``
to the front first (a copy only when ``dim`` is not already the leading dim).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fusednorm import backends
from fusednorm.ops import BackendPinnedFunction, acc_dtype, call_op, custom_op, forward_op


@custom_op("fusednorm::weight_norm_fwd")
def weight_norm_fwd(v: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """v: (O, K) contiguous, g: (O,). Returns w (O, K) v.dtype and norm (O,) acc dtype."""
    if v.numel() == 0:
        return v.new_empty(v.shape), v.new_zeros((v.shape[0],), dtype=acc_dtype(v.dtype))
    return backends.select("weight_norm_fwd", v).weight_norm_fwd(v, g)


@weight_norm_fwd.register_fake
def _(v, g):
    return v.new_empty(v.shape), v.new_empty((v.shape[0],), dtype=acc_dtype(v.dtype))


@custom_op("fusednorm::weight_norm_bwd")
def weight_norm_bwd(dw: Tensor, v: Tensor, g: Tensor, norm: Tensor) -> tuple[Tensor, Tensor]:
    """Returns dv (O, K) v.dtype and dg (O,) g.dtype."""
    if v.numel() == 0:
        return v.new_empty(v.shape), torch.zeros_like(g)
    return backends.select("weight_norm_bwd", v).weight_norm_bwd(dw, v, g, norm)


@weight_norm_bwd.register_fake
def _(dw, v, g, norm):
    return v.new_empty(v.shape), g.new_empty(g.shape)


class WeightNormFunction(BackendPinnedFunction):
    """Autograd for weight norm over rows; saves v, g and the fp32 row norms."""

    @staticmethod
    def forward(ctx, v: Tensor, g: Tensor) -> Tensor:
        w, norm = forward_op(ctx, weight_norm_fwd, v, g)
        ctx.save_for_backward(v, g, norm)
        return w

    @staticmethod
    def backward(ctx, dw: Tensor):
        v, g, norm = ctx.saved_tensors
        dv, dg = call_op(weight_norm_bwd, dw.contiguous(), v, g, norm)
        return dv, dg


def weight_norm_apply(v: Tensor, g: Tensor, dim: int) -> Tensor:
    """w = g * v / ||v|| (norm over all dims but ``dim``; ``dim=-1``: whole tensor). Returns v's shape and dtype.

    g has ``torch.norm_except_dim(v, 2, dim)``'s shape (or any shape with as many elements).
    """
    if dim == -1 or v.dim() == 0:
        w = WeightNormFunction.call(v.contiguous().reshape(1, v.numel()), g.reshape(1))
        return w.reshape(v.shape)
    dim = dim % v.dim()
    moved = v.movedim(dim, 0) if dim != 0 else v
    o = moved.shape[0]
    rows = moved.contiguous()
    if rows.dim() != 2:  # (a reshape to the same 2-D shape would still cost a view, ~1 us)
        # explicit K (not -1): an empty v (O = 0) has no inferable row length
        rows = rows.reshape(o, math.prod(moved.shape[1:]))
    w = WeightNormFunction.call(rows, g if g.dim() == 1 else g.reshape(o))
    if rows is not moved:
        w = w.reshape(moved.shape)
    return w.movedim(0, dim) if dim != 0 else w
