"""BatchNorm ops: ``fusednorm::batch_norm_{stats,apply,bwd_reduce,bwd_dx}`` and the autograd glue.

The four ops are the backend contract of ``fusednorm/backends/reference.py``; SyncBatchNorm
(``fusednorm/distributed.py``) reuses them around its collectives. Inputs are (N, C, *spatial) in any memory
format; outputs y / dx have the strides of ``torch.empty_like(x)``, so channels_last stays channels_last.

Zero-size inputs never reach a backend: empty statistics are the identity partial (count 0, mean 0, M2 0), and
an empty batch in training leaves the running buffers untouched and gives zero weight/bias gradients, as torch.

The running-statistics update happens on the device with in-place torch ops (no host sync), outside the custom
ops, so every op is functional (``mutates_args=()``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusednorm import backends
from fusednorm.ops import BackendPinnedFunction, acc_dtype, call_op, custom_op, forward_op, native_autograd_op


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Equal strides on every dim of size > 1 (the strides of size-1 dims carry no layout)."""
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape, strict=True) if n > 1)


def _like_x(out: Tensor, x: Tensor) -> Tensor:
    """``out`` with the strides of ``torch.empty_like(x)`` (what the fake impls promise); a copy only when a
    backend returned another layout."""
    if out.stride() == x.stride() or _same_layout(out, x):  # equal strides: the common case, checked cheaply
        return out
    fixed = torch.empty_like(x)
    if _same_layout(out, fixed):
        return out
    fixed.copy_(out)
    return fixed


@custom_op("fusednorm::batch_norm_stats")
def batch_norm_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean (C,) and M2 = sum((x - mean)^2) (C,) of x (N, C, *spatial), acc dtype.

    The count is N * prod(spatial); for an empty batch both are 0 (the identity of Chan's merge)."""
    if x.numel() == 0:
        c = x.shape[1]
        acc = acc_dtype(x.dtype)
        return x.new_zeros((c,), dtype=acc), x.new_zeros((c,), dtype=acc)
    return backends.select("batch_norm_stats", x).batch_norm_stats(x)


@batch_norm_stats.register_fake
def _(x):
    acc = acc_dtype(x.dtype)
    return x.new_empty((x.shape[1],), dtype=acc), x.new_empty((x.shape[1],), dtype=acc)


@custom_op("fusednorm::batch_norm_apply")
def batch_norm_apply(
    x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]
) -> Tensor:
    """y = (x - mean[c]) * rstd[c] * weight[c] + bias[c]. x (N, C, *spatial); mean, rstd (C,) acc dtype;
    weight, bias (C,) or None. Returns y in x's dtype, strides of ``torch.empty_like(x)``."""
    if x.numel() == 0:
        return torch.empty_like(x)
    y = backends.select("batch_norm_apply", x).batch_norm_apply(x, mean, rstd, weight, bias)
    return _like_x(y, x)


@batch_norm_apply.register_fake
def _(x, mean, rstd, weight, bias):
    return torch.empty_like(x)


