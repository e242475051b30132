"""Plain-torch reference backend: the contract every backend implements, and the test oracle's twin.

Every backend module (``triton``, ``native``, ``reference``) exposes ``supports(op) -> bool`` and the
functions below, with these exact signatures and semantics. Callers (``fusednorm/ops``) have already
validated shapes, dtypes and devices; backends do no argument checking beyond what is free.

Conventions shared by all ops:

- "acc dtype" is float64 for float64 inputs and float32 otherwise. Saved statistics (mean, rstd, M2, sums)
  are in the acc dtype.
- Outputs (y, dx) have the input's dtype; dweight/dbias have the parameter's dtype.
- Gradients for absent parameters are returned as ``None``.
- ``rstd = 1 / sqrt(var + eps)`` with the biased variance.

These implementations compute in the acc dtype with exact two-pass statistics, so they are accurate but not
fast; they also serve as the last-resort fallback for devices no other backend covers.
"""

from __future__ import annotations

import torch
from torch import Tensor


def supports(op: str) -> bool:
    """True when this backend implements function ``op``."""
    return op in _OPS


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: float64 stays float64, everything else uses float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cast_grad(g: Tensor | None, like: Tensor | None) -> Tensor | None:
    return None if like is None or g is None else g.to(like.dtype)


# ---- LayerNorm / RMSNorm (rows) ------------------------------------------------------------------------


def layer_norm_fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, is_rms: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize each row of ``x``.

    x: (M, N), any row stride, last dim contiguous. weight, bias: (N,) or None (RMS has no bias).
    Returns y (M, N) contiguous in x.dtype; mean (M,) acc dtype (shape (0,) when ``is_rms``); rstd (M,).
    LayerNorm: y = (x - mean) * rstd * w + b. RMSNorm: y = x * rstd * w with rstd = 1/sqrt(mean(x^2) + eps).
    """
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    if is_rms:
        mean = torch.empty(0, dtype=acc, device=x.device)
        rstd = torch.rsqrt(xf.square().mean(dim=1) + eps)
        xhat = xf * rstd[:, None]
    else:
        # Shift by each row's first element before averaging: a constant row then has an exactly zero centred
        # value (sum/N of equal values is not always exact), and |mean| >> std loses less.
        shift = xf[:, :1]
        centred_mean = (xf - shift).mean(dim=1)
        mean = centred_mean + shift[:, 0]
        centred = (xf - shift) - centred_mean[:, None]
        var = centred.square().mean(dim=1)
        rstd = torch.rsqrt(var + eps)
        xhat = centred * rstd[:, None]
    y = xhat
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype).contiguous(), mean, rstd


def layer_norm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    is_rms: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients of ``layer_norm_fwd``.

    dy, x: (M, N) (last dim contiguous); mean, rstd as returned by the forward. ``bias`` is only used for its
    presence and dtype. Returns dx (M, N) contiguous in x.dtype, dweight (N,), dbias (N,) (None when absent).
    """
    acc = acc_dtype(x.dtype)
    xf, dyf = x.to(acc), dy.to(acc)
    n = x.shape[1]
    if is_rms:
        xhat = xf * rstd[:, None]
    else:
        # The saved fp32 mean carries its own rounding (half an ulp of |mean|), which matters when |mean| >> std:
        # remove it with the row's mean of (x - mean), subtracted separately (mean + e would round again).
        d = xf - mean[:, None]
        xhat = (d - d.mean(dim=1, keepdim=True)) * rstd[:, None]
    g = dyf * weight.to(acc) if weight is not None else dyf
    c1 = (g * xhat).sum(dim=1, keepdim=True) / n
    if is_rms:
        dx = (g - xhat * c1) * rstd[:, None]
    else:
        c2 = g.sum(dim=1, keepdim=True) / n
        dx = (g - xhat * c1 - c2) * rstd[:, None]
    dw = (dyf * xhat).sum(dim=0) if weight is not None else None
    db = dyf.sum(dim=0) if bias is not None else None
    return dx.to(x.dtype).contiguous(), _cast_grad(dw, weight), _cast_grad(db, bias)


# ---- GroupNorm (InstanceNorm is GroupNorm with num_groups == C) ----------------------------------------


def _apply_activation(y: Tensor, activation: str) -> Tensor:
    return torch.nn.functional.silu(y) if activation == "silu" else y


