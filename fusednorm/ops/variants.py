"""The fused-variant op families (issue 8), gathered for ``fusednorm.functional``.

Importing this module registers every ``fusednorm::*`` variant custom op: add_norm (residual-add + dropout +
LayerNorm/RMSNorm), layer_norm_cf (channels-first LayerNorm), ada_norm (adaptive LayerNorm), weight_norm and
switchable_norm.
"""

from __future__ import annotations

from fusednorm.ops.add_norm import add_norm_rows

__all__ = ["add_norm_rows"]
