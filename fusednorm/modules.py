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


class GroupNorm(torch.nn.GroupNorm):
    """``torch.nn.GroupNorm`` with fusednorm kernels. Same constructor:
    ``GroupNorm(num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None)``.
    Input (N, C, *), contiguous or channels_last (kept in the output).
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class _FusedInstanceNormForward:
    """``forward`` of torch's ``_InstanceNorm`` (same checks, warning and unbatched handling) on fusednorm."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        feature_dim = input.dim() - self._get_no_batch_dim()
        if input.size(feature_dim) != self.num_features:
            if self.affine:
                raise ValueError(
                    f"expected input's size at dim={feature_dim} to match num_features"
                    f" ({self.num_features}), but got: {input.size(feature_dim)}."
                )
            import warnings  # only on this rare path; modules.py's shared import block is not this section's

            warnings.warn(
                f"input's size at dim={feature_dim} does not match num_features. "
                "You can silence this warning by not passing in num_features, "
                "which is not used because affine=False",
                stacklevel=2,
            )
        unbatched = input.dim() == self._get_no_batch_dim()
        x = input.unsqueeze(0) if unbatched else input
        y = F.instance_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )
        return y.squeeze(0) if unbatched else y


class InstanceNorm1d(_FusedInstanceNormForward, torch.nn.InstanceNorm1d):
    """``torch.nn.InstanceNorm1d`` with fusednorm kernels. Same constructor: ``InstanceNorm1d(num_features,
    eps=1e-5, momentum=0.1, affine=False, track_running_stats=False, device=None, dtype=None)``; input (N, C, L)
    or (C, L)."""


class InstanceNorm2d(_FusedInstanceNormForward, torch.nn.InstanceNorm2d):
    """``torch.nn.InstanceNorm2d`` with fusednorm kernels (same constructor as torch's); input (N, C, H, W) or
    (C, H, W), contiguous or channels_last (kept in the output)."""


class InstanceNorm3d(_FusedInstanceNormForward, torch.nn.InstanceNorm3d):
    """``torch.nn.InstanceNorm3d`` with fusednorm kernels (same constructor as torch's); input (N, C, D, H, W) or
    (C, D, H, W), contiguous or channels_last_3d (kept in the output)."""


