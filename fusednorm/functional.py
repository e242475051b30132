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
