"""Channels-first LayerNorm ops (``LayerNorm2d``): ``fusednorm::layer_norm_cf_fwd`` / ``fusednorm::layer_norm_cf_bwd``.

The ops take x as (N, C, P) (P = flattened spatial dims) with any strides; both NCHW and channels_last inputs
reach the kernels as a view, without a permute copy. y and dx keep x's memory format.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fusednorm import backends
from fusednorm.ops import (
    BackendPinnedFunction,
    absent_like,
    acc_dtype,
    call_op,
    custom_op,
    forward_op,
    grad_or_empty,
    native_autograd_op,
    none_if_absent,
)


@custom_op("fusednorm::layer_norm_cf_fwd")
def layer_norm_cf_fwd(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """x: (N, C, P). Returns y (like x), mean (N, P) and rstd (N, P) in the acc dtype."""
    n, c, p = x.shape
    if x.numel() == 0:
        acc = acc_dtype(x.dtype)
        return torch.empty_like(x), x.new_full((n, p), float("nan"), dtype=acc), x.new_full(
            (n, p), float("nan"), dtype=acc
        )
    return backends.select("layer_norm_cf_fwd", x).layer_norm_cf_fwd(x, weight, bias, eps)


@layer_norm_cf_fwd.register_fake
def _(x, weight, bias, eps):
    acc = acc_dtype(x.dtype)
    n, _, p = x.shape
    return torch.empty_like(x), x.new_empty((n, p), dtype=acc), x.new_empty((n, p), dtype=acc)


@custom_op("fusednorm::layer_norm_cf_bwd")
def layer_norm_cf_bwd(
    dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dx (like x), dweight (C,), dbias (C,); absent gradients are 0-size tensors."""
    if x.numel() == 0:
        dw = torch.zeros_like(weight) if weight is not None else absent_like(x)
        db = torch.zeros_like(bias) if bias is not None else absent_like(x)
        return torch.empty_like(x), dw, db
    dx, dw, db = backends.select("layer_norm_cf_bwd", x).layer_norm_cf_bwd(dy, x, weight, bias, mean, rstd)
    return dx, grad_or_empty(dw, x), grad_or_empty(db, x)


@layer_norm_cf_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd):
    dw = weight.new_empty(weight.shape) if weight is not None else x.new_empty(0)
    db = bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)
    return torch.empty_like(x), dw, db


class LayerNormCFFunction(BackendPinnedFunction):
    """Autograd for channels-first LayerNorm; saves x, mean and rstd (fp32)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
        y, mean, rstd = forward_op(ctx, layer_norm_cf_fwd, x, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = call_op(layer_norm_cf_bwd, dy, x, weight, bias, mean, rstd)
        return dx, none_if_absent(dw, weight is not None), none_if_absent(db, bias is not None), None


def _as_ncp(x: Tensor) -> Tensor:
    """View (N, C, *spatial) as (N, C, P) without copying when the spatial dims collapse (NCHW, channels_last)."""
    n, c = x.shape[0], x.shape[1]
    p = math.prod(x.shape[2:])
    try:
        return x.view(n, c, p)
    except RuntimeError:  # spatial dims not collapsible into one stride: one copy is unavoidable
        return x.contiguous().view(n, c, p)


def layer_norm_channels_first(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Normalize (N, C, *spatial) over C at every position (arguments validated). Returns x's shape and format."""
    x3 = x if x.dim() == 3 else _as_ncp(x)
    args = (x3, weight, bias, float(eps))
    native = native_autograd_op("layer_norm_cf", "layer_norm_cf_fwd", x3, args) if x3.numel() else None
    y = native(*args) if native is not None else LayerNormCFFunction.call(*args)
    if x3 is x:
        return y
    try:
        return y.view_as(x)
    except RuntimeError:
        return y.reshape(x.shape)
