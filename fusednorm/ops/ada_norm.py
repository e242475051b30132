"""Adaptive LayerNorm/RMSNorm ops (DiT AdaLN): ``fusednorm::ada_norm_fwd`` / ``fusednorm::ada_norm_bwd``.

y = norm(x) * (1 + scale[b]) + shift[b], x (B, L, D) with a contiguous last dim, scale/shift (B, D).
"""

from __future__ import annotations

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
    none_if_absent,
)


@custom_op("fusednorm::ada_norm_fwd")
def ada_norm_fwd(
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    is_rms: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns y (B, L, D) x.dtype, mean (B, L) ((0,) for RMS) and rstd (B, L) in the acc dtype."""
    b, l, _ = x.shape
    if x.numel() == 0:
        acc = acc_dtype(x.dtype)
        mean = x.new_full((0,) if is_rms else (b, l), float("nan"), dtype=acc)
        return x.new_empty(x.shape), mean, x.new_full((b, l), float("nan"), dtype=acc)
    return backends.select("ada_norm_fwd", x).ada_norm_fwd(x, scale, shift, weight, bias, eps, is_rms)


@ada_norm_fwd.register_fake
def _(x, scale, shift, weight, bias, eps, is_rms):
    b, l, _ = x.shape
    acc = acc_dtype(x.dtype)
    return x.new_empty(x.shape), x.new_empty((0,) if is_rms else (b, l), dtype=acc), x.new_empty((b, l), dtype=acc)


@custom_op("fusednorm::ada_norm_bwd")
def ada_norm_bwd(
    dy: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    is_rms: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns dx (B, L, D), dscale (B, D), dshift (B, D), dweight, dbias (0-size when absent)."""
    if x.numel() == 0:
        dw = torch.zeros_like(weight) if weight is not None else absent_like(x)
        db = torch.zeros_like(bias) if bias is not None else absent_like(x)
        return x.new_empty(x.shape), torch.zeros_like(scale), torch.zeros_like(shift), dw, db
    dx, dscale, dshift, dw, db = backends.select("ada_norm_bwd", x).ada_norm_bwd(
        dy, x, scale, shift, weight, bias, mean, rstd, is_rms
    )
    return dx, dscale, dshift, grad_or_empty(dw, x), grad_or_empty(db, x)


@ada_norm_bwd.register_fake
def _(dy, x, scale, shift, weight, bias, mean, rstd, is_rms):
    dw = weight.new_empty(weight.shape) if weight is not None else x.new_empty(0)
    db = bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)
    return x.new_empty(x.shape), scale.new_empty(scale.shape), shift.new_empty(shift.shape), dw, db


class AdaNormFunction(BackendPinnedFunction):
    """Autograd for adaptive LayerNorm/RMSNorm; saves x, scale, shift, mean, rstd."""

    @staticmethod
    def forward(ctx, x, scale, shift, weight, bias, eps, is_rms):
        y, mean, rstd = forward_op(ctx, ada_norm_fwd, x, scale, shift, weight, bias, eps, is_rms)
        ctx.save_for_backward(x, scale, shift, weight, bias, mean, rstd)
        ctx.is_rms = is_rms
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, shift, weight, bias, mean, rstd = ctx.saved_tensors
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        dx, dscale, dshift, dw, db = call_op(
            ada_norm_bwd, dy, x, scale, shift, weight, bias, mean, rstd, ctx.is_rms
        )
        return (
            dx, dscale, dshift, none_if_absent(dw, weight is not None), none_if_absent(db, bias is not None),
            None, None,
        )


def adaptive_norm(
    x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, is_rms: bool
) -> Tensor:
    """Adaptive norm of x (B, L, D) with per-batch scale/shift (B, D) (arguments validated)."""
    # is_contiguous() first: it is far cheaper than stride(-1) and settles the common case
    if not (x.is_contiguous() or x.stride(-1) == 1):
        x = x.contiguous()
    # scale/shift are often (B, D) chunks of one modulation tensor: any row stride is fine, no copy
    scale = scale if scale.is_contiguous() or scale.stride(-1) == 1 else scale.contiguous()
    shift = shift if shift.is_contiguous() or shift.stride(-1) == 1 else shift.contiguous()
    return AdaNormFunction.call(x, scale, shift, weight, bias, float(eps), is_rms)
