"""Functional entry points with the exact ``torch.nn.functional`` signatures.

This layer validates arguments (with torch's own error messages where torch has one), resolves defaults such
as RMSNorm's ``eps=None``, and hands canonical tensors to the op layer in ``fusednorm/ops``. The backend that
runs each call is chosen per tensor (see ``fusednorm.set_backend`` / ``use_backend``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fusednorm.ops import variants as _variant_ops
from fusednorm.ops.layer_norm import layer_norm_rows

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# ==== shared validation ==================================================================================


def check_floating(name: str, t: Tensor | None, what: str = "input") -> None:
    """Raise a clear error unless ``t`` is None or a floating-point tensor fusednorm computes in."""
    if t is not None and t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected {what} to have a floating-point dtype (float16, bfloat16, float32 or float64), "
            f"but got {t.dtype}"
        )


def check_same_device(name: str, input: Tensor, **others: Tensor | None) -> None:
    """Raise torch's device-mismatch error when a parameter lives on another device than ``input``."""
    for what, t in others.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(
                f"{name}: expected all tensors to be on the same device, but found at least two devices, "
                f"{input.device} (input) and {t.device} ({what})!"
            )


def _shape_list(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


# ==== LayerNorm / RMSNorm ================================================================================


def _normalized_shape(normalized_shape: int | Sequence[int] | torch.Size) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(int(s) for s in normalized_shape)


def _check_row_norm(
    name: str, input: Tensor, shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None, rms: bool
) -> None:
    check_floating(name, input)
    check_floating(name, weight, "weight")
    check_floating(name, bias, "bias")
    if len(shape) == 0:
        raise RuntimeError(
            "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one element, "
            f"but got normalized_shape = {_shape_list(shape)}"
        )
    if weight is not None and tuple(weight.shape) != shape:
        raise RuntimeError(
            "Expected weight to be of same shape as normalized_shape, but got weight of shape "
            f"{_shape_list(weight.shape)} and normalized_shape = {_shape_list(shape)}"
        )
    if bias is not None and tuple(bias.shape) != shape:
        raise RuntimeError(
            "Expected bias to be of same shape as normalized_shape, but got bias of shape "
            f"{_shape_list(bias.shape)} and normalized_shape = {_shape_list(shape)}"
        )
    if input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        star = "*" if rms else "*, "
        raise RuntimeError(
            f"Given normalized_shape={_shape_list(shape)}, expected input with shape "
            f"[{star}{', '.join(str(s) for s in shape)}], but got input of size{_shape_list(input.shape)}"
        )
    check_same_device(name, input, weight=weight, bias=bias)


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer normalization over the trailing ``normalized_shape`` dims, like ``torch.nn.functional.layer_norm``.

    input: (*, *normalized_shape), float16/bfloat16/float32/float64; weight, bias: normalized_shape, any
    floating dtype (fp32 parameters with bf16/fp16 input is the usual AMP case). Returns input's shape and dtype.
    Statistics are computed in fp32 (fp64 for fp64 input).
    """
    shape = _normalized_shape(normalized_shape)
    _check_row_norm("layer_norm", input, shape, weight, bias, rms=False)
    return layer_norm_rows(input, math.prod(shape), weight, bias, eps, is_rms=False)


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """RMS normalization over the trailing ``normalized_shape`` dims, like ``torch.nn.functional.rms_norm``.

    y = x / sqrt(mean(x^2) + eps) * weight. ``eps=None`` means ``torch.finfo(input.dtype).eps``, as in torch.
    Shapes and dtypes as for ``layer_norm``.
    """
    shape = _normalized_shape(normalized_shape)
    _check_row_norm("rms_norm", input, shape, weight, None, rms=True)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    return layer_norm_rows(input, math.prod(shape), weight, None, eps, is_rms=True)


# ==== GroupNorm / InstanceNorm (issue 3) =================================================================


# ==== BatchNorm / SyncBatchNorm (issue 4) ================================================================


# ==== Fused variants (issue 8) ===========================================================================


def _check_dropout_p(p: float) -> None:
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


def dropout_seed() -> int:
    """A fresh dropout seed drawn from torch's default CPU generator (so ``torch.manual_seed`` reproduces it)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _add_norm(
    name: str,
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    dropout_p: float,
    prenorm: bool,
    residual_in_fp32: bool,
    is_rms: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    check_floating(name, x)
    check_floating(name, residual, "residual")
    check_floating(name, weight, "weight")
    check_floating(name, bias, "bias")
    if x.dim() == 0:
        raise RuntimeError(f"{name}: expected input with at least 1 dimension, but got a 0-dim tensor")
    n = x.shape[-1]
    for what, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (n,):
            raise RuntimeError(
                f"Expected {what} to be of same shape as normalized_shape, but got {what} of shape "
                f"{_shape_list(p.shape)} and normalized_shape = [{n}]"
            )
    if residual is not None and residual.shape != x.shape:
        raise RuntimeError(
            f"{name}: residual of shape {_shape_list(residual.shape)} must match input of shape "
            f"{_shape_list(x.shape)}"
        )
    _check_dropout_p(dropout_p)
    check_same_device(name, x, residual=residual, weight=weight, bias=bias)
    seed = dropout_seed() if dropout_p > 0.0 else 0
    y, s = _variant_ops.add_norm_rows(x, residual, n, weight, bias, eps, is_rms, dropout_p, seed, residual_in_fp32)
    return (y, s) if prenorm else y


def add_layer_norm(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float = 1e-5,
    dropout_p: float = 0.0,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Fused ``layer_norm(dropout(x) + residual)`` over the last dim, in one read of x and residual.

    x: (*, N); residual: (*, N) or None; weight, bias: (N,) or None. ``dropout_p`` is applied as given (pass
    0.0 in eval; the modules do); the mask comes from a seed drawn from torch's generator and is regenerated in
    backward, never stored. Returns y (x.dtype), and also s = dropout(x) + residual when ``prenorm`` (the new
    residual stream), in the residual's dtype (x's when residual is None), or fp32 if ``residual_in_fp32``.
    """
    return _add_norm("add_layer_norm", x, residual, weight, bias, eps, dropout_p, prenorm, residual_in_fp32, False)


def add_rms_norm(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    eps: float | None = None,
    dropout_p: float = 0.0,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Fused ``rms_norm(dropout(x) + residual)`` over the last dim; see ``add_layer_norm``.

    ``eps=None`` means ``torch.finfo(x.dtype).eps`` as in ``torch.nn.functional.rms_norm``.
    """
    if eps is None:
        check_floating("add_rms_norm", x)
        eps = torch.finfo(x.dtype).eps
    return _add_norm("add_rms_norm", x, residual, weight, None, eps, dropout_p, prenorm, residual_in_fp32, True)
