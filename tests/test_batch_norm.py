"""BatchNorm 1d/2d/3d: every backend against float64 and torch over training sequences (outputs, gradients and
every buffer), dtypes, memory formats, the Triton split reduction, numerics, gradcheck, opcheck, modules, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as TF
from conftest import cpu_backends
from oracle import DTYPE_PAIRS, assert_close

import fusednorm
import fusednorm.functional as F

BACKENDS = cpu_backends()
CL, CL3 = torch.channels_last, torch.channels_last_3d

# (id, fusednorm class, torch class, input shape, memory format): odd sizes everywhere.
MODULE_CASES = [
    ("1d-NC", fusednorm.BatchNorm1d, torch.nn.BatchNorm1d, (7, 5), None),
    ("1d-NCL", fusednorm.BatchNorm1d, torch.nn.BatchNorm1d, (4, 5, 6), None),
    ("2d", fusednorm.BatchNorm2d, torch.nn.BatchNorm2d, (3, 5, 4, 6), None),
    ("2d-cl", fusednorm.BatchNorm2d, torch.nn.BatchNorm2d, (3, 5, 4, 6), CL),
    ("3d", fusednorm.BatchNorm3d, torch.nn.BatchNorm3d, (2, 5, 3, 2, 4), None),
    ("3d-cl", fusednorm.BatchNorm3d, torch.nn.BatchNorm3d, (2, 5, 3, 2, 4), CL3),
]


def _randomize(module: torch.nn.Module) -> None:
    with torch.no_grad():
        if module.weight is not None:
            module.weight.copy_(torch.randn_like(module.weight) + 1)
        if module.bias is not None:
            module.bias.copy_(torch.randn_like(module.bias))


def _make_input(shape, fmt, dtype=torch.float32):
    # per-channel offsets and scales, so a wrong channel mapping cannot pass
    c = shape[1]
    view = (1, c) + (1,) * (len(shape) - 2)
    x = torch.randn(shape) * (torch.rand(c) * 3 + 0.5).reshape(view) + torch.randn(c).reshape(view) * 4
    x = x.to(dtype)
    return x.to(memory_format=fmt) if fmt is not None else x


def _step(module, x, dy, backend=None):
    xx = x.detach().clone().requires_grad_()
    if backend is None:
        out = module(xx)
    else:
        with fusednorm.use_backend(backend):
            out = module(xx)
    out.backward(dy)
    grads = [xx.grad] + [p.grad.clone() if p.grad is not None else None for p in (module.weight, module.bias)
                         if p is not None]
    module.zero_grad()
    return out, grads


def _compare_modules(ours, ref64, theirs, x, dy, backend, fmt, what):
    out, grads = _step(ours, x, dy, backend)
    rout, rgrads = _step(ref64, x.double(), dy.double())
    tout, tgrads = _step(theirs, x, dy)
    assert_close(out, rout, tout, f"{what} y")
    if fmt is not None:
        assert out.is_contiguous(memory_format=fmt), f"{what}: output lost the input's memory format"
        assert grads[0].is_contiguous(memory_format=fmt), f"{what}: dx lost the input's memory format"
    assert len(grads) == len(tgrads)
    for name, g, r, t in zip(("dx", "dw", "db"), grads, rgrads, tgrads, strict=False):
        assert_close(g, r, t, f"{what} {name}")
    for name in ("running_mean", "running_var"):
        a, r, t = getattr(ours, name), getattr(ref64, name), getattr(theirs, name)
        assert (a is None) == (t is None)
        if a is not None:
            assert_close(a, r, t, f"{what} {name}")
    if theirs.num_batches_tracked is not None:
        assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)


def _train_then_eval(backend, ours_cls, torch_cls, shape, fmt, momentum, affine=True, track=True, steps=3):
    c = shape[1]
    theirs = torch_cls(c, momentum=momentum, affine=affine, track_running_stats=track)
    if affine:
        _randomize(theirs)
    ours = ours_cls(c, momentum=momentum, affine=affine, track_running_stats=track)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ref64 = copy.deepcopy(theirs).double()
    for step in range(steps):
        x, dy = _make_input(shape, fmt), torch.randn(shape)
        _compare_modules(ours, ref64, theirs, x, dy, backend, fmt, f"train step {step}")
    for m in (ours, ref64, theirs):
        m.eval()
    x, dy = _make_input(shape, fmt), torch.randn(shape)
    _compare_modules(ours, ref64, theirs, x, dy, backend, fmt, "eval")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0, None], ids=lambda m: f"mom{m}")
@pytest.mark.parametrize("case", MODULE_CASES, ids=lambda c: c[0])
def test_training_sequence_then_eval(backend, momentum, case, poison_empty):
    _, ours_cls, torch_cls, shape, fmt = case
    _train_then_eval(backend, ours_cls, torch_cls, shape, fmt, momentum)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "no_track"])
@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "cl"])
def test_affine_and_tracking_flags(backend, affine, track, fmt, poison_empty):
    _train_then_eval(backend, fusednorm.BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 3, 5), fmt, 0.1, affine, track,
                     steps=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_without_bias(backend):
    _train_then_eval(backend, lambda c, **kw: fusednorm.BatchNorm1d(c, bias=False, **kw),
                     lambda c, **kw: torch.nn.BatchNorm1d(c, bias=False, **kw), (6, 4, 3), None, 0.1, steps=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype,p_dtype", DTYPE_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "cl"])
def test_dtypes(backend, x_dtype, p_dtype, fmt, poison_empty):
    shape = (5, 6, 3, 7)
    c = shape[1]
    x = _make_input(shape, fmt, x_dtype)
    dy = torch.randn(shape).to(x_dtype)
    w, b = (torch.randn(c) + 1).to(p_dtype), torch.randn(c).to(p_dtype)
    rm, rv = torch.randn(c).to(p_dtype), (torch.rand(c) + 0.5).to(p_dtype)

    def run(fn, dtype, pdt, train):
        xx = x.detach().to(dtype).requires_grad_()
        ww, bb = w.detach().to(pdt).requires_grad_(), b.detach().to(pdt).requires_grad_()
        m, v = rm.to(pdt), rv.to(pdt)
        out = fn(xx, m, v, ww, bb, training=train, momentum=0.3, eps=1e-5)
        out.backward(dy.to(dtype))
        return out, [xx.grad, ww.grad, bb.grad, m, v]

    def ours(*args, **kwargs):
        with fusednorm.use_backend(backend):
            return F.batch_norm(*args, **kwargs)

    for train in (True, False):
        out, grads = run(ours, x_dtype, p_dtype, train)
        rout, rgrads = run(TF.batch_norm, torch.float64, torch.float64, train)
        tout, tgrads = run(TF.batch_norm, x_dtype, p_dtype, train)
        assert out.dtype == tout.dtype == x_dtype
        if fmt is not None:
            assert out.is_contiguous(memory_format=fmt)
        assert_close(out, rout, tout, f"train={train} y")
        for name, g, r, t in zip(("dx", "dw", "db", "running_mean", "running_var"), grads, rgrads, tgrads,
                                 strict=True):
            assert g.dtype == t.dtype, name
            assert_close(g, r, t, f"train={train} {name}")


# ---- the Triton kernels' split reduction and layouts -------------------------------------------------------


def _split_cases(small: bool):
    """Inputs whose reductions span several tiles and programs per channel (small: for tiny tiles)."""
    k = 1 if small else 3
    return [
        ("nchw", torch.randn(3 * k, 3, 2, 23 * k)),
        ("nchw-odd", torch.randn(13, 2, 3, 3)),
        ("cl", torch.randn(6 * k, 5, 3, 7).to(memory_format=CL)),
        ("cl3d", torch.randn(2 * k, 20, 2, 3, 3).to(memory_format=CL3)),
        ("2d", torch.randn(30 * k, 7)),
        ("ncl-transposed", torch.randn(3, 10 * k, 9).transpose(1, 2)),
        ("batch-slice", torch.randn(11, 3, 5, 3 * k)[::2]),
        ("batch-slice-cl", torch.randn(11, 3, 5, 3 * k).to(memory_format=CL)[1::3]),
        ("spatial-slice", torch.randn(3, 3, 9, 12)[:, :, 2:8, 1:10]),
        ("c1", torch.randn(10 * k, 1, 4, 5)),
    ]


@pytest.mark.parametrize("tiny_tiles", [False, True], ids=["default_tiles", "tiny_tiles"])
def test_triton_split_reduction_and_layouts(tiny_tiles, monkeypatch, poison_empty):
    """Many programs per channel (partials + merge), odd tails, every orientation and stride pattern."""
    if "triton" not in BACKENDS:
        pytest.fail("the Triton interpreter backend must be available in the test session")
    import fusednorm.backends.reference as R
    import fusednorm.backends.triton.batch_norm as T

    if tiny_tiles:
        monkeypatch.setattr(T, "TILE", 64)
        monkeypatch.setattr(T, "MIN_COLS", 4)
        monkeypatch.setattr(T, "MAX_CL_REDUCE_COLS", 8)
        monkeypatch.setattr(T, "MERGE_BLOCK_K", 4)
        monkeypatch.setattr(T, "MERGE_BLOCK_C", 4)
        # as if rows passed the int32 range: elementwise launches split over the batch, and channels-last
        # reductions switch to NCHW order
        monkeypatch.setattr(T, "_INT32_ROWS", 40)
    launches = []
    real_merge = T.bn_merge_kernel

    class _Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real_merge[grid]

    monkeypatch.setattr(T, "bn_merge_kernel", _Spy())
    for name, x in _split_cases(small=tiny_tiles):
        c = x.shape[1]
        w, b = torch.randn(c), torch.randn(c)
        dy = torch.randn(x.shape)
        mean, m2 = T.batch_norm_stats(x)
        rmean, rm2 = R.batch_norm_stats(x)
        torch.testing.assert_close(mean, rmean, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(m2, rm2, atol=1e-4, rtol=1e-5, msg=name)
        count = x.numel() // c
        rstd = torch.rsqrt(rm2 / count + 1e-5)
        y = T.batch_norm_apply(x, rmean, rstd, w, b)
        torch.testing.assert_close(y, R.batch_norm_apply(x, rmean, rstd, w, b), atol=1e-5, rtol=1e-5, msg=name)
        assert y.stride() == torch.empty_like(x).stride(), name
        s0, s1 = T.batch_norm_bwd_reduce(dy, x, rmean, rstd)
        r0, r1 = R.batch_norm_bwd_reduce(dy, x, rmean, rstd)
        torch.testing.assert_close(s0, r0, atol=1e-4, rtol=1e-5, msg=name)
        torch.testing.assert_close(s1, r1, atol=1e-4, rtol=1e-5, msg=name)
        for training in (True, False):
            dx = T.batch_norm_bwd_dx(dy, x, rmean, rstd, w, r0, r1, count, training)
            rdx = R.batch_norm_bwd_dx(dy, x, rmean, rstd, w, r0, r1, count, training)
            torch.testing.assert_close(dx, rdx, atol=1e-5, rtol=1e-5, msg=name)
    assert launches, "the merge of split partials never ran"


def test_triton_native_layouts_are_not_copied(monkeypatch):
    import fusednorm.backends.triton.batch_norm as T

    for x, want_cl in ((torch.randn(4, 3, 5, 6), False), (torch.randn(4, 3, 5, 6).to(memory_format=CL), True),
                       (torch.randn(2, 3, 2, 5, 6).to(memory_format=CL3), True), (torch.randn(7, 3), True),
                       (torch.randn(4, 6, 3).transpose(1, 2), True), (torch.randn(8, 3, 5)[::2], False)):
        planned, cl, out = T._plan(x, need_out=True)
        assert planned is x and cl == want_cl
        assert out.stride() == torch.empty_like(x).stride()


def test_every_launch_config_is_listed_for_offline_compilation():
    """Configs are functions of (orientation, C, S bucket, dtype) only (never N), and each one the launchers
    can pick is in kernel_configs(), which the offline sm_80/sm_90 compile check walks."""
    import inspect

    import fusednorm.backends.triton.batch_norm as T

    for fn in (T.reduce_config, T.elementwise_config):
        assert list(inspect.signature(fn).parameters) == ["channels_last", "c", "s", "dtype"]
    listed = {(name.split()[0], tuple(sorted(consts.items())), warps) for name, _, _, consts, warps in
              T.kernel_configs()}
    for c, s in ((1, 7), (3, 1), (64, 49), (512, 196), (7, 100_000), (2048, 1), (5, 3000)):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            for cl in (False, True):
                red = T.reduce_config(cl, c, s, dtype)
                for is_bwd in (False, True):
                    consts = {"IS_BWD": is_bwd, "CHANNELS_LAST": cl, "BLOCK_R": red["BLOCK_R"],
                              "BLOCK_COL": red["BLOCK_COL"]}
                    assert ("bn_reduce", tuple(sorted(consts.items())), red["num_warps"]) in listed
                ew = T.elementwise_config(cl, c, s, dtype)
                for is_bwd, training in ((False, False), (True, True), (True, False)):
                    consts = {"IS_BWD": is_bwd, "TRAINING": training, "HAS_WEIGHT": True, "HAS_BIAS": not is_bwd,
                              "CHANNELS_LAST": cl, "BLOCK_R": ew["BLOCK_R"], "BLOCK_COL": ew["BLOCK_COL"]}
                    assert ("bn_elementwise", tuple(sorted(consts.items())), ew["num_warps"]) in listed


# ---- numerics, edge cases --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "cl"])
def test_large_offset_numerics(backend, fmt):
    # |mean| >> std: E[x^2] - E[x]^2 would lose every digit here.
    x = (1e4 + torch.randn(16, 3, 24, 20, dtype=torch.float64)).float()
    if fmt is not None:
        x = x.to(memory_format=fmt)
    x64 = x.double()
    with fusednorm.use_backend(backend):
        mean, m2 = torch.ops.fusednorm.batch_norm_stats(x)
    ref_mean = x64.mean(dim=(0, 2, 3))
    ref_var = x64.var(dim=(0, 2, 3), unbiased=False)
    var = m2.double() / (x.numel() // 3)
    assert ((mean.double() - ref_mean).abs() / ref_mean.abs()).max() < 1e-4
    assert ((var - ref_var).abs() / ref_var).max() < 1e-4
    # and through the module: normalized output and running variance
    bn = fusednorm.BatchNorm2d(3, momentum=1.0)
    with fusednorm.use_backend(backend):
        y = bn(x)
    rstd = 1 / torch.sqrt(ref_var + 1e-5)
    y_ref = (x64 - ref_mean.reshape(1, 3, 1, 1)) * rstd.reshape(1, 3, 1, 1)
    # the fp32 mean (the saved-statistics contract) carries up to ~1 ulp of |mean| = 1e4; y inherits that times
    # rstd and nothing more (an E[x^2] - E[x]^2 variance would be off by orders of magnitude)
    bound = 2 * torch.finfo(torch.float32).eps * 1e4 * float(rstd.max())
    assert (y.double() - y_ref).abs().max() < bound
    unbiased = x64.var(dim=(0, 2, 3), unbiased=True)
    assert ((bn.running_var.double() - unbiased).abs() / unbiased).max() < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_training_and_single_value_eval(backend):
    bn, ref = fusednorm.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    _randomize(ref)
    ref.running_mean.normal_()
    bn.load_state_dict(ref.state_dict())
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    with fusednorm.use_backend(backend):
        y = bn(x)
    y.sum().backward()
    ref(x.detach()).sum().backward()
    assert y.shape == (0, 3, 4, 4)
    assert torch.equal(bn.running_mean, ref.running_mean) and torch.equal(bn.running_var, ref.running_var)
    assert torch.equal(bn.num_batches_tracked, ref.num_batches_tracked)
    assert torch.equal(bn.weight.grad, torch.zeros(3)) and torch.equal(bn.bias.grad, torch.zeros(3))
    # N * HW == 1 is fine in eval
    bn.eval()
    ref.eval()
    x1 = torch.randn(1, 3, 1, 1)
    with fusednorm.use_backend(backend):
        torch.testing.assert_close(bn(x1), ref(x1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_channel_is_finite_and_nan_propagates(backend):
    x = torch.randn(4, 3, 5)
    x[:, 0] = 7.0
    x[1, 2, 3] = float("nan")
    with fusednorm.use_backend(backend):
        out = F.batch_norm(x, None, None, torch.randn(3), torch.randn(3), training=True)
    ref = TF.batch_norm(x, None, None, training=True)
    assert torch.isfinite(out[:, :2]).all()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(backend, training):
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5

    def fn(x, w, b):
        with fusednorm.use_backend(backend):
            return F.batch_norm(x, None if training else rm, None if training else rv, w, b, training=training)

    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "cl"])
def test_opcheck(backend, fmt):
    x = torch.randn(3, 4, 2, 5)
    if fmt is not None:
        x = x.to(memory_format=fmt)
    w, b, dy = torch.randn(4), torch.randn(4), torch.randn(3, 4, 2, 5)
    ops = torch.ops.fusednorm
    with fusednorm.use_backend(backend):
        torch.library.opcheck(ops.batch_norm_stats.default, (x,))
        mean, m2 = ops.batch_norm_stats(x)
        rstd = torch.rsqrt(m2 / 30 + 1e-5)
        torch.library.opcheck(ops.batch_norm_apply.default, (x, mean, rstd, w, b))
        torch.library.opcheck(ops.batch_norm_apply.default, (x, mean, rstd, None, None))
        torch.library.opcheck(ops.batch_norm_bwd_reduce.default, (dy, x, mean, rstd))
        s0, s1 = ops.batch_norm_bwd_reduce(dy, x, mean, rstd)
        for training in (True, False):
            torch.library.opcheck(ops.batch_norm_bwd_dx.default, (dy, x, mean, rstd, w, s0, s1, 30, training))


# ---- modules ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ours,theirs,kwargs",
    [
        (fusednorm.BatchNorm1d, torch.nn.BatchNorm1d, {}),
        (fusednorm.BatchNorm2d, torch.nn.BatchNorm2d, {"momentum": None, "eps": 1e-3}),
        (fusednorm.BatchNorm3d, torch.nn.BatchNorm3d, {"affine": False}),
        (fusednorm.BatchNorm2d, torch.nn.BatchNorm2d, {"track_running_stats": False}),
        (fusednorm.SyncBatchNorm, torch.nn.SyncBatchNorm, {}),
    ],
)
def test_module_parity_and_state_dict(ours, theirs, kwargs):
    a, b = ours(6, **kwargs), theirs(6, **kwargs)
    assert isinstance(a, theirs)
    assert repr(a).split("(", 1)[1] == repr(b).split("(", 1)[1]
    assert list(a.state_dict()) == list(b.state_dict())
    if b.affine:
        _randomize(b)
    if b.track_running_stats:
        b.running_mean.normal_()
        b.num_batches_tracked.fill_(5)
    a.load_state_dict(b.state_dict(), strict=True)
    b.load_state_dict(a.state_dict(), strict=True)
    for k, v in b.state_dict().items():
        assert torch.equal(a.state_dict()[k], v), k
    x = torch.randn(4, 6, *(3,) * {torch.nn.BatchNorm2d: 2, torch.nn.BatchNorm3d: 3}.get(theirs, 1))
    torch.testing.assert_close(a(x), b(x))
    a.eval()
    b.eval()
    torch.testing.assert_close(a(x), b(x))


def test_module_dtype_device_kwargs():
    m = fusednorm.BatchNorm2d(4, dtype=torch.bfloat16, device="cpu")
    assert m.weight.dtype == m.running_mean.dtype == torch.bfloat16
    out = m(torch.randn(2, 4, 3, 3, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_batch_norm_inside_training_model(backend):
    def model(bn_cls):
        torch.manual_seed(3)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bn_cls(4), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 1),
                                   bn_cls(5))

    ours, theirs = model(fusednorm.BatchNorm2d), model(torch.nn.BatchNorm2d)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for m in (ours, theirs):
        m.train()
        m[1].eval()  # frozen: running statistics, no buffer updates, still differentiable
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs)]
    frozen = {k: v.clone() for k, v in theirs[1].state_dict().items() if "running" in k or "num_batches" in k}
    for _ in range(2):
        x = torch.randn(3, 3, 6, 7)
        with fusednorm.use_backend(backend):
            lo = ours(x).square().mean()
        lt = theirs(x).square().mean()
        for loss, opt in zip((lo, lt), opts, strict=True):
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.testing.assert_close(lo, lt, atol=1e-5, rtol=1e-5)
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=k)
    for k, v in frozen.items():
        assert torch.equal(ours[1].state_dict()[k], v), f"frozen BN changed {k}"


def test_momentum_none_needs_no_host_sync(monkeypatch):
    bn = fusednorm.BatchNorm1d(3, momentum=None)
    ref = torch.nn.BatchNorm1d(3, momentum=None)
    xs = [torch.randn(5, 3) * 2 + 1 for _ in range(3)]
    for x in xs:
        ref(x)

    def no_sync(*_args, **_kwargs):
        raise AssertionError("host sync in the running-statistics update")

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "item", no_sync)
        m.setattr(torch.Tensor, "__float__", no_sync)
        with fusednorm.use_backend("reference"):
            for x in xs:
                bn(x)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)


# ---- bad input: torch's messages -------------------------------------------------------------------------


def _message(fn) -> tuple[type, str]:
    with pytest.raises(Exception) as info:
        fn()
    return info.type, str(info.value)


@pytest.mark.parametrize(
    "call",
    [
        lambda f: f.batch_norm(torch.randn(4, 3, 5), torch.zeros(4), torch.ones(4), training=True),
        lambda f: f.batch_norm(torch.randn(4, 3, 5), torch.zeros(3), torch.ones(4)),
        lambda f: f.batch_norm(torch.randn(4, 3, 5), torch.zeros(3), torch.ones(3), torch.ones(4)),
        lambda f: f.batch_norm(torch.randn(4, 3, 5), torch.zeros(3), torch.ones(3), None, torch.ones(2)),
        lambda f: f.batch_norm(torch.randn(4, 3, 5), None, None, training=False),
        lambda f: f.batch_norm(torch.randn(4, 3, 5), torch.zeros(3), None, training=True),
        lambda f: f.batch_norm(torch.randn(1, 3), None, None, training=True),
        lambda f: f.batch_norm(torch.randn(1, 3, 1, 1), torch.zeros(3), torch.ones(3), training=True),
        lambda f: f.batch_norm(torch.randn(4, 3), None, None, training=True, eps=0.0),
        lambda f: f.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), eps=-1.0),
        lambda f: f.batch_norm(torch.randn(3), None, None, training=True),
    ],
)
def test_bad_input_matches_torch(call):
    expected = _message(lambda: call(TF))
    assert _message(lambda: call(F)) == expected


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda nn: nn.BatchNorm2d(3), (4, 3, 5)),
        (lambda nn: nn.BatchNorm1d(3), (2, 3, 4, 5)),
        (lambda nn: nn.BatchNorm3d(3), (2, 3, 4, 5)),
        (lambda nn: nn.BatchNorm2d(3), (4, 5, 2, 2)),
        (lambda nn: nn.BatchNorm1d(3), (1, 3)),
        (lambda nn: nn.SyncBatchNorm(3), (1, 3)),
        (lambda nn: nn.SyncBatchNorm(3), (1,)),
    ],
)
def test_module_bad_input_matches_torch(make, shape):
    x = torch.randn(shape)
    expected = _message(lambda: make(torch.nn)(x))
    assert _message(lambda: make(fusednorm)(x)) == expected


def test_integer_input_is_a_clear_error():
    with pytest.raises(TypeError, match="floating-point dtype.*torch.int64"):
        F.batch_norm(torch.arange(12).reshape(4, 3), None, None, training=True)
