"""Fused norm variants (issue 8): residual-add + dropout + LayerNorm/RMSNorm, LayerNorm2d, adaptive LayerNorm,
weight_norm and SwitchableNorm2d. Every backend that implements an op is checked against a float64 composition
of plain torch ops (forward and backward) with the shared oracle, plus dropout statistics and reproducibility,
module semantics, bad input and opcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from conftest import cpu_backends
from oracle import DTYPE_PAIRS, assert_close

import fusednorm
import fusednorm.functional as F
from fusednorm.backends import _load
from fusednorm.backends.reference_variants import dropout_keep_mask


def backends_for(*ops: str) -> list[str]:
    """The CPU-capable backends that implement every op in ``ops`` (native may not have all variants)."""
    out = []
    for name in cpu_backends():
        module = _load(name)
        if not isinstance(module, BaseException) and all(module.supports(op) for op in ops):
            out.append(name)
    return out


ADD_BACKENDS = backends_for("add_norm_fwd", "add_norm_bwd")
CF_BACKENDS = backends_for("layer_norm_cf_fwd", "layer_norm_cf_bwd")
ADA_BACKENDS = backends_for("ada_norm_fwd", "ada_norm_bwd")
WN_BACKENDS = backends_for("weight_norm_fwd", "weight_norm_bwd")
SN_BACKENDS = backends_for("plane_stats", "plane_affine", "plane_bwd_reduce", "plane_bwd_dx")


def _leaf(t: torch.Tensor | None, dtype=None) -> torch.Tensor | None:
    if t is None:
        return None
    return t.detach().to(dtype or t.dtype).clone().requires_grad_()


def _param_grad_atol(count: int) -> float:
    """fp32 parameter gradients next to low-precision inputs: torch's own (computed in the input dtype) is no
    yardstick, so bound ours by fp32 accumulation over ``count`` terms."""
    return 1e-5 * max(1, count)


def _compare(outs, refs, touts, grads, ref_grads, t_grads, names, mixed_params=(), param_count=1):
    """assert_close every output and gradient; names of parameters in ``mixed_params`` get the fp32 bound."""
    for o, r, t, name in zip(outs, refs, touts, names[: len(outs)], strict=True):
        assert_close(o, r, t, name)
    for g, r, t, name in zip(grads, ref_grads, t_grads, names[len(outs):], strict=True):
        if g is None:
            assert r is None or name in mixed_params, name
            continue
        if name in mixed_params:
            assert_close(g, r, None, name, atol=_param_grad_atol(param_count))
        else:
            assert_close(g, r, t.to(g.dtype), name)


# ==== residual-add + LayerNorm / RMSNorm =================================================================


def _add_norm_torch(x, r, w, b, eps, rms, fp32_res):
    s = x.float() + r.float() if fp32_res else (x + r if r is not None else x)
    if fp32_res and r is None:
        s = x.float()
    n = x.shape[-1]
    y = TF.rms_norm(s, (n,), w.to(s.dtype) if w is not None else None, eps) if rms else \
        TF.layer_norm(s, (n,), w.to(s.dtype) if w is not None else None, b.to(s.dtype) if b is not None else None, eps)
    return y.to(x.dtype), s


# Odd widths; (80, 130) has more row blocks than the interpreter's persistent grid (so programs accumulate dW
# over several blocks); (9, 16500) takes the chunked path, also with several rows per program.
ADD_SHAPES = [(3, 37), (2, 5, 64), (80, 130)]
# (6, 9000): forward single-tile, backward chunked (its single-tile limit is lower). Wide rows: fp32 and the AMP
# pair only (the interpreter is slow).
ADD_CASES = [(shape, d) for shape in ADD_SHAPES for d in DTYPE_PAIRS] + \
    [(shape, d) for shape in ((9, 16500), (6, 9000)) for d in (DTYPE_PAIRS[0], DTYPE_PAIRS[3])]


@pytest.mark.parametrize("backend", ADD_BACKENDS)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("shape,dtypes", ADD_CASES,
                         ids=[f"{s}-{a}-{b}".replace("torch.", "") for s, (a, b) in ADD_CASES])
def test_add_norm_matches_float64(backend, dtypes, rms, shape, poison_empty):
    x_dtype, p_dtype = dtypes
    n = shape[-1]
    eps = 1e-5
    fp32_res = x_dtype != torch.float32 and p_dtype == torch.float32  # AMP case: residual stream in fp32
    x = (torch.randn(shape) * 2 + 0.5).to(x_dtype)
    r = (torch.randn(shape) * 3 - 1).to(x_dtype)
    w = (torch.randn(n) + 1).to(p_dtype)
    b = None if rms else torch.randn(n).to(p_dtype)
    dy = torch.randn(shape).to(x_dtype)
    s_dtype = torch.float32 if fp32_res else x_dtype
    ds = torch.randn(shape).to(s_dtype)

    leaves = [_leaf(t) for t in (x, r, w, b)]
    with fusednorm.use_backend(backend):
        if rms:
            y, s = F.add_rms_norm(leaves[0], leaves[1], leaves[2], eps, prenorm=True, residual_in_fp32=fp32_res)
        else:
            y, s = F.add_layer_norm(leaves[0], leaves[1], leaves[2], leaves[3], eps, prenorm=True,
                                    residual_in_fp32=fp32_res)
        torch.autograd.backward([y, s], [dy, ds])  # backward inside: the backend is chosen per call
    assert y.dtype == x_dtype and s.dtype == s_dtype

    ref_leaves = [_leaf(t, torch.float64) for t in (x, r, w, b)]
    ry, rs = _add_norm_torch(*ref_leaves, eps, rms, False)
    torch.autograd.backward([ry, rs], [dy.double(), ds.double()])

    tp = x_dtype if not fp32_res else torch.float32
    t_leaves = [_leaf(x), _leaf(r), _leaf(w, tp if not rms else p_dtype), _leaf(b, tp)]
    ty, ts = _add_norm_torch(*t_leaves, eps, rms, fp32_res)
    torch.autograd.backward([ty, ts], [dy, ds])

    mixed = ("dw", "db") if p_dtype != x_dtype else ()
    _compare([y, s], [ry, rs], [ty, ts], [t.grad if t is not None else None for t in leaves],
             [t.grad if t is not None else None for t in ref_leaves],
             [t.grad if t is not None else None for t in t_leaves], ["y", "s", "dx", "dres", "dw", "db"],
             mixed, param_count=x.numel() // n)


@pytest.mark.parametrize("backend", ADD_BACKENDS)
def test_add_norm_without_residual_and_no_prenorm(backend):
    x = torch.randn(4, 33, requires_grad=True)
    w = torch.randn(33, requires_grad=True)
    b = torch.randn(33, requires_grad=True)
    with fusednorm.use_backend(backend):
        y = F.add_layer_norm(x, None, w, b)
        assert isinstance(y, torch.Tensor)
        dy = torch.randn_like(y)
        y.backward(dy)
    xr, wr, br = (_leaf(t, torch.float64) for t in (x, w, b))
    ref = TF.layer_norm(xr, (33,), wr, br, 1e-5)
    ref.backward(dy.double())
    for got, want in ((y, ref), (x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        assert_close(got, want, None, atol=2e-5)


@pytest.mark.parametrize("backend", ADD_BACKENDS)
def test_add_norm_large_mean_is_exact(backend):
    # x + residual with |mean| >> std: E[s^2] - E[s]^2 would lose everything in fp32
    x = torch.randn(3, 300)
    r = torch.full((3, 300), 1e4)
    with fusednorm.use_backend(backend):
        y = F.add_layer_norm(x, r, None, None)
    ref = TF.layer_norm((x.double() + 1e4), (300,))
    assert (y.double() - ref).abs().max() < 1e-2


# ---- dropout -------------------------------------------------------------------------------------------


def test_dropout_fraction_matches_p():
    m, n = 512, 1024
    for p in (0.1, 0.5, 0.9):
        keep = dropout_keep_mask(m, n, seed=12345, p=p)
        assert abs((1 - keep.float().mean().item()) - p) < 0.01, p
    a = dropout_keep_mask(64, 256, 1, 0.5)
    b = dropout_keep_mask(64, 256, 2, 0.5)
    assert (a != b).float().mean() > 0.3  # different seeds: different masks


@pytest.mark.parametrize("backend", ADD_BACKENDS)
def test_dropout_mask_is_the_same_on_every_backend(backend):
    # The hash is specified bit-exactly, so each backend reproduces the reference mask for a given seed.
    torch.manual_seed(3)
    x = torch.randn(9, 300) + 5.0  # never 0: a zero of s - residual then means "dropped"
    r = torch.randn(9, 300)
    torch.manual_seed(7)
    with fusednorm.use_backend(backend):
        _, s = F.add_rms_norm(x, r, None, dropout_p=0.25, prenorm=True)
    torch.manual_seed(7)
    seed = F.dropout_seed()
    keep = dropout_keep_mask(9, 300, seed, 0.25)
    assert torch.equal((s - r) != 0, keep)
    torch.testing.assert_close(s, torch.where(keep, x / 0.75, 0.0) + r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ADD_BACKENDS)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_dropout_backward_uses_the_forward_mask(backend, rms):
    p = 0.3
    x = (torch.randn(6, 50).abs() + 0.5).requires_grad_()
    r = torch.randn(6, 50).requires_grad_()
    w = torch.randn(50).requires_grad_()
    torch.manual_seed(11)
    with fusednorm.use_backend(backend):
        fn = F.add_rms_norm if rms else F.add_layer_norm
        args = (x, r, w) if rms else (x, r, w, None)
        y, s = fn(*args, dropout_p=p, prenorm=True)
        dy, ds = torch.randn_like(y), torch.randn_like(s)
        torch.autograd.backward([y, s], [dy, ds])
    mask = ((s - r) != 0).detach()
    frac = 1 - mask.float().mean().item()
    assert 0.1 < frac < 0.5
    # the gradient reaching s is dresidual; dx must be it through the same mask, scaled by 1/(1-p)
    torch.testing.assert_close(x.grad, r.grad * mask / (1 - p), rtol=1e-6, atol=1e-6)
    # and everything matches a float64 composition that uses the recovered mask
    xr, rr, wr = (_leaf(t, torch.float64) for t in (x, r, w))
    sr = xr * mask / (1 - p) + rr
    yr = TF.rms_norm(sr, (50,), wr, torch.finfo(torch.float32).eps) if rms else TF.layer_norm(sr, (50,), wr)
    torch.autograd.backward([yr, sr], [dy.double(), ds.double()])
    for got, want in ((y, yr), (s, sr), (x.grad, xr.grad), (r.grad, rr.grad), (w.grad, wr.grad)):
        assert_close(got, want, None, atol=5e-5)


@pytest.mark.parametrize("backend", ADD_BACKENDS)
def test_dropout_reproducible_from_torch_seed(backend):
    x = torch.randn(4, 64)
    r = torch.randn(4, 64)
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        with fusednorm.use_backend(backend):
            outs.append(F.add_layer_norm(x, r, None, None, dropout_p=0.5))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_dropout_p_one_and_eval_mode():
    x = torch.randn(3, 16)
    r = torch.randn(3, 16)
    y, s = F.add_layer_norm(x, r, None, None, dropout_p=1.0, prenorm=True)
    assert torch.equal(s, r)
    m = fusednorm.AddLayerNorm(16, dropout_p=0.5, prenorm=True)
    m.eval()
    y_eval, s_eval = m(x, r)
    torch.testing.assert_close(s_eval, x + r)
    torch.testing.assert_close(y_eval, TF.layer_norm(x + r, (16,), m.weight, m.bias))
    m.train()
    _, s_train = m(x, r)
    assert not torch.allclose(s_train, x + r)


def test_add_norm_modules_state_dict_and_repr():
    ln = fusednorm.AddLayerNorm(24, eps=1e-6, dropout_p=0.1, prenorm=True, residual_in_fp32=True)
    ref = torch.nn.LayerNorm(24, eps=1e-6)
    ref.weight.data.normal_()
    ref.bias.data.normal_()
    ln.load_state_dict(ref.state_dict(), strict=True)
    assert list(ln.state_dict()) == ["weight", "bias"]
    assert "dropout_p=0.1" in repr(ln)
    rms = fusednorm.AddRMSNorm(24)
    rms.load_state_dict(torch.nn.RMSNorm(24).state_dict(), strict=True)
    x = torch.randn(2, 3, 24, dtype=torch.bfloat16)
    y, s = ln.eval()(x, x)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    torch.testing.assert_close(rms(x), TF.rms_norm(x, (24,), rms.weight.to(x.dtype)), atol=2e-2, rtol=2e-2)


def test_add_norm_bad_input():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="residual of shape"):
        F.add_layer_norm(x, torch.randn(2, 9), None, None)
    with pytest.raises(RuntimeError, match="Expected weight to be of same shape"):
        F.add_layer_norm(x, None, torch.randn(7), None)
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        F.add_rms_norm(x, None, None, dropout_p=1.5)
    with pytest.raises(TypeError, match="floating-point"):
        F.add_rms_norm(x.long(), None, None)


# ==== channels-first LayerNorm (LayerNorm2d) =============================================================

# (3, 40, 20, 20) and (9, 520, 2, 2) have more tiles than the interpreter's persistent backward grid; 520 > 512
# channels takes the chunked path; 300 channels: single-tile forward, chunked backward.
CF_SHAPES = [(2, 5, 3, 7), (3, 40, 20, 20), (9, 520, 2, 2)]
CF_CASES = [(shape, d) for shape in CF_SHAPES for d in DTYPE_PAIRS] + \
    [((4, 300, 3, 2), d) for d in (DTYPE_PAIRS[0], DTYPE_PAIRS[3])]


def _ln2d_torch(x, w, b, eps):
    c = x.shape[1]
    return TF.layer_norm(x.movedim(1, -1), (c,), w, b, eps).movedim(-1, 1)


@pytest.mark.parametrize("backend", CF_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,dtypes", CF_CASES,
                         ids=[f"{s}-{a}-{b}".replace("torch.", "") for s, (a, b) in CF_CASES])
def test_layer_norm_2d_matches_float64(backend, dtypes, channels_last, shape, poison_empty):
    x_dtype, p_dtype = dtypes
    c = shape[1]
    x = (torch.randn(shape) * 2 + 0.5).to(x_dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(c) + 1).to(p_dtype)
    b = torch.randn(c).to(p_dtype)
    dy = torch.randn(shape).to(x_dtype)
    leaves = [_leaf(t) for t in (x, w, b)]
    with fusednorm.use_backend(backend):
        y = F.layer_norm_2d(*leaves, eps=1e-6)
        y.backward(dy)
    assert y.dtype == x_dtype
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    ref_leaves = [_leaf(t, torch.float64) for t in (x, w, b)]
    ref = _ln2d_torch(*ref_leaves, 1e-6)
    ref.backward(dy.double())
    t_leaves = [_leaf(x), _leaf(w, x_dtype), _leaf(b, x_dtype)]
    tout = _ln2d_torch(*t_leaves, 1e-6)
    tout.backward(dy)
    mixed = ("dw", "db") if p_dtype != x_dtype else ()
    _compare([y], [ref], [tout], [t.grad for t in leaves], [t.grad for t in ref_leaves],
             [t.grad for t in t_leaves], ["y", "dx", "dw", "db"], mixed, param_count=x.numel() // c)


# 3-D (N, C, P) inputs with strides that are neither NCHW nor channels_last (the native kernels read those two
# layouts in place and copy the rest), and channels_last's row view with padded rows.
CF_ODD_VIEWS = {
    "permuted": lambda: torch.randn(45, 7, 4).permute(2, 1, 0),
    "sliced_channels": lambda: torch.randn(4, 14, 45)[:, ::2],
    "sliced_pixels": lambda: torch.randn(4, 7, 90)[:, :, ::2],
    "padded_rows": lambda: torch.randn(4, 45, 9)[:, :, :7].transpose(1, 2),
    "rows_strided_channels": lambda: torch.randn(4, 45, 14).transpose(1, 2)[:, ::2],
}


@pytest.mark.parametrize("backend", CF_BACKENDS)
@pytest.mark.parametrize("view", list(CF_ODD_VIEWS))
def test_layer_norm_2d_odd_strides(backend, view):
    x = CF_ODD_VIEWS[view]() * 2 + 0.5
    assert x.shape == (4, 7, 45)
    w, b = torch.randn(7) + 1, torch.randn(7)
    dy = torch.randn(45, 4, 7).permute(1, 2, 0)  # a dy in yet another layout
    leaves = [_leaf(t) for t in (x, w, b)]
    with fusednorm.use_backend(backend):
        y = F.layer_norm_2d(*leaves, eps=1e-6)
        y.backward(dy)
    # the ops' fake implementations promise empty_like(x)'s strides
    assert y.stride() == torch.empty_like(x).stride() and leaves[0].grad.stride() == torch.empty_like(x).stride()
    ref_leaves = [_leaf(t, torch.float64) for t in (x, w, b)]
    ref = _ln2d_torch(*ref_leaves, 1e-6)
    ref.backward(dy.double())
    t_leaves = [_leaf(t) for t in (x, w, b)]
    tout = _ln2d_torch(*t_leaves, 1e-6)
    tout.backward(dy)
    _compare([y], [ref], [tout], [t.grad for t in leaves], [t.grad for t in ref_leaves],
             [t.grad for t in t_leaves], ["y", "dx", "dw", "db"], param_count=x.numel() // 7)


@pytest.mark.parametrize("backend", CF_BACKENDS)
def test_layer_norm_2d_module_bias_free_and_large_mean(backend):
    m = fusednorm.LayerNorm2d(12, bias=False)
    assert m.bias is None and list(m.state_dict()) == ["weight"]
    m.weight.data.normal_()
    x = torch.randn(2, 12, 4, 4) + 1e4
    with fusednorm.use_backend(backend):
        y = m(x)
    ref = _ln2d_torch(x.double(), m.weight.double(), None, 1e-6)
    assert (y.double() - ref).abs().max() < 1e-2
    assert "LayerNorm2d" in repr(m)


def test_layer_norm_2d_bad_input():
    with pytest.raises(RuntimeError, match=r"expected weight of shape \[4\]"):
        F.layer_norm_2d(torch.randn(1, 4, 2, 2), torch.randn(5))
    with pytest.raises(RuntimeError, match="expected input of shape"):
        F.layer_norm_2d(torch.randn(4))


# ==== adaptive LayerNorm =================================================================================


def _ada_torch(x, scale, shift, w, b, eps, rms):
    d = x.shape[-1]
    n = TF.rms_norm(x, (d,), w, eps) if rms else TF.layer_norm(x, (d,), w, b, eps)
    if rms and b is not None:
        n = n + b
    return n * (1 + scale[:, None, :]) + shift[:, None, :]


# (3, 97, 48): more row blocks per batch than backward programs; D = 4100 is above the backward's register limit
# (fp32 and the AMP pair only: the interpreter is slow).
ADA_CASES = [((3, 97, 48), d) for d in DTYPE_PAIRS] + [((2, 3, 4100), d) for d in (DTYPE_PAIRS[0], DTYPE_PAIRS[3])]


@pytest.mark.parametrize("backend", ADA_BACKENDS)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("dims,dtypes", ADA_CASES,
                         ids=[f"{s}-{a}-{b}".replace("torch.", "") for s, (a, b) in ADA_CASES])
def test_adaptive_layer_norm_matches_float64(backend, dtypes, rms, affine, dims, poison_empty):
    x_dtype, p_dtype = dtypes
    bsz, seq, d = dims
    x = (torch.randn(bsz, seq, d) * 2 + 0.5).to(x_dtype)
    mod = torch.randn(bsz, 2 * d).to(x_dtype)  # DiT-style: scale/shift are chunks of one modulation tensor
    w = (torch.randn(d) + 1).to(p_dtype) if affine else None
    b = torch.randn(d).to(p_dtype) if affine else None
    dy = torch.randn(bsz, seq, d).to(x_dtype)
    x_l, mod_l, w_l, b_l = (_leaf(t) for t in (x, mod, w, b))
    scale, shift = mod_l.chunk(2, dim=1)
    with fusednorm.use_backend(backend):
        y = F.adaptive_layer_norm(x_l, scale, shift, w_l, b_l, eps=1e-6, rms=rms)
        y.backward(dy)
    leaves = [x_l, mod_l, w_l, b_l]
    ref_leaves = [_leaf(t, torch.float64) for t in (x, mod, w, b)]
    ref = _ada_torch(ref_leaves[0], *ref_leaves[1].chunk(2, dim=1), ref_leaves[2], ref_leaves[3], 1e-6, rms)
    ref.backward(dy.double())
    t_leaves = [_leaf(x), _leaf(mod), _leaf(w, x_dtype), _leaf(b, x_dtype)]
    tout = _ada_torch(t_leaves[0], *t_leaves[1].chunk(2, dim=1), t_leaves[2], t_leaves[3], 1e-6, rms)
    tout.backward(dy)
    mixed = ("dw", "db") if p_dtype != x_dtype else ()
    _compare([y], [ref], [tout], [t.grad if t is not None else None for t in leaves],
             [t.grad if t is not None else None for t in ref_leaves],
             [t.grad if t is not None else None for t in t_leaves], ["y", "dx", "dmod", "dw", "db"], mixed,
             param_count=bsz * seq)


def test_adaptive_layer_norm_accepts_b1d_and_rejects_bad_shapes():
    x = torch.randn(2, 3, 8)
    s = torch.randn(2, 1, 8)
    torch.testing.assert_close(F.adaptive_layer_norm(x, s, s), _ada_torch(x, s[:, 0], s[:, 0], None, None, 1e-6, False))
    with pytest.raises(RuntimeError, match=r"expected scale of shape \[2, 8\]"):
        F.adaptive_layer_norm(x, torch.randn(3, 8), torch.randn(2, 8))
    with pytest.raises(RuntimeError, match=r"expected x of shape \(B, L, D\)"):
        F.adaptive_layer_norm(torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8))


# ==== weight norm ========================================================================================


@pytest.mark.parametrize("backend", WN_BACKENDS)
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("shape_dim", [((6, 5, 3, 3), 0), ((7, 9), 1), ((5, 4000), 0), ((4, 3, 2), None)],
                         ids=str)
def test_weight_norm_matches_float64(backend, dtypes, shape_dim, poison_empty):
    v_dtype, g_dtype = dtypes
    shape, dim = shape_dim
    v = torch.randn(shape).to(v_dtype)
    g = (torch.norm_except_dim(v.float(), 2, -1 if dim is None else dim) * (torch.rand(()) + 0.5)).to(g_dtype)
    g = g + torch.randn_like(g) * 0.1
    dw = torch.randn(shape).to(v_dtype)
    v_l, g_l = _leaf(v), _leaf(g)
    with fusednorm.use_backend(backend):
        w = F.weight_norm_fn(v_l, g_l, dim)
        w.backward(dw)
    assert w.dtype == v_dtype and w.shape == v.shape
    d = -1 if dim is None else dim
    v_r, g_r = _leaf(v, torch.float64), _leaf(g, torch.float64)
    ref = torch._weight_norm(v_r, g_r, d)
    ref.backward(dw.double())
    v_t, g_t = _leaf(v), _leaf(g, v_dtype)
    tout = torch._weight_norm(v_t, g_t, d)
    tout.backward(dw)
    mixed = ("dg",) if g_dtype != v_dtype else ()
    _compare([w], [ref], [tout], [v_l.grad, g_l.grad], [v_r.grad, g_r.grad], [v_t.grad, g_t.grad],
             ["w", "dv", "dg"], mixed, param_count=v.numel() // g.numel())


@pytest.mark.parametrize("backend", WN_BACKENDS)
@pytest.mark.parametrize("make,dim", [(lambda: torch.nn.Linear(12, 7), 0), (lambda: torch.nn.Conv2d(3, 5, 3), 0),
                                      (lambda: torch.nn.Linear(6, 4), 1), (lambda: torch.nn.Linear(6, 4), None)],
                         ids=["linear", "conv", "linear-dim1", "linear-whole"])
def test_weight_norm_module_matches_torch_through_training(backend, make, dim):
    torch.manual_seed(1)
    ours = make()
    theirs = make()
    theirs.load_state_dict(ours.state_dict())
    fusednorm.weight_norm(ours, dim=dim)
    torch.nn.utils.parametrizations.weight_norm(theirs, dim=dim)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    opt_a = torch.optim.Adam(ours.parameters(), lr=0.05)
    opt_b = torch.optim.Adam(theirs.parameters(), lr=0.05)
    x = torch.randn(4, 12) if isinstance(ours, torch.nn.Linear) and ours.in_features == 12 else None
    if isinstance(ours, torch.nn.Conv2d):
        x = torch.randn(2, 3, 6, 6)
    elif x is None:
        x = torch.randn(4, 6)
    for _ in range(4):
        for model, opt in ((ours, opt_a), (theirs, opt_b)):
            opt.zero_grad()
            with fusednorm.use_backend(backend):
                loss = model(x).square().mean()
                loss.backward()
            opt.step()
    for (ka, a), (kb, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert ka == kb
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with fusednorm.use_backend(backend):
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    torch.nn.utils.parametrize.remove_parametrizations(ours, "weight")
    assert "weight" in dict(ours.named_parameters())
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-5, atol=1e-5)


def test_weight_norm_loads_old_g_v_checkpoints():
    m = fusednorm.weight_norm(torch.nn.Linear(5, 3))
    sd = {"weight_g": torch.rand(3, 1) + 0.5, "weight_v": torch.randn(3, 5), "bias": torch.randn(3)}
    m.load_state_dict(sd)
    torch.testing.assert_close(m.weight, torch._weight_norm(sd["weight_v"], sd["weight_g"], 0))


# ==== SwitchableNorm2d ===================================================================================


def _sn_torch(x, w, b, mw, vw, rm, rv, use_batch, eps):
    n, c = x.shape[:2]
    xf = x.reshape(n, c, -1)
    mean_in, var_in = xf.mean(-1), xf.var(-1, unbiased=False)
    mean_ln, var_ln = xf.mean((1, 2)), xf.var((1, 2), unbiased=False)
    if use_batch:
        mean_bn, var_bn = xf.mean((0, 2)), xf.var((0, 2), unbiased=False)
    else:
        mean_bn, var_bn = rm.to(x.dtype), rv.to(x.dtype)
    wm, wv = torch.softmax(mw.to(x.dtype), 0), torch.softmax(vw.to(x.dtype), 0)
    mu = wm[0] * mean_in + wm[1] * mean_ln[:, None] + wm[2] * mean_bn[None]
    var = wv[0] * var_in + wv[1] * var_ln[:, None] + wv[2] * var_bn[None]
    y = (xf - mu[..., None]) / torch.sqrt(var[..., None] + eps) * w.to(x.dtype)[None, :, None] \
        + b.to(x.dtype)[None, :, None]
    return y.reshape(x.shape), mean_bn, var_bn


@pytest.mark.parametrize("backend", SN_BACKENDS)
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("use_batch", [True, False], ids=["train", "eval"])
def test_switchable_norm_matches_float64(backend, dtypes, use_batch, poison_empty):
    x_dtype, p_dtype = dtypes
    n, c, h, w_ = 3, 5, 4, 7
    x = (torch.randn(n, c, h, w_) * 2 + torch.randn(1, c, 1, 1) * 3).to(x_dtype)
    params = [(torch.randn(c) + 1).to(p_dtype), torch.randn(c).to(p_dtype), torch.randn(3).to(p_dtype),
              torch.randn(3).to(p_dtype)]
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    dy = torch.randn(n, c, h, w_).to(x_dtype)
    leaves = [_leaf(x)] + [_leaf(p) for p in params]
    with fusednorm.use_backend(backend):
        y = F.switchable_norm(leaves[0], None if use_batch else rm, None if use_batch else rv, *leaves[1:],
                              training=use_batch)
        y.backward(dy)
    ref_leaves = [_leaf(t, torch.float64) for t in [x] + params]
    ref = _sn_torch(ref_leaves[0], *ref_leaves[1:], rm, rv, use_batch, 1e-5)[0]
    ref.backward(dy.double())
    t_leaves = [_leaf(x)] + [_leaf(p, x_dtype) for p in params]
    tout = _sn_torch(t_leaves[0], *t_leaves[1:], rm, rv, use_batch, 1e-5)[0]
    tout.backward(dy)
    mixed = ("dw", "db", "dmw", "dvw") if p_dtype != x_dtype else ()
    _compare([y], [ref], [tout], [t.grad for t in leaves], [t.grad for t in ref_leaves],
             [t.grad for t in t_leaves], ["y", "dx", "dw", "db", "dmw", "dvw"], mixed, param_count=x.numel())


class _RefSwitchableNorm(torch.nn.Module):
    """The float64 composition as a module with the same running-statistics rules, for train/eval sequences."""

    def __init__(self, c, momentum, moving):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(c, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.zeros(c, dtype=torch.float64))
        self.mean_weight = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        self.var_weight = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        self.running_mean = torch.zeros(c, dtype=torch.float64)
        self.running_var = torch.ones(c, dtype=torch.float64)
        self.momentum, self.moving, self.steps = momentum, moving, 0

    def forward(self, x):
        y, mean_bn, var_bn = _sn_torch(x, self.weight, self.bias, self.mean_weight, self.var_weight,
                                       self.running_mean, self.running_var, self.training, 1e-5)
        if self.training:
            self.steps += 1
            f = self.momentum if self.moving else 1.0 / self.steps
            self.running_mean = self.running_mean + f * (mean_bn.detach() - self.running_mean)
            self.running_var = self.running_var + f * (var_bn.detach() - self.running_var)
        return y


@pytest.mark.parametrize("backend", SN_BACKENDS)
@pytest.mark.parametrize("moving", [True, False], ids=["moving", "cumulative"])
def test_switchable_norm_train_eval_sequence(backend, moving):
    c = 6
    ours = fusednorm.SwitchableNorm2d(c, momentum=0.2, using_moving_average=moving)
    ref = _RefSwitchableNorm(c, 0.2, moving)
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(4):
        x = torch.randn(4, c, 5, 3) * (step + 1) + step
        target = torch.randn(4, c, 5, 3)
        for model, opt, xx in ((ours, opt_a, x), (ref, opt_b, x.double())):
            opt.zero_grad()
            with fusednorm.use_backend(backend):
                loss = (model(xx) - target.to(xx.dtype)).square().mean()
                loss.backward()
            opt.step()
        torch.testing.assert_close(ours.running_mean.double(), ref.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.running_var.double(), ref.running_var, rtol=1e-5, atol=1e-5)
    assert int(ours.num_batches_tracked) == 4
    for name in ("weight", "bias", "mean_weight", "var_weight"):
        torch.testing.assert_close(getattr(ours, name).double(), getattr(ref, name), rtol=1e-4, atol=1e-5)
    ours.eval()
    ref.eval()
    x = torch.randn(2, c, 5, 3)
    rm = ours.running_mean.clone()
    with fusednorm.use_backend(backend):
        y = ours(x)
    assert torch.equal(ours.running_mean, rm)  # eval does not touch the running statistics
    torch.testing.assert_close(y.double(), ref(x.double()), rtol=1e-4, atol=1e-4)
    assert sorted(ours.state_dict()) == sorted(["weight", "bias", "mean_weight", "var_weight", "running_mean",
                                                "running_var", "num_batches_tracked"])


@pytest.mark.parametrize("backend", SN_BACKENDS)
def test_switchable_norm_large_mean(backend):
    sn = fusednorm.SwitchableNorm2d(3)
    x = torch.randn(2, 3, 8, 8) + 1e4
    with fusednorm.use_backend(backend):
        y = sn(x)
    ref = _sn_torch(x.double(), sn.weight.double(), sn.bias.double(), sn.mean_weight.double(),
                    sn.var_weight.double(), None, None, True, 1e-5)[0]
    assert (y.double() - ref).abs().max() < 2e-2


@pytest.mark.parametrize("backend", SN_BACKENDS)
def test_switchable_norm_eval_far_running_mean_fuzz_example(backend):
    """Regression (issue 9 fuzz, ci example 'AEIEaEEAQQNBA0EEQQlBA0EBQQMAQQFBAEMBLI4='): eval mode,
    x = -200 + 0.01 * randn (fp32, N=3, C=4, L=9, rows of a strided batch), running means near 1. The backward
    centred its per-plane map on mu (~ -107, far from the data) and added back a matching ~|mu - mean_in| term,
    so two ~5e4 terms cancelled to a ~5 result: dx error 1.65e-2 on reference (2.15x torch's 7.7e-3), 1.2e-2 /
    1.3e-2 on native / Triton. Now ~4e-6 on all three (centred on each plane's mean, see
    fusednorm/ops/switchable_norm.py). Rebuilt with the fuzz's own helpers from its draws (same tensors)."""
    from test_fuzz import Case, _running, _switchable_torch, make_param, run_case

    gen = torch.Generator().manual_seed(1128)
    vals = torch.randn(3, 4, 9, generator=gen, dtype=torch.float64) * 0.01 - 200.0
    big = torch.zeros(6, 4, 9)
    big[::2] = vals.float()
    x = big[::2]  # the 'strided_lead' layout
    w, b = make_param(4, torch.float32, gen, 1.0), make_param(4, torch.float32, gen)
    mw, vw = make_param(3, torch.float32, gen), make_param(3, torch.float32, gen)
    rm, rv = _running(4, torch.float32, gen)
    case = Case(lambda x, w, b, mw, vw, rm, rv: F.switchable_norm(x, rm, rv, w, b, mw, vw, False, 0.5, 1e-5),
                lambda x, w, b, mw, vw, rm, rv: _switchable_torch(x, w, b, mw, vw, rm, rv, False, 0.5, 1e-5),
                [x, w, b, mw, vw], ["x", "weight", "bias", "mean_weight", "var_weight"], buffers=[rm, rv])
    run_case(case, backend, 76942)


# (training, offset, scale): |mean| / std of 1e4 and 1e5, fp32.
SN_LARGE_OFFSET = [(False, 1e4, 1.0), (True, 1e3, 1e-2)]


@pytest.mark.parametrize("backend", SN_BACKENDS)
@pytest.mark.parametrize("use_batch,offset,scale", SN_LARGE_OFFSET, ids=["eval-1e4+randn", "train-1e3+0.01randn"])
def test_switchable_norm_large_offset_backward(backend, use_batch, offset, scale):
    """|mean| >> std, fp32: y, dx, dweight, dmean_weight and dvar_weight within the oracle's bound of torch's
    composite. Before the per-plane shift (issue 9), every backend failed both cases: eval (running means ~0
    against data ~1e4) dvar_weight at 10-116x the bound and dmean_weight at 1.3-23x, from layer/batch variances
    merged out of fp32-rounded plane means; train dx at 1.1-2.2x, from mu's rounding in x - mu."""
    gen = torch.Generator().manual_seed(7)
    n, c, p = 2, 3, 20
    x = (torch.randn(n, c, p, generator=gen, dtype=torch.float64) * scale + offset).float()
    params = [torch.randn(c, generator=gen) + 1, torch.randn(c, generator=gen), torch.randn(3, generator=gen),
              torch.randn(3, generator=gen)]
    rm = torch.randn(c, generator=gen)
    rv = torch.rand(c, generator=gen) + 0.5
    dy = torch.randn(n, c, p, generator=gen)
    leaves = [_leaf(x)] + [_leaf(t) for t in params]
    with fusednorm.use_backend(backend):
        y = F.switchable_norm(leaves[0], None if use_batch else rm, None if use_batch else rv, *leaves[1:],
                              training=use_batch)
        y.backward(dy)
    ref_leaves = [_leaf(t, torch.float64) for t in [x] + params]
    ref = _sn_torch(ref_leaves[0], *ref_leaves[1:], rm.double(), rv.double(), use_batch, 1e-5)[0]
    ref.backward(dy.double())
    t_leaves = [_leaf(t) for t in [x] + params]
    tout = _sn_torch(t_leaves[0], *t_leaves[1:], rm, rv, use_batch, 1e-5)[0]
    tout.backward(dy)
    _compare([y], [ref], [tout], [t.grad for t in leaves], [t.grad for t in ref_leaves],
             [t.grad for t in t_leaves], ["y", "dx", "dw", "db", "dmw", "dvw"])


def test_switchable_norm_bad_input():
    sn = fusednorm.SwitchableNorm2d(3)
    with pytest.raises(ValueError, match="expected 4D input"):
        sn(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        sn(torch.randn(1, 3, 1, 1))


# ==== opcheck ============================================================================================


def _opcheck_cases():
    x = torch.randn(5, 24)
    r = torch.randn(5, 24)
    w, b = torch.randn(24), torch.randn(24)
    x4 = torch.randn(2, 6, 15)
    w6, b6 = torch.randn(6), torch.randn(6)
    xa, sc, sh = torch.randn(2, 3, 24), torch.randn(2, 24), torch.randn(2, 24)
    v, g = torch.randn(4, 10), torch.rand(4) + 0.5
    mw, vw = torch.randn(3), torch.randn(3)
    return [
        ("add_norm", lambda: (torch.ops.fusednorm.add_norm_fwd.default, (x, r, w, b, 1e-5, False, 0.2, 3, True)),
         lambda out: (torch.ops.fusednorm.add_norm_bwd.default,
                      (torch.randn(5, 24), torch.randn(5, 24), out[1], w, b, out[2], out[3], False, 0.2, 3,
                       torch.float32, True, torch.float32))),
        ("layer_norm_cf", lambda: (torch.ops.fusednorm.layer_norm_cf_fwd.default, (x4, w6, b6, 1e-6)),
         lambda out: (torch.ops.fusednorm.layer_norm_cf_bwd.default,
                      (torch.randn(2, 6, 15), x4, w6, b6, out[1], out[2]))),
        ("ada_norm", lambda: (torch.ops.fusednorm.ada_norm_fwd.default, (xa, sc, sh, w, b, 1e-6, False)),
         lambda out: (torch.ops.fusednorm.ada_norm_bwd.default,
                      (torch.randn(2, 3, 24), xa, sc, sh, w, b, out[1], out[2], False))),
        ("weight_norm", lambda: (torch.ops.fusednorm.weight_norm_fwd.default, (v, g)),
         lambda out: (torch.ops.fusednorm.weight_norm_bwd.default, (torch.randn(4, 10), v, g, out[1]))),
        ("switchable_norm",
         lambda: (torch.ops.fusednorm.switchable_norm_fwd.default, (x4, w6, b6, mw, vw, None, None, True, 1e-5)),
         lambda out: (torch.ops.fusednorm.switchable_norm_bwd.default,
                      (torch.randn(2, 6, 15), x4, w6, mw, vw, *out[1:], True))),
    ]


_OP_BACKENDS = {"add_norm": ADD_BACKENDS, "layer_norm_cf": CF_BACKENDS, "ada_norm": ADA_BACKENDS,
                "weight_norm": WN_BACKENDS, "switchable_norm": SN_BACKENDS}


@pytest.mark.parametrize("case", range(5), ids=list(_OP_BACKENDS))
def test_opcheck(case):
    name, fwd, bwd = _opcheck_cases()[case]
    for backend in _OP_BACKENDS[name]:
        with fusednorm.use_backend(backend):
            op, args = fwd()
            torch.library.opcheck(op, args)
            out = op(*args)
            bop, bargs = bwd(out)
            torch.library.opcheck(bop, bargs)


@pytest.mark.skipif("native" not in ADD_BACKENDS, reason="the native extension was built without csrc/cpu/variants.cpp")
def test_native_variant_ops_opcheck():
    ops = torch.ops.fusednorm_C
    x, r, w, b = torch.randn(5, 24), torch.randn(5, 24), torch.randn(24), torch.randn(24)
    torch.library.opcheck(ops.add_norm_fwd.default, (x, r, w, b, 1e-5, False, True, 1.25, 3, 3355443, torch.float32))
    y, s, mean, rstd = ops.add_norm_fwd(x, r, w, b, 1e-5, False, True, 1.25, 3, 3355443, torch.float32)
    torch.library.opcheck(ops.add_norm_bwd.default, (torch.randn(5, 24), torch.randn(5, 24), s, w, b, mean, rstd,
                                                     False, True, 1.25, 3, 3355443, torch.float32, True,
                                                     torch.float32))
    if hasattr(ops, "plane_stats"):
        x4 = torch.randn(2, 6, 15)
        torch.library.opcheck(ops.layer_norm_cf_fwd.default, (x4, torch.randn(6), torch.randn(6), 1e-6))
        torch.library.opcheck(ops.weight_norm_fwd.default, (torch.randn(4, 10), torch.rand(4) + 0.5))
        planes = torch.randn(12, 15)
        torch.library.opcheck(ops.plane_stats.default, (planes,))
        c = torch.randn(12)
        torch.library.opcheck(ops.plane_bwd_dx.default, (torch.randn(12, 15), planes, c, c, c, c))
    if hasattr(ops, "ada_norm_fwd"):
        xa, sc = torch.randn(2, 3, 24), torch.randn(2, 24)
        torch.library.opcheck(ops.ada_norm_fwd.default, (xa, sc, sc, w, b, 1e-6, False))
        _, mean, rstd = ops.ada_norm_fwd(xa, sc, sc, w, b, 1e-6, False)
        torch.library.opcheck(ops.ada_norm_bwd.default, (torch.randn(2, 3, 24), xa, sc, sc, w, b, mean, rstd, False))


@pytest.mark.parametrize("backend", ADD_BACKENDS[:1] + SN_BACKENDS[-1:])
def test_torch_compile_fullgraph(backend):
    # The custom ops are opaque to the compiler: whole-graph capture with forward and backward through them.
    x = torch.randn(4, 32, requires_grad=True)
    r = torch.randn(4, 32)
    w = torch.randn(32, requires_grad=True)
    with fusednorm.use_backend(backend):
        f = torch.compile(lambda x, r, w: F.add_rms_norm(x, r, w, prenorm=True), backend="aot_eager",
                          fullgraph=True)
        y, s = f(x, r, w)
        (y.sum() + s.square().sum()).backward()
        ref_y, ref_s = F.add_rms_norm(x.detach(), r, w.detach(), prenorm=True)
        torch.testing.assert_close(y, ref_y)
        ln2d = fusednorm.LayerNorm2d(8)
        g = torch.compile(ln2d, backend="aot_eager", fullgraph=True)
        xi = torch.randn(2, 8, 3, 3, requires_grad=True)
        g(xi).sum().backward()
        assert xi.grad is not None and torch.isfinite(xi.grad).all()



# ==== far from zero: the saved mean's rounding in backward ===============================================
# Rows of x = -200 + randn (fp32): the saved fp32 mean is off by up to half an ulp of 200 (~8e-6), which is not
# small against x - mean, and dx = rstd * (g - xhat * c1 - c2) cancels; each LayerNorm backward measures that
# rounding on the data. (width, seed, scale) cases: widths 2 and 3 with seeds found by scanning that the Triton
# backwards failed before that correction (dx, dweight outside the oracle; adaptive width 37, scale 1e-2:
# dscale). add/layer_norm_2d width 37 and one width above each chunked backward's single-tile limit (add_norm
# 8192, layer_norm_2d 128; the adaptive backward has no chunked kernel) run the corrected code paths, but there
# torch's own fp32 error is as large or larger than the uncorrected kernels' (on the chunked cases about |dx|
# itself), so the oracle cannot tell those apart. add width 3 seed 27 and adaptive width 3 seed 1 fail in the
# forward instead: the Triton add+norm and adaptive forwards took the statistics of unshifted rows (y outside
# the oracle: 7.1e-5 against 2 x 1.2e-5 + 2.1e-5, and 3.2e-4 against 2 x 3.2e-5 + 5e-5) until they were
# shifted by the row's first element, as the LayerNorm forward.


def _far_case(op: str, width: int, seed: int, scale: float):
    from test_fuzz import Case

    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(4, width, generator=gen, dtype=torch.float64) * scale - 200.0).float()
    params = [torch.randn(width, generator=gen) + 1, torch.randn(width, generator=gen)]
    if op == "add":
        r = torch.randn(4, width, generator=gen)
        return Case(lambda x, r, w, b: F.add_layer_norm(x, r, w, b, 1e-5),
                    lambda x, r, w, b: TF.layer_norm(x + r, (width,), w, b, 1e-5),
                    [x, r, *params], ["x", "residual", "weight", "bias"])
    if op == "cf":
        x = x.t().reshape(1, width, 2, 2).contiguous()  # four pixels of `width` channels
        return Case(lambda x, w, b: F.layer_norm_2d(x, w, b, 1e-6), lambda x, w, b: _ln2d_torch(x, w, b, 1e-6),
                    [x, *params], ["x", "weight", "bias"], fmt=torch.contiguous_format)
    scale_, shift = (torch.randn(2, width, generator=gen) * 0.5 for _ in range(2))
    return Case(lambda x, sc, sh, w, b: F.adaptive_layer_norm(x, sc, sh, w, b, eps=1e-6),
                lambda x, sc, sh, w, b: _ada_torch(x, sc, sh, w, b, 1e-6, False),
                [x.view(2, 2, width), scale_, shift, *params], ["x", "scale", "shift", "weight", "bias"])


def _far_param(op: str, backend: str, case: tuple[int, int, float]):
    return pytest.param(op, backend, case, id=f"{op}-{backend}-w{case[0]}-s{case[1]}")


FAR_CASES = [
    *[_far_param("add", b, (w, s, 1.0)) for b in ADD_BACKENDS
      for w, s in ((2, 46), (2, 82), (3, 87), (3, 122), (3, 27), (37, 0))],
    *[_far_param("add", b, (8193, 0, 1e-2)) for b in ADD_BACKENDS],
    *[_far_param("cf", b, (w, s, 1.0)) for b in CF_BACKENDS for w, s in ((2, 13), (2, 30), (3, 7), (3, 28), (37, 0))],
    *[_far_param("cf", b, (130, 0, 1e-2)) for b in CF_BACKENDS],
    *[_far_param("ada", b, (w, s, 1.0)) for b in ADA_BACKENDS
      for w, s in ((2, 16), (2, 18), (3, 27), (3, 30), (3, 1))],
    *[_far_param("ada", b, (37, s, 1e-2)) for b in ADA_BACKENDS for s in (10, 26)],
]


@pytest.mark.parametrize("op,backend,case", FAR_CASES)
def test_layer_norm_variants_backward_far_from_zero(op, backend, case):
    from test_fuzz import run_case

    width, seed, scale = case
    run_case(_far_case(op, width, seed, scale), backend, seed)
