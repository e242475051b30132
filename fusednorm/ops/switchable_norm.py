"""SwitchableNorm ops: ``fusednorm::switchable_norm_fwd`` / ``fusednorm::switchable_norm_bwd``.

x is viewed as (N, C, P). The statistics mixed are instance (per (n, c)), layer (per n, over C and P) and
batch (per c, over N and P), with learned softmax weights, separately for means and variances:

    mu[n, c]  = wm0 * mean_in[n, c] + wm1 * mean_ln[n] + wm2 * mean_bn[c]
    var[n, c] = wv0 * var_in[n, c]  + wv1 * var_ln[n]  + wv2 * var_bn[c]
    y = (x - mu) / sqrt(var + eps) * weight[c] + bias[c]

One read of x (``plane_stats``) gives every (n, c) plane's exact (mean, M2); the layer and batch statistics are
Chan merges of those (N, C) partials (tiny, done here with torch ops). All variances are biased. Without batch
statistics (eval), mean_bn/var_bn are the given running statistics and get no gradient.

Backward: one reduction pass (per plane sum(dy), sum(dy * (x - mu))) and one elementwise pass; the gradient of x
through all three statistics collapses to dx = dy * k[n, c] + (x - mu[n, c]) * p[n, c] + q[n, c].
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusednorm import backends
from fusednorm.ops import BackendPinnedFunction, acc_dtype


def _merge_equal(mean: Tensor, m2: Tensor, count: int, dim: int) -> tuple[Tensor, Tensor]:
    """Chan's merge of equal-count partials (mean, M2) along ``dim``: returns the merged mean and M2."""
    merged_mean = mean.mean(dim=dim)
    spread = (mean - merged_mean.unsqueeze(dim)).square().sum(dim=dim)
    return merged_mean, m2.sum(dim=dim) + count * spread


@torch.library.custom_op("fusednorm::switchable_norm_fwd", mutates_args=())
def switchable_norm_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    mean_weight: Tensor,
    var_weight: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    use_batch_stats: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x: (N, C, P) contiguous. Returns y (N, C, P) x.dtype and, in the acc dtype: mean_in, var_in (N, C);
    mean_ln, var_ln (N,); mean_bn, var_bn (C,) (batch statistics, or the running ones); mu, rstd (N, C)."""
    n, c, p = x.shape
    acc = acc_dtype(x.dtype)
    planes = x.reshape(n * c, p)
    be = backends.select("plane_stats", x)
    mean_in, m2_in = be.plane_stats(planes)
    mean_in, m2_in = mean_in.view(n, c), m2_in.view(n, c)
    var_in = m2_in / p
    mean_ln, m2_ln = _merge_equal(mean_in, m2_in, p, dim=1)
    var_ln = m2_ln / (c * p)
    if use_batch_stats:
        mean_bn, m2_bn = _merge_equal(mean_in, m2_in, p, dim=0)
        var_bn = m2_bn / (n * p)
    else:
        mean_bn, var_bn = running_mean.to(acc).clone(), running_var.to(acc).clone()
    wm = torch.softmax(mean_weight.to(acc), dim=0)
    wv = torch.softmax(var_weight.to(acc), dim=0)
    mu = wm[0] * mean_in + wm[1] * mean_ln[:, None] + wm[2] * mean_bn[None, :]
    var = wv[0] * var_in + wv[1] * var_ln[:, None] + wv[2] * var_bn[None, :]
    rstd = torch.rsqrt(var + eps)
    a = rstd * weight.to(acc)[None, :]
    b = bias.to(acc)[None, :].expand(n, c)
    y = backends.select("plane_affine", x).plane_affine(
        planes, mu.reshape(-1), a.reshape(-1).contiguous(), b.reshape(-1).contiguous()
    )
    return y.view(n, c, p), mean_in, var_in, mean_ln, var_ln, mean_bn, var_bn, mu, rstd


@switchable_norm_fwd.register_fake
def _(x, weight, bias, mean_weight, var_weight, running_mean, running_var, use_batch_stats, eps):
    n, c, _ = x.shape
    acc = acc_dtype(x.dtype)

    def nc():
        return x.new_empty((n, c), dtype=acc)

    return (x.new_empty(x.shape), nc(), nc(), x.new_empty((n,), dtype=acc), x.new_empty((n,), dtype=acc),
            x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc), nc(), nc())


@torch.library.custom_op("fusednorm::switchable_norm_bwd", mutates_args=())
def switchable_norm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    mean_weight: Tensor,
    var_weight: Tensor,
    mean_in: Tensor,
    var_in: Tensor,
    mean_ln: Tensor,
    var_ln: Tensor,
    mean_bn: Tensor,
    var_bn: Tensor,
    mu: Tensor,
    rstd: Tensor,
    use_batch_stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns dx (N, C, P), dweight (C,), dbias (C,), dmean_weight (3,), dvar_weight (3,)."""
    n, c, p = x.shape
    acc = acc_dtype(x.dtype)
    planes = x.reshape(n * c, p)
    dy_planes = dy.reshape(n * c, p)
    sum_dy, sum_dyxc = backends.select("plane_bwd_reduce", x).plane_bwd_reduce(dy_planes, planes, mu.reshape(-1))
    sum_dy, sum_dyxc = sum_dy.view(n, c), sum_dyxc.view(n, c)
    gamma = weight.to(acc)[None, :]
    dweight = (sum_dyxc * rstd).sum(dim=0)
    dbias = sum_dy.sum(dim=0)
    # gradients of the mixed statistics mu[n, c] and var[n, c]
    dmu = -rstd * gamma * sum_dy
    dvar = -0.5 * rstd.pow(3) * gamma * sum_dyxc
    wm = torch.softmax(mean_weight.to(acc), dim=0)
    wv = torch.softmax(var_weight.to(acc), dim=0)
    # gradients of the softmax weights, then through the softmax
    gm = torch.stack([(dmu * mean_in).sum(), (dmu.sum(1) * mean_ln).sum(), (dmu.sum(0) * mean_bn).sum()])
    gv = torch.stack([(dvar * var_in).sum(), (dvar.sum(1) * var_ln).sum(), (dvar.sum(0) * var_bn).sum()])
    dmean_weight = wm * (gm - (wm * gm).sum())
    dvar_weight = wv * (gv - (wv * gv).sum())
    # dx = sum over statistics s of d(stat)/dx: each is (count-normalised) dmean + 2 dvar (x - mean_s) / count
    cnt_in, cnt_ln, cnt_bn = p, c * p, n * p
    dvar_in = wv[0] * dvar / cnt_in
    dvar_ln = (wv[1] * dvar.sum(1) / cnt_ln)[:, None]
    p_coef = 2 * (dvar_in + dvar_ln)
    q = wm[0] * dmu / cnt_in + (wm[1] * dmu.sum(1) / cnt_ln)[:, None]
    q = q + 2 * dvar_in * (mu - mean_in) + 2 * dvar_ln * (mu - mean_ln[:, None])
    if use_batch_stats:
        dvar_bn = (wv[2] * dvar.sum(0) / cnt_bn)[None, :]
        p_coef = p_coef + 2 * dvar_bn
        q = q + (wm[2] * dmu.sum(0) / cnt_bn)[None, :] + 2 * dvar_bn * (mu - mean_bn[None, :])
    k = (rstd * gamma).expand(n, c)
    dx = backends.select("plane_bwd_dx", x).plane_bwd_dx(
        dy_planes, planes, mu.reshape(-1), k.reshape(-1).contiguous(), p_coef.reshape(-1).contiguous(),
        q.reshape(-1).contiguous(),
    )
    return (dx.view(n, c, p), dweight.to(weight.dtype), dbias.to(weight.dtype), dmean_weight.to(mean_weight.dtype),
            dvar_weight.to(var_weight.dtype))


