"""The fused-variant op families (issue 8), gathered for ``fusednorm.functional``.

Importing this module registers every ``fusednorm::*`` variant custom op: add_norm (residual-add + dropout +
LayerNorm/RMSNorm), layer_norm_cf (channels-first LayerNorm), ada_norm (adaptive LayerNorm/RMSNorm),
weight_norm and switchable_norm.
"""

from __future__ import annotations

from fusednorm.ops.ada_norm import adaptive_norm
from fusednorm.ops.add_norm import add_norm_rows
from fusednorm.ops.layer_norm_cf import layer_norm_channels_first
from fusednorm.ops.switchable_norm import switchable_norm
from fusednorm.ops.weight_norm import weight_norm_apply

__all__ = ["adaptive_norm", "add_norm_rows", "layer_norm_channels_first", "switchable_norm", "weight_norm_apply"]
