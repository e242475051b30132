"""Plain-torch reference implementations of the fused-variant backend functions (issue 8).

``fusednorm.backends.reference`` re-exports everything here, so these functions are part of the backend
contract: the Triton (``backends/triton/*``) and native (``backends/native_variants.py``) backends implement
the same names with the same signatures. Conventions are those of ``reference.py`` (acc dtype, outputs in the
input dtype, gradients in the parameter dtype, ``None`` for absent gradients).

Dropout masks are not drawn from torch's generator: they are a pure function of (seed, element index) through
the counter-based hash ``dropout_keep_mask`` below, which every backend implements bit-exactly. So backward
regenerates the forward's mask from the seed instead of storing it, and all backends agree on the mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
# Dropout draws a 24-bit uniform integer u per element and keeps it when u >= threshold.
DROPOUT_BITS = 24


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cast(g: Tensor | None, like: Tensor | None) -> Tensor | None:
    return None if like is None or g is None else g.to(like.dtype)


# ---- counter-based dropout hash ------------------------------------------------------------------------


def _mul32(h: Tensor, c: int) -> Tensor:
    """(h * c) mod 2^32 for 0 <= h < 2^32 held in int64, without overflowing int64 (split c in 16-bit halves)."""
    lo = h * (c & 0xFFFF)
    hi = ((h * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _hash32(h: Tensor) -> Tensor:
    """A 32-bit integer mixer (xorshift-multiply); h is int64 holding values in [0, 2^32)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x7FEB352D)
    h = h ^ (h >> 15)
    h = _mul32(h, 0x846CA68B)
    return h ^ (h >> 16)


def dropout_threshold(p: float) -> int:
    """The integer threshold every backend compares the 24-bit hash against: keep iff u >= threshold."""
    return min(1 << DROPOUT_BITS, max(0, int(round(p * (1 << DROPOUT_BITS)))))


def dropout_scale(p: float) -> float:
    """Scale of kept elements, 1 / (1 - p); 0 when p == 1 (everything dropped, like torch)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def dropout_keep_mask(m: int, n: int, seed: int, p: float, device: torch.device | str = "cpu") -> Tensor:
    """Boolean keep mask (m, n) of element ``i = row * n + col`` for ``seed``.

    k = H(H(hi32(i)) ^ seed); u = H(H(lo32(i) ^ k) + k) >> 8; keep iff u >= dropout_threshold(p), where H is
    ``_hash32``. Every backend computes exactly this, so masks agree bit for bit across backends.
    """
    idx = torch.arange(m * n, dtype=torch.int64, device=device)
    lo, hi = idx & _M32, idx >> 32
    k = _hash32(_hash32(hi) ^ (int(seed) & _M32))
    h = _hash32((_hash32(lo ^ k) + k) & _M32)
    return ((h >> (32 - DROPOUT_BITS)) >= dropout_threshold(p)).view(m, n)


# ---- residual-add + LayerNorm/RMSNorm ------------------------------------------------------------------


def add_norm_fwd(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    is_rms: bool,
    dropout_p: float,
    seed: int,
    s_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """s = dropout(x) + residual, y = norm(s) over rows.

    x: (M, N) last dim contiguous; residual: (M, N) or None. ``dropout_p`` 0 disables dropout (the mask is
    ``dropout_keep_mask(M, N, seed, p)``, kept elements scaled by 1/(1-p)). s is rounded to ``s_dtype`` and the
    statistics are those of the rounded s (what backward sees). Returns y (M, N) in x.dtype, s (M, N) in
    s_dtype, mean (M,) acc dtype ((0,) for RMS), rstd (M,).
    """
    from fusednorm.backends.reference import layer_norm_fwd

    acc = _acc(x.dtype)
    s = x.to(acc)
    if dropout_p > 0.0:
        keep = dropout_keep_mask(x.shape[0], x.shape[1], seed, dropout_p, x.device)
        s = torch.where(keep, s * dropout_scale(dropout_p), torch.zeros((), dtype=acc, device=x.device))
    if residual is not None:
        s = s + residual.to(acc)
    s = s.to(s_dtype, copy=True).contiguous()  # a fresh tensor: outputs must not alias x
    y, mean, rstd = layer_norm_fwd(s, weight, bias, eps, is_rms)
    return y.to(x.dtype), s, mean, rstd


def add_norm_bwd(
    dy: Tensor,
    ds: Tensor | None,
    s: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    is_rms: bool,
    dropout_p: float,
    seed: int,
    x_dtype: torch.dtype,
    residual_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``add_norm_fwd``.

    dy: (M, N) gradient of y; ds: (M, N) gradient of the returned s (prenorm) or None. With ds_total the
    gradient reaching s: dresidual = ds_total in ``residual_dtype`` (None when there was no residual),
    dx = ds_total * mask / (1 - p) in ``x_dtype``. Returns dx, dresidual, dweight, dbias.
    """
    from fusednorm.backends.reference import layer_norm_bwd

    acc = rstd.dtype
    # s in the acc dtype, so the norm's input gradient comes back unrounded
    dsf, dw, db = layer_norm_bwd(dy, s.to(acc), weight, bias, mean, rstd, is_rms)
    if ds is not None:
        dsf = dsf + ds.to(acc)
    dres = dsf.to(residual_dtype, copy=True).contiguous() if residual_dtype is not None else None
    dx = dsf
    if dropout_p > 0.0:
        keep = dropout_keep_mask(s.shape[0], s.shape[1], seed, dropout_p, s.device)
        dx = torch.where(keep, dx * dropout_scale(dropout_p), torch.zeros((), dtype=acc, device=s.device))
    return dx.to(x_dtype).contiguous(), dres, dw, db


