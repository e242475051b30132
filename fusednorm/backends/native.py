"""Native backend: the compiled extension ``fusednorm._C`` built from ``csrc/``.

Importing this module fails (and the backend is reported unavailable, with the reason) when the extension
was not built or does not load. Each function has the signature documented in ``reference.py`` and calls
the op of the same name registered by the extension under ``torch.ops.fusednorm_C``; gradients of absent
parameters, returned by the C++ ops as empty (0,) placeholders, come back as ``None`` here.

The module also registers fake (meta) implementations of the ``fusednorm_C`` ops, so they trace under
``torch.compile`` / ``FakeTensorMode`` and pass ``torch.library.opcheck``.
"""

from __future__ import annotations

import os

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from fusednorm import backends as _backends

try:
    from fusednorm import _C  # loading it registers torch.ops.fusednorm_C.*
except ImportError as _exc:  # pragma: no cover - depends on how the package was installed
    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    raise ImportError(
        f"fusednorm's native extension fusednorm._C could not be loaded ({_exc}). It is built by "
        "`pip install --no-build-isolation .` unless FUSEDNORM_NO_EXTENSION=1 was set; it must be built "
        f"against the installed torch {torch.__version__} (package directory: {_here})."
    ) from _exc

_ops = torch.ops.fusednorm_C

# The op layer's plain-eager check in one call (csrc/eager.cpp; see fusednorm.ops.native_autograd_op).
eager_unintercepted = _C.eager_unintercepted

# fusednorm.functional's whole-call entries (csrc/eager.cpp): they read the backend in force and the forward-AD
# level from these modules.
_C.bind_eager_state(_backends, _forward_ad)
for _name in vars(_backends.native_entries):
    setattr(_backends.native_entries, _name, getattr(_C, _name))

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


# The extension's C++ autograd ops (csrc/autograd.cpp), by family; the op layer's eager path calls them (see
# ``fusednorm.ops.native_autograd_op``). Each records its own autograd node and runs the ops above.
AUTOGRAD_OPS = {
    "layer_norm": _ops.layer_norm.default,
    "layer_norm_cf": _ops.layer_norm_cf.default,
    "group_norm": _ops.group_norm.default,
    "batch_norm": _ops.batch_norm.default,
    "add_norm": _ops.add_norm.default,
}


def has_cuda() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return bool(_ops.has_cuda())


def cpu_isa() -> str:
    """Which copy of the CPU kernels runs here: ``"avx512bf16"``, ``"avx2"`` or ``"base"``: the best one the CPU
    supports, capped by ``FUSEDNORM_CPU_ISA`` (``base`` or ``avx2``)."""
    return str(_ops.cpu_isa())


def cpu_isas_built() -> list[str]:
    """The copies of the CPU kernels this build holds, e.g. ``["base", "avx2", "avx512bf16"]``."""
    return [str(isa) for isa in _ops.cpu_isas_built()]


def supports(op: str) -> bool:
    """True when this backend implements function ``op``."""
    return op in _OPS and hasattr(_ops, op)


# ---- LayerNorm / RMSNorm -------------------------------------------------------------------------------


def layer_norm_fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, is_rms: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize each row of x (M, N) (any row stride, contiguous last dim): y (M, N), mean (M,) or (0,), rstd (M,)."""
    y, mean, rstd = _ops.layer_norm_fwd(x, weight, bias, float(eps), bool(is_rms))
    return y, mean, rstd


def layer_norm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    is_rms: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients of layer_norm_fwd: dx (M, N) in x.dtype, dweight (N,), dbias (N,) (None when absent)."""
    dx, dw, db = _ops.layer_norm_bwd(dy, x, weight, bias, mean, rstd, bool(is_rms))
    return dx, (dw if weight is not None else None), (db if bias is not None else None)


# ---- GroupNorm -----------------------------------------------------------------------------------------


