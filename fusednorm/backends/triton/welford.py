"""Welford/Chan statistics shared by every Triton kernel.

A partial statistic is (count, mean, M2) with M2 = sum((x - mean)^2). Inside one register tile the exact
two-step form (mean first, then centred squares) is used; tiles, programs and chunks are combined with Chan's
parallel formula. Never E[x^2] - E[x]^2: with |mean| >> std it cancels catastrophically.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def welford_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan's merge of two partials (count, mean, M2); an empty side (count 0) is handled exactly."""
    count = count_a + count_b
    delta = mean_b - mean_a
    # frac = count_b / count, 0 when both sides are empty (avoids 0/0 in masked lanes)
    frac = tl.where(count > 0, count_b / tl.maximum(count, 1.0), 0.0)
    mean = mean_a + delta * frac
    m2 = m2_a + m2_b + delta * delta * count_a * frac
    return count, mean, m2


@triton.jit
def welford_combine(mean_a, m2_a, count_a, mean_b, m2_b, count_b):
    """``welford_merge`` in the argument order ``tl.reduce`` expects for a (mean, M2, count) tuple."""
    count, mean, m2 = welford_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b)
    return mean, m2, count


@triton.jit
def row_stats(x, mask, count):
    """Exact two-step (mean, M2) of each row of the (R, B) tile ``x`` over its ``mask``-ed lanes.

    ``count`` is the number of valid lanes per row (scalar or (R,)); masked lanes may hold anything finite.
    Returns mean (R,) and M2 (R,).
    """
    mean = tl.sum(tl.where(mask, x, 0.0), axis=1) / tl.maximum(count, 1.0)
    centred = tl.where(mask, x - mean[:, None], 0.0)
    return mean, tl.sum(centred * centred, axis=1)


@triton.jit
def row_shift(x_rows, row_mask):
    """The first element of each row (R,), in x's dtype (0 for masked rows): the shift K of shifted statistics.

    Statistics of x - K (mean = K + mean(x - K), M2 from (x - K) - mean(x - K)) carry no large offset, so with
    |mean| >> std the mean is not limited by an fp32 sum of large values. ``x_rows`` points at each row's start
    (R, 1); the element is in the same cache line as the row's first load, so the data is still read once.
    """
    return tl.sum(tl.load(x_rows, mask=row_mask[:, None], other=0.0), axis=1)