# ---- channels-first LayerNorm (N, C, P) ----------------------------------------------------------------


def layer_norm_cf_fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm over C of an (N, C, P) tensor (P = flattened pixels), any strides.

    weight, bias: (C,) or None. Returns y (N, C, P) with x's strides when x is dense (else contiguous) in
    x.dtype, mean and rstd (N, P) acc dtype.
    """
    acc = _acc(x.dtype)
    # statistics of x - x[:, 0]: exact for a constant pixel (the mean is x itself, not x +- 1 ulp)
    k = x[:, :1].to(acc)
    d = x.to(acc) - k
    mean_d = d.mean(dim=1)
    rstd = torch.rsqrt((d - mean_d[:, None]).square().mean(dim=1) + eps)
    mean = k[:, 0] + mean_d
    y = (d - mean_d[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.to(acc)[None, :, None]
    if bias is not None:
        y = y + bias.to(acc)[None, :, None]
    out = torch.empty_like(x)
    out.copy_(y)
    return out, mean.contiguous(), rstd.contiguous()


def layer_norm_cf_bwd(
    dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients of ``layer_norm_cf_fwd``: dx (like x), dweight (C,), dbias (C,)."""
    acc = _acc(x.dtype)
    xf, dyf = x.to(acc), dy.to(acc)
    c = x.shape[1]
    # remove the saved mean's rounding (as reference.layer_norm_bwd): e = mean over channels of (x - mean)
    d = xf - mean[:, None]
    xhat = (d - d.mean(dim=1, keepdim=True)) * rstd[:, None]
    g = dyf * weight.to(acc)[None, :, None] if weight is not None else dyf
    c1 = (g * xhat).sum(dim=1, keepdim=True) / c
    c2 = g.sum(dim=1, keepdim=True) / c
    dx = (g - xhat * c1 - c2) * rstd[:, None]
    out = torch.empty_like(x)
    out.copy_(dx)
    dw = (dyf * xhat).sum(dim=(0, 2)) if weight is not None else None
    db = dyf.sum(dim=(0, 2)) if bias is not None else None
    return out, _cast(dw, weight), _cast(db, bias)


# ---- adaptive LayerNorm / RMSNorm (DiT AdaLN) ----------------------------------------------------------


