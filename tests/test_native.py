"""The native CPU backend (fusednorm._C via fusednorm.backends.native) against float64, torch and the reference.

Every op of the backend contract is checked for fp32/fp16/bf16/fp64 and bf16/fp16 input with fp32 parameters,
odd sizes, strided rows (LayerNorm), NCHW and channels_last 4-D / 5-D (GroupNorm, BatchNorm), with and without
affine parameters and SiLU, and zero-size inputs. The error against a float64 computation must be at most 2x
the error of torch's own same-dtype op (and 2x the reference backend's) plus a small atol. Also: bit-identical
repeat runs, torch.library.opcheck on every fusednorm_C op, gradcheck in float64, and both CPU instruction-set
copies (AVX2 and baseline) of the kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fusednorm
from fusednorm.backends import reference as ref
from tests.oracle import ATOL, DTYPE_PAIRS, assert_close

try:
    from fusednorm.backends import native as nat
except ImportError as _exc:  # the extension was not built (FUSEDNORM_NO_EXTENSION=1 or a failed build)
    pytest.skip(f"fusednorm._C is not built: {_exc}", allow_module_level=True)

ALL_PAIRS = [*DTYPE_PAIRS, (torch.float64, torch.float64)]


def _ids(pairs):
    return [f"{str(a).split('.')[-1]}-{str(b).split('.')[-1]}" for a, b in pairs]


def check(name, ours, ref64, torch_out, ref_out):
    """ours vs float64: within 2x torch's same-dtype error and 2x the reference backend's error (+ atol)."""
    if ours is None or ref64 is None:
        assert ours is None and ref64 is None, f"{name}: presence mismatch"
        return
    if torch_out is not None:
        assert_close(ours, ref64, torch_out.to(ours.dtype), name + " (vs torch)")
    assert_close(ours, ref64, ref_out, name + " (vs reference)")


def _poison(t):
    return t.fill_(float("nan")) if t.numel() else t


def _params(n, pdtype, affine, bias=True):
    if not affine:
        return None, None
    w = torch.randn(n, dtype=pdtype) + 1.0
    b = torch.randn(n, dtype=pdtype) if bias else None
    return w, b


def _d(t):
    return None if t is None else t.double()


# ---- LayerNorm / RMSNorm -------------------------------------------------------------------------------


def _torch_ln(x, w, b, eps, is_rms):
    """torch's own op in x's dtype (parameters cast to it), with autograd."""
    wc = None if w is None else w.detach().to(x.dtype).requires_grad_()
    bc = None if b is None else b.detach().to(x.dtype).requires_grad_()
    xc = x.detach().clone().requires_grad_()
    if is_rms:
        y = F.rms_norm(xc, (x.shape[1],), wc, eps)
    else:
        y = F.layer_norm(xc, (x.shape[1],), wc, bc, eps)
    return y, xc, wc, bc


@pytest.mark.parametrize("xdtype,pdtype", ALL_PAIRS, ids=_ids(ALL_PAIRS))
@pytest.mark.parametrize("is_rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape", [(37, 515), (5, 4099), (3, 1)])
def test_layer_norm(xdtype, pdtype, is_rms, affine, shape):
    m, n = shape
    eps = 1e-5
    # Strided rows: a view into a wider buffer (row stride n + 7), offset by a mean to test cancellation.
    big = torch.randn(m, n + 7, dtype=torch.float64) * 2 + 3
    x = big.to(xdtype)[:, 3 : 3 + n]
    assert x.stride(0) == n + 7
    w, b = _params(n, pdtype, affine, bias=not is_rms)
    y, mean, rstd = nat.layer_norm_fwd(x, w, b, eps, is_rms)
    y64, mean64, rstd64 = ref.layer_norm_fwd(x.double(), _d(w), _d(b), eps, is_rms)
    yr, meanr, rstdr = ref.layer_norm_fwd(x, w, b, eps, is_rms)
    yt, xt, wt, bt = _torch_ln(x, w, b, eps, is_rms)
    assert y.dtype == xdtype and y.is_contiguous() and rstd.dtype == ref.acc_dtype(xdtype)
    check("y", y, y64, yt, yr)
    check("rstd", rstd, rstd64, None, rstdr)
    if is_rms:
        assert mean.numel() == 0
    else:
        check("mean", mean, mean64, None, meanr)

    dy = torch.randn(m, n + 5, dtype=xdtype)[:, :n]  # strided dy too
    dx, dw, db = nat.layer_norm_bwd(dy, x, w, b, mean, rstd, is_rms)
    dx64, dw64, db64 = ref.layer_norm_bwd(dy.double(), x.double(), _d(w), _d(b), mean64, rstd64, is_rms)
    dxr, dwr, dbr = ref.layer_norm_bwd(dy, x, w, b, meanr, rstdr, is_rms)
    yt.backward(dy)
    check("dx", dx, dx64, xt.grad, dxr)
    check("dw", dw, None if w is None else dw64.to(torch.float64), None if wt is None else wt.grad, dwr)
    check("db", db, None if b is None else db64, None if bt is None else bt.grad, dbr)
    if w is not None:
        assert dw.dtype == pdtype
    if b is not None:
        assert db.dtype == pdtype


def test_layer_norm_large_mean_and_long_rows():
    """|mean| >> std (E[x^2]-E[x]^2 would lose everything) and a row longer than one chunk."""
    x = (1e4 + torch.randn(4, 70001, dtype=torch.float64)).float()
    y, mean, rstd = nat.layer_norm_fwd(x, None, None, 1e-5, False)
    y64, mean64, rstd64 = ref.layer_norm_fwd(x.double(), None, None, 1e-5, False)
    check("y", y, y64, F.layer_norm(x, (x.shape[1],)), ref.layer_norm_fwd(x, None, None, 1e-5, False)[0])
    assert torch.allclose(rstd.double(), rstd64, rtol=1e-4)


def _shift_cases():
    """Rows whose statistics stress the one-read chunk sums (sums of x - k and (x - k)^2, k = the mean of the
    first 8 elements): an outlier at the start (k far from the mean: the exact fallback), chunks at different
    levels (the fallback), the first 8 at 2.6 standard deviations (the worst case that stays on one read),
    and that on a 1e4 offset."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(16, 5000, dtype=torch.float64, generator=g)
    outlier = base.clone()
    outlier[:, 0] = 1e4
    levels = base * 0.01
    for i, lv in zip(range(0, 5000, 2048), (0.0, 50.0, -30.0), strict=True):
        levels[:, i : i + 2048] += lv
    first8 = base.clone()
    first8[:, :8] = 2.6
    return {"outlier": outlier, "levels": levels, "first8": first8, "first8+1e4": first8 + 1e4}


