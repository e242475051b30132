"""Functional entry points with the exact ``torch.nn.functional`` signatures.

This layer validates arguments (with torch's own error messages where torch has one), resolves defaults such
as RMSNorm's ``eps=None``, and hands canonical tensors to the op layer in ``fusednorm/ops``. The backend that
runs each call is chosen per tensor (see ``fusednorm.set_backend`` / ``use_backend``).

LayerNorm, RMSNorm, LayerNorm2d, GroupNorm, InstanceNorm, BatchNorm and residual-add + norm first offer the call to the
native extension's whole-call entry (``fusednorm.backends.native_entries``, csrc/eager.cpp): for a valid
plain-eager call on CPU tensors that the native backend runs, it does the checks and the op layer's work in C++
and returns the result (on the CPU this Python costs 80-100 us per call once the caches are cold); for any other
call it returns None and the code below runs. Under torch.compile the entry is skipped, so dynamo traces the code below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fusednorm.backends import native_entries as _native
from fusednorm.ops import variants as _variant_ops
from fusednorm.ops.batch_norm import batch_norm_nd
from fusednorm.ops.group_norm import group_norm_nd, spatial_numel
from fusednorm.ops.layer_norm import layer_norm_rows

_is_compiling = torch.compiler.is_compiling

_FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})

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
    device = input.device
    for what, t in others.items():
        if t is not None and t.device != device:
            raise RuntimeError(
                f"{name}: expected all tensors to be on the same device, but found at least two devices, "
                f"{input.device} (input) and {t.device} ({what})!"
            )


def autocast_to_fp32(input: Tensor, *params: Tensor | None) -> tuple[Tensor | None, ...]:
    """Apply torch's CUDA autocast policy for layer_norm / rms_norm / group_norm (run in float32).

    Under ``torch.autocast("cuda")`` torch casts these ops' fp16/bf16 arguments to float32 and returns float32;
    outside autocast, and on the CPU (whose autocast leaves norms alone), arguments pass through unchanged.
    """
    if not (input.is_cuda and torch.is_autocast_enabled("cuda")):
        return (input, *params)
    low = (torch.float16, torch.bfloat16)
    return tuple(t.float() if t is not None and t.dtype in low else t for t in (input, *params))


def _shape_list(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


# ==== LayerNorm / RMSNorm ================================================================================


def _normalized_shape(normalized_shape: int | Sequence[int] | torch.Size) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(map(int, normalized_shape))


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
    # torch.Size compares equal to a tuple of the same ints (no tuple() copies: this runs on every call)
    if weight is not None and weight.shape != shape:
        raise RuntimeError(
            "Expected weight to be of same shape as normalized_shape, but got weight of shape "
            f"{_shape_list(weight.shape)} and normalized_shape = {_shape_list(shape)}"
        )
    if bias is not None and bias.shape != shape:
        raise RuntimeError(
            "Expected bias to be of same shape as normalized_shape, but got bias of shape "
            f"{_shape_list(bias.shape)} and normalized_shape = {_shape_list(shape)}"
        )
    if input.dim() < len(shape) or input.shape[input.dim() - len(shape):] != shape:
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
    if not _is_compiling():
        y = _native.layer_norm(input, normalized_shape, weight, bias, eps)
        if y is not None:
            return y
    shape = _normalized_shape(normalized_shape)
    _check_row_norm("layer_norm", input, shape, weight, bias, rms=False)
    input, weight, bias = autocast_to_fp32(input, weight, bias)
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
    if not _is_compiling():
        y = _native.rms_norm(input, normalized_shape, weight, eps)
        if y is not None:
            return y
    shape = _normalized_shape(normalized_shape)
    _check_row_norm("rms_norm", input, shape, weight, None, rms=True)
    input, weight = autocast_to_fp32(input, weight)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    return layer_norm_rows(input, math.prod(shape), weight, None, eps, is_rms=True)


# ==== GroupNorm / InstanceNorm (issue 3) =================================================================


def _check_group_norm(input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None) -> None:
    """torch's checks for ``group_norm``, in torch's order and with its messages."""
    check_floating("group_norm", input)
    check_floating("group_norm", weight, "weight")
    check_floating("group_norm", bias, "bias")
    if input.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    n, c = input.shape[0], input.shape[1]
    size_prods = n * c // num_groups
    for s in input.shape[2:]:
        size_prods *= s
    if size_prods == 1:
        shape = [n * c // num_groups, num_groups, *input.shape[2:]]
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {shape}")
    if num_groups <= 0 or c % num_groups != 0:
        raise RuntimeError(
            "Expected number of channels in input to be divisible by num_groups, but got input of shape "
            f"{_shape_list(input.shape)} and num_groups={num_groups}"
        )
    if weight is not None and (weight.dim() != 1 or weight.numel() != c):
        raise RuntimeError(
            "Expected weight to be a vector of size equal to the number of channels in input, but got weight of "
            f"shape {_shape_list(weight.shape)} and input of shape {_shape_list(input.shape)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.numel() != c):
        # torch prints the *weight's* shape here ([0] without a weight); reproduced so messages match exactly.
        shown = weight.shape if weight is not None else (0,)
        raise RuntimeError(
            "Expected bias to be a vector of size equal to the number of channels in input, but got bias of "
            f"shape {_shape_list(shown)} and input of shape {_shape_list(input.shape)}"
        )
    check_same_device("group_norm", input, weight=weight, bias=bias)


def _activation_name(activation: str | None) -> str:
    if activation is None or activation == "none":
        return "none"
    if activation == "silu":
        return "silu"
    raise ValueError(f"group_norm: activation must be None or 'silu', but got {activation!r}")


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
) -> Tensor:
    """Group normalization, like ``torch.nn.functional.group_norm``, with an optional fused SiLU.

    input: (N, C, *spatial) with C divisible by ``num_groups``, float16/bfloat16/float32/float64, contiguous or
    channels_last / channels_last_3d (kept in the output, never copied). weight, bias: (C,) or None, any floating
    dtype (fp32 with bf16/fp16 input works). ``activation``: None or ``"silu"`` (y = silu(affine(xhat)), as a
    UNet block does next). Returns input's shape, dtype and memory format. Statistics in fp32 (fp64 for fp64).
    """
    if not _is_compiling():
        y = _native.group_norm(input, num_groups, weight, bias, eps, activation)
        if y is not None:
            return y
    _check_group_norm(input, num_groups, weight, bias)
    act = _activation_name(activation)
    input, weight, bias = autocast_to_fp32(input, weight, bias)
    y, _, _ = group_norm_nd(input, num_groups, weight, bias, eps, act)
    return y


def _check_instance_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    use_input_stats: bool,
) -> None:
    """torch's checks for ``instance_norm`` (which runs batch_norm on (1, N*C, *): sizes are reported x N)."""
    check_floating("instance_norm", input)
    for what, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        check_floating("instance_norm", t, what)
    if use_input_stats:
        size_prods = 1
        for s in input.shape[2:]:
            size_prods *= s
        if size_prods == 1:
            raise ValueError(f"Expected more than 1 spatial element when training, got input size {input.size()}")
    if not use_input_stats and (running_mean is None or running_var is None):
        raise RuntimeError("Expected running_mean and running_var to be defined when use_input_stats is false")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    n, c = input.shape[0], input.shape[1]
    for what, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is not None and t.numel() != c:
            raise RuntimeError(f"{what} should contain {n * c} elements not {n * t.numel()}")
    check_same_device(
        "instance_norm", input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias
    )


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Instance normalization, like ``torch.nn.functional.instance_norm``.

    input: (N, C, *spatial), contiguous or channels_last (kept). running_mean, running_var, weight, bias: (C,) or
    None. With ``use_input_stats`` each (n, c) slice is normalized by its own statistics and, when given, the
    running stats are updated in place: r = (1 - momentum) * r + momentum * mean_n(stat), with the unbiased
    per-instance variance (from M2, exact even when var << eps). Without it, the running stats normalize
    (y = (x - rm) / sqrt(rv + eps) * w + b). Returns input's shape, dtype and memory format.
    """
    if not _is_compiling():
        y = _native.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
        if y is not None:
            return y
    _check_instance_norm(input, running_mean, running_var, weight, bias, use_input_stats)
    c = input.shape[1]
    if not use_input_stats:
        # Fixed statistics: an elementwise per-channel scale and shift (autograd through plain torch ops).
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        bshape = (1, c) + (1,) * (input.dim() - 2)
        scale = torch.rsqrt(running_var.detach().to(acc) + eps)
        if weight is not None:
            scale = scale * weight.to(acc)
        shift = -running_mean.detach().to(acc) * scale
        if bias is not None:
            shift = shift + bias.to(acc)
        # input * scale promotes inside the kernel, so autograd saves the input itself (no fp32 copy of it).
        out = input * scale.reshape(bshape) + shift.reshape(bshape)
        return out.to(input.dtype)
    with_var = running_mean is not None
    if eps == 0:
        y, mean, var = _instance_norm_eps0(input, weight, bias)
    else:
        y, mean, var = group_norm_nd(input, c, weight, bias, eps, "none", with_var=with_var)
    # As torch: instances without spatial elements leave the buffers alone, but an empty batch (N == 0) folds in
    # the NaN mean over zero instances.
    if with_var and (spatial_numel(input) > 0 or input.shape[0] == 0):
        m = spatial_numel(input)
        with torch.no_grad():
            running_mean.mul_(1.0 - momentum).add_(mean.mean(dim=0).to(running_mean.dtype), alpha=momentum)
            unbiased = var * (m / (m - 1))
            running_var.mul_(1.0 - momentum).add_(unbiased.mean(dim=0).to(running_var.dtype), alpha=momentum)
    return y


def _instance_norm_eps0(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """instance_norm with eps == 0, where torch (its batch-norm kernel) uses invstd = 0 for a constant plane, so
    the output there is the bias, not 0/0. A plain-torch composite in the acc dtype: eps == 0 is a corner case.
    Returns (y, mean, biased var), mean and var (N, C) in the acc dtype."""
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    dims = tuple(range(2, input.dim()))
    xf = input.to(acc)
    var, mean = torch.var_mean(xf, dim=dims, correction=0, keepdim=True)
    zero = var == 0
    # where() twice: rsqrt's backward at var == 0 would otherwise turn the masked zero gradient into NaN
    invstd = torch.where(zero, torch.zeros_like(var), torch.rsqrt(torch.where(zero, torch.ones_like(var), var)))
    y = (xf - mean) * invstd
    bshape = (1, input.shape[1]) + (1,) * (input.dim() - 2)
    if weight is not None:
        y = y * weight.to(acc).reshape(bshape)
    if bias is not None:
        y = y + bias.to(acc).reshape(bshape)
    n, c = input.shape[0], input.shape[1]
    return y.to(input.dtype), mean.detach().reshape(n, c), var.detach().reshape(n, c)


# ==== BatchNorm / SyncBatchNorm (issue 4) ================================================================


def check_batch_norm_args(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    eps: float,
    check_batch_size: bool = True,
) -> None:
    """Validate a batch_norm call like torch, with torch's messages (also used by SyncBatchNorm, which skips
    the one-value-per-channel rule: its statistics cover every rank's batch)."""
    if training and check_batch_size:
        size = input.size()
        values = size[0] * math.prod(size[2:])
        if values == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    for what, t in (("input", input), ("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        check_floating("batch_norm", t, what)
    c = input.size(1)  # torch's IndexError for 1-D input
    if not training:
        for what, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is None:
                raise RuntimeError(f"{what} must be defined in evaluation mode")
    elif (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    for what, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is not None and t.numel() != c:
            raise RuntimeError(f"{what} should contain {c} elements not {t.numel()}")
    check_same_device("batch_norm", input, weight=weight, bias=bias, running_mean=running_mean,
                      running_var=running_var)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch normalization per channel over (N, *spatial), like ``torch.nn.functional.batch_norm``.

    input: (N, C, *spatial), float16/bfloat16/float32/float64, contiguous or channels_last(_3d) (kept in the
    output); weight, bias, running_mean, running_var: (C,), any floating dtype (fp32 with bf16/fp16 input
    is the AMP case). training=True normalizes with the batch's biased variance and, when the running
    buffers are given, updates them in place with momentum (unbiased variance), on the device; training=False
    normalizes with the running buffers. ``momentum`` may also be a 0-dim tensor (the modules pass one for
    momentum=None, so the cumulative average needs no host sync). Statistics in fp32 (fp64 for fp64 input).
    """
    if not _is_compiling():
        y = _native.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        if y is not None:
            return y
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, eps)
    return batch_norm_nd(input, running_mean, running_var, weight, bias, training, momentum, eps)


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
    if not _is_compiling():
        out = _native.add_norm(x, residual, weight, bias, eps, dropout_p, prenorm, residual_in_fp32, False)
        if out is not None:
            return out
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
    if not _is_compiling():
        out = _native.add_norm(x, residual, weight, None, eps, dropout_p, prenorm, residual_in_fp32, True)
        if out is not None:
            return out
    if eps is None:
        check_floating("add_rms_norm", x)
        eps = torch.finfo(x.dtype).eps
    return _add_norm("add_rms_norm", x, residual, weight, None, eps, dropout_p, prenorm, residual_in_fp32, True)


def _check_channel_param(name: str, what: str, p: Tensor | None, c: int) -> None:
    if p is not None and tuple(p.shape) != (c,):
        raise RuntimeError(f"{name}: expected {what} of shape [{c}] (num_channels), but got {_shape_list(p.shape)}")


def layer_norm_2d(
    input: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-6
) -> Tensor:
    """Channels-first LayerNorm: normalize (N, C, *spatial) over C at every spatial position.

    weight, bias: (C,) or None. NCHW and channels_last inputs are read in place (no permute copy); the result
    has input's shape, dtype and memory format. Equals ``layer_norm(input.movedim(1, -1), (C,), w, b, eps)``
    moved back.
    """
    if not _is_compiling():
        y = _native.layer_norm_2d(input, weight, bias, eps)
        if y is not None:
            return y
    name = "layer_norm_2d"
    check_floating(name, input)
    check_floating(name, weight, "weight")
    check_floating(name, bias, "bias")
    if input.dim() < 2:
        raise RuntimeError(
            f"{name}: expected input of shape (N, C, *), but got input of size{_shape_list(input.shape)}"
        )
    c = input.shape[1]
    _check_channel_param(name, "weight", weight, c)
    _check_channel_param(name, "bias", bias, c)
    check_same_device(name, input, weight=weight, bias=bias)
    return _variant_ops.layer_norm_channels_first(input, weight, bias, eps)


def adaptive_layer_norm(
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-6,
    rms: bool = False,
) -> Tensor:
    """Adaptive LayerNorm (DiT AdaLN): ``norm(x) * (1 + scale) + shift`` in one pass.

    x: (B, L, D); scale, shift: (B, D) (or (B, 1, D)), broadcast over L; weight, bias: (D,) or None (the usual
    DiT form has neither). ``rms=True`` uses RMSNorm statistics (bias still allowed). Returns (B, L, D) in x.dtype;
    gradients flow to x, scale, shift, weight and bias.
    """
    name = "adaptive_layer_norm"
    for what, t in (("input", x), ("scale", scale), ("shift", shift), ("weight", weight), ("bias", bias)):
        check_floating(name, t, what)
    if x.dim() != 3:
        raise RuntimeError(f"{name}: expected x of shape (B, L, D), but got input of size{_shape_list(x.shape)}")
    b, _, d = x.shape
    scale = scale.reshape(b, d) if scale.dim() == 3 and scale.shape[1] == 1 else scale
    shift = shift.reshape(b, d) if shift.dim() == 3 and shift.shape[1] == 1 else shift
    for what, t in (("scale", scale), ("shift", shift)):
        if tuple(t.shape) != (b, d):
            raise RuntimeError(f"{name}: expected {what} of shape [{b}, {d}] (or [{b}, 1, {d}]), but got "
                               f"{_shape_list(t.shape)}")
    _check_channel_param(name, "weight", weight, d)
    _check_channel_param(name, "bias", bias, d)
    check_same_device(name, x, scale=scale, shift=shift, weight=weight, bias=bias)
    return _variant_ops.adaptive_norm(x, scale, shift, weight, bias, eps, rms)


def weight_norm_fn(v: Tensor, g: Tensor, dim: int | None = 0) -> Tensor:
    """``torch._weight_norm``: w = g * v / ||v||, the norm over every dim of v except ``dim``.

    ``dim=None`` or ``-1``: the norm of the whole tensor. g: shaped like ``torch.norm_except_dim(v, 2, dim)``.
    Returns w with v's shape and dtype.
    """
    name = "weight_norm"
    check_floating(name, v, "v")
    check_floating(name, g, "g")
    d = -1 if dim is None else dim
    count = 1 if d == -1 or v.dim() == 0 else v.shape[d % v.dim()]
    if g.numel() != count:
        raise RuntimeError(f"{name}: expected g with {count} elements for dim={dim}, but got {_shape_list(g.shape)}")
    check_same_device(name, v, g=g)
    return _variant_ops.weight_norm_apply(v, g, d)


def switchable_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor,
    bias: Tensor,
    mean_weight: Tensor,
    var_weight: Tensor,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    using_moving_average: bool = True,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """SwitchableNorm of (N, C, *spatial): mixes instance, layer and batch statistics with softmax weights.

    weight, bias: (C,); mean_weight, var_weight: (3,) logits for (instance, layer, batch). In training the batch
    statistics are used and, when running buffers are given, folded into them in place (momentum average if
    ``using_moving_average``, else the cumulative average over ``num_batches_tracked`` batches); in eval the
    running statistics replace the batch ones. Variances are biased throughout (running_var included).
    """
    name = "switchable_norm"
    for what, t in (("input", input), ("weight", weight), ("bias", bias), ("mean_weight", mean_weight),
                    ("var_weight", var_weight)):
        check_floating(name, t, what)
    if input.dim() < 2:
        raise ValueError(f"{name}: expected input of shape (N, C, *), got {input.dim()}-D input")
    c = input.shape[1]
    _check_channel_param(name, "weight", weight, c)
    _check_channel_param(name, "bias", bias, c)
    for what, t in (("mean_weight", mean_weight), ("var_weight", var_weight)):
        if tuple(t.shape) != (3,):
            raise RuntimeError(f"{name}: expected {what} of shape [3], but got {_shape_list(t.shape)}")
    use_batch = training or running_mean is None
    if use_batch and input.numel() // c <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
    if input.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty input, got input size {input.size()}")
    check_same_device(name, input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    y, mean_bn, var_bn = _variant_ops.switchable_norm(
        input, weight, bias, mean_weight, var_weight, running_mean, running_var, use_batch, eps
    )
    if training and running_mean is not None and running_var is not None:
        with torch.no_grad():
            if using_moving_average:
                factor = momentum
            else:  # cumulative average over the batches seen so far
                if num_batches_tracked is None:
                    raise ValueError(f"{name}: using_moving_average=False needs num_batches_tracked")
                factor = 1.0 / float(num_batches_tracked.item())
            # torch's (1 - m) * r + m * s form (lerp_ would turn an infinite running value into NaN)
            running_mean.mul_(1 - factor).add_(mean_bn.to(running_mean.dtype) * factor)
            running_var.mul_(1 - factor).add_(var_bn.to(running_var.dtype) * factor)
    return y
