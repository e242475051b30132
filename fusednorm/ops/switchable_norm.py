"""SwitchableNorm ops: ``fusednorm::switchable_norm_fwd`` / ``fusednorm::switchable_norm_bwd``.

x is viewed as (N, C, P). The statistics mixed are instance (per (n, c)), layer (per n, over C and P) and
batch (per c, over N and P), with learned softmax weights, separately for means and variances:

    mu[n, c]  = wm0 * mean_in[n, c] + wm1 * mean_ln[n] + wm2 * mean_bn[c]
    var[n, c] = wv0 * var_in[n, c]  + wv1 * var_ln[n]  + wv2 * var_bn[c]
    y = (x - mu) / sqrt(var + eps) * weight[c] + bias[c]

One read of x (``plane_stats``) gives every (n, c) plane's exact (mean, M2); the layer and batch statistics are
Chan merges of those (N, C) partials (tiny, done here with torch ops). For fp32 input a second read
(``plane_bwd_reduce`` with dy = 1) gives each plane mean's rounding error, which keeps those merges accurate when
|mean| >> std (see ``switchable_norm_fwd``). All variances are biased. Without batch statistics (eval),
mean_bn/var_bn are the given running statistics and get no gradient.

Every pass over x is centred on the plane's own mean mean_in[n, c] (a per-plane shift: x - mean_in is exact and
small); mu and the three means enter only as small offsets to it, so nothing cancels when |mean| >> std or when
mu is far from the data (eval with running means far from the batch's).

Backward: one reduction pass (per plane sum(dy), sum(dy * (x - mean_in))) and one elementwise pass; the gradient
of x through all three statistics collapses to dx = dy * k[n, c] + (x - mean_in[n, c]) * p[n, c] + q[n, c].
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusednorm import backends
from fusednorm.ops import BackendPinnedFunction, acc_dtype, call_op, custom_op, forward_op


def _merge_equal(mean: Tensor, mean_lo: Tensor, m2: Tensor, count: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Chan's merge of equal-count partials (mean + mean_lo, M2) along ``dim``.

    ``mean`` is each partial's mean rounded to the acc dtype and ``mean_lo`` the rest (true mean - mean). Returns
    the merged mean (rounded), its rest, and the merged M2. The partial means are taken relative to the first one
    along ``dim`` (an exact subtraction when they are close): with |mean| >> std their spread is tiny next to their
    rounding, so without the rests the spread term of M2 (and the merged mean) would be mostly rounding noise.
    """
    ref = mean.narrow(dim, 0, 1)
    d = (mean - ref) + mean_lo
    d_mean = d.mean(dim=dim, keepdim=True)
    spread = (d - d_mean).square().sum(dim=dim)
    merged = ref + d_mean
    merged_lo = d_mean - (merged - ref)  # the rounding of ref + d_mean (exact when merged is close to ref)
    return merged.squeeze(dim), merged_lo.squeeze(dim), m2.sum(dim=dim) + count * spread