def ada_norm_fwd(
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    is_rms: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """y = norm(x) * (1 + scale[b]) + shift[b] with norm(x) = xhat * weight + bias.

    x: (B, L, D), last dim contiguous; scale, shift: (B, D). Returns y (B, L, D) contiguous in x.dtype,
    mean (B, L) acc dtype ((0,) for RMS) and rstd (B, L).
    """
    acc = _acc(x.dtype)
    xf = x.to(acc)
    if is_rms:
        mean = torch.empty(0, dtype=acc, device=x.device)
        rstd = torch.rsqrt(xf.square().mean(dim=2) + eps)
        xhat = xf * rstd[..., None]
    else:
        # statistics of x - x[..., 0]: exact for a constant row (the mean is x itself, not x +- 1 ulp)
        k = xf[..., :1]
        d = xf - k
        mean_d = d.mean(dim=2)
        rstd = torch.rsqrt((d - mean_d[..., None]).square().mean(dim=2) + eps)
        mean = k[..., 0] + mean_d
        xhat = (d - mean_d[..., None]) * rstd[..., None]
    n = xhat
    if weight is not None:
        n = n * weight.to(acc)
    if bias is not None:
        n = n + bias.to(acc)
    y = n * (1 + scale.to(acc)[:, None, :]) + shift.to(acc)[:, None, :]
    return y.to(x.dtype).contiguous(), mean, rstd


def ada_norm_bwd(
    dy: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    is_rms: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Gradients of ``ada_norm_fwd``: dx (B, L, D), dscale (B, D), dshift (B, D), dweight (D,), dbias (D,)."""
    acc = _acc(x.dtype)
    xf, dyf = x.to(acc), dy.to(acc)
    d = x.shape[2]
    if is_rms:
        xhat = xf * rstd[..., None]
    else:  # remove the saved mean's rounding (as reference.layer_norm_bwd): e = mean(x - mean)
        xc = xf - mean[..., None]
        xhat = (xc - xc.mean(dim=2, keepdim=True)) * rstd[..., None]
    n = xhat * weight.to(acc) if weight is not None else xhat
    if bias is not None:
        n = n + bias.to(acc)
    dscale = (dyf * n).sum(dim=1)
    dshift = dyf.sum(dim=1)
    dn = dyf * (1 + scale.to(acc)[:, None, :])
    dw = (dn * xhat).sum(dim=(0, 1)) if weight is not None else None
    db = dn.sum(dim=(0, 1)) if bias is not None else None
    g = dn * weight.to(acc) if weight is not None else dn
    c1 = (g * xhat).sum(dim=2, keepdim=True) / d
    dx = g - xhat * c1
    if not is_rms:
        dx = dx - g.sum(dim=2, keepdim=True) / d
    dx = dx * rstd[..., None]
    return (
        dx.to(x.dtype).contiguous(),
        dscale.to(scale.dtype),
        dshift.to(shift.dtype),
        _cast(dw, weight),
        _cast(db, bias),
    )


# ---- weight norm ---------------------------------------------------------------------------------------


def weight_norm_fwd(v: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """w = g[o] * v[o] / ||v[o]|| for each row o of v (O, K) (contiguous); g: (O,).

    Returns w (O, K) in v.dtype and norm (O,) in the acc dtype.
    """
    acc = _acc(v.dtype)
    vf = v.to(acc)
    norm = vf.square().sum(dim=1).sqrt()
    w = vf * (g.to(acc) / norm)[:, None]
    return w.to(v.dtype).contiguous(), norm


def weight_norm_bwd(dw: Tensor, v: Tensor, g: Tensor, norm: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of ``weight_norm_fwd``: dv = g/||v|| * (dw - v * <dw, v>/||v||^2), dg = <dw, v>/||v||."""
    acc = _acc(v.dtype)
    vf, dwf = v.to(acc), dw.to(acc)
    dot = (dwf * vf).sum(dim=1)
    gf = g.to(acc)
    dv = (gf / norm)[:, None] * (dwf - vf * (dot / (norm * norm))[:, None])
    return dv.to(v.dtype).contiguous(), (dot / norm).to(g.dtype)


# ---- per-plane kernels (SwitchableNorm): x viewed as (N*C, P) planes -----------------------------------


def plane_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Exact (mean, M2) of each plane of x (R, P) (last dim contiguous); both (R,) acc dtype.

    Shifted by each plane's first element: the sum then runs over small differences, so the mean is correctly
    rounded when |mean| >> std (a plain fp32 sum of values near -200 is off by several ulps of the mean, which
    the backward's centred terms x - mean_in amplify), exact for a constant plane, and M2 never sees the
    rounding of the mean's large part.
    """
    xf = x.to(_acc(x.dtype))
    if xf.shape[1] == 0:
        return xf.mean(dim=1), xf.sum(dim=1)
    shift = xf[:, :1]
    d = xf - shift
    dmean = d.mean(dim=1)
    return shift[:, 0] + dmean, (d - dmean[:, None]).square().sum(dim=1)


def plane_affine(x: Tensor, center: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """y = (x - center[r]) * a[r] + b[r] for planes x (R, P); center, a, b: (R,) acc dtype. Returns y in x.dtype.

    Centring first keeps full precision when |mean| >> std (x * a - mean * a would cancel).
    """
    acc = _acc(x.dtype)
    return ((x.to(acc) - center[:, None]) * a[:, None] + b[:, None]).to(x.dtype).contiguous()


def plane_bwd_reduce(dy: Tensor, x: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
    """Per-plane sum(dy) and sum(dy * (x - center[r])); dy, x (R, P); center (R,). Both (R,) acc dtype."""
    acc = _acc(x.dtype)
    dyf = dy.to(acc)
    return dyf.sum(dim=1), (dyf * (x.to(acc) - center[:, None])).sum(dim=1)


def plane_bwd_dx(dy: Tensor, x: Tensor, center: Tensor, k: Tensor, p: Tensor, q: Tensor) -> Tensor:
    """dx = dy * k[r] + (x - center[r]) * p[r] + q[r] for planes (R, P); center, k, p, q (R,) acc dtype.

    Returns dx (R, P) in x.dtype.
    """
    acc = _acc(x.dtype)
    xc = x.to(acc) - center[:, None]
    return (dy.to(acc) * k[:, None] + xc * p[:, None] + q[:, None]).to(x.dtype).contiguous()


VARIANT_OPS = frozenset(
    {
        "add_norm_fwd",
        "add_norm_bwd",
        "layer_norm_cf_fwd",
        "layer_norm_cf_bwd",
        "ada_norm_fwd",
        "ada_norm_bwd",
        "weight_norm_fwd",
        "weight_norm_bwd",
        "plane_stats",
        "plane_affine",
        "plane_bwd_reduce",
        "plane_bwd_dx",
    }
)

__all__ = sorted(VARIANT_OPS) + ["VARIANT_OPS", "dropout_keep_mask", "dropout_threshold", "dropout_scale"]
