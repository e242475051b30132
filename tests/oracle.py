"""The test oracle shared by every suite.

A kernel's result is compared with a float64 computation of the same math. Its error must be at most twice
the error of torch's own implementation in the same dtype, plus a small absolute tolerance for the dtype:
so fusednorm is held to torch's accuracy, not to a tolerance picked to pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Absolute slack per output dtype, about one rounding step of a value of order 1 in that dtype.
ATOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (input dtype, parameter dtype) pairs: same dtype, and the AMP case of low-precision input with fp32 params.
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]


def max_err(a: Tensor, ref: Tensor) -> float:
    """Largest absolute difference, with NaN in ``a`` (but not in ``ref``) counted as infinite error."""
    if a.numel() == 0:
        return 0.0
    a64, r64 = a.detach().double(), ref.detach().double()
    bad = torch.isnan(a64) & ~torch.isnan(r64)
    if bad.any():
        return float("inf")
    d = (a64 - r64).abs()
    d = torch.where(torch.isnan(r64) & torch.isnan(a64), torch.zeros_like(d), d)
    return float(d.max())


def assert_close(actual: Tensor, ref64: Tensor, torch_out: Tensor | None, name: str = "", atol: float | None = None):
    """Assert ``actual`` is within 2x torch's own error against ``ref64`` plus the dtype's atol.

    actual, torch_out: the same dtype and shape (torch_out None means: only the atol bound, for fp64).
    """
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    if torch_out is not None:
        assert actual.dtype == torch_out.dtype, f"{name}: dtype {actual.dtype} != torch's {torch_out.dtype}"
    scale = max(1.0, float(ref64.detach().double().abs().max())) if ref64.numel() else 1.0
    tol = (atol if atol is not None else ATOL[actual.dtype]) * scale
    torch_err = max_err(torch_out, ref64) if torch_out is not None else 0.0
    err = max_err(actual, ref64)
    assert err <= 2 * torch_err + tol, (
        f"{name}: max error {err:.3e} vs float64 exceeds 2 x torch's {torch_err:.3e} + {tol:.1e}"
    )


def randn_like_param(shape, dtype, offset: float = 0.0) -> Tensor:
    """A random parameter (never all ones/zeros): N(offset, 1)."""
    return torch.randn(shape, dtype=dtype) + offset