@custom_op("fusednorm::batch_norm_bwd_reduce")
def batch_norm_bwd_reduce(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel sum(dy) and sum(dy * xhat), xhat = (x - mean) * rstd; both (C,) acc dtype."""
    if x.numel() == 0:
        c = x.shape[1]
        acc = acc_dtype(x.dtype)
        return x.new_zeros((c,), dtype=acc), x.new_zeros((c,), dtype=acc)
    return backends.select("batch_norm_bwd_reduce", x).batch_norm_bwd_reduce(dy, x, mean, rstd)


@batch_norm_bwd_reduce.register_fake
def _(dy, x, mean, rstd):
    acc = acc_dtype(x.dtype)
    return x.new_empty((x.shape[1],), dtype=acc), x.new_empty((x.shape[1],), dtype=acc)


@custom_op("fusednorm::batch_norm_bwd_dx")
def batch_norm_bwd_dx(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Optional[Tensor],
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: int,
    training: bool,
) -> Tensor:
    """dX (x's dtype, strides of ``torch.empty_like(x)``). training: through the statistics of ``count``
    values whose sums are ``sum_dy``/``sum_dy_xhat`` (C,); eval: dy * weight * rstd (the sums are unused)."""
    if x.numel() == 0:
        return torch.empty_like(x)
    dx = backends.select("batch_norm_bwd_dx", x).batch_norm_bwd_dx(
        dy, x, mean, rstd, weight, sum_dy, sum_dy_xhat, count, training
    )
    return _like_x(dx, x)


@batch_norm_bwd_dx.register_fake
def _(dy, x, mean, rstd, weight, sum_dy, sum_dy_xhat, count, training):
    return torch.empty_like(x)


# ---- running statistics ----------------------------------------------------------------------------------


def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    m2: Tensor,
    count: int | Tensor,
    momentum: float | Tensor,
) -> None:
    """In place on the device: running = (1 - momentum) * running + momentum * batch statistic, with the
    unbiased variance M2 / (count - 1), as torch. ``count`` and ``momentum`` may be device tensors (global
    counts in SyncBatchNorm, the cumulative-average factor), so nothing here waits for the device."""
    with torch.no_grad():
        for buf, stat in ((running_mean, mean), (running_var, m2 / (count - 1))):
            if buf is None:
                continue
            weight = momentum.to(device=buf.device, dtype=buf.dtype) if isinstance(momentum, Tensor) else momentum
            stat = stat.to(buf.dtype)
            if stat.shape != buf.shape:  # a (C,) buffer needs no view (a view costs ~1-2 us on small tensors)
                stat = stat.view(buf.shape)
            # Not lerp_: r + m * (s - r) turns an infinite running value into NaN, torch's form keeps it.
            buf.mul_(1 - weight).add_(stat * weight)


# ---- autograd --------------------------------------------------------------------------------------------


def _to_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    # t.to(dtype) is a no-op when the dtype already matches, but still costs ~1 us on the CPU
    return t if t.dtype == dtype else t.to(dtype)


def _channel_vector(t: Tensor | None, c: int) -> Tensor | None:
    # validated to hold c elements: 1-D means (c,) already (a reshape would cost a view, ~1 us)
    return t if t is None or t.dim() == 1 else t.reshape(c)


class BatchNormFunction(BackendPinnedFunction):
    """Local BatchNorm; saves x, weight, mean and rstd (acc dtype), never the output."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        training: bool,
        momentum: float | Tensor,
        eps: float,
    ) -> Tensor:
        c = x.shape[1]
        count = x.numel() // c if c else 0
        acc = acc_dtype(x.dtype)
        if training:
            mean, m2 = forward_op(ctx, batch_norm_stats, x)
            if count > 0:
                rstd = (m2 / count).add_(eps).rsqrt_()  # rsqrt(m2 / count + eps) without two temporaries
                update_running_stats(running_mean, running_var, mean, m2, count, momentum)
            else:  # empty batch: nothing to normalize, buffers untouched (torch)
                rstd = torch.zeros_like(m2)
        else:
            mean = _to_dtype(_channel_vector(running_mean, c), acc)
            rstd = (_to_dtype(_channel_vector(running_var, c), acc) + eps).rsqrt_()
        y = forward_op(ctx, batch_norm_apply, x, mean, rstd, weight, bias)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.count, ctx.training = count, training
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if (need_x and ctx.training) or need_w or need_b:
            sum_dy, sum_dy_xhat = call_op(batch_norm_bwd_reduce, dy, x, mean, rstd)
        else:
            sum_dy = sum_dy_xhat = mean.new_empty(0)
        if need_x:
            dx = call_op(
                batch_norm_bwd_dx, dy, x, mean, rstd, weight, sum_dy, sum_dy_xhat, ctx.count, ctx.training
            )
        if need_w:
            dw = sum_dy_xhat.to(weight.dtype)
        if need_b:
            db = sum_dy.to(bias.dtype)
        return dx, dw, db, None, None, None, None, None


def batch_norm_nd(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | Tensor,
    eps: float,
) -> Tensor:
    """BatchNorm of x (N, C, *spatial) with validated arguments (see ``fusednorm.functional.batch_norm``)."""
    c = x.shape[1]
    args = (
        x, _channel_vector(weight, c), _channel_vector(bias, c), running_mean, running_var, bool(training),
        momentum, float(eps),
    )
    # The C++ op takes a float momentum; a tensor one (the cumulative average) stays on the Python path.
    if x.numel() and type(momentum) is float:
        native = native_autograd_op("batch_norm", "batch_norm_apply", x, args)
        if native is not None:
            return native(*args)
    return BatchNormFunction.call(*args)

