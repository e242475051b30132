"""Explicit byte model: the fewest bytes each op must move across memory, per mode.

GB/s in every report is ``bytes_moved(case) / median time``. The model counts each tensor the op must read
or write exactly once (an ideal kernel keeps everything else on chip), so a kernel that needs two passes
over a large input (e.g. BatchNorm statistics then normalization on maps larger than the cache) can reach at
most about 2/3 of the copy bandwidth in this unit; that is by design, the model states the floor.

Symbols (all in bytes): ``E`` one activation-sized tensor (numel x activation element size; for weight_norm the
weight v), ``P`` one per-feature parameter vector (features x parameter element size; features = hidden for row
norms, C for maps, O output rows for weight_norm), ``S`` one saved statistic vector in fp32 (fp64 for fp64
inputs): per row for row norms, per (n, group) for GroupNorm/InstanceNorm, per channel for BatchNorm, per (n, c)
for SwitchableNorm, per output row for weight_norm. forward+backward is forward plus backward (the input
is re-read by the backward; the statistics are written once and read once).

| op               | inference   | forward          | backward                       |
|------------------|-------------|------------------|--------------------------------|
| layer_norm       | 2E + 2P     | 2E + 2P + 2S     | 3E + 2S + 3P (X, dY, mean, rstd, W in; dX, dW, dB out) |
| rms_norm         | 2E + P      | 2E + P + S       | 3E + S + 2P (X, dY, rstd, W in; dX, dW out) |
| add_layer_norm   | 4E + 2P     | 4E + 2P + 2S     | 4E + 2S + 3P (H, dY, dH in; one dX=dResidual out) |
| add_rms_norm     | 4E + P      | 4E + P + S       | 4E + S + 2P                    |
| group_norm       | 2E + 2P     | 2E + 2P + 2S     | 3E + 2S + 3P                   |
| group_norm_silu  | 2E + 2P     | 2E + 2P + 2S     | 3E + 2S + 4P (B re-read for SiLU's derivative) |
| instance_norm    | 2E + 2P     | 2E + 2P + 2S     | 3E + 2S + 3P                   |
| batch_norm_train | 2E + 6P     | 2E + 6P + 2S     | 3E + 2S + 3P (running stats read + written = 4P) |
| batch_norm_eval  | 2E + 4P     | 2E + 4P          | 3E + 5P (X re-read for dW; running mean/var read) |
| layer_norm_2d    | 2E + 2P     | 2E + 2P + 2S     | 3E + 2S + 3P (statistics per (n, position)) |
| adaptive_layer_norm | 2E + 2P  | 2E + 2P + 2S     | 3E + 2S + 3P (P = one (B, D) scale or shift) |
| switchable_norm  | 2E + 6P     | 2E + 6P + 2S     | 3E + 2S + 3P (as BatchNorm train; S = per-plane mean, var) |
| weight_norm      | 2E + P      | 2E + P + S       | 3E + S + 2P (dW, V, G, norm in; dV, dG out) |

switchable_norm (training): one read of x gives each (n, c) plane's (mean, var), from which the layer and batch
statistics follow; saving those two (N, C) vectors is all backward needs. The (3,) mixing logits and their
gradients (at most 48 bytes) are left out. weight_norm: v (O, *K) is the "activation", g (O, 1, ...) the
parameter, the saved statistic is one norm per output row.
"""

from __future__ import annotations

import math

import torch

from fusednorm.bench.cases import DTYPES, Case

# (inference, forward, backward) as coefficients of (E, P, S)
_TABLE: dict[str, tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]] = {
    "layer_norm": ((2, 2, 0), (2, 2, 2), (3, 3, 2)),
    "rms_norm": ((2, 1, 0), (2, 1, 1), (3, 2, 1)),
    "add_layer_norm": ((4, 2, 0), (4, 2, 2), (4, 3, 2)),
    "add_rms_norm": ((4, 1, 0), (4, 1, 1), (4, 2, 1)),
    "group_norm": ((2, 2, 0), (2, 2, 2), (3, 3, 2)),
    "group_norm_silu": ((2, 2, 0), (2, 2, 2), (3, 4, 2)),
    "instance_norm": ((2, 2, 0), (2, 2, 2), (3, 3, 2)),
    "batch_norm_train": ((2, 6, 0), (2, 6, 2), (3, 3, 2)),
    "batch_norm_eval": ((2, 4, 0), (2, 4, 0), (3, 5, 0)),
    "layer_norm_2d": ((2, 2, 0), (2, 2, 2), (3, 3, 2)),
    "adaptive_layer_norm": ((2, 2, 0), (2, 2, 2), (3, 3, 2)),
    "switchable_norm": ((2, 6, 0), (2, 6, 2), (3, 3, 2)),
    "weight_norm": ((2, 1, 0), (2, 1, 1), (3, 2, 1)),
}


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def units(case: Case) -> tuple[int, int, int]:
    """(E, P, S) in bytes for ``case``: one activation tensor, one parameter vector, one statistic vector."""
    act, param = DTYPES[case.dtype]
    stat_elt = 8 if act == torch.float64 else 4
    e = case.numel * _elt(act)
    if case.op == "adaptive_layer_norm":  # the per-sample (B, D) conditioning vectors play the parameters' part
        return e, case.shape[0] * case.shape[-1] * _elt(act), (case.numel // case.shape[-1]) * stat_elt
    if case.op == "layer_norm_2d":
        return e, case.shape[1] * _elt(param), (case.numel // case.shape[1]) * stat_elt
    if case.op == "weight_norm":  # one norm and one g per output row (dim 0)
        return e, case.shape[0] * _elt(param), case.shape[0] * stat_elt
    if case.spec.kind == "rows":
        features, stats = case.shape[-1], case.numel // case.shape[-1]
    else:
        features = case.shape[1]
        if case.op in ("instance_norm", "switchable_norm"):
            stats = case.shape[0] * case.shape[1]
        elif case.op.startswith("group_norm"):
            stats = case.shape[0] * case.groups
        else:
            stats = case.shape[1]
    return e, features * _elt(param), stats * stat_elt


def coefficients(case: Case) -> tuple[int, int, int]:
    """The (E, P, S) multipliers for the case's op and mode (see the module table)."""
    infer, fwd, bwd = _TABLE[case.op]
    if case.mode == "inference":
        return infer
    if case.mode == "forward":
        return fwd
    if case.mode == "backward":
        return bwd
    return (fwd[0] + bwd[0], fwd[1] + bwd[1], fwd[2] + bwd[2])


def bytes_moved(case: Case) -> int:
    """Fewest bytes ``case`` must read plus write (the numerator of every GB/s figure)."""
    e, p, s = units(case)
    ce, cp, cs = coefficients(case)
    return ce * e + cp * p + cs * s


def formula(case: Case) -> str:
    """The byte model of ``case`` as text, e.g. ``2E + 2P + 2S``."""
    terms = [f"{c}{u}" if c != 1 else u for c, u in zip(coefficients(case), "EPS", strict=True) if c]
    return " + ".join(terms)


def gbps(case: Case, seconds: float) -> float:
    """GB/s (1e9 bytes per second) of ``case`` run in ``seconds``."""
    return bytes_moved(case) / seconds / 1e9 if seconds > 0 and math.isfinite(seconds) else float("nan")
