"""SyncBatchNorm on torch.distributed: batch statistics over the global batch of every rank in a group.

Forward: each rank computes its (count, mean, M2) per channel with ``fusednorm::batch_norm_stats`` and ONE
``all_gather`` exchanges the (3, C) triples; every rank merges them the same way, with the parallel form of
Chan's formula (M2 = sum M2_r + sum n_r (mean_r - mean)^2, in float64), so the variance is never rebuilt from
a rounded invstd and never from E[x^2] - E[x]^2. Backward: ONE ``all_reduce`` of (sum(dy), sum(dy * xhat)).

Uneven batches and ranks with an empty batch work (an empty rank contributes count 0 and still joins both
collectives). Counts stay on the device, so neither pass waits for the host. Works with NCCL (CUDA) and gloo
(CPU). Weight and bias gradients are the local ones, as in torch: DDP averages them across ranks.

Note: torch's DistributedDataParallel refuses any ``torch.nn.SyncBatchNorm`` (subclasses included) inside a
CPU module, because torch's own kernels are GPU-only. fusednorm's run on CPU with gloo; to use them under DDP
on CPU, subclass DDP with a no-op ``_passing_sync_batchnorm_handle`` (see tests/test_sync_batch_norm.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from fusednorm.functional import check_batch_norm_args
from fusednorm.ops import BackendPinnedFunction, acc_dtype
from fusednorm.ops.batch_norm import update_running_stats


def sync_group(process_group=None):
    """The process group to synchronize over, or None when there is nothing to synchronize (torch.distributed
    unavailable or not initialized, or a group of one rank): then local statistics are used."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def merge_stats(stats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge per-rank (count, mean, M2) rows. stats: (R, 3, C) float64. Returns count, mean, M2, each (C,).

    Exact parallel form of Chan's merge; ranks with count 0 drop out (their mean/M2 are ignored)."""
    counts, means, m2s = stats[:, 0], stats[:, 1], stats[:, 2]
    total = counts.sum(dim=0)
    mean = (counts * means).sum(dim=0) / total
    dev = torch.where(counts > 0, means - mean, torch.zeros_like(means))
    m2 = m2s.sum(dim=0) + (counts * dev * dev).sum(dim=0)
    return total, mean, m2


class SyncBatchNormFunction(BackendPinnedFunction):
    """Training-mode BatchNorm over all ranks of ``group``; saves x, weight, global mean/rstd and count."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, group):
        c = x.shape[1]
        local = x.numel() // c
        acc = acc_dtype(x.dtype)
        mean, m2 = torch.ops.fusednorm.batch_norm_stats(x)  # zeros for an empty local batch
        packed = torch.stack([torch.full_like(mean, local, dtype=torch.float64), mean.double(), m2.double()])
        gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, packed, group=group)
        total, g_mean, g_m2 = merge_stats(torch.stack(gathered))
        update_running_stats(running_mean, running_var, g_mean, g_m2, total, momentum)
        mean = g_mean.to(acc)
        rstd = torch.rsqrt(g_m2 / total + eps).to(acc)
        y = torch.ops.fusednorm.batch_norm_apply(x, mean, rstd, weight, bias)
        ctx.save_for_backward(x, weight, bias, mean, rstd, total.to(acc))
        ctx.group = group
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd, total = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        sum_dy, sum_dy_xhat = torch.ops.fusednorm.batch_norm_bwd_reduce(dy, x, mean, rstd)  # local
        dx = None
        if need_x:  # every rank needs x's gradient or none does (as torch's SyncBatchNorm)
            sums = torch.stack([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
            # global means of dy and dy * xhat, so the kernel's count is 1 (the global count stays on device)
            means = sums / total
            dx = torch.ops.fusednorm.batch_norm_bwd_dx(dy, x, mean, rstd, weight, means[0], means[1], 1, True)
        dw = sum_dy_xhat.to(weight.dtype) if need_w else None
        db = sum_dy.to(bias.dtype) if need_b else None
        return dx, dw, db, None, None, None, None, None


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | Tensor,
    eps: float,
    group,
) -> Tensor:
    """Training-mode BatchNorm of input (N, C, *spatial) with statistics over every rank of ``group``.

    The local batch may be empty or differ in size between ranks. Running buffers (C,), when given, are
    updated in place with the global statistics (unbiased variance over the global count). Every rank must
    call this (and the backward) the same number of times.
    """
    # one value per channel is fine here: the other ranks contribute (torch checks it only for one rank)
    check_batch_norm_args(input, running_mean, running_var, weight, bias, True, eps, check_batch_size=False)
    c = input.shape[1]
    w = weight.reshape(c) if weight is not None else None
    b = bias.reshape(c) if bias is not None else None
    return SyncBatchNormFunction.apply(input, w, b, running_mean, running_var, momentum, float(eps), group)

