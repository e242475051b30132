"""Native (C++) implementations of the fused-variant backend functions, from ``csrc/cpu/variants.cpp``.

``fusednorm.backends.native`` re-exports this module's functions and adds ``NATIVE_VARIANT_OPS`` to the ops it
supports. Each function has the signature documented in ``reference_variants.py`` and calls the
``torch.ops.fusednorm_C`` op of the same name (registered when the extension ``fusednorm._C`` is loaded, which
``native.py`` does before importing this module). Every fused variant has a native CPU kernel.

Dropout: the C++ kernels take the keep threshold and scale computed here by the same helpers the other backends
use, so the mask hash is identical everywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusednorm.backends.reference_variants import dropout_scale, dropout_threshold

NATIVE_VARIANT_OPS = frozenset(
    {
        "add_norm_fwd",
        "add_norm_bwd",
        "layer_norm_cf_fwd",
        "layer_norm_cf_bwd",
        "weight_norm_fwd",
        "weight_norm_bwd",
        "plane_stats",
        "plane_affine",
        "plane_bwd_reduce",
        "plane_bwd_dx",
        "ada_norm_fwd",
        "ada_norm_bwd",
    }
)

_ops = torch.ops.fusednorm_C


def supports_variant(op: str) -> bool:
    """True when the loaded extension registers the variant op ``op``."""
    return op in NATIVE_VARIANT_OPS and hasattr(_ops, op)


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
    """See ``reference_variants.add_norm_fwd``: y (M, N) x.dtype, s (M, N) s_dtype, mean, rstd."""
    y, s, mean, rstd = _ops.add_norm_fwd(
        x, residual, weight, bias, float(eps), bool(is_rms), dropout_p > 0.0, dropout_scale(dropout_p), int(seed),
        dropout_threshold(dropout_p), s_dtype,
    )
    return y, s, mean, rstd


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
    """See ``reference_variants.add_norm_bwd``: dx, dresidual, dweight, dbias (None when absent)."""
    has_res = residual_dtype is not None
    dx, dres, dw, db = _ops.add_norm_bwd(
        dy, ds, s, weight, bias, mean, rstd, bool(is_rms), dropout_p > 0.0, dropout_scale(dropout_p), int(seed),
        dropout_threshold(dropout_p), x_dtype, has_res, residual_dtype if has_res else x_dtype,
    )
    return dx, (dres if has_res else None), (dw if weight is not None else None), (db if bias is not None else None)


def _pixel_rows(t: Tensor) -> Tensor | None:
    """An (N, C, P) tensor whose channels are contiguous (channels_last) as (N * P, C) rows, without a copy;
    None when it is not laid out that way (or is empty)."""
    n, c, p = t.shape
    if t.numel() == 0 or (c > 1 and t.stride(1) != 1):
        return None
    rows = t.transpose(1, 2)
    if not rows.is_contiguous():
        return None
    return rows.view(n * p, c)


def layer_norm_cf_fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """See ``reference_variants.layer_norm_cf_fwd``: x (N, C, P) any strides; y like x, mean/rstd (N, P)."""
    rows = _pixel_rows(x)
    if rows is not None:
        # channels_last: every pixel's C channels are one contiguous row, which is the plain LayerNorm kernel's
        # job (vectorized over C); y keeps x's layout.
        n, c, p = x.shape
        y, mean, rstd = _ops.layer_norm_fwd(rows, weight, bias, float(eps), False)
        return y.view(n, p, c).transpose(1, 2), mean.view(n, p), rstd.view(n, p)
    y, mean, rstd = _ops.layer_norm_cf_fwd(x, weight, bias, float(eps))
    return y, mean, rstd


def layer_norm_cf_bwd(
    dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """See ``reference_variants.layer_norm_cf_bwd``: dx (like x), dweight, dbias (None when absent)."""
    rows = _pixel_rows(x)
    if rows is not None:
        n, c, p = x.shape
        dy_rows = dy.to(x.dtype).transpose(1, 2).reshape(n * p, c)  # a view when dy is channels_last too
        dx, dw, db = _ops.layer_norm_bwd(dy_rows, rows, weight, bias, mean.reshape(-1).contiguous(),
                                         rstd.reshape(-1).contiguous(), False)
        dx = dx.view(n, p, c).transpose(1, 2)
    else:
        dx, dw, db = _ops.layer_norm_cf_bwd(dy, x, weight, bias, mean, rstd)
    return dx, (dw if weight is not None else None), (db if bias is not None else None)


def weight_norm_fwd(v: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """See ``reference_variants.weight_norm_fwd``: w (O, K) v.dtype, norm (O,) acc dtype."""
    w, norm = _ops.weight_norm_fwd(v, g)
    return w, norm


def weight_norm_bwd(dw: Tensor, v: Tensor, g: Tensor, norm: Tensor) -> tuple[Tensor, Tensor]:
    """See ``reference_variants.weight_norm_bwd``: dv (O, K), dg (O,) g.dtype."""
    dv, dg = _ops.weight_norm_bwd(dw, v, g, norm)
    return dv, dg


def plane_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """See ``reference_variants.plane_stats``: per-plane mean and M2 of x (R, P)."""
    mean, m2 = _ops.plane_stats(x)
    return mean, m2


def plane_affine(x: Tensor, center: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """See ``reference_variants.plane_affine``: (x - center) * a + b per plane."""
    return _ops.plane_affine(x, center, a, b)


def plane_bwd_reduce(dy: Tensor, x: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
    """See ``reference_variants.plane_bwd_reduce``: per-plane sum(dy), sum(dy * (x - center))."""
    s1, s2 = _ops.plane_bwd_reduce(dy, x, center)
    return s1, s2


def plane_bwd_dx(dy: Tensor, x: Tensor, center: Tensor, k: Tensor, p: Tensor, q: Tensor) -> Tensor:
    """See ``reference_variants.plane_bwd_dx``: dy * k + (x - center) * p + q per plane."""
    return _ops.plane_bwd_dx(dy, x, center, k, p, q)


def ada_norm_fwd(
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    is_rms: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """See ``reference_variants.ada_norm_fwd``: y (B, L, D), mean (B, L) or (0,), rstd (B, L)."""
    y, mean, rstd = _ops.ada_norm_fwd(x, scale, shift, weight, bias, float(eps), bool(is_rms))
    return y, mean, rstd


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
    """See ``reference_variants.ada_norm_bwd``: dx, dscale, dshift, dweight, dbias (None when absent)."""
    dx, dscale, dshift, dw, db = _ops.ada_norm_bwd(dy, x, scale, shift, weight, bias, mean, rstd, bool(is_rms))
    return dx, dscale, dshift, (dw if weight is not None else None), (db if bias is not None else None)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_fakes() -> None:
    """Fake (meta) implementations of the fusednorm_C variant ops, for tracing and opcheck."""
    if not hasattr(_ops, "add_norm_fwd"):
        return

    @torch.library.register_fake("fusednorm_C::add_norm_fwd")
    def _(x, residual, weight, bias, eps, is_rms, has_dropout, drop_scale, seed, threshold, s_dtype):
        m = x.shape[0]
        acc = _acc(s_dtype)
        return (x.new_empty(x.shape), x.new_empty(x.shape, dtype=s_dtype),
                x.new_empty((0 if is_rms else m,), dtype=acc), x.new_empty((m,), dtype=acc))

    @torch.library.register_fake("fusednorm_C::add_norm_bwd")
    def _(dy, ds, s, weight, bias, mean, rstd, is_rms, has_dropout, drop_scale, seed, threshold, x_dtype,
          has_residual, residual_dtype):
        n = s.shape[1]
        dres = s.new_empty(s.shape, dtype=residual_dtype) if has_residual else s.new_empty((0,), dtype=x_dtype)
        dw = s.new_empty((n,), dtype=weight.dtype) if weight is not None else s.new_empty((0,), dtype=x_dtype)
        db = s.new_empty((n,), dtype=bias.dtype) if bias is not None else s.new_empty((0,), dtype=x_dtype)
        return s.new_empty(s.shape, dtype=x_dtype), dres, dw, db

    if not hasattr(_ops, "plane_stats"):
        return

    @torch.library.register_fake("fusednorm_C::layer_norm_cf_fwd")
    def _(x, weight, bias, eps):
        acc = _acc(x.dtype)
        n, _, p = x.shape
        return torch.empty_like(x), x.new_empty((n, p), dtype=acc), x.new_empty((n, p), dtype=acc)

    @torch.library.register_fake("fusednorm_C::layer_norm_cf_bwd")
    def _(dy, x, weight, bias, mean, rstd):
        c = x.shape[1]
        dw = x.new_empty((c,), dtype=weight.dtype) if weight is not None else x.new_empty((0,))
        db = x.new_empty((c,), dtype=bias.dtype) if bias is not None else x.new_empty((0,))
        return torch.empty_like(x), dw, db

    @torch.library.register_fake("fusednorm_C::weight_norm_fwd")
    def _(v, g):
        return v.new_empty(v.shape), v.new_empty((v.shape[0],), dtype=_acc(v.dtype))

    @torch.library.register_fake("fusednorm_C::weight_norm_bwd")
    def _(dw, v, g, norm):
        return v.new_empty(v.shape), g.new_empty(g.shape)

    @torch.library.register_fake("fusednorm_C::plane_stats")
    def _(x):
        acc = _acc(x.dtype)
        return x.new_empty((x.shape[0],), dtype=acc), x.new_empty((x.shape[0],), dtype=acc)

    @torch.library.register_fake("fusednorm_C::plane_affine")
    def _(x, center, a, b):
        return x.new_empty(x.shape)

    @torch.library.register_fake("fusednorm_C::plane_bwd_reduce")
    def _(dy, x, center):
        acc = _acc(x.dtype)
        return x.new_empty((x.shape[0],), dtype=acc), x.new_empty((x.shape[0],), dtype=acc)

    @torch.library.register_fake("fusednorm_C::plane_bwd_dx")
    def _(dy, x, center, k, p, q):
        return x.new_empty(x.shape)

    if not hasattr(_ops, "ada_norm_fwd"):
        return

    @torch.library.register_fake("fusednorm_C::ada_norm_fwd")
    def _(x, scale, shift, weight, bias, eps, is_rms):
        b, l, _ = x.shape
        acc = _acc(x.dtype)
        return (x.new_empty(x.shape), x.new_empty((0,) if is_rms else (b, l), dtype=acc),
                x.new_empty((b, l), dtype=acc))

    @torch.library.register_fake("fusednorm_C::ada_norm_bwd")
    def _(dy, x, scale, shift, weight, bias, mean, rstd, is_rms):
        d = x.shape[2]
        dw = x.new_empty((d,), dtype=weight.dtype) if weight is not None else x.new_empty((0,))
        db = x.new_empty((d,), dtype=bias.dtype) if bias is not None else x.new_empty((0,))
        return x.new_empty(x.shape), scale.new_empty(scale.shape), shift.new_empty(shift.shape), dw, db


_register_fakes()

__all__ = sorted(NATIVE_VARIANT_OPS) + ["NATIVE_VARIANT_OPS", "supports_variant"]