@pytest.mark.parametrize("name", ["outlier", "levels", "first8", "first8+1e4"])
def test_statistics_when_the_shift_is_far_from_the_mean(name):
    """The chunk statistics fall back to an exact second pass where their one-read sums would cancel: rstd
    stays within a few fp32 ulps of float64 and y within torch's error, for LayerNorm rows and GroupNorm
    groups (one group = one contiguous span)."""
    x = _shift_cases()[name].float()
    y, _, rstd = nat.layer_norm_fwd(x, None, None, 0.0, False)
    y64, _, rstd64 = ref.layer_norm_fwd(x.double(), None, None, 0.0, False)
    assert float(((rstd.double() - rstd64) / rstd64).abs().max()) < 2e-6
    assert_close(y, y64, F.layer_norm(x, (x.shape[1],), eps=0.0), f"{name}: layer_norm y")
    xg = x.reshape(4, 8, 50, 50)  # 2 groups of 4 rows: each group is one span of 20000
    yg, _, rstdg = nat.group_norm_fwd(xg, None, None, 2, 0.0, "none")
    yg64, _, rstdg64 = ref.group_norm_fwd(xg.double(), None, None, 2, 0.0, "none")
    assert float(((rstdg.double() - rstdg64) / rstdg64).abs().max()) < 2e-6
    assert_close(yg, yg64, F.group_norm(xg, 2, eps=0.0), f"{name}: group_norm y")


def test_layer_norm_zero_size_and_constant_rows():
    x = torch.empty(0, 33)
    y, mean, rstd = nat.layer_norm_fwd(x, torch.randn(33), torch.randn(33), 1e-5, False)
    assert y.shape == (0, 33) and mean.shape == (0,) and rstd.shape == (0,)
    dx, dw, db = nat.layer_norm_bwd(torch.empty(0, 33), x, torch.randn(33), torch.randn(33), mean, rstd, False)
    assert dx.shape == (0, 33) and torch.equal(dw, torch.zeros(33)) and torch.equal(db, torch.zeros(33))
    c = torch.full((3, 17), 2.5)
    y, _, _ = nat.layer_norm_fwd(c, None, None, 1e-5, False)
    assert torch.isfinite(y).all() and torch.equal(y, torch.zeros_like(y))


# ---- GroupNorm -----------------------------------------------------------------------------------------

GN_SHAPES = [
    ((3, 12, 7, 9), 4, "nchw"),
    ((3, 12, 7, 9), 4, "cl"),
    ((2, 6, 3, 5, 4), 3, "cl3d"),
    ((2, 6, 3, 5, 4), 6, "nchw"),  # InstanceNorm: num_groups == C
    ((2, 10, 129), 5, "nchw"),  # 3-D input
]


def _fmt(x, fmt):
    if fmt == "cl":
        return x.to(memory_format=torch.channels_last)
    if fmt == "cl3d":
        return x.to(memory_format=torch.channels_last_3d)
    return x.contiguous()


def _torch_gn(x, w, b, g, eps, act):
    wc = None if w is None else w.detach().to(x.dtype).requires_grad_()
    bc = None if b is None else b.detach().to(x.dtype).requires_grad_()
    xc = x.detach().clone().requires_grad_()
    y = F.group_norm(xc, g, wc, bc, eps)
    if act == "silu":
        y = F.silu(y)
    return y, xc, wc, bc


