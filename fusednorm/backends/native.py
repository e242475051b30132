"""Native backend: the compiled extension ``fusednorm._C`` built from ``csrc/``.

Importing this module fails (and the backend is reported unavailable, with the reason) when the extension
was not built or does not load. Each function has the signature documented in ``reference.py`` and calls
the op of the same name registered by the extension under ``torch.ops.fusednorm_C``.
"""

from __future__ import annotations

import torch

from fusednorm import _C  # noqa: F401  - registers torch.ops.fusednorm_C.*


def has_cuda() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return bool(torch.ops.fusednorm_C.has_cuda())


def supports(op: str) -> bool:
    return hasattr(torch.ops.fusednorm_C, op) and op in globals()