def group_norm_fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float, activation: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Group-normalize x (N, C, *spatial), affine, optional SiLU: y (x's format), mean, rstd (N, num_groups)."""
    return _ops.group_norm_fwd(x, weight, bias, int(num_groups), float(eps), str(activation))


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
    """Gradients of group_norm_fwd: dx (x's shape and format), dweight (C,), dbias (C,) (None when absent)."""
    dx, dw, db = _ops.group_norm_bwd(dy, x, weight, bias, mean, rstd, int(num_groups), str(activation))
    return dx, (dw if weight is not None else None), (db if bias is not None else None)


# ---- BatchNorm -----------------------------------------------------------------------------------------


def batch_norm_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean (C,) and M2 = sum((x - mean)^2) (C,) of x (N, C, *spatial), acc dtype."""
    return _ops.batch_norm_stats(x)


def batch_norm_apply(x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """y = (x - mean[c]) * rstd[c] * w[c] + b[c] with x's shape, dtype and memory format."""
    return _ops.batch_norm_apply(x, mean, rstd, weight, bias)


def batch_norm_bwd_reduce(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel sum(dy) and sum(dy * xhat), both (C,) acc dtype."""
    return _ops.batch_norm_bwd_reduce(dy, x, mean, rstd)


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
    """Input gradient of BatchNorm (see reference.batch_norm_bwd_dx), x's shape, dtype and memory format."""
    return _ops.batch_norm_bwd_dx(dy, x, mean, rstd, weight, sum_dy, sum_dy_xhat, int(count), bool(training))


# ---- fake (meta) implementations for tracing -----------------------------------------------------------


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fmt(x: Tensor) -> torch.memory_format:
    """The memory format the kernels give results computed from x (channels_last kept)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def _grad_like(p: Tensor | None, n: int, like: Tensor) -> Tensor:
    # Absent parameters get an empty (0,) placeholder in x's dtype, as the C++ ops return.
    return like.new_empty((0,)) if p is None else like.new_empty((n,), dtype=p.dtype)


@torch.library.register_fake("fusednorm_C::layer_norm_fwd")
def _layer_norm_fwd_fake(x, weight, bias, eps, is_rms):
    m, n = x.shape
    acc = _acc(x.dtype)
    return x.new_empty((m, n)), x.new_empty((0 if is_rms else m,), dtype=acc), x.new_empty((m,), dtype=acc)


@torch.library.register_fake("fusednorm_C::layer_norm_bwd")
def _layer_norm_bwd_fake(dy, x, weight, bias, mean, rstd, is_rms):
    n = x.shape[1]
    return x.new_empty(x.shape), _grad_like(weight, n, x), _grad_like(bias, n, x)


@torch.library.register_fake("fusednorm_C::group_norm_fwd")
def _group_norm_fwd_fake(x, weight, bias, num_groups, eps, activation):
    acc = _acc(x.dtype)
    y = torch.empty_like(x, memory_format=_fmt(x))
    return y, x.new_empty((x.shape[0], num_groups), dtype=acc), x.new_empty((x.shape[0], num_groups), dtype=acc)


@torch.library.register_fake("fusednorm_C::group_norm_bwd")
def _group_norm_bwd_fake(dy, x, weight, bias, mean, rstd, num_groups, activation):
    c = x.shape[1]
    return torch.empty_like(x, memory_format=_fmt(x)), _grad_like(weight, c, x), _grad_like(bias, c, x)


@torch.library.register_fake("fusednorm_C::batch_norm_stats")
def _batch_norm_stats_fake(x):
    acc = _acc(x.dtype)
    return x.new_empty((x.shape[1],), dtype=acc), x.new_empty((x.shape[1],), dtype=acc)


@torch.library.register_fake("fusednorm_C::batch_norm_apply")
def _batch_norm_apply_fake(x, mean, rstd, weight, bias):
    return torch.empty_like(x, memory_format=_fmt(x))


@torch.library.register_fake("fusednorm_C::batch_norm_bwd_reduce")
def _batch_norm_bwd_reduce_fake(dy, x, mean, rstd):
    acc = _acc(x.dtype)
    return x.new_empty((x.shape[1],), dtype=acc), x.new_empty((x.shape[1],), dtype=acc)


@torch.library.register_fake("fusednorm_C::batch_norm_bwd_dx")
def _batch_norm_bwd_dx_fake(dy, x, mean, rstd, weight, sum_dy, sum_dy_xhat, count, training):
    return torch.empty_like(x, memory_format=_fmt(x))


# The fused variants' native ops (csrc/cpu/variants.cpp) live in their own module; export them from this backend.
from fusednorm.backends.native_variants import *  # noqa: E402,F401,F403
from fusednorm.backends.native_variants import NATIVE_VARIANT_OPS  # noqa: E402

_OPS = _OPS | NATIVE_VARIANT_OPS