__all__ += ["GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


# ==== BatchNorm / SyncBatchNorm (issue 4) ================================================================


def _batch_norm_plan(bn: torch.nn.modules.batchnorm._BatchNorm) -> tuple[bool, float | Tensor, bool]:
    """torch's _BatchNorm.forward bookkeeping: (use batch statistics, momentum factor, pass the buffers).

    Bumps num_batches_tracked in training. momentum=None (cumulative average) gives the factor
    1 / num_batches_tracked as a 0-dim device tensor instead of a Python float, so no host sync happens.
    """
    factor: float | Tensor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = torch.reciprocal(bn.num_batches_tracked.to(torch.float64))
    bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
    pass_buffers = not bn.training or bn.track_running_stats
    return bn_training, factor, pass_buffers


class _FusedBatchNormForward:
    """forward() shared by BatchNorm1d/2d/3d: torch's running-statistics rules, fusednorm kernels."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        bn_training, factor, pass_buffers = _batch_norm_plan(self)
        return F.batch_norm(
            input,
            self.running_mean if pass_buffers else None,
            self.running_var if pass_buffers else None,
            self.weight,
            self.bias,
            bn_training,
            factor,
            self.eps,
        )


class BatchNorm1d(_FusedBatchNormForward, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` with fusednorm kernels; input (N, C) or (N, C, L). Same constructor:
    ``BatchNorm1d(num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None,
    dtype=None)``.
    """


class BatchNorm2d(_FusedBatchNormForward, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` with fusednorm kernels; input (N, C, H, W), NCHW or channels_last (kept)."""


class BatchNorm3d(_FusedBatchNormForward, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` with fusednorm kernels; input (N, C, D, H, W), NCDHW or channels_last_3d."""


class SyncBatchNorm(torch.nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` with fusednorm kernels and collectives (``fusednorm.distributed``).

    Same constructor: ``SyncBatchNorm(num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, process_group=None, device=None, dtype=None)``. In training with a process
    group of more than one rank, statistics cover the whole (uneven, possibly locally empty) global batch:
    one all_gather of (count, mean, M2) per channel in forward, one all_reduce in backward. Works with NCCL
    and with gloo on CPU. Otherwise it behaves as BatchNorm with local statistics.
    """

    def forward(self, input: Tensor) -> Tensor:
        from fusednorm.distributed import sync_batch_norm, sync_group

        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        bn_training, factor, pass_buffers = _batch_norm_plan(self)
        running_mean = self.running_mean if pass_buffers else None
        running_var = self.running_var if pass_buffers else None
        group = sync_group(self.process_group) if bn_training and self.training else None
        if group is None:
            return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training, factor,
                                self.eps)
        return sync_batch_norm(input, running_mean, running_var, self.weight, self.bias, factor, self.eps, group)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Replace every BatchNorm*D (torch's or fusednorm's) in ``module`` by a ``fusednorm.SyncBatchNorm``
        sharing its parameters and buffers; returns the converted module (``module`` itself if not a BN)."""
        out = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group, bias=module.bias is not None)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out


__all__ += ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"]


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


class LayerNorm2d(torch.nn.LayerNorm):
    """Channels-first LayerNorm (ConvNeXt / timm ``LayerNorm2d``): normalizes (N, C, *spatial) over C.

    ``LayerNorm2d(num_channels, eps=1e-6, elementwise_affine=True, bias=True, device=None, dtype=None)``; weight
    and bias are (C,) with ``torch.nn.LayerNorm``'s state_dict keys. NCHW and channels_last inputs are read in
    place through their strides (no permute copies); ``bias=False`` gives the bias-free form.
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-6,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_channels, eps, elementwise_affine, bias, device=device, dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm_2d(input, self.weight, self.bias, self.eps)


class SwitchableNorm2d(torch.nn.Module):
    """SwitchableNorm (Luo et al.) for (N, C, H, W): learned softmax mixture of instance, layer and batch stats.

    ``SwitchableNorm2d(num_features, eps=1e-5, momentum=0.1, using_moving_average=True, device=None,
    dtype=None)``. Parameters: weight, bias (C,); mean_weight, var_weight (3,) (logits over instance, layer,
    batch; separate for means and variances). Buffers: running_mean, running_var (C,) (biased batch
    statistics), num_batches_tracked. Eval mode uses the running batch statistics. ``using_moving_average=False``
    keeps the cumulative average of the batch statistics instead of a momentum average.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        using_moving_average: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.using_moving_average = using_moving_average
        self.weight = torch.nn.Parameter(torch.ones(num_features, **kw))
        self.bias = torch.nn.Parameter(torch.zeros(num_features, **kw))
        self.mean_weight = torch.nn.Parameter(torch.ones(3, **kw))
        self.var_weight = torch.nn.Parameter(torch.ones(3, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.switchable_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, self.mean_weight, self.var_weight,
            self.training, self.momentum, self.eps, self.using_moving_average, self.num_batches_tracked,
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, " \
               f"using_moving_average={self.using_moving_average}"


class _FusedWeightNorm(torch.nn.Module):
    """Parametrization computing w = g * v / ||v|| with the fused kernel (torch's ``_WeightNorm`` contract)."""

    def __init__(self, dim: int | None = 0) -> None:
        super().__init__()
        self.dim = -1 if dim is None else dim

    def forward(self, weight_g: Tensor, weight_v: Tensor) -> Tensor:
        return F.weight_norm_fn(weight_v, weight_g, self.dim)

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return torch.norm_except_dim(weight, 2, self.dim), weight


def weight_norm(module: torch.nn.Module, name: str = "weight", dim: int | None = 0) -> torch.nn.Module:
    """``torch.nn.utils.parametrizations.weight_norm`` with a fused kernel for w = g * v / ||v|| and its backward.

    Registers a parametrization on ``module.<name>``: state_dict keys ``parametrizations.<name>.original0`` (g)
    and ``.original1`` (v), exactly as torch's; ``torch.nn.utils.parametrize.remove_parametrizations`` works, and
    old ``<name>_g`` / ``<name>_v`` checkpoints load. Returns the module.
    """
    torch.nn.utils.parametrize.register_parametrization(module, name, _FusedWeightNorm(dim), unsafe=True)

    def _compat_hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        g_key, v_key = f"{prefix}{name}_g", f"{prefix}{name}_v"
        if g_key in state_dict and v_key in state_dict:
            state_dict[f"{prefix}parametrizations.{name}.original0"] = state_dict.pop(g_key)
            state_dict[f"{prefix}parametrizations.{name}.original1"] = state_dict.pop(v_key)

    module._register_load_state_dict_pre_hook(_compat_hook)
    return module


__all__ += ["AddLayerNorm", "AddRMSNorm", "LayerNorm2d", "SwitchableNorm2d", "weight_norm"]