def _offsets(wm: Tensor, mean_in: Tensor, lo_in: Tensor, mean_ln: Tensor, lo_ln: Tensor, mean_bn: Tensor,
             lo_bn: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each statistic's true mean minus the rounded plane mean mean_in[n, c] (e_in, e_ln, e_bn), and the mixed
    mean's, mu_off = mu - mean_in: small, accurate (N, C) tensors. Forward and backward both call this, so the
    backward recomputes the forward's mu_off bit for bit instead of saving it."""
    e_ln = (mean_ln[:, None] - mean_in) + lo_ln[:, None]
    e_bn = (mean_bn[None, :] - mean_in) + lo_bn[None, :]
    return lo_in, e_ln, e_bn, wm[0] * lo_in + wm[1] * e_ln + wm[2] * e_bn


@custom_op("fusednorm::switchable_norm_fwd")
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x: (N, C, P) contiguous. Returns y (N, C, P) x.dtype and, in the acc dtype: mean_in, var_in (N, C);
    mean_ln, var_ln (N,); mean_bn, var_bn (C,) (batch statistics, or the running ones); rstd (N, C);
    lo_in (N, C), lo_ln (N,), lo_bn (C,): true mean - rounded mean of each statistic.

    The data is normalised about each plane's own rounded mean, y = (x - mean_in) * a + (b - mu_off * a): x - mean_in
    is exact, and mu_off is small and accurate, where x - mu would carry mu's rounding (ulp(|mu|)) when
    |mean| >> std.
    """
    n, c, p = x.shape
    acc = acc_dtype(x.dtype)
    planes = x.reshape(n * c, p)
    be = backends.select("plane_stats", x)
    mean_in, m2_in = be.plane_stats(planes)
    if x.dtype == torch.float32:
        # The fp32 plane means are rounded at ulp(|mean|); when |mean| >> std that rounding is a large part of the
        # spread of the means the layer/batch variances are merged from (relative error up to ~1e-7 |mean| / std
        # in var_ln / var_bn, where a two-pass variance over all of x has ~1e-7) and of mu - mean_in. One more read
        # recovers each plane's rounding: sum(x - mean_in) / P (exact differences, tiny sum). bf16/fp16 data is
        # quantised far coarser than that rounding, and fp64 has it at 1e-16.
        ones = torch.ones((p,), dtype=x.dtype, device=x.device).expand(n * c, p)  # dy = 1, row stride 0: no copy
        _, resid = backends.select("plane_bwd_reduce", x).plane_bwd_reduce(ones, planes, mean_in)
        lo_in = (resid / p).view(n, c)
    else:
        lo_in = torch.zeros((n, c), dtype=acc, device=x.device)
    mean_in, m2_in = mean_in.view(n, c), m2_in.view(n, c)
    var_in = m2_in / p
    mean_ln, lo_ln, m2_ln = _merge_equal(mean_in, lo_in, m2_in, p, dim=1)
    var_ln = m2_ln / (c * p)
    if use_batch_stats:
        mean_bn, lo_bn, m2_bn = _merge_equal(mean_in, lo_in, m2_in, p, dim=0)
        var_bn = m2_bn / (n * p)
    else:
        mean_bn, var_bn = running_mean.to(acc).clone(), running_var.to(acc).clone()
        lo_bn = torch.zeros((c,), dtype=acc, device=x.device)
    wm = torch.softmax(mean_weight.to(acc), dim=0)
    wv = torch.softmax(var_weight.to(acc), dim=0)
    *_, mu_off = _offsets(wm, mean_in, lo_in, mean_ln, lo_ln, mean_bn, lo_bn)
    var = wv[0] * var_in + wv[1] * var_ln[:, None] + wv[2] * var_bn[None, :]
    rstd = torch.rsqrt(var + eps)
    a = rstd * weight.to(acc)[None, :]
    b = bias.to(acc)[None, :] - mu_off * a
    y = backends.select("plane_affine", x).plane_affine(
        planes, mean_in.reshape(-1), a.reshape(-1).contiguous(), b.reshape(-1).contiguous()
    )
    return y.view(n, c, p), mean_in, var_in, mean_ln, var_ln, mean_bn, var_bn, rstd, lo_in, lo_ln, lo_bn


@switchable_norm_fwd.register_fake
def _(x, weight, bias, mean_weight, var_weight, running_mean, running_var, use_batch_stats, eps):
    n, c, _ = x.shape
    acc = acc_dtype(x.dtype)

    def nc():
        return x.new_empty((n, c), dtype=acc)

    def vec(k):
        return x.new_empty((k,), dtype=acc)

    return (x.new_empty(x.shape), nc(), nc(), vec(n), vec(n), vec(c), vec(c), nc(), nc(), vec(n), vec(c))


@custom_op("fusednorm::switchable_norm_bwd")
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
    rstd: Tensor,
    lo_in: Tensor,
    lo_ln: Tensor,
    lo_bn: Tensor,
    use_batch_stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Statistics as ``switchable_norm_fwd`` returns them. Returns dx (N, C, P), dweight (C,), dbias (C,),
    dmean_weight (3,), dvar_weight (3,).

    Every pass over x is centred on the plane's own rounded mean mean_in (x - mean_in exact and small); the
    statistics enter only through their small offsets to it. Centring on mu instead cancels catastrophically
    when mu is far from the data (eval mode with running means far from the batch's): (x - mu) * p and the
    matching term of q are each ~|mu - mean_in| / std times larger than their sum.
    """
    n, c, p = x.shape
    acc = acc_dtype(x.dtype)
    planes = x.reshape(n * c, p)
    dy_planes = dy.reshape(n * c, p)
    center = mean_in.reshape(-1).contiguous()
    sum_dy, sum_dyxi = backends.select("plane_bwd_reduce", x).plane_bwd_reduce(dy_planes, planes, center)
    sum_dy, sum_dyxi = sum_dy.view(n, c), sum_dyxi.view(n, c)
    wm = torch.softmax(mean_weight.to(acc), dim=0)
    wv = torch.softmax(var_weight.to(acc), dim=0)
    e_in, e_ln, e_bn, mu_off = _offsets(wm, mean_in, lo_in, mean_ln, lo_ln, mean_bn, lo_bn)
    sum_dyxc = sum_dyxi - mu_off * sum_dy  # sum(dy * (x - mu))
    gamma = weight.to(acc)[None, :]
    dweight = (sum_dyxc * rstd).sum(dim=0)
    dbias = sum_dy.sum(dim=0)
    # gradients of the mixed statistics mu[n, c] and var[n, c]
    dmu = -rstd * gamma * sum_dy
    dvar = -0.5 * rstd.pow(3) * gamma * sum_dyxc
    var = wv[0] * var_in + wv[1] * var_ln[:, None] + wv[2] * var_bn[None, :]  # the forward's mixed variance
    # Gradients of the softmax weights through the softmax: d/dw_i = w_i * sum(dstat * (stat_i - mixed)), written
    # with the differences to the mixed statistic (exactly equal to w_i * (g_i - sum_j w_j g_j), since the w_j sum
    # to 1) so that a large common offset of the means (|mean| >> std) cancels in each difference, not in g.
    gm = torch.stack([(dmu * (e_in - mu_off)).sum(), (dmu * (e_ln - mu_off)).sum(), (dmu * (e_bn - mu_off)).sum()])
    gv = torch.stack([(dvar * (var_in - var)).sum(), (dvar * (var_ln[:, None] - var)).sum(),
                      (dvar * (var_bn[None, :] - var)).sum()])
    dmean_weight = wm * gm
    dvar_weight = wv * gv
    # dx = sum over statistics s of d(stat)/dx: each is (count-normalised) dmean + 2 dvar (x - mean_s) / count,
    # with x - mean_s = (x - mean_in) - e_s.
    cnt_in, cnt_ln, cnt_bn = p, c * p, n * p
    dvar_in = 2 * wv[0] * dvar / cnt_in
    dvar_ln = (2 * wv[1] * dvar.sum(1) / cnt_ln)[:, None]
    p_coef = dvar_in + dvar_ln
    q = wm[0] * dmu / cnt_in + (wm[1] * dmu.sum(1) / cnt_ln)[:, None] - dvar_in * e_in - dvar_ln * e_ln
    if use_batch_stats:
        dvar_bn = (2 * wv[2] * dvar.sum(0) / cnt_bn)[None, :]
        p_coef = p_coef + dvar_bn
        q = q + (wm[2] * dmu.sum(0) / cnt_bn)[None, :] - dvar_bn * e_bn
    k = (rstd * gamma).expand(n, c)
    dx = backends.select("plane_bwd_dx", x).plane_bwd_dx(
        dy_planes, planes, center, k.reshape(-1).contiguous(), p_coef.reshape(-1).contiguous(),
        q.reshape(-1).contiguous(),
    )
    return (dx.view(n, c, p), dweight.to(weight.dtype), dbias.to(weight.dtype), dmean_weight.to(mean_weight.dtype),
            dvar_weight.to(var_weight.dtype))


@switchable_norm_bwd.register_fake
def _(dy, x, weight, mean_weight, var_weight, mean_in, var_in, mean_ln, var_ln, mean_bn, var_bn, rstd, lo_in,
      lo_ln, lo_bn, use_batch_stats):
    return (x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape),
            mean_weight.new_empty(mean_weight.shape), var_weight.new_empty(var_weight.shape))


class SwitchableNormFunction(BackendPinnedFunction):
    """Autograd for SwitchableNorm; saves x and the small statistics tensors."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean_weight, var_weight, running_mean, running_var, use_batch_stats, eps):
        out = forward_op(
            ctx, switchable_norm_fwd, x, weight, bias, mean_weight, var_weight, running_mean, running_var,
            use_batch_stats, eps,
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
        dx, dw, db, dmw, dvw = call_op(
            switchable_norm_bwd, dy.contiguous(), x, weight, mean_weight, var_weight, *stats, ctx.use_batch_stats
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
    y, mean_bn, var_bn = SwitchableNormFunction.call(
        x3, weight, bias, mean_weight, var_weight, running_mean, running_var, use_batch_stats, float(eps)
    )
    return y.view(x.shape), mean_bn, var_bn