@pytest.mark.parametrize("xdtype,pdtype", ALL_PAIRS, ids=_ids(ALL_PAIRS))
@pytest.mark.parametrize("shape,groups,fmt", GN_SHAPES, ids=[f"{s}-{g}-{f}" for s, g, f in GN_SHAPES])
@pytest.mark.parametrize("act", ["none", "silu"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_group_norm(xdtype, pdtype, shape, groups, fmt, act, affine):
    _run_group_norm(xdtype, pdtype, shape, groups, fmt, act, affine)


@pytest.mark.parametrize("xdtype,pdtype", DTYPE_PAIRS, ids=_ids(DTYPE_PAIRS))
@pytest.mark.parametrize("act", ["none", "silu"])
def test_group_norm_large_nhwc(xdtype, pdtype, act):
    """Several NHWC chunks and blocks per sample (the small shapes fit in one)."""
    _run_group_norm(xdtype, pdtype, (2, 40, 50, 50), 8, "cl", act, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_group_norm_nhwc_in_sample_steps(dtype):
    """Channels-last forward and backward go through the batch in steps of about 8 MiB (one sample per step
    here in fp32, 2 + 1 in bf16): every step must use its own samples' statistics and coefficients."""
    _run_group_norm(dtype, torch.float32, (3, 64, 128, 128), 16, "cl", "silu", True)


@pytest.mark.parametrize("xdtype,pdtype", DTYPE_PAIRS, ids=_ids(DTYPE_PAIRS))
def test_group_norm_silu_large_groups(xdtype, pdtype):
    """NCHW groups above the 64K elements whose SiLU gradients the backward keeps between its passes (the
    small shapes take the cached path, this one recomputes them)."""
    _run_group_norm(xdtype, pdtype, (2, 4, 130, 260), 2, "nchw", "silu", True)


@pytest.mark.parametrize("xdtype,pdtype", DTYPE_PAIRS, ids=_ids(DTYPE_PAIRS))
@pytest.mark.parametrize("offsets", ["centred", "mixed"])
def test_group_norm_nhwc_folded_mean(xdtype, pdtype, offsets):
    """The channels-last forward folds the mean into the shift where |mean| * rstd <= 1 (every group when the
    data is centred) and keeps it elsewhere: 'mixed' has groups of both kinds in one step."""
    offset = torch.zeros(1, 24, 1, 1, dtype=torch.float64)
    if offsets == "mixed":
        offset[0, :6] = 40.0  # group 0 of every sample: |mean| * rstd = 40 / 1.5
    _run_group_norm(xdtype, pdtype, (3, 24, 20, 21), 4, "cl", "none", True, offset=offset)
    _run_group_norm(xdtype, pdtype, (3, 24, 20, 21), 4, "cl", "silu", True, offset=offset)


def _run_group_norm(xdtype, pdtype, shape, groups, fmt, act, affine, offset=2.0):
    eps = 1e-5
    c = shape[1]
    x = _fmt((torch.randn(shape, dtype=torch.float64) * 1.5 + offset).to(xdtype), fmt)
    w, b = _params(c, pdtype, affine)
    y, mean, rstd = nat.group_norm_fwd(x, w, b, groups, eps, act)
    y64, mean64, rstd64 = ref.group_norm_fwd(x.double(), _d(w), _d(b), groups, eps, act)
    yr, meanr, rstdr = ref.group_norm_fwd(x, w, b, groups, eps, act)
    yt, xt, wt, bt = _torch_gn(x, w, b, groups, eps, act)
    assert y.dtype == xdtype and y.stride() == yr.stride(), "output must keep x's dtype and memory format"
    check("y", y, y64, yt, yr)
    check("mean", mean, mean64, None, meanr)
    check("rstd", rstd, rstd64, None, rstdr)

    dy = _fmt(torch.randn(shape, dtype=xdtype), fmt)
    dx, dw, db = nat.group_norm_bwd(dy, x, w, b, mean, rstd, groups, act)
    dx64, dw64, db64 = ref.group_norm_bwd(dy.double(), x.double(), _d(w), _d(b), mean64, rstd64, groups, act)
    dxr, dwr, dbr = ref.group_norm_bwd(dy, x, w, b, meanr, rstdr, groups, act)
    yt.backward(dy)
    assert dx.stride() == dxr.stride()
    check("dx", dx, dx64, xt.grad, dxr)
    check("dw", dw, dw64, None if wt is None else wt.grad, dwr)
    check("db", db, db64, None if bt is None else bt.grad, dbr)


def test_group_norm_dy_in_other_layout_and_zero_size():
    x = torch.randn(2, 8, 5, 6).to(memory_format=torch.channels_last)
    w, b = torch.randn(8), torch.randn(8)
    y, mean, rstd = nat.group_norm_fwd(x, w, b, 2, 1e-5, "silu")
    dy = torch.randn(2, 8, 5, 6)  # NCHW dy for a channels_last x
    got = nat.group_norm_bwd(dy, x, w, b, mean, rstd, 2, "silu")
    want = ref.group_norm_bwd(dy, x, w, b, mean, rstd, 2, "silu")
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    z = torch.empty(0, 8, 3, 3)
    y, mean, rstd = nat.group_norm_fwd(z, w, b, 4, 1e-5, "none")
    assert y.shape == z.shape and mean.shape == (0, 4)
    dx, dw, db = nat.group_norm_bwd(z, z, w, b, mean, rstd, 4, "none")
    assert dx.shape == z.shape and torch.equal(dw, torch.zeros(8)) and torch.equal(db, torch.zeros(8))


def test_group_norm_large_mean():
    x = (1e4 + torch.randn(2, 8, 33, 31, dtype=torch.float64)).float()
    for fmt in ("nchw", "cl"):
        xf = _fmt(x, fmt)
        _, mean, rstd = nat.group_norm_fwd(xf, None, None, 4, 1e-5, "none")
        _, mean64, rstd64 = ref.group_norm_fwd(xf.double(), None, None, 4, 1e-5, "none")
        assert torch.allclose(rstd.double(), rstd64, rtol=1e-4), fmt


# ---- BatchNorm -----------------------------------------------------------------------------------------

BN_SHAPES = [
    ((5, 7, 9, 11), "nchw"),
    ((5, 7, 9, 11), "cl"),
    ((3, 10, 4, 5, 3), "cl3d"),
    ((3, 10, 4, 5, 3), "nchw"),
    ((33, 19), "nchw"),  # BatchNorm1d (N, C)
    ((4, 16, 37), "nchw"),  # BatchNorm1d (N, C, L)
    ((4, 64, 40, 40), "cl"),  # several NHWC chunks
]


def _torch_bn_train(x, w, b, eps):
    wc = None if w is None else w.detach().to(x.dtype).requires_grad_()
    bc = None if b is None else b.detach().to(x.dtype).requires_grad_()
    xc = x.detach().clone().requires_grad_()
    y = F.batch_norm(xc, None, None, wc, bc, training=True, eps=eps)
    return y, xc, wc, bc


@pytest.mark.parametrize("xdtype,pdtype", ALL_PAIRS, ids=_ids(ALL_PAIRS))
@pytest.mark.parametrize("shape,fmt", BN_SHAPES, ids=[f"{s}-{f}" for s, f in BN_SHAPES])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_batch_norm(xdtype, pdtype, shape, fmt, affine):
    eps = 1e-5
    c = shape[1]
    x = _fmt((torch.randn(shape, dtype=torch.float64) * 2 + 3).to(xdtype), fmt)
    w, b = _params(c, pdtype, affine)
    count = x.numel() // c
    mean, m2 = nat.batch_norm_stats(x)
    mean64, m264 = ref.batch_norm_stats(x.double())
    meanr, m2r = ref.batch_norm_stats(x)
    dims = [0, *range(2, x.dim())]
    var_t, mean_t = torch.var_mean(x, dims, correction=0)
    check("mean", mean, mean64, mean_t, meanr)
    check("m2", m2, m264, var_t.to(m2.dtype) * count, m2r)

    rstd64 = torch.rsqrt(m264 / count + eps)
    rstd = rstd64.to(mean.dtype)
    y = nat.batch_norm_apply(x, mean64.to(mean.dtype), rstd, w, b)
    y64 = ref.batch_norm_apply(x.double(), mean64, rstd64, _d(w), _d(b))
    yr = ref.batch_norm_apply(x, mean64.to(mean.dtype), rstd, w, b)
    yt, xt, wt, bt = _torch_bn_train(x, w, b, eps)
    assert y.dtype == xdtype and y.stride() == yr.stride()
    check("y", y, y64, yt, yr)

    dy = _fmt(torch.randn(shape, dtype=xdtype), fmt)
    s1, s2 = nat.batch_norm_bwd_reduce(dy, x, mean64.to(mean.dtype), rstd)
    s164, s264 = ref.batch_norm_bwd_reduce(dy.double(), x.double(), mean64, rstd64)
    s1r, s2r = ref.batch_norm_bwd_reduce(dy, x, mean64.to(mean.dtype), rstd)
    yt.backward(dy)
    check("sum_dy", s1, s164, None if bt is None else bt.grad, s1r)
    check("sum_dy_xhat", s2, s264, None if wt is None else wt.grad, s2r)
    for training in (True, False):
        dx = nat.batch_norm_bwd_dx(
            dy, x, mean64.to(mean.dtype), rstd, w, s164.to(s1.dtype), s264.to(s2.dtype), count, training
        )
        dx64 = ref.batch_norm_bwd_dx(dy.double(), x.double(), mean64, rstd64, _d(w), s164, s264, count, training)
        dxr = ref.batch_norm_bwd_dx(
            dy, x, mean64.to(mean.dtype), rstd, w, s164.to(s1.dtype), s264.to(s2.dtype), count, training
        )
        assert dx.stride() == dxr.stride()
        check(f"dx(training={training})", dx, dx64, xt.grad if training else None, dxr)


@pytest.mark.parametrize("xdtype,pdtype", DTYPE_PAIRS, ids=_ids(DTYPE_PAIRS))
@pytest.mark.parametrize("fmt", ["nchw", "cl"])
@pytest.mark.parametrize("offsets", ["centred", "mixed"])
def test_batch_norm_folded_mean(xdtype, pdtype, fmt, offsets):
    """batch_norm_apply folds the mean into the shift for channels with |mean| * rstd <= 1 (all of them when the
    data is centred; channels-last then runs a two-coefficient loop) and keeps it for the others ('mixed'); the
    channels-last training dx folds it when every channel qualifies."""
    shape, c = (4, 16, 9, 13), 16
    offset = torch.zeros(1, c, 1, 1, dtype=torch.float64)
    if offsets == "mixed":
        offset[0, ::2] = 30.0
    x = _fmt((torch.randn(shape, dtype=torch.float64) * 1.5 + offset).to(xdtype), fmt)
    w, b = _params(c, pdtype, True)
    count = x.numel() // c
    mean64, m264 = ref.batch_norm_stats(x.double())
    rstd64 = torch.rsqrt(m264 / count + 1e-5)
    mean, rstd = mean64.float(), rstd64.float()
    y = nat.batch_norm_apply(x, mean, rstd, w, b)
    y64 = ref.batch_norm_apply(x.double(), mean64, rstd64, _d(w), _d(b))
    yr = ref.batch_norm_apply(x, mean, rstd, w, b)
    yt, xt, _, _ = _torch_bn_train(x, w, b, 1e-5)
    assert y.stride() == yr.stride()
    check("y", y, y64, yt, yr)

    dy = _fmt(torch.randn(shape, dtype=xdtype), fmt)
    yt.backward(dy)
    s164, s264 = ref.batch_norm_bwd_reduce(dy.double(), x.double(), mean64, rstd64)
    s1, s2 = s164.float(), s264.float()
    dx = nat.batch_norm_bwd_dx(dy, x, mean, rstd, w, s1, s2, count, True)
    dx64 = ref.batch_norm_bwd_dx(dy.double(), x.double(), mean64, rstd64, _d(w), s164, s264, count, True)
    dxr = ref.batch_norm_bwd_dx(dy, x, mean, rstd, w, s1, s2, count, True)
    assert dx.stride() == dxr.stride()
    check("dx", dx, dx64, xt.grad, dxr)


def test_batch_norm_large_mean_and_zero_size():
    x = (1e4 + torch.randn(8, 6, 21, 23, dtype=torch.float64)).float()
    for fmt in ("nchw", "cl"):
        mean, m2 = nat.batch_norm_stats(_fmt(x, fmt))
        mean64, m264 = ref.batch_norm_stats(x.double())
        assert torch.allclose(m2.double(), m264, rtol=1e-4), fmt
    z = torch.empty(0, 5, 3, 3)
    mean, m2 = nat.batch_norm_stats(z)
    assert mean.shape == (5,) and torch.isnan(mean).all() and torch.equal(m2, torch.zeros(5))
    y = nat.batch_norm_apply(z, torch.zeros(5), torch.ones(5), None, None)
    assert y.shape == z.shape
    s1, s2 = nat.batch_norm_bwd_reduce(z, z, torch.zeros(5), torch.ones(5))
    assert torch.equal(s1, torch.zeros(5)) and torch.equal(s2, torch.zeros(5))


# ---- determinism ---------------------------------------------------------------------------------------


def _all_ops_outputs(dtype):
    torch.manual_seed(1)
    outs = []
    x = torch.randn(301, 1031, dtype=dtype)
    w, b = torch.randn(1031), torch.randn(1031)
    y, mean, rstd = nat.layer_norm_fwd(x, w, b, 1e-5, False)
    outs += [y, mean, rstd, *nat.layer_norm_bwd(torch.randn_like(x), x, w, b, mean, rstd, False)]
    for fmt in ("nchw", "cl"):
        xg = _fmt(torch.randn(3, 32, 33, 35, dtype=dtype), fmt)
        wg, bg = torch.randn(32), torch.randn(32)
        y, mean, rstd = nat.group_norm_fwd(xg, wg, bg, 8, 1e-5, "silu")
        outs += [y, mean, rstd, *nat.group_norm_bwd(torch.randn_like(xg), xg, wg, bg, mean, rstd, 8, "silu")]
        mean, m2 = nat.batch_norm_stats(xg)
        rstd = torch.rsqrt(m2 / (xg.numel() // 32) + 1e-5)
        dyg = torch.randn_like(xg)
        s1, s2 = nat.batch_norm_bwd_reduce(dyg, xg, mean, rstd)
        outs += [mean, m2, nat.batch_norm_apply(xg, mean, rstd, wg, bg), s1, s2]
        outs.append(nat.batch_norm_bwd_dx(dyg, xg, mean, rstd, wg, s1, s2, xg.numel() // 32, True))
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_repeat_runs(dtype):
    first = _all_ops_outputs(dtype)
    for _ in range(2):
        again = _all_ops_outputs(dtype)
        for i, (a, b) in enumerate(zip(first, again, strict=True)):
            assert (
                torch.equal(a, b)
                or (torch.isnan(a) == torch.isnan(b)).all()
                and torch.equal(a.nan_to_num(), b.nan_to_num())
            ), f"output {i} differs between identical runs"


# ---- the CPU instruction-set copies (base, avx2, avx512bf16) ---------------------------------------------

_ISA_ORDER = ("base", "avx2", "avx512bf16")
# /proc/cpuinfo flags each copy needs (module.cpp's cpu_isa_level checks the same features).
_ISA_FLAGS = {
    "base": set(),
    "avx2": {"avx2", "fma", "f16c", "bmi2"},
    "avx512bf16": {"avx2", "fma", "f16c", "bmi2", "avx512f", "avx512vl", "avx512bw", "avx512dq", "avx512_bf16"},
}


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo; None where there is no such file (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return set()


def _isa_skip_reason(isa: str) -> str | None:
    """Why copy `isa` cannot run here (None when it can): not built, or not supported by this CPU."""
    if isa not in nat.cpu_isas_built():
        return (f"this build has no {isa} copy of the kernels (FUSEDNORM_NO_AVX2 / FUSEDNORM_NO_AVX512, a non-GCC "
                "compiler, or GCC < 10; test_isa_copies_built_and_chosen checks which apply)")
    flags = _cpu_flags()
    if flags is not None:
        supported = _ISA_FLAGS[isa] <= flags
    else:
        supported = _ISA_ORDER.index(isa) <= _ISA_ORDER.index(nat.cpu_isa())
    if not supported:
        return f"this CPU has no {isa} (needs {' '.join(sorted(_ISA_FLAGS[isa]))})"
    return None


def test_isa_copies_built_and_chosen():
    """A build with GCC on x86-64 holds the AVX2 copy (and the AVX-512 BF16 one with GCC 10+) unless opted out,
    and the best copy the CPU supports is the one that runs: the ISA tests below skip only where a CPU or an
    opted-out build lacks a copy, never because the build silently dropped it."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the ISA copies exist on x86-64 only")
    built = nat.cpu_isas_built()
    compiler = os.environ.get("CXX", "c++")
    try:
        gcc_major = int(subprocess.run([compiler, "-dumpversion"], capture_output=True, text=True,
                                       timeout=30).stdout.split(".")[0])
    except (OSError, ValueError, subprocess.SubprocessError):
        gcc_major = 0
    opted_out = lambda name: os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")  # noqa: E731
    if "clang" not in os.path.basename(compiler) and gcc_major > 0 and not opted_out("FUSEDNORM_NO_AVX2"):
        assert "avx2" in built, built
        if gcc_major >= 10 and not opted_out("FUSEDNORM_NO_AVX512"):
            assert "avx512bf16" in built, built
    flags = _cpu_flags()
    if flags is not None and "FUSEDNORM_CPU_ISA" not in os.environ:
        best = [isa for isa in _ISA_ORDER if isa in built and _ISA_FLAGS[isa] <= flags][-1]
        assert nat.cpu_isa() == best, (nat.cpu_isa(), best, built)


@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_lower_isa_copies_match_reference(isa):
    """FUSEDNORM_CPU_ISA=base / avx2 selects the older copies of the kernels (the suite runs the best one):
    they must agree with the reference too (read once per process: run in a subprocess)."""
    reason = _isa_skip_reason(isa)
    if reason is not None:
        pytest.skip(reason)
    code = r"""
import torch
from fusednorm.backends import native as nat, reference as ref
assert nat.cpu_isa() == ISA, nat.cpu_isa()
torch.manual_seed(0)
for dt in (torch.float32, torch.bfloat16):
    x = torch.randn(9, 77, dtype=dt) + 3
    w, b = torch.randn(77), torch.randn(77)
    got, want = nat.layer_norm_fwd(x, w, b, 1e-5, False), ref.layer_norm_fwd(x, w, b, 1e-5, False)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-2, atol=1e-2)
    dy = torch.randn_like(x)
    got = nat.layer_norm_bwd(dy, x, w, b, want[1], want[2], False)
    for g, r in zip(got, ref.layer_norm_bwd(dy, x, w, b, want[1], want[2], False)):
        torch.testing.assert_close(g, r, rtol=1e-2, atol=1e-2)
    for fmt in (torch.contiguous_format, torch.channels_last):
        xg = (torch.randn(2, 12, 5, 7, dtype=dt) + 2).contiguous(memory_format=fmt)
        wg, bg = torch.randn(12), torch.randn(12)
        want = ref.group_norm_fwd(xg, wg, bg, 3, 1e-5, "silu")
        for g, r in zip(nat.group_norm_fwd(xg, wg, bg, 3, 1e-5, "silu"), want):
            torch.testing.assert_close(g, r, rtol=1e-2, atol=1e-2)
        dy = torch.randn_like(xg)
        got = nat.group_norm_bwd(dy, xg, wg, bg, want[1], want[2], 3, "silu")
        for g, r in zip(got, ref.group_norm_bwd(dy, xg, wg, bg, want[1], want[2], 3, "silu")):
            torch.testing.assert_close(g, r, rtol=1e-2, atol=1e-2)
        for g, r in zip(nat.batch_norm_stats(xg), ref.batch_norm_stats(xg)):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-3)
print("ok")
"""
    env = dict(os.environ, FUSEDNORM_CPU_ISA=isa)
    res = subprocess.run([sys.executable, "-c", f"ISA = {isa!r}\n" + code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_kernels_run_on_every_thread():
    """at::parallel_for is `#pragma omp parallel` in a header: built without OpenMP it silently runs on one
    thread. The library must use every thread torch is set to use."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.fusednorm_C.parallel_threads(8) == 2
        torch.set_num_threads(1)
        assert torch.ops.fusednorm_C.parallel_threads(8) == 1
    finally:
        torch.set_num_threads(before)


# Every op of the extension on odd sizes, fp32 / bf16 / fp64, in a fresh process whose environment picks a
# code path (read once per process); saves the list of outputs to OUT.
_EVERY_OP_CODE = r"""
import torch
from fusednorm.backends import native as nat, reference as ref
torch.manual_seed(0)
outs = []
for dt in (torch.float32, torch.bfloat16, torch.float64):
    for n in (77, 64, 1):
        x = torch.randn(9, n + 3, dtype=dt)[:, 3:] + 3  # rows start off 32-byte boundaries
        w, b = torch.randn(n, dtype=torch.float64 if dt == torch.float64 else torch.float32), None
        b = torch.randn_like(w)
        y, mean, rstd = nat.layer_norm_fwd(x, w, b, 1e-5, False)
        dy = torch.randn_like(x)
        outs += [y, mean, rstd, *nat.layer_norm_bwd(dy, x, w, b, mean, rstd, False)]
        s_dtype = torch.float64 if dt == torch.float64 else torch.float32
        ya, sa, ma, ra = nat.add_norm_fwd(x, torch.randn_like(x), w, b, 1e-5, False, 0.0, 0, s_dtype)
        outs += [ya, sa, ma, ra]
        outs += list(nat.add_norm_bwd(torch.randn_like(x), torch.randn_like(sa), sa, w, b, ma, ra, False, 0.0, 0,
                                      x.dtype, s_dtype))
        v, g = x.contiguous(), torch.rand(9, dtype=w.dtype) + 0.5
        wn, norm = nat.weight_norm_fwd(v, g)
        outs += [wn, norm, *nat.weight_norm_bwd(torch.randn_like(v), v, g, norm)]
    for fmt in (torch.contiguous_format, torch.channels_last):
        xg = (torch.randn(2, 12, 5, 7, dtype=dt) + 2).contiguous(memory_format=fmt)
        wg = torch.randn(12, dtype=w.dtype); bg = torch.randn_like(wg)
        y, mean, rstd = nat.group_norm_fwd(xg, wg, bg, 3, 1e-5, "silu")
        dy = torch.randn_like(xg)
        outs += [y, *nat.group_norm_bwd(dy, xg, wg, bg, mean, rstd, 3, "silu")]
        m, m2 = nat.batch_norm_stats(xg)
        rs = torch.rsqrt(m2 / 70 + 1e-5)
        outs.append(nat.batch_norm_apply(xg, m, rs, wg, bg))
# bf16 outputs that are fp32 denormals (columns 40-79 scaled by 1e-39) or NaN (row 1), next to ordinary ones
xs = torch.randn(4, 80, dtype=torch.bfloat16)
xs[1, 5] = float("nan")
tiny = torch.ones(80)
tiny[40:] = 1e-39
outs += list(nat.layer_norm_fwd(xs, tiny, torch.zeros(80), 1e-5, False))
xg = torch.randn(2, 80, 3, 3, dtype=torch.bfloat16)
xg[1, 7, 1, 1] = float("nan")
outs.append(nat.group_norm_fwd(xg, tiny, None, 4, 1e-5, "none")[0])
m, m2 = nat.batch_norm_stats(xg)
outs.append(nat.batch_norm_apply(xg, m, torch.rsqrt(m2 / 18 + 1e-5), tiny, None))
torch.save(outs, OUT)
print("ok")
"""


def _every_op_outputs(**env_overrides: str) -> list[torch.Tensor]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.pt")
        env = dict(os.environ, **env_overrides)
        res = subprocess.run([sys.executable, "-c", f"OUT = {path!r}\n" + _EVERY_OP_CODE], env=env,
                             capture_output=True, text=True, timeout=180)
        assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
        return torch.load(path)


def _assert_same_bits(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    assert len(got) == len(want) > 40
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), i
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        assert torch.equal(a.view(bits), b.view(bits)), f"output {i} differs {what}"


def test_streaming_stores_match_reference():
    """FUSEDNORM_CPU_STREAM_BYTES=1 makes every op stream its output (non-temporal stores, with unaligned
    heads and tails): results must equal the ordinary path bit for bit."""
    streamed = _every_op_outputs(FUSEDNORM_CPU_STREAM_BYTES="1")
    ordinary = _every_op_outputs(FUSEDNORM_CPU_STREAM_BYTES="0")
    _assert_same_bits(streamed, ordinary, "when streamed")


def test_avx512_copy_matches_avx2_copy_bit_for_bit():
    """The AVX-512 BF16 copy converts bf16 outputs with vcvtne2ps2bf16 (which flushes denormals and keeps
    NaN payloads) and falls back to the AVX2 rounding for vectors holding either: every output, the tiny and
    NaN ones included, must have the AVX2 copy's bits."""
    reason = _isa_skip_reason("avx512bf16")
    if reason is not None:
        pytest.skip(reason)
    fast = _every_op_outputs(FUSEDNORM_CPU_ISA="avx512bf16", FUSEDNORM_CPU_STREAM_BYTES="0")
    avx2 = _every_op_outputs(FUSEDNORM_CPU_ISA="avx2", FUSEDNORM_CPU_STREAM_BYTES="0")
    _assert_same_bits(fast, avx2, "between the AVX-512 and AVX2 copies")


# ---- opcheck on every fusednorm_C op -------------------------------------------------------------------


def _opcheck_cases():
    x = torch.randn(6, 19)
    w, b = torch.randn(19), torch.randn(19)
    _, mean, rstd = ref.layer_norm_fwd(x, w, b, 1e-5, False)
    _, _, rstd_rms = ref.layer_norm_fwd(x, w, None, 1e-5, True)
    xg = torch.randn(2, 6, 4, 5).to(memory_format=torch.channels_last)
    wg, bg = torch.randn(6), torch.randn(6)
    _, gmean, grstd = ref.group_norm_fwd(xg, wg, bg, 3, 1e-5, "silu")
    bmean, bm2 = ref.batch_norm_stats(xg)
    brstd = torch.rsqrt(bm2 / 40 + 1e-5)
    dyg = torch.randn_like(xg)
    return [
        ("layer_norm_fwd", (x, w, b, 1e-5, False)),
        ("layer_norm_fwd", (x, w, None, 1e-5, True)),
        ("layer_norm_bwd", (torch.randn_like(x), x, w, b, mean, rstd, False)),
        ("layer_norm_bwd", (torch.randn_like(x), x, None, None, torch.empty(0), rstd_rms, True)),
        ("group_norm_fwd", (xg, wg, bg, 3, 1e-5, "silu")),
        ("group_norm_fwd", (xg.contiguous(), None, None, 6, 1e-5, "none")),
        ("group_norm_bwd", (dyg, xg, wg, bg, gmean, grstd, 3, "silu")),
        ("batch_norm_stats", (xg,)),
        ("batch_norm_apply", (xg, bmean, brstd, wg, bg)),
        ("batch_norm_bwd_reduce", (dyg, xg, bmean, brstd)),
        ("batch_norm_bwd_dx", (dyg, xg, bmean, brstd, wg, bmean * 2, bm2, 40, True)),
        ("batch_norm_bwd_dx", (dyg, xg, bmean, brstd, None, bmean, bm2, 40, False)),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.fusednorm_C, name).default, args)


def test_has_cuda_and_supports():
    assert isinstance(nat.has_cuda(), bool)
    for op in (
        "layer_norm_fwd",
        "layer_norm_bwd",
        "group_norm_fwd",
        "group_norm_bwd",
        "batch_norm_stats",
        "batch_norm_apply",
        "batch_norm_bwd_reduce",
        "batch_norm_bwd_dx",
    ):
        assert nat.supports(op), op
    assert not nat.supports("not_an_op")
    assert fusednorm.available_backends()["native"].available


# ---- gradcheck in float64 through the backend's fwd/bwd pairs ------------------------------------------


class _LN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, is_rms):
        y, mean, rstd = nat.layer_norm_fwd(x, w, b, 1e-5, is_rms)
        ctx.save_for_backward(x, w, b, mean, rstd)
        ctx.is_rms = is_rms
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, b, mean, rstd = ctx.saved_tensors
        dx, dw, db = nat.layer_norm_bwd(dy.contiguous(), x, w, b, mean, rstd, ctx.is_rms)
        return dx, dw, db, None


class _GN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, groups, act):
        y, mean, rstd = nat.group_norm_fwd(x, w, b, groups, 1e-5, act)
        ctx.save_for_backward(x, w, b, mean, rstd)
        ctx.groups, ctx.act = groups, act
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, b, mean, rstd = ctx.saved_tensors
        dx, dw, db = nat.group_norm_bwd(dy, x, w, b, mean, rstd, ctx.groups, ctx.act)
        return dx, dw, db, None, None


class _BN(torch.autograd.Function):
    """Training-mode BatchNorm from the four native pieces."""

    @staticmethod
    def forward(ctx, x, w, b):
        mean, m2 = nat.batch_norm_stats(x)
        count = x.numel() // x.shape[1]
        rstd = torch.rsqrt(m2 / count + 1e-5)
        ctx.save_for_backward(x, w, mean, rstd)
        ctx.count = count
        return nat.batch_norm_apply(x, mean, rstd, w, b)

    @staticmethod
    def backward(ctx, dy):
        x, w, mean, rstd = ctx.saved_tensors
        s1, s2 = nat.batch_norm_bwd_reduce(dy, x, mean, rstd)
        dx = nat.batch_norm_bwd_dx(dy, x, mean, rstd, w, s1, s2, ctx.count, True)
        return dx, s2, s1


def _leaf(*shape, cl=False):
    t = torch.randn(*shape, dtype=torch.float64)
    if cl:
        t = t.to(memory_format=torch.channels_last)
    return t.requires_grad_()


@pytest.mark.parametrize("is_rms", [False, True])
def test_gradcheck_layer_norm(is_rms):
    x, w = _leaf(4, 9), _leaf(9)
    b = None if is_rms else _leaf(9)
    assert torch.autograd.gradcheck(lambda x, w, b: _LN.apply(x, w, b, is_rms), (x, w, b))


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("act", ["none", "silu"])
def test_gradcheck_group_norm(cl, act):
    x, w, b = _leaf(2, 6, 3, 4, cl=cl), _leaf(6), _leaf(6)
    assert torch.autograd.gradcheck(lambda x, w, b: _GN.apply(x, w, b, 3, act), (x, w, b))


@pytest.mark.parametrize("cl", [False, True])
def test_gradcheck_batch_norm(cl):
    x, w, b = _leaf(3, 4, 3, 5, cl=cl), _leaf(4), _leaf(4)
    assert torch.autograd.gradcheck(_BN.apply, (x, w, b))


# ---- integration through fusednorm.functional ----------------------------------------------------------


def test_functional_uses_native_backend():
    """The public layer runs on the native backend when forced, matching the reference backend."""
    x = torch.randn(4, 6, 10, requires_grad=True)
    w, b = torch.randn(10, requires_grad=True), torch.randn(10, requires_grad=True)
    outs = {}
    for name in ("native", "reference"):
        with fusednorm.use_backend(name):
            y = fusednorm.functional.layer_norm(x, (10,), w, b, 1e-5)
            gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.ones_like(y) * 0.5 + y.detach())
        outs[name] = (y, gx, gw, gb)
    for a, r in zip(outs["native"], outs["reference"], strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=ATOL[torch.float32])
