"""Residual-add (+ dropout) + LayerNorm/RMSNorm ops: ``fusednorm::add_norm_fwd`` / ``fusednorm::add_norm_bwd``.

s = dropout(x) + residual, y = norm(s). The forward writes s once (the prenorm output, and what backward
normalizes again); the dropout mask is never stored: it is a hash of (seed, element index) that the backward
regenerates. Rows are (M, N) with a contiguous last dim, as for ``fusednorm::layer_norm_fwd``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusednorm import backends
from fusednorm.backends.reference_variants import dropout_scale, dropout_threshold
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
from fusednorm.ops.layer_norm import as_rows, as_vector, is_rows


def residual_dtype_for(x: Tensor, residual: Optional[Tensor], residual_in_fp32: bool) -> torch.dtype:
    """dtype of s: the residual's (x's when there is none), promoted to fp32 from 16-bit if residual_in_fp32."""
    dt = residual.dtype if residual is not None else x.dtype
    if residual_in_fp32 and dt in (torch.float16, torch.bfloat16):
        dt = torch.float32
    return dt


@custom_op("fusednorm::add_norm_fwd")
def add_norm_fwd(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    is_rms: bool,
    dropout_p: float,
    seed: int,
    residual_in_fp32: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x, residual: (M, N). Returns y (M, N) x.dtype, s (M, N), mean (M,) ((0,) for RMS), rstd (M,)."""
    m, n = x.shape
    s_dtype = residual_dtype_for(x, residual, residual_in_fp32)
    if m == 0 or n == 0:
        acc = acc_dtype(s_dtype)
        return (
            x.new_empty((m, n)),
            x.new_empty((m, n), dtype=s_dtype),
            x.new_full((0 if is_rms else m,), float("nan"), dtype=acc),
            x.new_full((m,), float("nan"), dtype=acc),
        )
    return backends.select("add_norm_fwd", x).add_norm_fwd(
        x, residual, weight, bias, eps, is_rms, dropout_p, seed, s_dtype
    )


@add_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, is_rms, dropout_p, seed, residual_in_fp32):
    m = x.shape[0]
    s_dtype = residual_dtype_for(x, residual, residual_in_fp32)
    acc = acc_dtype(s_dtype)
    return (
        x.new_empty(x.shape),
        x.new_empty(x.shape, dtype=s_dtype),
        x.new_empty((0 if is_rms else m,), dtype=acc),
        x.new_empty((m,), dtype=acc),
    )


@custom_op("fusednorm::add_norm_bwd")
def add_norm_bwd(
    dy: Tensor,
    ds: Optional[Tensor],
    s: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    is_rms: bool,
    dropout_p: float,
    seed: int,
    x_dtype: torch.dtype,
    has_residual: bool,
    residual_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns dx (M, N) x_dtype, dresidual (M, N) residual_dtype, dweight, dbias; absent ones are 0-size tensors."""
    m, n = s.shape
    if m == 0 or n == 0:
        dw = torch.zeros_like(weight) if weight is not None else absent_like(s)
        db = torch.zeros_like(bias) if bias is not None else absent_like(s)
        dres = s.new_empty((m, n), dtype=residual_dtype) if has_residual else absent_like(s)
        return s.new_empty((m, n), dtype=x_dtype), dres, dw, db
    dx, dres, dw, db = backends.select("add_norm_bwd", s).add_norm_bwd(
        dy, ds, s, weight, bias, mean, rstd, is_rms, dropout_p, seed, x_dtype, residual_dtype if has_residual else None
    )
    return dx, grad_or_empty(dres, s), grad_or_empty(dw, s), grad_or_empty(db, s)


@add_norm_bwd.register_fake
def _(dy, ds, s, weight, bias, mean, rstd, is_rms, dropout_p, seed, x_dtype, has_residual, residual_dtype):
    dw = weight.new_empty(weight.shape) if weight is not None else s.new_empty(0)
    db = bias.new_empty(bias.shape) if bias is not None else s.new_empty(0)
    dres = s.new_empty(s.shape, dtype=residual_dtype) if has_residual else s.new_empty(0)
    return s.new_empty(s.shape, dtype=x_dtype), dres, dw, db


class AddNormFunction(BackendPinnedFunction):
    """Autograd for residual-add + norm; saves s, mean, rstd and the seed (never the dropout mask)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, is_rms, dropout_p, seed, residual_in_fp32):
        y, s, mean, rstd = forward_op(
            ctx, add_norm_fwd, x, residual, weight, bias, eps, is_rms, dropout_p, seed, residual_in_fp32
        )
        ctx.save_for_backward(s, weight, bias, mean, rstd)
        res_dtype = residual.dtype if residual is not None else x.dtype
        ctx.cfg = (is_rms, dropout_p, seed, x.dtype, residual is not None, res_dtype)
        ctx.set_materialize_grads(False)  # an unused s (no prenorm) gets no gradient tensor
        return y, s

    @staticmethod
    def backward(ctx, dy, ds):
        s, weight, bias, mean, rstd = ctx.saved_tensors
        is_rms, dropout_p, seed, x_dtype, has_residual, res_dtype = ctx.cfg
        if dy is None:
            dy = torch.zeros_like(s)
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        if ds is not None and ds.stride(-1) != 1:
            ds = ds.contiguous()
        # Without dropout, s = x + residual passes the same gradient to both: when their dtypes match s's, compute
        # it once and hand the one tensor to both (as torch's add does), instead of writing a second (M, N) copy.
        shared = has_residual and dropout_p == 0.0 and x_dtype == res_dtype == s.dtype
        dx, dres, dw, db = call_op(
            add_norm_bwd, dy, ds, s, weight, bias, mean, rstd, is_rms, dropout_p, seed, x_dtype,
            has_residual and not shared, res_dtype,
        )
        if shared:
            dres = dx
        return (
            dx,
            none_if_absent(dres, has_residual),
            none_if_absent(dw, weight is not None),
            none_if_absent(db, bias is not None),
            None, None, None, None, None,
        )


def add_norm_rows(
    x: Tensor,
    residual: Tensor | None,
    n: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    is_rms: bool,
    dropout_p: float,
    seed: int,
    residual_in_fp32: bool,
) -> tuple[Tensor, Tensor]:
    """Add + normalize over the trailing ``n`` elements (arguments already validated). Returns (y, s) like x."""
    rows = x if is_rows(x, n) else as_rows(x, n)
    res = None if residual is None else residual if is_rows(residual, n) else as_rows(residual, n)
    w, b = as_vector(weight, n), as_vector(bias, n)
    native = native_autograd_op("add_norm", "add_norm_fwd", rows, (rows, res, w, b)) if rows.numel() else None
    if native is not None:  # the C++ op takes what the native backend's add_norm_fwd passes to the kernel
        p = float(dropout_p)
        y, s = native(
            rows, res, w, b, float(eps), is_rms, p > 0.0, dropout_scale(p), int(seed), dropout_threshold(p),
            residual_dtype_for(rows, res, residual_in_fp32),
        )
    else:
        y, s = AddNormFunction.call(
            rows, res, w, b, float(eps), is_rms, float(dropout_p), int(seed), residual_in_fp32
        )
    return (y, s) if rows is x else (y.view_as(x), s.view_as(x))
