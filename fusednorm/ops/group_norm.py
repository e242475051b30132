"""GroupNorm / InstanceNorm ops: ``fusednorm::group_norm_fwd`` / ``fusednorm::group_norm_bwd`` (the backend
contract), ``fusednorm::group_norm_fwd_var`` (the forward that also returns the group variance, for
InstanceNorm's running statistics) and the autograd glue.

The ops take x as (N, C, *spatial) in its own memory format (contiguous, channels_last or channels_last_3d); the
output keeps it. InstanceNorm is GroupNorm with num_groups == C. ``activation`` is ``"none"`` or ``"silu"``
(SiLU fused after the affine, its backward fused into the backward op).
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

ACTIVATIONS = ("none", "silu")


def _memory_format(x: Tensor) -> torch.memory_format:
    """The memory format a result computed from ``x`` keeps (channels_last kept, anything else contiguous)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def _empty_out(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))


def _empty_stats(x: Tensor, num_groups: int) -> Tensor:
    """Statistics of groups with no elements are undefined (torch gives NaN): keep that."""
    return x.new_full((x.shape[0], num_groups), float("nan"), dtype=acc_dtype(x.dtype))


def _group_var_fallback(x: Tensor, num_groups: int) -> Tensor:
    """Biased group variance (N, G) in the acc dtype, for backends without a fused variance path."""
    acc = acc_dtype(x.dtype)
    xf = (x if x.dtype == acc else x.to(acc)).reshape(x.shape[0], num_groups, -1)
    return xf.var(dim=2, unbiased=False)


@custom_op("fusednorm::group_norm_fwd")
def group_norm_fwd(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float, activation: str
) -> tuple[Tensor, Tensor, Tensor]:
    """GroupNorm forward. x: (N, C, *spatial); weight, bias: (C,) or None. Returns y (x's shape, dtype and memory
    format), mean and rstd (N, num_groups) fp32 (fp64 for fp64 x)."""
    if x.numel() == 0:
        return _empty_out(x), _empty_stats(x, num_groups), _empty_stats(x, num_groups)
    return backends.select("group_norm_fwd", x).group_norm_fwd(x, weight, bias, num_groups, eps, activation)


@group_norm_fwd.register_fake
def _(x, weight, bias, num_groups, eps, activation):
    acc = acc_dtype(x.dtype)
    stats = x.new_empty((x.shape[0], num_groups), dtype=acc)
    return _empty_out(x), stats, x.new_empty((x.shape[0], num_groups), dtype=acc)


@custom_op("fusednorm::group_norm_fwd_var")
def group_norm_fwd_var(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float, activation: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``group_norm_fwd`` plus the biased group variance var (N, num_groups), acc dtype. The variance comes from
    the kernels' M2 (1 / rstd^2 - eps would lose it when var << eps)."""
    if x.numel() == 0:
        nan = _empty_stats(x, num_groups)
        return _empty_out(x), nan, nan.clone(), nan.clone()
    impl = backends.select("group_norm_fwd", x)
    fused = getattr(impl, "group_norm_fwd_var", None)
    if fused is not None:
        return fused(x, weight, bias, num_groups, eps, activation)
    y, mean, rstd = impl.group_norm_fwd(x, weight, bias, num_groups, eps, activation)
    return y, mean, rstd, _group_var_fallback(x, num_groups)


@group_norm_fwd_var.register_fake
def _(x, weight, bias, num_groups, eps, activation):
    acc = acc_dtype(x.dtype)
    shape = (x.shape[0], num_groups)
    return _empty_out(x), x.new_empty(shape, dtype=acc), x.new_empty(shape, dtype=acc), x.new_empty(shape, dtype=acc)


@custom_op("fusednorm::group_norm_bwd")
def group_norm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """GroupNorm backward. Returns dx (x's shape, dtype and memory format), dweight (C,), dbias (C,); absent
    gradients are 0-size tensors."""
    if x.numel() == 0:
        dw = torch.zeros_like(weight) if weight is not None else absent_like(x)
        db = torch.zeros_like(bias) if bias is not None else absent_like(x)
        return _empty_out(x), dw, db
    dx, dw, db = backends.select("group_norm_bwd", x).group_norm_bwd(
        dy, x, weight, bias, mean, rstd, num_groups, activation
    )
    return dx, grad_or_empty(dw, x), grad_or_empty(db, x)


@group_norm_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd, num_groups, activation):
    dw = weight.new_empty(weight.shape) if weight is not None else x.new_empty(0)
    db = bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)
    return _empty_out(x), dw, db


class GroupNormFunction(BackendPinnedFunction):
    """Autograd for GroupNorm (+ optional SiLU); saves x, mean and rstd, never the output.

    Returns (y, mean, var): mean and var (N, G) are non-differentiable and only computed when ``with_var``
    (InstanceNorm's running statistics); otherwise var is a 0-size tensor.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        num_groups: int,
        eps: float,
        activation: str,
        with_var: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        if with_var:
            y, mean, rstd, var = forward_op(ctx, group_norm_fwd_var, x, weight, bias, num_groups, eps, activation)
        else:
            y, mean, rstd = forward_op(ctx, group_norm_fwd, x, weight, bias, num_groups, eps, activation)
            var = mean.new_empty(0)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.activation = num_groups, activation
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy: Tensor, _dmean: Tensor | None, _dvar: Tensor | None):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
        dx, dw, db = call_op(
            group_norm_bwd, dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.activation
        )
        return (dx, none_if_absent(dw, weight is not None), none_if_absent(db, bias is not None),
                None, None, None, None)


def group_norm_nd(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str = "none",
    with_var: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Group-normalize ``x`` (N, C, *spatial), already validated. Returns (y, mean, var): with ``with_var`` the
    group statistics (N, G) as ``GroupNormFunction`` gives them (InstanceNorm's running statistics), else
    (y, None, None).

    Layouts the kernels cannot address (neither the channel nor the flattened spatial axis unit-stride) are copied
    once to the format torch would give the result; contiguous and channels_last inputs are never copied.
    """
    if x.numel() > 0 and not _addressable(x):
        x = x.contiguous(memory_format=_memory_format(x))
    args = (x, weight, bias, int(num_groups), float(eps), activation)
    if not with_var and x.numel() > 0:
        native = native_autograd_op("group_norm", "group_norm_fwd", x, args)
        if native is not None:
            return native(*args), None, None
    y, mean, var = GroupNormFunction.call(*args, with_var)
    return (y, mean, var) if with_var else (y, None, None)


def _addressable(x: Tensor) -> bool:
    """True when x is contiguous or in channels_last / channels_last_3d (the layouts every backend handles)."""
    return x.is_contiguous() or _memory_format(x) != torch.contiguous_format


def spatial_numel(x: Tensor) -> int:
    """Elements per (sample, channel) of an (N, C, *spatial) tensor."""
    return math.prod(x.shape[2:])
