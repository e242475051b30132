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


class AddLayerNorm(torch.nn.LayerNorm):
    """Fused residual-add (+ dropout) + LayerNorm over the last dim: ``forward(x, residual=None)``.

    ``AddLayerNorm(hidden_size, eps=1e-5, elementwise_affine=True, bias=True, dropout_p=0.0, prenorm=False,
    residual_in_fp32=False, device=None, dtype=None)``. Parameters and state_dict keys (weight, bias) are
    ``torch.nn.LayerNorm``'s. Dropout on x is active in training mode only. With ``prenorm`` the forward returns
    (y, s) where s = dropout(x) + residual is the residual stream for the next block.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        dropout_p: float = 0.0,
        prenorm: bool = False,
        residual_in_fp32: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(hidden_size, eps, elementwise_affine, bias, device=device, dtype=dtype)
        F._check_dropout_p(dropout_p)
        self.dropout_p, self.prenorm, self.residual_in_fp32 = dropout_p, prenorm, residual_in_fp32

    def forward(self, x: Tensor, residual: Tensor | None = None):
        return F.add_layer_norm(
            x, residual, self.weight, self.bias, self.eps, self.dropout_p if self.training else 0.0,
            self.prenorm, self.residual_in_fp32,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout_p={self.dropout_p}, prenorm={self.prenorm}, " \
               f"residual_in_fp32={self.residual_in_fp32}"


class AddRMSNorm(torch.nn.RMSNorm):
    """Fused residual-add (+ dropout) + RMSNorm over the last dim: ``forward(x, residual=None)``.

    ``AddRMSNorm(hidden_size, eps=None, elementwise_affine=True, dropout_p=0.0, prenorm=False,
    residual_in_fp32=False, device=None, dtype=None)``; state_dict key weight like ``torch.nn.RMSNorm``.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float | None = None,
        elementwise_affine: bool = True,
        dropout_p: float = 0.0,
        prenorm: bool = False,
        residual_in_fp32: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(hidden_size, eps, elementwise_affine, device=device, dtype=dtype)
        F._check_dropout_p(dropout_p)
        self.dropout_p, self.prenorm, self.residual_in_fp32 = dropout_p, prenorm, residual_in_fp32

    def forward(self, x: Tensor, residual: Tensor | None = None):
        return F.add_rms_norm(
            x, residual, self.weight, self.eps, self.dropout_p if self.training else 0.0,
            self.prenorm, self.residual_in_fp32,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout_p={self.dropout_p}, prenorm={self.prenorm}, " \
               f"residual_in_fp32={self.residual_in_fp32}"


__all__ += ["AddLayerNorm", "AddRMSNorm"]