@switchable_norm_bwd.register_fake
def _(dy, x, weight, mean_weight, var_weight, mean_in, var_in, mean_ln, var_ln, mean_bn, var_bn, mu, rstd,
      use_batch_stats):
    return (x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape),
            mean_weight.new_empty(mean_weight.shape), var_weight.new_empty(var_weight.shape))


class SwitchableNormFunction(BackendPinnedFunction):
    """Autograd for SwitchableNorm; saves x and the small statistics tensors."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean_weight, var_weight, running_mean, running_var, use_batch_stats, eps):
        out = torch.ops.fusednorm.switchable_norm_fwd(
            x, weight, bias, mean_weight, var_weight, running_mean, running_var, use_batch_stats, eps
        )
        y, stats = out[0], out[1:]
        ctx.save_for_backward(x, weight, mean_weight, var_weight, *stats)
        ctx.use_batch_stats = use_batch_stats
        ctx.bias_dtype = bias.dtype
        mean_bn, var_bn = stats[4], stats[5]
        ctx.mark_non_differentiable(mean_bn, var_bn)
        return y, mean_bn, var_bn

    @staticmethod
    def backward(ctx, dy, _dmean_bn, _dvar_bn):
        x, weight, mean_weight, var_weight, *stats = ctx.saved_tensors
        dx, dw, db, dmw, dvw = torch.ops.fusednorm.switchable_norm_bwd(
            dy.contiguous(), x, weight, mean_weight, var_weight, *stats, ctx.use_batch_stats
        )
        return dx, dw, db.to(ctx.bias_dtype), dmw, dvw, None, None, None, None


def switchable_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    mean_weight: Tensor,
    var_weight: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_batch_stats: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """SwitchableNorm of x (N, C, *spatial) (arguments validated). Returns y (x's shape) and the batch mean and
    variance (C,) used (for the caller's running-statistics update)."""
    n, c = x.shape[0], x.shape[1]
    x3 = x.contiguous().view(n, c, -1)
    y, mean_bn, var_bn = SwitchableNormFunction.apply(
        x3, weight, bias, mean_weight, var_weight, running_mean, running_var, use_batch_stats, float(eps)
    )
    return y.view(x.shape), mean_bn, var_bn
