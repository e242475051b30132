"""GroupNorm and InstanceNorm: every backend against float64 and torch, forward and backward, both memory
formats, the fused SiLU, running statistics, numerics, bad input, opcheck, gradcheck and module parity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF
from conftest import cpu_backends
from oracle import DTYPE_PAIRS, assert_close

import fusednorm
import fusednorm.functional as F

BACKENDS = cpu_backends()
CL = {4: torch.channels_last, 5: torch.channels_last_3d}


def _fmt(x: torch.Tensor) -> torch.memory_format:
    if x.dim() in CL and x.is_contiguous(memory_format=CL[x.dim()]) and not x.is_contiguous():
        return CL[x.dim()]
    return torch.contiguous_format


def _torch_gn(x, g, w, b, eps, act):
    y = TF.group_norm(x, g, w, b, eps)
    return TF.silu(y) if act == "silu" else y


def _mixed_param_grad_atol(x_shape, g) -> float:
    """With fp32 params and low-precision input, torch's own dW (params cast to the input dtype) is rounded to
    that dtype, so it is no yardstick for our fp32 dW: bound ours by fp32 accumulation over N * S terms."""
    return 1e-5 * max(1, x_shape[0] * math.prod(x_shape[2:]))


def _run_gn(backend, shape, g, x_dtype=torch.float32, p_dtype=torch.float32, channels_last=False, affine=True,
            act="none", dy_layout="same"):
    c = shape[1]
    x = (torch.randn(shape) * 2 + 0.5).to(x_dtype)
    if channels_last:
        x = x.contiguous(memory_format=CL[len(shape)])
    w = (torch.randn(c) + 1).to(p_dtype) if affine else None
    b = torch.randn(c).to(p_dtype) if affine else None
    dy = torch.randn(shape).to(x_dtype)
    if dy_layout == "same":
        dy = dy.contiguous(memory_format=_fmt(x))
    eps = 1e-5

    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    if channels_last:
        leaves[0] = x.detach().clone(memory_format=CL[len(shape)]).requires_grad_()
    with fusednorm.use_backend(backend):
        out = F.group_norm(leaves[0], g, leaves[1], leaves[2], eps, activation=None if act == "none" else act)
    out.backward(dy)

    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    ref = _torch_gn(ref_leaves[0], g, ref_leaves[1], ref_leaves[2], eps, act)
    ref.backward(dy.double())

    # torch in the same dtypes (its CPU kernel rejects fp32 params with low-precision input: cast them there)
    tp = p_dtype if p_dtype == x_dtype else x_dtype
    t_leaves = [t.detach().to(tp if i else x_dtype).requires_grad_() if t is not None else None
                for i, t in enumerate((x, w, b))]
    tout = _torch_gn(t_leaves[0], g, t_leaves[1], t_leaves[2], eps, act)
    tout.backward(dy)

    assert out.dtype == x_dtype and out.shape == x.shape
    assert _fmt(out) == _fmt(x), "output must keep the input's memory format"
    if x.numel():
        assert out.stride() == x.stride()
        assert leaves[0].grad.stride() == x.stride(), "dx must keep the input's memory format"
    assert_close(out, ref, tout, "y")
    assert_close(leaves[0].grad, ref_leaves[0].grad, t_leaves[0].grad, "dx")
    for i, name in ((1, "dw"), (2, "db")):
        if leaves[i] is not None:
            assert leaves[i].grad.dtype == p_dtype
            assert_close(leaves[i].grad, ref_leaves[i].grad, t_leaves[i].grad.to(p_dtype), name,
                         atol=None if p_dtype == x_dtype else _mixed_param_grad_atol(shape, g))


# (shape, num_groups): G = 1, G = C, 32 groups, C/G odd, spatial sizes not multiples of a tile, batch 1 with a
# split reduction whose programs cross channel blocks, 2-D / 3-D / 4-D / 5-D.
SHAPES = [
    ((3, 8), 2),
    ((2, 6, 5), 3),
    ((2, 5, 11), 5),
    ((2, 6, 7, 9), 1),
    ((2, 15, 7, 9), 5),
    ((1, 64, 5, 3), 32),
    ((1, 14, 50, 60), 1),
    ((2, 6, 3, 4, 5), 2),
]


# Both layouts where channels_last exists (4-D / 5-D); 32 groups run in channels_last only (interpreter time).
LAYOUT_CASES = [(s, g, layout) for s, g in SHAPES for layout in ("nchw", "channels_last")
                if layout == "nchw" and g != 32 or layout == "channels_last" and len(s) in CL]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,g,layout", LAYOUT_CASES, ids=[f"{s}-g{g}-{lay}" for s, g, lay in LAYOUT_CASES])
def test_fp32_against_float64_and_torch(backend, shape, g, layout, poison_empty):
    _run_gn(backend, shape, g, channels_last=layout == "channels_last", act="silu" if g == 5 else "none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype,p_dtype", DTYPE_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("layout,act", [("nchw", "none"), ("channels_last", "silu")])
def test_dtypes(backend, x_dtype, p_dtype, layout, act, poison_empty):
    _run_gn(backend, (2, 12, 5, 7), 4, x_dtype, p_dtype, channels_last=layout == "channels_last", act=act)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["none", "silu"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_without_affine(backend, act, layout, poison_empty):
    _run_gn(backend, (2, 6, 4, 5), 3, affine=False, act=act, channels_last=layout == "channels_last")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_in_another_layout(backend, poison_empty):
    # x channels_last, dy contiguous (what autograd may hand over): dx still channels_last and right
    _run_gn(backend, (2, 8, 5, 6), 4, channels_last=True, act="silu", dy_layout="contiguous")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_split_reduction(backend, layout, poison_empty):
    """Batch 1, few groups, a map whose groups span several tiles: N*G is smaller than the programs that fill the
    machine, so every group's reduction is split across programs and the partials are merged (Chan)."""
    shape = (1, 16, 33, 40)
    if backend == "triton":
        from fusednorm.backends.triton import group_norm as tg

        x = torch.randn(shape)
        geo = tg._Geometry(x if layout == "nchw" else x.to(memory_format=torch.channels_last), 4)
        assert geo.split > 1, "the interpreter's assumed 4 SMs want 16 programs: 4 groups must be split"
    _run_gn(backend, shape, 4, channels_last=layout == "channels_last", act="silu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_only_and_bias_only(backend):
    x = torch.randn(2, 6, 5, requires_grad=True)
    w = torch.randn(6, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    for ww, bb in ((w, None), (None, b)):
        with fusednorm.use_backend(backend):
            out = F.group_norm(x, 3, ww, bb)
        # composite reference: torch's own group_norm backward fails with a bias but no weight
        ref = TF.group_norm(x.double(), 3)
        if ww is not None:
            ref = ref * ww.double()[:, None]
        if bb is not None:
            ref = ref + bb.double()[:, None]
        args = [t for t in (x, ww, bb) if t is not None]
        gs = torch.autograd.grad(out.square().sum(), args)
        rs = torch.autograd.grad(ref.square().sum(), args)
        for got, exp in zip(gs, rs, strict=True):
            torch.testing.assert_close(got.double(), exp.double(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_zero_batch_and_empty(backend, layout):
    w = torch.randn(6, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    x = torch.randn(0, 6, 4, 4)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with fusednorm.use_backend(backend):
        out = F.group_norm(x, 3, w, b)
        out.sum().backward()
        assert out.shape == (0, 6, 4, 4) and x.grad.shape == (0, 6, 4, 4)
        assert torch.equal(w.grad, torch.zeros(6)) and torch.equal(b.grad, torch.zeros(6))
        y2 = F.group_norm(torch.randn(2, 6, 0), 3)
        assert y2.shape == (2, 6, 0)
        assert F.instance_norm(torch.randn(0, 6, 4)).shape == (0, 6, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_large_offset_numerics(backend, layout):
    # |mean| >> std: E[x^2] - E[x]^2 would lose every digit here; Chan merges across tiles/programs must not.
    x = (1e4 + torch.randn(2, 8, 40, 30, dtype=torch.float64)).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with fusednorm.use_backend(backend):
        y, mean, rstd, var = torch.ops.fusednorm.group_norm_fwd_var(x, None, None, 2, 0.0, "none")
    x64 = x.double().reshape(2, 2, -1)
    ref_mean, ref_var = x64.mean(dim=2), x64.var(dim=2, unbiased=False)
    assert ((mean.double() - ref_mean).abs() / ref_mean.abs()).max() < 1e-4
    assert ((var.double() - ref_var).abs() / ref_var).max() < 1e-4
    assert ((1.0 / rstd.double() ** 2 - ref_var).abs() / ref_var).max() < 1e-4
    ref_y = ((x64 - ref_mean[..., None]) / ref_var[..., None].sqrt()).reshape(x.shape)
    rel = float((y.double() - ref_y).norm() / ref_y.norm())
    if backend == "triton":
        # The kernels normalize (x - K) - mean(x - K) with K the group's first element, so the output is not
        # limited by the rounding of an fp32 mean near 1e4 (half an ulp = 4.9e-4, what torch's fp32 gets).
        assert rel < 1e-4, f"relative output error {rel:.2e}"
    else:
        assert_close(y, ref_y, TF.group_norm(x, 2, eps=0.0), "y")


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_group_is_finite_and_nan_propagates(backend):
    x = torch.full((2, 4, 3, 3), 5.0, requires_grad=True)
    with fusednorm.use_backend(backend):
        out = F.group_norm(x, 2, torch.randn(4), torch.randn(4), activation="silu")
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    x = torch.randn(2, 4, 3, 3)
    x[0, 1, 1, 1] = float("nan")
    with fusednorm.use_backend(backend):
        out = F.group_norm(x, 2)
    ref = TF.group_norm(x, 2)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    torch.testing.assert_close(out[1], ref[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout,act", [("nchw", "silu"), ("channels_last", "none")])
def test_gradcheck_float64(backend, layout, act):
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        with fusednorm.use_backend(backend):
            return F.group_norm(x, 2, w, b, activation=None if act == "none" else act)

    # fast_mode (random projections) keeps the Triton interpreter's share of the suite to seconds
    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64_full_mode(backend):
    """Full (column by column) gradcheck on a tiny shape, SiLU and affine included."""
    x = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        with fusednorm.use_backend(backend):
            return F.group_norm(x, 1, w, b, activation="silu")

    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x = torch.randn(1, 6, 3, 4).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(6), torch.randn(6)
    with fusednorm.use_backend(backend):
        torch.library.opcheck(torch.ops.fusednorm.group_norm_fwd.default, (x, w, b, 2, 1e-5, "silu"))
        torch.library.opcheck(torch.ops.fusednorm.group_norm_fwd_var.default, (x, None, None, 2, 1e-5, "none"))
        y, mean, rstd = torch.ops.fusednorm.group_norm_fwd(x, w, b, 2, 1e-5, "silu")
        torch.library.opcheck(torch.ops.fusednorm.group_norm_bwd.default,
                              (torch.randn_like(x), x, w, b, mean, rstd, 2, "silu"))


def test_backends_agree_with_reference_op():
    """The Triton op against the reference backend on the raw op outputs (mean/rstd included)."""
    if "triton" not in BACKENDS:
        pytest.fail("the Triton interpreter backend must be available in the test session")
    x = torch.randn(3, 10, 6, 7).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(10), torch.randn(10)
    outs = {}
    for backend in ("triton", "reference"):
        with fusednorm.use_backend(backend):
            outs[backend] = torch.ops.fusednorm.group_norm_fwd(x, w, b, 5, 1e-5, "silu")
    for got, exp in zip(outs["triton"], outs["reference"], strict=True):
        torch.testing.assert_close(got, exp, atol=2e-6, rtol=2e-6)


# ---- InstanceNorm ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "ours,theirs,shape,layout",
    [
        (fusednorm.InstanceNorm1d, torch.nn.InstanceNorm1d, (3, 5, 9), "nchw"),
        (fusednorm.InstanceNorm2d, torch.nn.InstanceNorm2d, (2, 4, 5, 6), "nchw"),
        (fusednorm.InstanceNorm2d, torch.nn.InstanceNorm2d, (2, 4, 5, 6), "channels_last"),
        (fusednorm.InstanceNorm3d, torch.nn.InstanceNorm3d, (2, 3, 3, 4, 5), "channels_last"),
    ],
)
def test_instance_norm_running_stats_train_then_eval(backend, ours, theirs, shape, layout, poison_empty):
    kwargs = {"num_features": shape[1], "affine": True, "track_running_stats": True, "momentum": 0.3}
    a, t = ours(**kwargs), theirs(**kwargs)
    with torch.no_grad():
        for p in t.parameters():
            p.copy_(torch.randn_like(p))
    a.load_state_dict(t.state_dict(), strict=True)
    ref = theirs(**kwargs).double()
    ref.load_state_dict(t.state_dict(), strict=True)
    for step in range(2):
        x = torch.randn(shape) * 3 + 1
        if layout == "channels_last":
            x = x.contiguous(memory_format=CL[len(shape)])
        dy = torch.randn(shape)
        xa, xt, xr = (x.detach().clone().requires_grad_() for _ in range(3))
        with fusednorm.use_backend(backend):
            ya = a(xa)
        ya.backward(dy)
        yt = t(xt)
        yt.backward(dy)
        yr = ref(xr.double())
        yr.backward(dy.double())
        assert _fmt(ya) == _fmt(x)
        assert_close(ya, yr, yt, f"y step {step}")
        assert_close(xa.grad, xr.grad, xt.grad, f"dx step {step}")
        for name in ("weight", "bias"):
            pa, pt, pr = (getattr(m, name) for m in (a, t, ref))
            assert_close(pa.grad, pr.grad, pt.grad, f"d{name} step {step}")
        for name in ("running_mean", "running_var"):
            assert_close(getattr(a, name), getattr(ref, name), getattr(t, name), f"{name} step {step}")
    a.eval(), t.eval(), ref.eval()
    x = torch.randn(shape) * 2
    xa, xt, xr = (x.detach().clone().requires_grad_() for _ in range(3))
    with fusednorm.use_backend(backend):
        ya = a(xa)
    ya.sum().backward()
    t(xt).sum().backward()
    yr = ref(xr.double())
    yr.sum().backward()
    assert_close(ya, yr, t(x), "eval y")
    assert_close(xa.grad, xr.grad, xt.grad, "eval dx")
    assert_close(a.weight.grad, ref.weight.grad, t.weight.grad, "eval dweight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_instance_norm_running_var_when_var_much_smaller_than_eps(backend):
    # var ~ 1e-10 << eps: recovering var from rstd (1/rstd^2 - eps) would keep almost no correct digit.
    x = 1e-5 * torch.randn(2, 3, 64)
    rm, rv = torch.zeros(3), torch.ones(3)
    with fusednorm.use_backend(backend):
        F.instance_norm(x, rm, rv, momentum=1.0, eps=1e-3)
    x64 = x.double()
    ref_var = x64.var(dim=2, unbiased=True).mean(dim=0)
    assert ((rv.double() - ref_var).abs() / ref_var).max() < 1e-5
    torch.testing.assert_close(rm.double(), x64.mean(dim=2).mean(dim=0), atol=1e-12, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_instance_norm_eps_zero_constant_plane_like_torch(backend):
    # torch uses invstd = 0 when var == 0 and eps == 0: a constant plane gives the bias, with finite gradients
    x = torch.randn(2, 3, 4, 5)
    x[1, 2] = 3.0
    w, b = torch.randn(3), torch.randn(3)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    t_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    rm, rv = torch.zeros(3), torch.ones(3)
    trm, trv = rm.clone(), rv.clone()
    with fusednorm.use_backend(backend):
        out = F.instance_norm(leaves[0], rm, rv, leaves[1], leaves[2], eps=0.0)
    ref = TF.instance_norm(t_leaves[0], trm, trv, t_leaves[1], t_leaves[2], eps=0.0)
    dy = torch.randn_like(out)
    out.backward(dy)
    ref.backward(dy)
    # fp32 against torch's fp32: outputs differ by ulps; dW/dB are sums over 40 elements per channel (1e-4).
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, exp in zip(leaves, t_leaves, strict=True):
        torch.testing.assert_close(got.grad, exp.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rm, trm)
    torch.testing.assert_close(rv, trv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_instance_norm_functional_without_running_stats(backend, poison_empty):
    x = torch.randn(2, 5, 7, requires_grad=True)
    w, b = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    with fusednorm.use_backend(backend):
        out = F.instance_norm(x, weight=w, bias=b)
    ref = TF.instance_norm(x.double(), weight=w.double(), bias=b.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    gs = torch.autograd.grad(out.square().sum(), (x, w, b))
    xs = [t.detach().double().requires_grad_() for t in (x, w, b)]
    rs = torch.autograd.grad(TF.instance_norm(xs[0], weight=xs[1], bias=xs[2]).square().sum(), xs)
    for got, exp in zip(gs, rs, strict=True):
        torch.testing.assert_close(got.double(), exp, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "ours,theirs,shape",
    [
        (fusednorm.InstanceNorm1d, torch.nn.InstanceNorm1d, (5, 9)),
        (fusednorm.InstanceNorm2d, torch.nn.InstanceNorm2d, (4, 5, 6)),
        (fusednorm.InstanceNorm3d, torch.nn.InstanceNorm3d, (3, 3, 4, 5)),
    ],
)
def test_instance_norm_unbatched(ours, theirs, shape):
    a, t = ours(shape[0], affine=True), theirs(shape[0], affine=True)
    with torch.no_grad():
        for p in t.parameters():
            p.copy_(torch.randn_like(p))
    a.load_state_dict(t.state_dict())
    x = torch.randn(shape)
    torch.testing.assert_close(a(x), t(x), atol=1e-5, rtol=1e-5)
    wrong = torch.randn(shape[0] + 1, *shape[1:])  # unbatched, with a channel count that is not num_features
    with pytest.raises(ValueError) as theirs_err:
        t(wrong)
    with pytest.raises(ValueError) as ours_err:
        a(wrong)
    assert str(ours_err.value) == str(theirs_err.value)


# ---- modules and state_dict ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ours,theirs,kwargs,shape",
    [
        (fusednorm.GroupNorm, torch.nn.GroupNorm, {"num_groups": 3, "num_channels": 6}, (2, 6, 4, 5)),
        (fusednorm.GroupNorm, torch.nn.GroupNorm, {"num_groups": 2, "num_channels": 4, "affine": False,
                                                   "eps": 1e-3}, (2, 4, 5)),
        (fusednorm.InstanceNorm1d, torch.nn.InstanceNorm1d, {"num_features": 4}, (2, 4, 6)),
        (fusednorm.InstanceNorm2d, torch.nn.InstanceNorm2d, {"num_features": 4, "affine": True}, (2, 4, 3, 5)),
        (fusednorm.InstanceNorm3d, torch.nn.InstanceNorm3d,
         {"num_features": 4, "affine": True, "track_running_stats": True}, (2, 4, 2, 3, 5)),
    ],
)
def test_module_parity_and_state_dict(ours, theirs, kwargs, shape):
    a, b = ours(**kwargs), theirs(**kwargs)
    assert isinstance(a, theirs)
    assert repr(a) == repr(b)
    assert list(a.state_dict()) == list(b.state_dict())
    with torch.no_grad():
        for p in b.parameters():
            p.copy_(torch.randn_like(p))
        for buf in b.buffers():
            if buf.is_floating_point():
                buf.copy_(torch.rand_like(buf) + 0.5)
    a.load_state_dict(b.state_dict(), strict=True)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(shape)
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)
    a.eval(), b.eval()
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb
        torch.testing.assert_close(ta, tb, atol=1e-6, rtol=1e-6)


def test_module_dtype_device_kwargs_and_triton_module():
    m = fusednorm.GroupNorm(4, 8, dtype=torch.bfloat16, device="cpu")
    assert m.weight.dtype == torch.bfloat16
    assert m(torch.randn(2, 8, 3, dtype=torch.bfloat16)).dtype == torch.bfloat16
    if "triton" not in BACKENDS:
        pytest.fail("the Triton interpreter backend must be available in the test session")
    m = fusednorm.GroupNorm(2, 8)
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    with fusednorm.use_backend("triton"):
        y = m(x)
    y.square().sum().backward()
    r = torch.nn.GroupNorm(2, 8)
    r.load_state_dict(m.state_dict())
    xr = x.detach().requires_grad_()
    r(xr).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.weight.grad, r.weight.grad, atol=1e-5, rtol=1e-5)


# ---- bad input: torch's messages -------------------------------------------------------------------------


def _torch_error(fn) -> tuple[type, str]:
    with pytest.raises(Exception) as info:
        fn()
    return info.type, str(info.value)


@pytest.mark.parametrize(
    "call",
    [
        lambda f: f.group_norm(torch.randn(2, 6, 5), 4),
        lambda f: f.group_norm(torch.randn(2, 6, 5), 3, torch.randn(5)),
        lambda f: f.group_norm(torch.randn(2, 6, 5), 3, torch.randn(2, 3)),
        lambda f: f.group_norm(torch.randn(2, 6, 5), 3, None, torch.randn(5)),
        lambda f: f.group_norm(torch.randn(2, 6, 5), 3, torch.randn(6), torch.randn(4)),
        lambda f: f.group_norm(torch.randn(6), 3),
        lambda f: f.group_norm(torch.randn(1, 3), 3),
        lambda f: f.instance_norm(torch.randn(2, 6)),
        lambda f: f.instance_norm(torch.randn(2, 6, 1)),
        lambda f: f.instance_norm(torch.randn(2, 6, 5), weight=torch.randn(5)),
        lambda f: f.instance_norm(torch.randn(2, 6, 5), weight=torch.randn(6), bias=torch.randn(5)),
        lambda f: f.instance_norm(torch.randn(2, 6, 5), torch.zeros(5), torch.ones(5)),
        lambda f: f.instance_norm(torch.randn(2, 6, 5), torch.zeros(6), torch.ones(4)),
        lambda f: f.instance_norm(torch.randn(2, 6, 5), torch.zeros(6), None),
        lambda f: f.instance_norm(torch.randn(2, 6, 5), use_input_stats=False),
    ],
)
def test_bad_input_matches_torch(call):
    expected_type, expected = _torch_error(lambda: call(TF))
    with pytest.raises(expected_type) as info:
        call(F)
    assert str(info.value) == expected


def test_bad_activation_and_dtype_are_clear_errors():
    with pytest.raises(ValueError, match="activation"):
        F.group_norm(torch.randn(2, 4, 3), 2, activation="relu")
    with pytest.raises(TypeError, match="floating-point dtype.*torch.int64"):
        F.group_norm(torch.arange(24).reshape(2, 4, 3), 2)
    with pytest.raises(RuntimeError, match="same device.*cpu.*meta"):
        F.group_norm(torch.randn(2, 4, 3), 2, torch.randn(4, device="meta"))
