"""Drop-in ``nn.Module`` replacements.

Each class subclasses its ``torch.nn`` counterpart, so parameters, initialisation, buffers, state_dict keys,
``extra_repr`` and ``isinstance`` checks are torch's own; only ``forward`` is routed to fusednorm. A checkpoint
saved from one loads strictly into the other, both ways.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusednorm import functional as F

__all__: list[str] = []

# ==== LayerNorm / RMSNorm ================================================================================


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` with fusednorm kernels. Same constructor:
    ``LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None)``.
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with fusednorm kernels. Same constructor:
    ``RMSNorm(normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None)``.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


__all__ += ["LayerNorm", "RMSNorm"]

# ==== GroupNorm / InstanceNorm (issue 3) =================================================================


# ==== BatchNorm / SyncBatchNorm (issue 4) ================================================================


# ==== Fused variants (issue 8) ===========================================================================
