"""Triton backend: one file of kernels + launchers per op family, Welford helpers in ``welford.py``.

Importing this package imports Triton (so it fails cleanly where Triton is missing, and the registry reports the
backend unavailable). Functions follow the contract in ``fusednorm/backends/reference.py``. Kernels run on CUDA
tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (which must be set before this package is imported).
"""

from __future__ import annotations

import triton  # noqa: F401  - fail at import when Triton is missing

from fusednorm.backends.triton.layer_norm import layer_norm_bwd as layer_norm_bwd
from fusednorm.backends.triton.layer_norm import layer_norm_fwd as layer_norm_fwd

_OPS: set[str] = {"layer_norm_fwd", "layer_norm_bwd"}

# ==== GroupNorm / InstanceNorm (issue 3) =================================================================

from fusednorm.backends.triton.group_norm import group_norm_bwd as group_norm_bwd  # noqa: E402
from fusednorm.backends.triton.group_norm import group_norm_fwd as group_norm_fwd  # noqa: E402
from fusednorm.backends.triton.group_norm import group_norm_fwd_var as group_norm_fwd_var  # noqa: E402

_OPS |= {"group_norm_fwd", "group_norm_bwd", "group_norm_fwd_var"}


# ==== BatchNorm (issue 4) ================================================================================

from fusednorm.backends.triton.batch_norm import batch_norm_apply as batch_norm_apply  # noqa: E402
from fusednorm.backends.triton.batch_norm import batch_norm_bwd_dx as batch_norm_bwd_dx  # noqa: E402
from fusednorm.backends.triton.batch_norm import batch_norm_bwd_reduce as batch_norm_bwd_reduce  # noqa: E402
from fusednorm.backends.triton.batch_norm import batch_norm_stats as batch_norm_stats  # noqa: E402

_OPS |= {"batch_norm_stats", "batch_norm_apply", "batch_norm_bwd_reduce", "batch_norm_bwd_dx"}


# ==== Fused variants (issue 8) ===========================================================================

from fusednorm.backends.triton.ada_norm import ada_norm_bwd, ada_norm_fwd  # noqa: E402,F401
from fusednorm.backends.triton.add_norm import add_norm_bwd, add_norm_fwd  # noqa: E402,F401
from fusednorm.backends.triton.layer_norm_cf import layer_norm_cf_bwd, layer_norm_cf_fwd  # noqa: E402,F401
from fusednorm.backends.triton.switchable_norm import (  # noqa: E402,F401
    plane_affine,
    plane_bwd_dx,
    plane_bwd_reduce,
    plane_stats,
)
from fusednorm.backends.triton.weight_norm import weight_norm_bwd, weight_norm_fwd  # noqa: E402,F401

_OPS |= {
    "add_norm_fwd", "add_norm_bwd", "layer_norm_cf_fwd", "layer_norm_cf_bwd", "ada_norm_fwd", "ada_norm_bwd",
    "weight_norm_fwd", "weight_norm_bwd", "plane_stats", "plane_affine", "plane_bwd_reduce", "plane_bwd_dx",
}


def supports(op: str) -> bool:
    """True when the Triton backend implements ``op``."""
    return op in _OPS


__all__ = sorted(_OPS) + ["supports"]
