"""LayerNorm and RMSNorm ops: ``fusednorm::layer_norm_fwd`` / ``fusednorm::layer_norm_bwd`` and the autograd glue.

Both norms share one op pair (``is_rms`` picks the statistics). The ops take rows: a 2-D (M, N) tensor whose
last dimension is contiguous; the row stride is free, so a strided batch needs no copy.
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
    native_autograd_op,
    none_if_absent,
)


@custom_op("fusednorm::layer_norm_fwd")
def layer_norm_fwd(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, is_rms: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Row norm forward. x: (M, N) with contiguous last dim. Returns y (M, N), mean (M,) or (0,) for RMS, rstd (M,)."""
    m, n = x.shape
    if m == 0 or n == 0:
        # Nothing to launch; an empty row has undefined statistics (torch gives NaN), keep that.
        acc = acc_dtype(x.dtype)
        mean = x.new_full((0 if is_rms else m,), float("nan"), dtype=acc)
        return x.new_empty((m, n)), mean, x.new_full((m,), float("nan"), dtype=acc)
    return backends.select("layer_norm_fwd", x).layer_norm_fwd(x, weight, bias, eps, is_rms)


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps, is_rms):
    m = x.shape[0]
    acc = acc_dtype(x.dtype)
    return x.new_empty(x.shape), x.new_empty((0 if is_rms else m,), dtype=acc), x.new_empty((m,), dtype=acc)


@custom_op("fusednorm::layer_norm_bwd")
def layer_norm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    is_rms: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Row norm backward. Returns dx (M, N), dweight (N,), dbias (N,); absent gradients are 0-size tensors."""
    m, n = x.shape
    if m == 0 or n == 0:
        dw = torch.zeros_like(weight) if weight is not None else absent_like(x)
        db = torch.zeros_like(bias) if bias is not None else absent_like(x)
        return x.new_empty((m, n)), dw, db
    dx, dw, db = backends.select("layer_norm_bwd", x).layer_norm_bwd(dy, x, weight, bias, mean, rstd, is_rms)
    return dx, grad_or_empty(dw, x), grad_or_empty(db, x)


@layer_norm_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd, is_rms):
    dw = weight.new_empty(weight.shape) if weight is not None else x.new_empty(0)
    db = bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)
    return x.new_empty(x.shape), dw, db


class LayerNormFunction(BackendPinnedFunction):
    """Autograd for LayerNorm/RMSNorm over rows; saves x, mean and rstd (fp32), never the output."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, is_rms: bool) -> Tensor:
        y, mean, rstd = forward_op(ctx, layer_norm_fwd, x, weight, bias, eps, is_rms)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.is_rms = is_rms
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if dy.stride(-1) != 1:  # kernels need contiguous rows; autograd may hand us an expanded gradient
            dy = dy.contiguous()
        dx, dw, db = call_op(layer_norm_bwd, dy, x, weight, bias, mean, rstd, ctx.is_rms)
        return dx, none_if_absent(dw, weight is not None), none_if_absent(db, bias is not None), None, None


def as_rows(x: Tensor, n: int) -> Tensor:
    """View ``x`` as (M, n) rows with a contiguous last dim, copying only when no such view exists.

    A strided batch (e.g. a slice of a fused projection) stays a view with its row stride. The check is made on
    the 2-D view itself: a trailing unit dim can make x's last stride 1 while the rows are not contiguous.
    """
    m = x.numel() // n if n > 0 else x.numel()
    try:
        rows = x.view(m, n)
    except RuntimeError:  # leading dims not collapsible into one stride: one copy is unavoidable
        rows = x.contiguous().view(m, n)
    if rows.numel() > 0 and n > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


def layer_norm_rows(
    x: Tensor, n: int, weight: Tensor | None, bias: Tensor | None, eps: float, is_rms: bool
) -> Tensor:
    """Normalize ``x`` over its trailing ``n`` elements (already validated). Returns a tensor shaped like x."""
    rows = x if is_rows(x, n) else as_rows(x, n)
    args = (rows, as_vector(weight, n), as_vector(bias, n), float(eps), is_rms)
    native = native_autograd_op("layer_norm", "layer_norm_fwd", rows, args) if rows.numel() else None
    y = native(*args) if native is not None else LayerNormFunction.call(*args)
    return y if rows is x else y.view_as(x)


def is_rows(x: Tensor, n: int) -> bool:
    """True when ``x`` already is what ``as_rows(x, n)`` makes of it: 2-D, rows of ``n``, contiguous.

    Checked first because a view costs ~1 us on the CPU, which matters for small tensors (issue #5)."""
    return x.dim() == 2 and x.shape[1] == n and x.is_contiguous()


def as_vector(p: Tensor | None, n: int) -> Tensor | None:
    """A validated parameter of ``n`` elements as shape (n,) (no new view when it already is 1-D)."""
    return p if p is None or p.dim() == 1 else p.reshape(n)
