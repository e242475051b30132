"""Native (C++) implementations of the fused-variant backend functions, from ``csrc/cpu/variants.cpp``.

``fusednorm.backends.native`` re-exports this module's functions and adds ``NATIVE_VARIANT_OPS`` to the ops it
supports. Each function has the signature documented in ``reference_variants.py`` and calls the
``torch.ops.fusednorm_C`` op of the same name (registered when the extension ``fusednorm._C`` is loaded, which
``native.py`` does before importing this module). Only residual-add + norm has a native kernel so far; the other
variants (channels-first LayerNorm, adaptive LayerNorm, weight norm, SwitchableNorm planes) run on Triton or the
reference backend.

Dropout: the C++ kernels take the keep threshold and scale computed here by the same helpers the other backends
use, so the mask hash is identical everywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusednorm.backends.reference_variants import dropout_scale, dropout_threshold

NATIVE_VARIANT_OPS = frozenset({"add_norm_fwd", "add_norm_bwd"})

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


_register_fakes()

__all__ = ["NATIVE_VARIANT_OPS", "add_norm_bwd", "add_norm_fwd", "supports_variant"]
