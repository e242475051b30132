"""LayerNorm and RMSNorm: every backend against float64 and torch, forward and backward, plus edge cases,
numerics, bad input, opcheck, gradcheck and module parity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF
from conftest import cpu_backends
from oracle import DTYPE_PAIRS, assert_close

import fusednorm
import fusednorm.functional as F
from fusednorm.ops.layer_norm import as_rows

BACKENDS = cpu_backends()

# (leading shape, normalized_shape): odd sizes, N = 1, packed small rows, the chunked path (N > 16K).
SHAPES = [
    ((3,), (1,)),
    ((5,), (7,)),
    ((17,), (100,)),
    ((2, 3), (33,)),
    ((4,), (1000,)),
    ((3,), (4099,)),
    ((2,), (6, 10)),
    ((2,), (20000,)),
]


def _torch_norm(x, shape, w, b, eps, rms):
    if rms:
        return TF.rms_norm(x, shape, w, eps)
    return TF.layer_norm(x, shape, w, b, eps)


def _mixed_param_grad_atol(n: int, lead: tuple[int, ...]) -> float:
    """With fp32 params and low-precision input, torch's own dW (params cast to the input dtype) is rounded to
    that dtype, so it is no yardstick for our fp32 dW; bound ours by fp32 accumulation error over M rows."""
    return 1e-5 * max(1, math.prod(lead))


def _run_case(backend, lead, shape, x_dtype, p_dtype, rms, affine, poison=True):
    n = math.prod(shape)
    x = (torch.randn(*lead, *shape) * 2 + 0.5).to(x_dtype)
    w = (torch.randn(shape) + 1).to(p_dtype) if affine else None
    b = torch.randn(shape).to(p_dtype) if (affine and not rms) else None
    eps = 1e-5
    dy = torch.randn(*lead, *shape).to(x_dtype)

    def fused(xx, ww, bb):
        with fusednorm.use_backend(backend):
            return F.rms_norm(xx, shape, ww, eps) if rms else F.layer_norm(xx, shape, ww, bb, eps)

    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    out = fused(*leaves)
    out.backward(dy)

    # float64 oracle
    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    ref = _torch_norm(ref_leaves[0], shape, ref_leaves[1], ref_leaves[2], eps, rms)
    ref.backward(dy.double())

    # torch in the same dtypes (fp32 params with low-precision input is not accepted by torch's CPU
    # layer_norm, so torch's error is measured with params cast to the input dtype there)
    tp = p_dtype if (p_dtype == x_dtype or rms) else x_dtype
    t_leaves = [t.detach().to(tp if i else x_dtype).requires_grad_() if t is not None else None
                for i, t in enumerate((x, w, b))]
    tout = _torch_norm(t_leaves[0], shape, t_leaves[1], t_leaves[2], eps, rms)
    tout.backward(dy)

    assert out.dtype == x_dtype and out.shape == x.shape
    assert_close(out, ref, tout, "y")
    assert_close(leaves[0].grad, ref_leaves[0].grad, t_leaves[0].grad, "dx")
    for i, name in ((1, "dw"), (2, "db")):
        if leaves[i] is not None:
            assert leaves[i].grad.dtype == p_dtype
            assert_close(leaves[i].grad, ref_leaves[i].grad, t_leaves[i].grad.to(p_dtype), name,
                         atol=None if p_dtype == x_dtype else _mixed_param_grad_atol(n, lead))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,shape", SHAPES)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_fp32_against_float64_and_torch(backend, lead, shape, rms, poison_empty):
    _run_case(backend, lead, shape, torch.float32, torch.float32, rms, affine=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype,p_dtype", DTYPE_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("lead,shape", [((9,), (257,)), ((2,), (17000,))], ids=["single", "chunked"])
def test_dtypes(backend, x_dtype, p_dtype, rms, lead, shape, poison_empty):
    _run_case(backend, lead, shape, x_dtype, p_dtype, rms, affine=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_without_affine(backend, rms, poison_empty):
    _run_case(backend, (6,), (300,), torch.float32, torch.float32, rms, affine=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_only_and_bias_only(backend):
    x = torch.randn(4, 50, requires_grad=True)
    w = torch.randn(50, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    for ww, bb in ((w, None), (None, b)):
        with fusednorm.use_backend(backend):
            out = F.layer_norm(x, (50,), ww, bb)
        ref = TF.layer_norm(x.double(), (50,), ww.double() if ww is not None else None,
                            bb.double() if bb is not None else None)
        gs = torch.autograd.grad(out.sum(), [t for t in (x, ww, bb) if t is not None])
        rs = torch.autograd.grad(ref.sum(), [t for t in (x, ww, bb) if t is not None])
        for g, r in zip(gs, rs, strict=True):
            torch.testing.assert_close(g.double(), r.double(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_strided_rows_no_copy(backend, rms):
    base = torch.randn(6, 4, 300)
    x = base[..., 100:200]  # e.g. the k slice of a fused qkv projection: row stride 300
    rows = as_rows(x, 100)
    assert rows.data_ptr() == x.data_ptr() and rows.stride() == (300, 1), "strided rows must not be copied"
    w, b = torch.randn(100), torch.randn(100)
    with fusednorm.use_backend(backend):
        out = F.rms_norm(x, (100,), w) if rms else F.layer_norm(x, (100,), w, b)
    assert out.shape == x.shape and out.is_contiguous()
    xd = x.double()
    if rms:
        ref = TF.rms_norm(xd, (100,), w.double(), torch.finfo(torch.float32).eps)
    else:
        ref = TF.layer_norm(xd, (100,), w.double(), b.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_last_dim_and_grad(backend):
    x = torch.randn(40, 8).t().requires_grad_()  # last dim has stride 8: copied once, correctly
    dy = torch.randn(40, 8).t()  # and a gradient with a strided last dim
    with fusednorm.use_backend(backend):
        out = F.layer_norm(x, (40,))
    out.backward(dy)
    ref_x = x.detach().double().requires_grad_()
    ref = TF.layer_norm(ref_x, (40,))
    ref.backward(dy.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_zero_rows_and_empty(backend, rms):
    w = torch.randn(16, requires_grad=True)
    x = torch.randn(0, 16, requires_grad=True)
    with fusednorm.use_backend(backend):
        out = F.rms_norm(x, (16,), w) if rms else F.layer_norm(x, (16,), w)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert x.grad.shape == (0, 16)
    assert torch.equal(w.grad, torch.zeros(16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_offset_numerics(backend):
    # |mean| >> std: E[x^2] - E[x]^2 would lose every digit here.
    x = 1e4 + torch.randn(8, 2048, dtype=torch.float64)
    with fusednorm.use_backend(backend):
        y, mean, rstd = torch.ops.fusednorm.layer_norm_fwd(x.float(), None, None, 0.0, False)
    x64 = x.float().double()
    ref_mean = x64.mean(dim=1)
    ref_var = x64.var(dim=1, unbiased=False)
    var = 1.0 / rstd.double() ** 2
    assert ((mean.double() - ref_mean).abs() / ref_mean.abs()).max() < 1e-4
    assert ((var - ref_var).abs() / ref_var).max() < 1e-4
    # chunked path too
    x = 1e4 + torch.randn(2, 17000, dtype=torch.float64)
    with fusednorm.use_backend(backend):
        _, mean, rstd = torch.ops.fusednorm.layer_norm_fwd(x.float(), None, None, 0.0, False)
    x64 = x.float().double()
    var = 1.0 / rstd.double() ** 2
    assert ((var - x64.var(dim=1, unbiased=False)).abs() / x64.var(dim=1, unbiased=False)).max() < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_constant_row_is_finite(backend, rms):
    x = torch.full((3, 64), 5.0, requires_grad=True)
    with fusednorm.use_backend(backend):
        out = F.rms_norm(x, (64,)) if rms else F.layer_norm(x, (64,), torch.randn(64), torch.randn(64))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate_like_torch(backend):
    x = torch.randn(3, 32)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    with fusednorm.use_backend(backend):
        out = F.layer_norm(x, (32,))
    ref = TF.layer_norm(x, (32,))
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    torch.testing.assert_close(out[2], ref[2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_gradcheck_float64(backend, rms):
    x = torch.randn(3, 13, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, dtype=torch.float64, requires_grad=True)
    b = torch.randn(13, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        with fusednorm.use_backend(backend):
            return F.rms_norm(x, (13,), w, 1e-5) if rms else F.layer_norm(x, (13,), w, b)

    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_opcheck(backend, rms):
    x = torch.randn(5, 24)
    w = torch.randn(24)
    b = None if rms else torch.randn(24)
    with fusednorm.use_backend(backend):
        torch.library.opcheck(torch.ops.fusednorm.layer_norm_fwd.default, (x, w, b, 1e-5, rms))
        y, mean, rstd = torch.ops.fusednorm.layer_norm_fwd(x, w, b, 1e-5, rms)
        torch.library.opcheck(torch.ops.fusednorm.layer_norm_bwd.default,
                              (torch.randn(5, 24), x, w, b, mean, rstd, rms))


def test_eps_default_for_rms_is_finfo_eps():
    x = torch.randn(4, 8, dtype=torch.bfloat16) * 1e-3
    out = F.rms_norm(x, (8,))
    ref = TF.rms_norm(x.double(), (8,), eps=torch.finfo(torch.bfloat16).eps).to(torch.bfloat16)
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)


# ---- bad input: torch's messages -------------------------------------------------------------------------


def _torch_message(fn) -> str:
    with pytest.raises(Exception) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize(
    "call",
    [
        lambda f: f.layer_norm(torch.randn(3, 5), (4,)),
        lambda f: f.layer_norm(torch.randn(3, 5), (5,), torch.randn(4)),
        lambda f: f.layer_norm(torch.randn(3, 5), (5,), None, torch.randn(4)),
        lambda f: f.layer_norm(torch.randn(3, 5), ()),
        lambda f: f.rms_norm(torch.randn(3, 5), (4,)),
        lambda f: f.rms_norm(torch.randn(3, 5), (5,), torch.randn(4)),
        lambda f: f.layer_norm(torch.randn(2, 3, 5), (2, 5)),
    ],
)
def test_bad_shapes_match_torch_message(call):
    expected = _torch_message(lambda: call(TF))
    with pytest.raises(RuntimeError) as info:
        call(F)
    assert str(info.value) == expected


def test_integer_input_is_a_clear_error():
    with pytest.raises(TypeError, match="floating-point dtype.*torch.int64"):
        F.layer_norm(torch.arange(10).reshape(2, 5), (5,))
    with pytest.raises(TypeError, match="weight.*torch.int32"):
        F.rms_norm(torch.randn(2, 5), (5,), torch.ones(5, dtype=torch.int32))


def test_mismatched_devices_is_a_clear_error():
    with pytest.raises(RuntimeError, match="same device.*cpu.*meta"):
        F.layer_norm(torch.randn(3, 5), (5,), torch.randn(5, device="meta"))


# ---- modules ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ours,theirs,kwargs",
    [
        (fusednorm.LayerNorm, torch.nn.LayerNorm, {"normalized_shape": (4, 6)}),
        (fusednorm.LayerNorm, torch.nn.LayerNorm, {"normalized_shape": 6, "bias": False, "eps": 1e-6}),
        (fusednorm.LayerNorm, torch.nn.LayerNorm, {"normalized_shape": 6, "elementwise_affine": False}),
        (fusednorm.RMSNorm, torch.nn.RMSNorm, {"normalized_shape": [6]}),
        (fusednorm.RMSNorm, torch.nn.RMSNorm, {"normalized_shape": 6, "eps": 1e-3, "elementwise_affine": False}),
    ],
)
def test_module_parity_and_state_dict(ours, theirs, kwargs):
    a, b = ours(**kwargs), theirs(**kwargs)
    assert repr(a).replace("fusednorm.", "") .split("(", 1)[1] == repr(b).split("(", 1)[1]
    assert list(a.state_dict()) == list(b.state_dict())
    for p in b.parameters():
        with torch.no_grad():
            p.copy_(torch.randn_like(p))
    a.load_state_dict(b.state_dict(), strict=True)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(3, 4, 6)
    torch.testing.assert_close(a(x), b(x))
    assert isinstance(a, theirs)


def test_module_dtype_device_kwargs():
    m = fusednorm.LayerNorm(8, dtype=torch.bfloat16, device="cpu")
    assert m.weight.dtype == torch.bfloat16
    out = m(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_triton_backend_runs_module_forward_backward():
    if "triton" not in BACKENDS:
        pytest.fail("the Triton interpreter backend must be available in the test session")
    m = fusednorm.RMSNorm(48)
    x = torch.randn(5, 48, requires_grad=True)
    with fusednorm.use_backend("triton"):
        y = m(x)
    y.square().sum().backward()
    ref = torch.nn.RMSNorm(48)
    ref.load_state_dict(m.state_dict())
    xr = x.detach().requires_grad_()
    ref(xr).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.weight.grad, ref.weight.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [65537, 262144])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_very_wide_rows(backend, n, rms, poison_empty):
    """Rows far past the register-resident limit (and past the 64K limit common in peers) take the chunked path."""
    _run_case(backend, (2,), (n,), torch.float32, torch.float32, rms, affine=True)