def group_norm_fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float, activation: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Group-normalize ``x`` then apply the per-channel affine and an optional activation.

    x: (N, C, *spatial), contiguous or channels_last / channels_last_3d. weight, bias: (C,) or None.
    activation: ``"none"`` or ``"silu"`` (applied after the affine).
    Returns y (same shape, dtype and memory format as x); mean, rstd (N, num_groups) acc dtype.
    """
    acc = acc_dtype(x.dtype)
    n, c = x.shape[0], x.shape[1]
    xf = x.to(acc).reshape(n, num_groups, -1)
    # Statistics of x shifted by each group's first element (as layer_norm_fwd): a plain fp32 mean of values with
    # |mean| >> std is off by several ulps; the shifted sum carries no large offset.
    shift = xf[..., :1]
    centred_mean = (xf - shift).mean(dim=2)
    mean = centred_mean + shift[..., 0]
    centred = (xf - shift) - centred_mean[..., None]
    var = centred.square().mean(dim=2)
    rstd = torch.rsqrt(var + eps)
    y = (centred * rstd[..., None]).reshape(x.shape)
    bshape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(acc).reshape(bshape)
    if bias is not None:
        y = y + bias.to(acc).reshape(bshape)
    y = _apply_activation(y, activation)
    return y.to(x.dtype).contiguous(memory_format=_memory_format(x)), mean, rstd


def group_norm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    activation: str,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients of ``group_norm_fwd`` (the activation's backward included).

    dy, x: (N, C, *spatial); mean, rstd: (N, num_groups). Returns dx (x's shape, dtype and memory format),
    dweight (C,), dbias (C,) (None when absent).
    """
    acc = acc_dtype(x.dtype)
    n, c = x.shape[0], x.shape[1]
    bshape = (1, c) + (1,) * (x.dim() - 2)
    xf = x.to(acc).reshape(n, num_groups, -1)
    # Correct for the saved mean's rounding per (n, group), as in layer_norm_bwd.
    d = xf - mean[..., None]
    xhat = ((d - d.mean(dim=2, keepdim=True)) * rstd[..., None]).reshape(x.shape)
    dyf = dy.to(acc)
    if activation == "silu":
        pre = xhat
        if weight is not None:
            pre = pre * weight.to(acc).reshape(bshape)
        if bias is not None:
            pre = pre + bias.to(acc).reshape(bshape)
        sig = torch.sigmoid(pre)
        dyf = dyf * sig * (1 + pre * (1 - sig))
    reduce_dims = [0] + list(range(2, x.dim()))
    dw = (dyf * xhat).sum(dim=reduce_dims) if weight is not None else None
    db = dyf.sum(dim=reduce_dims) if bias is not None else None
    g = dyf * weight.to(acc).reshape(bshape) if weight is not None else dyf
    g = g.reshape(n, num_groups, -1)
    xhat_g = xhat.reshape(n, num_groups, -1)
    m = g.shape[2]
    c1 = (g * xhat_g).sum(dim=2, keepdim=True) / m
    c2 = g.sum(dim=2, keepdim=True) / m
    dx = ((g - xhat_g * c1 - c2) * rstd[..., None]).reshape(x.shape)
    dx = dx.to(x.dtype).contiguous(memory_format=_memory_format(x))
    return dx, _cast_grad(dw, weight), _cast_grad(db, bias)


# ---- BatchNorm (per-channel statistics over N and spatial) ---------------------------------------------


def batch_norm_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel statistics of ``x`` (N, C, *spatial), any supported memory format.

    Returns mean (C,) and M2 (C,) = sum((x - mean)^2), both acc dtype. The count is N * prod(spatial), known
    on the host; (count, mean, M2) triples from several shards merge with Chan's formula (SyncBatchNorm).
    """
    acc = acc_dtype(x.dtype)
    dims = [0] + list(range(2, x.dim()))
    xf = x.to(acc)
    mean = xf.mean(dim=dims)
    m2 = (xf - _bcast(mean, x)).square().sum(dim=dims)
    return mean, m2


def batch_norm_apply(
    x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """y = (x - mean[c]) * rstd[c] * w[c] + b[c], elementwise (training after stats, or eval with running stats).

    x: (N, C, *spatial); mean, rstd: (C,) acc dtype. Returns y with x's shape, dtype and memory format.
    """
    acc = acc_dtype(x.dtype)
    y = (x.to(acc) - _bcast(mean, x)) * _bcast(rstd, x)
    if weight is not None:
        y = y * _bcast(weight.to(acc), x)
    if bias is not None:
        y = y + _bcast(bias.to(acc), x)
    return y.to(x.dtype).contiguous(memory_format=_memory_format(x))


def batch_norm_bwd_reduce(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel sum(dy) and sum(dy * xhat) with xhat = (x - mean) * rstd; both (C,) acc dtype.

    These are dbias and dweight (before the cast to the parameter dtype), and what SyncBatchNorm all-reduces.
    """
    acc = acc_dtype(x.dtype)
    dims = [0] + list(range(2, x.dim()))
    dyf = dy.to(acc)
    xhat = (x.to(acc) - _bcast(mean, x)) * _bcast(rstd, x)
    return dyf.sum(dim=dims), (dyf * xhat).sum(dim=dims)


def batch_norm_bwd_dx(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: int,
    training: bool,
) -> Tensor:
    """Input gradient of BatchNorm.

    training=True: dx = w * rstd * (dy - sum_dy / count - xhat * sum_dy_xhat / count), where the sums and
    ``count`` cover the whole (possibly multi-rank) batch. training=False (statistics are constants):
    dx = dy * w * rstd, and the sums are ignored. Returns dx with x's shape, dtype and memory format.
    """
    acc = acc_dtype(x.dtype)
    scale = _bcast(rstd * (weight.to(acc) if weight is not None else 1.0), x)
    dyf = dy.to(acc)
    if training:
        xhat = (x.to(acc) - _bcast(mean, x)) * _bcast(rstd, x)
        dx = (dyf - _bcast(sum_dy / count, x) - xhat * _bcast(sum_dy_xhat / count, x)) * scale
    else:
        dx = dyf * scale
    return dx.to(x.dtype).contiguous(memory_format=_memory_format(x))


# ---- helpers -------------------------------------------------------------------------------------------


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """View a per-channel (C,) vector so it broadcasts against (N, C, *spatial)."""
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


def _memory_format(x: Tensor) -> torch.memory_format:
    """The memory format torch would give a result computed from ``x`` (channels_last kept)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


# Every op a backend may implement; a backend's ``supports`` answers from its own list.
_OPS = frozenset(
    {
        "layer_norm_fwd",
        "layer_norm_bwd",
        "group_norm_fwd",
        "group_norm_bwd",
        "batch_norm_stats",
        "batch_norm_apply",
        "batch_norm_bwd_reduce",
        "batch_norm_bwd_dx",
    }
)
from fusednorm.backends.reference_variants import *  # noqa: E402,F401,F403,I001
_OPS = _OPS | VARIANT_OPS  # noqa: F405
