"""Triton kernels for GroupNorm (InstanceNorm is GroupNorm with one channel per group).

Data model. ``x`` is (N, C, *spatial); the spatial dims are flattened to one axis of S elements, so a sample is a
(C, S) matrix with one unit-stride axis: S in NCHW (``CHANNELS_LAST=False``), C in NHWC / NDHWC
(``CHANNELS_LAST=True``; inputs with S == 1 also take it, their channels being contiguous). The kernels read both
layouts natively through a runtime stride for the other axis; nothing is copied to NCHW. Group (n, g) is the
(Cg, S) sub-matrix of channels [g*Cg, (g+1)*Cg), cut into (BLOCK_C, BLOCK_S) tiles numbered channel-block-major.

Split reductions. The grid is (N*G, SPLIT): each group's tiles are divided into SPLIT contiguous ranges so that
batch-1 / few-group shapes still fill the machine. SPLIT is a runtime value (it never recompiles); the tile shape
depends only on coarse buckets of Cg or S and the layout.

Forward (two kernels):
1. ``group_norm_stats_kernel``: each program reduces its tiles to one (count, mean, M2) partial (exact two-step
   statistics inside a tile, Chan's formula across tiles).
2. ``group_norm_apply_kernel``: each program merges its group's SPLIT partials (Chan, fixed order), computes
   mean/rstd/var (program 0 of the group stores them), then normalizes its tiles with the fused per-channel affine
   and optional SiLU.

Backward (two kernels, three with SiLU, no atomics, every reduction in a fixed order):
1. ``group_norm_bwd_reduce_kernel``: per program, the group sums sum(g) and sum(g * xhat) (g = dL/dxhat, the SiLU
   backward included) into (N*G, SPLIT) partials, and per-channel dW/dB partials into an (N*SPLIT, C) buffer in
   which each (program, channel) slot is written by exactly one program, once; the host sums that buffer.
2. ``group_norm_bwd_dx_kernel``: merges the group sums and writes dX in one more pass.
xhat is recomputed as ((x - mean) - e) * rstd with e = mean(x - mean) over the group: the saved fp32 mean carries
half an ulp of |mean| of rounding, and dX cancels when |mean| >> std. Without SiLU every group sum is linear in xhat,
so the reduce kernel also sums the uncorrected xhat (that sum is e * rstd * count) and the correction is applied
after (no extra read); with SiLU a third kernel, ``group_norm_bwd_centre_kernel``, sums it first (one more read of
X). The host merges those partials into e (N*G,) in a fixed order.

Statistics are fp32 (fp64 for fp64 input), of x - K with K the group's first element (the same K in every program
of a group): a tile's sum then carries no large offset, and the forward normalizes (x - K) - mean(x - K), so the
output is not limited by the rounding of a large fp32 mean (1e4 + randn: ~1e-7 relative instead of torch's ~5e-4).
All offsets are 64-bit. Integer arguments are specialized by Triton as usual (== 1, divisible by 16); every kernel
also compiles with all of them constexpr 1.

Known limits: channels_last groups with few channels (InstanceNorm: Cg == 1) read (BLOCK_S, Cg) strips with
stride C, which wastes sector bandwidth; a tile spanning several groups would fix that. The forward and the
backward each read X (and dY) twice (stats then apply), the second time mostly from L2 for typical sizes.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusednorm.backends.triton.welford import welford_combine, welford_merge

# Elements per tile (a power of two); a tile is (BLOCK_C, BLOCK_S) with BLOCK_C * BLOCK_S == TILE. fp64 tiles are
# half as large: 8 fp64 values per thread pushed the backward past 128 registers into spills.
TILE = 2048
TILE_FP64 = 1024
NUM_WARPS = 8
# Partials merged per step when a group's SPLIT partials are combined (fixed: SPLIT may change with the batch).
PARTIAL_BLOCK = 64
# Tile width along the unit-stride axis: S buckets for NCHW, Cg buckets for channels_last.
NCHW_BLOCK_S = (16, 64, 256, 1024)
NHWC_BLOCK_C = (1, 2, 4, 8, 16, 32, 64, 128)
# Programs per SM the split aims for.
PROGRAMS_PER_SM = 4


# ---- kernels ---------------------------------------------------------------------------------------------


@triton.jit
def _offsets(tc, ts, stride_o, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """int64 offsets (BLOCK_C, BLOCK_S) of tile (tc, ts) from the group's base; ``stride_o`` is the stride of the
    axis that is not unit-stride."""
    c64 = (tc * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    s64 = (ts * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    if CHANNELS_LAST:
        return c64[:, None] + s64[None, :] * stride_o
    else:
        return c64[:, None] * stride_o + s64[None, :]


@triton.jit
def _tile(tc, ts, cg, S, stride_o, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Channel indices within the group (BLOCK_C,), offsets (see ``_offsets``) and mask of tile (tc, ts)."""
    c = tc * BLOCK_C + tl.arange(0, BLOCK_C)
    s = ts * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = (c < cg)[:, None] & (s < S)[None, :]
    return c, _offsets(tc, ts, stride_o, CHANNELS_LAST, BLOCK_C, BLOCK_S), mask


@triton.jit
def _group_base(P, n, c_first, stride_n, stride_c, CHANNELS_LAST: tl.constexpr):
    """Pointer to element (n, c_first, spatial 0) of a (N, C, S) view: channels at unit stride when channels_last,
    else stride_c apart. Offsets in int64 (the tensor may exceed 2**31 elements)."""
    if CHANNELS_LAST:
        return P + n.to(tl.int64) * stride_n + c_first
    return P + n.to(tl.int64) * stride_n + c_first * stride_c


@triton.jit
def _tile_range(tiles_s, tiles_per_prog, num_tiles):
    """This program's tiles [t0, t1) and the channel blocks [tc0, tc1] they touch."""
    t0 = tl.program_id(1) * tiles_per_prog
    t1 = tl.minimum(t0 + tiles_per_prog, num_tiles)
    return t0, t1, t0 // tiles_s, (t1 - 1) // tiles_s


@triton.jit
def _recip_ge1(d):
    """1 / d for d >= 1. fp32: a plain division (div.full, no call). fp64: an fp32 seed refined by two Newton steps
    to fp64 accuracy, because an fp64 IEEE division compiles to a slow-path subroutine whose call needs a stack
    frame; d beyond the fp32 range gives 0 (the true value is then below 3e-39)."""
    if d.dtype == tl.float64:
        r = (1.0 / d.to(tl.float32)).to(tl.float64)
        r = r * (2.0 - d * r)
        return r * (2.0 - d * r)
    else:
        return 1.0 / d


@triton.jit
def _silu(y):
    """silu(y) = y * sigmoid(y)."""
    if y.dtype == tl.float64:
        return y * _recip_ge1(1.0 + tl.exp(-y))
    else:
        return y / (1.0 + tl.exp(-y))


@triton.jit
def _silu_grad(dy, pre):
    """d silu(pre) / d pre * dy, with silu(p) = p * sigmoid(p)."""
    sig = _recip_ge1(1.0 + tl.exp(-pre))
    return dy * sig * (1.0 + pre * (1.0 - sig))


@triton.jit
def group_norm_stats_kernel(
    X, PCount, PMean, PM2,
    stride_xn, stride_xo, G, cg, S, tiles_s, tiles_per_prog, num_tiles,
    CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    acc_ty = PMean.dtype.element_ty
    ng = tl.program_id(0)
    n = ng // G
    g = ng - n * G
    x_base = _group_base(X, n, (g * cg).to(tl.int64), stride_xn, stride_xo, CHANNELS_LAST)
    # Statistics of x - K with K the group's first element, the same shift in every program of the group: with
    # |mean| >> std a tile's plain fp32 sum would round away the low digits of its mean; x - K is exact there.
    shift = tl.load(x_base).to(acc_ty)
    t0, t1, tc0, tc1 = _tile_range(tiles_s, tiles_per_prog, num_tiles)
    count = tl.zeros([1], dtype=acc_ty)
    mean = tl.zeros([1], dtype=acc_ty)
    m2 = tl.zeros([1], dtype=acc_ty)
    for tc in range(tc0, tc1 + 1):
        rows = tl.minimum(cg - tc * BLOCK_C, BLOCK_C)
        for ts in range(tl.maximum(t0 - tc * tiles_s, 0), tl.minimum(t1 - tc * tiles_s, tiles_s)):
            c, offs, mask = _tile(tc, ts, cg, S, stride_xo, CHANNELS_LAST, BLOCK_C, BLOCK_S)
            x = tl.where(mask, tl.load(x_base + offs, mask=mask, other=0.0).to(acc_ty) - shift, 0.0)
            # Exact two-step statistics of the tile, then Chan's merge into the running partial.
            t_count = (rows * tl.minimum(S - ts * BLOCK_S, BLOCK_S)).to(acc_ty)
            t_mean = tl.sum(tl.sum(x, axis=1), axis=0) / t_count
            d = tl.where(mask, x - t_mean, 0.0)
            t_m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
            count, mean, m2 = welford_merge(count, mean, m2, t_count, t_mean, t_m2)
    p = ng.to(tl.int64) * tl.num_programs(1) + tl.program_id(1) + tl.arange(0, 1)
    tl.store(PCount + p, count)
    tl.store(PMean + p, mean)
    tl.store(PM2 + p, m2)


@triton.jit
def _merge_partials(PCount, PMean, PM2, row, split, PBLOCK: tl.constexpr):
    """Chan-merge the ``split`` partials of group ``row`` in a fixed order. Returns (count, mean, M2), each (1,)."""
    acc_ty = PMean.dtype.element_ty
    count = tl.zeros([1], dtype=acc_ty)
    mean = tl.zeros([1], dtype=acc_ty)
    m2 = tl.zeros([1], dtype=acc_ty)
    base = row.to(tl.int64) * split
    for p0 in range(0, split, PBLOCK):
        p = p0 + tl.arange(0, PBLOCK)
        pm = p < split
        b_count = tl.load(PCount + base + p, mask=pm, other=0.0)
        b_mean = tl.load(PMean + base + p, mask=pm, other=0.0)
        b_m2 = tl.load(PM2 + base + p, mask=pm, other=0.0)
        b_mean, b_m2, b_count = tl.reduce((b_mean, b_m2, b_count), 0, welford_combine)
        count, mean, m2 = welford_merge(count, mean, m2, b_count, b_mean, b_m2)
    return count, mean, m2


@triton.jit
def group_norm_apply_kernel(
    X, Y, W, B, PCount, PMean, PM2, Mean, Rstd, Var,
    stride_xn, stride_xo, stride_yn, stride_yo, G, cg, S, tiles_s, tiles_per_prog, num_tiles, eps,
    CHANNELS_LAST: tl.constexpr, AFFINE: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, PBLOCK: tl.constexpr,
):
    acc_ty = PMean.dtype.element_ty
    ng = tl.program_id(0)
    n = ng // G
    g = ng - n * G
    split = tl.num_programs(1)
    # Partials are statistics of x - K (see the stats kernel); ``mean`` here is the shifted mean.
    count, mean, m2 = _merge_partials(PCount, PMean, PM2, ng, split, PBLOCK)
    var = m2 / count
    rstd = 1.0 / tl.sqrt(var + eps)
    first = tl.arange(0, 1) + tl.program_id(1) == 0
    tl.store(Rstd + ng + tl.arange(0, 1), rstd, mask=first)
    tl.store(Var + ng + tl.arange(0, 1), var, mask=first)
    # Broadcastable (1, 1) forms of the group statistics.
    mean2 = tl.reshape(mean, (1, 1))
    rstd2 = tl.reshape(rstd, (1, 1))
    c_first = (g * cg).to(tl.int64)
    x_base = _group_base(X, n, c_first, stride_xn, stride_xo, CHANNELS_LAST)
    y_base = _group_base(Y, n, c_first, stride_yn, stride_yo, CHANNELS_LAST)
    shift = tl.load(x_base).to(acc_ty)
    tl.store(Mean + ng + tl.arange(0, 1), shift + mean, mask=first)
    t0, t1, tc0, tc1 = _tile_range(tiles_s, tiles_per_prog, num_tiles)
    for tc in range(tc0, tc1 + 1):
        if AFFINE:
            c = tc * BLOCK_C + tl.arange(0, BLOCK_C)
            # Per-channel scale rstd * w; the bias is added after scaling the centred x (not folded into a shift
            # b - mean * scale, which would cancel when |mean| >> std).
            w = tl.load(W + c_first + c, mask=c < cg, other=0.0).to(acc_ty)
            bb = tl.load(B + c_first + c, mask=c < cg, other=0.0).to(acc_ty)
            scale = w[:, None] * rstd2
            bias2 = bb[:, None]
        for ts in range(tl.maximum(t0 - tc * tiles_s, 0), tl.minimum(t1 - tc * tiles_s, tiles_s)):
            c, offs, mask = _tile(tc, ts, cg, S, stride_xo, CHANNELS_LAST, BLOCK_C, BLOCK_S)
            xc = (tl.load(x_base + offs, mask=mask, other=0.0).to(acc_ty) - shift) - mean2
            if AFFINE:
                y = xc * scale + bias2
            else:
                y = xc * rstd2
            if SILU:
                y = _silu(y)
            if stride_yo == stride_xo:
                y_offs = offs
            else:
                y_offs = _offsets(tc, ts, stride_yo, CHANNELS_LAST, BLOCK_C, BLOCK_S)
            tl.store(y_base + y_offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _grad_tile(x, dy, mask, mean2, e2, rstd2, w, bb, AFFINE: tl.constexpr, SILU: tl.constexpr):
    """xhat = ((x - mean) - e) * rstd and dL/d(affine output) of one tile (masked lanes zero); ``e`` is the group's
    mean of x - mean (the saved fp32 mean's rounding), subtracted on its own: mean + e would round again."""
    xhat = tl.where(mask, ((x - mean2) - e2) * rstd2, 0.0)
    if SILU:
        if AFFINE:
            pre = xhat * w[:, None] + bb[:, None]
        else:
            pre = xhat
        dy = _silu_grad(dy, pre)
    dy = tl.where(mask, dy, 0.0)
    return xhat, dy


@triton.jit
def _group_count(cg, S, acc_ty: tl.constexpr):
    """Elements of a group, (1,) in ``acc_ty``; an int64 product: a group may hold more than 2^31 elements (and cg,
    S may be specialized to constexpr 1)."""
    return ((tl.zeros([1], dtype=tl.int64) + cg) * S).to(acc_ty)


@triton.jit
def group_norm_bwd_centre_kernel(
    X, Mean, Rstd, PSumD,
    stride_xn, stride_xo, G, cg, S, tiles_s, tiles_per_prog, num_tiles,
    CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Per program, sum((x - mean) * rstd) over its tiles into PSumD (N*G, SPLIT): e * rstd * count, with e the
    saved mean's rounding. The SiLU backward needs e before its first pass (g depends on xhat nonlinearly); without
    SiLU the reduce kernel sums the same quantity itself."""
    acc_ty = PSumD.dtype.element_ty
    ng = tl.program_id(0)
    n = ng // G
    g = ng - n * G
    x_base = _group_base(X, n, (g * cg).to(tl.int64), stride_xn, stride_xo, CHANNELS_LAST)
    mean2 = tl.reshape(tl.load(Mean + ng + tl.arange(0, 1)), (1, 1))
    rstd2 = tl.reshape(tl.load(Rstd + ng + tl.arange(0, 1)), (1, 1))
    t0, t1, tc0, tc1 = _tile_range(tiles_s, tiles_per_prog, num_tiles)
    sum_d = tl.zeros([1], dtype=acc_ty)
    for tc in range(tc0, tc1 + 1):
        for ts in range(tl.maximum(t0 - tc * tiles_s, 0), tl.minimum(t1 - tc * tiles_s, tiles_s)):
            c, offs, mask = _tile(tc, ts, cg, S, stride_xo, CHANNELS_LAST, BLOCK_C, BLOCK_S)
            x = tl.load(x_base + offs, mask=mask, other=0.0).to(acc_ty)
            sum_d += tl.sum(tl.sum(tl.where(mask, (x - mean2) * rstd2, 0.0), axis=1), axis=0)
    tl.store(PSumD + ng.to(tl.int64) * tl.num_programs(1) + tl.program_id(1) + tl.arange(0, 1), sum_d)


@triton.jit
def group_norm_bwd_reduce_kernel(
    DY, X, W, B, Mean, Rstd, PSumG, PSumGX, PSumD, DWp, DBp,
    stride_dyn, stride_dyo, stride_xn, stride_xo, C, G, cg, S, tiles_s, tiles_per_prog, num_tiles,
    CHANNELS_LAST: tl.constexpr, AFFINE: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    acc_ty = Rstd.dtype.element_ty
    ng = tl.program_id(0)
    sp = tl.program_id(1)
    n = ng // G
    g = ng - n * G
    mean2 = tl.reshape(tl.load(Mean + ng + tl.arange(0, 1)), (1, 1))
    rstd2 = tl.reshape(tl.load(Rstd + ng + tl.arange(0, 1)), (1, 1))
    # The saved mean's rounding e = mean(x - mean) over the group. With SiLU, g depends on xhat nonlinearly, so e
    # is needed now: PSumD then holds e per group (N*G,), from the centre kernel's partials. Without SiLU everything
    # here is linear in xhat: this pass uses xhat + e * rstd, writes its partial sum of that xhat to PSumD
    # (N*G, SPLIT), and the dx kernel / host subtract e * rstd * sum(g) after.
    if SILU:
        e2 = tl.reshape(tl.load(PSumD + ng + tl.arange(0, 1)), (1, 1))
    else:
        e2 = tl.zeros([1, 1], dtype=acc_ty)
        sum_d = tl.zeros([1], dtype=acc_ty)
    c_first = (g * cg).to(tl.int64)
    x_base = _group_base(X, n, c_first, stride_xn, stride_xo, CHANNELS_LAST)
    dy_base = _group_base(DY, n, c_first, stride_dyn, stride_dyo, CHANNELS_LAST)
    # This program's row of the (N * SPLIT, C) dW/dB partials: slots of this group's channels, written once.
    p_row = (n.to(tl.int64) * tl.num_programs(1) + sp) * C + c_first
    sum_g = tl.zeros([1], dtype=acc_ty)
    sum_gx = tl.zeros([1], dtype=acc_ty)
    t0, t1, tc0, tc1 = _tile_range(tiles_s, tiles_per_prog, num_tiles)
    for tc in range(tc0, tc1 + 1):
        c = tc * BLOCK_C + tl.arange(0, BLOCK_C)
        if AFFINE:
            w = tl.load(W + c_first + c, mask=c < cg, other=0.0).to(acc_ty)
            bb = tl.load(B + c_first + c, mask=c < cg, other=0.0).to(acc_ty)
        else:
            w = tl.zeros([BLOCK_C], dtype=acc_ty)
            bb = w
        dw_acc = tl.zeros([BLOCK_C], dtype=acc_ty)
        db_acc = tl.zeros([BLOCK_C], dtype=acc_ty)
        d_acc = tl.zeros([BLOCK_C], dtype=acc_ty)
        for ts in range(tl.maximum(t0 - tc * tiles_s, 0), tl.minimum(t1 - tc * tiles_s, tiles_s)):
            cc, offs, mask = _tile(tc, ts, cg, S, stride_xo, CHANNELS_LAST, BLOCK_C, BLOCK_S)
            if stride_dyo == stride_xo:
                dy_offs = offs
            else:
                dy_offs = _offsets(tc, ts, stride_dyo, CHANNELS_LAST, BLOCK_C, BLOCK_S)
            x = tl.load(x_base + offs, mask=mask, other=0.0).to(acc_ty)
            dy = tl.load(dy_base + dy_offs, mask=mask, other=0.0).to(acc_ty)
            xhat, dy = _grad_tile(x, dy, mask, mean2, e2, rstd2, w, bb, AFFINE, SILU)
            if not SILU:
                # Per channel like dW/dB, reduced once per channel block: the per-tile full reduction spilled in
                # one fp64 configuration, this form in another (ptxas), so it only covers one-channel tiles.
                if BLOCK_C == 1:
                    d_acc += tl.sum(xhat, axis=1)
                else:
                    sum_d += tl.sum(tl.sum(xhat, axis=1), axis=0)
            if AFFINE:
                dw_acc += tl.sum(dy * xhat, axis=1)
                db_acc += tl.sum(dy, axis=1)
                gg = dy * w[:, None]
            else:
                gg = dy
            sum_g += tl.sum(tl.sum(gg, axis=1), axis=0)
            sum_gx += tl.sum(tl.sum(gg * xhat, axis=1), axis=0)
        if AFFINE:
            tl.store(DWp + p_row + c, dw_acc, mask=c < cg)
            tl.store(DBp + p_row + c, db_acc, mask=c < cg)
        if not SILU:
            if BLOCK_C == 1:
                sum_d += tl.sum(d_acc, axis=0)
    p = ng.to(tl.int64) * tl.num_programs(1) + sp + tl.arange(0, 1)
    tl.store(PSumG + p, sum_g)
    tl.store(PSumGX + p, sum_gx)
    if not SILU:
        tl.store(PSumD + p, sum_d)


@triton.jit
def group_norm_bwd_dx_kernel(
    DY, X, W, B, Mean, Rstd, PSumG, PSumGX, E, DX,
    stride_dyn, stride_dyo, stride_xn, stride_xo, stride_dxn, stride_dxo,
    G, cg, S, tiles_s, tiles_per_prog, num_tiles,
    CHANNELS_LAST: tl.constexpr, AFFINE: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, PBLOCK: tl.constexpr,
):
    acc_ty = Rstd.dtype.element_ty
    ng = tl.program_id(0)
    n = ng // G
    g = ng - n * G
    split = tl.num_programs(1)
    # Group sums of g and g * xhat, merged in a fixed order; e (N*G,), the saved mean's rounding, merged on the host
    # (an fp64 division here needed a stack frame).
    sum_g = tl.zeros([PBLOCK], dtype=acc_ty)
    sum_gx = tl.zeros([PBLOCK], dtype=acc_ty)
    for p0 in range(0, split, PBLOCK):
        p = p0 + tl.arange(0, PBLOCK)
        sum_g += tl.load(PSumG + ng.to(tl.int64) * split + p, mask=p < split, other=0.0)
        sum_gx += tl.load(PSumGX + ng.to(tl.int64) * split + p, mask=p < split, other=0.0)
    m = _group_count(cg, S, acc_ty)
    sum_g = tl.sum(sum_g, axis=0) + tl.zeros([1], dtype=acc_ty)
    sum_gx = tl.sum(sum_gx, axis=0) + tl.zeros([1], dtype=acc_ty)
    rstd = tl.load(Rstd + ng + tl.arange(0, 1))
    e = tl.load(E + ng + tl.arange(0, 1))
    if not SILU:
        # The reduce pass summed g * (xhat + e * rstd) (see there): take out e * rstd * sum(g).
        sum_gx = sum_gx - (e * rstd) * sum_g
    c2 = tl.reshape(sum_g / m, (1, 1))
    c1 = tl.reshape(sum_gx / m, (1, 1))
    e2 = tl.reshape(e, (1, 1))
    mean2 = tl.reshape(tl.load(Mean + ng + tl.arange(0, 1)), (1, 1))
    rstd2 = tl.reshape(rstd, (1, 1))
    c_first = (g * cg).to(tl.int64)
    x_base = _group_base(X, n, c_first, stride_xn, stride_xo, CHANNELS_LAST)
    dy_base = _group_base(DY, n, c_first, stride_dyn, stride_dyo, CHANNELS_LAST)
    dx_base = _group_base(DX, n, c_first, stride_dxn, stride_dxo, CHANNELS_LAST)
    t0, t1, tc0, tc1 = _tile_range(tiles_s, tiles_per_prog, num_tiles)
    for tc in range(tc0, tc1 + 1):
        c = tc * BLOCK_C + tl.arange(0, BLOCK_C)
        if AFFINE:
            w = tl.load(W + c_first + c, mask=c < cg, other=0.0).to(acc_ty)
            bb = tl.load(B + c_first + c, mask=c < cg, other=0.0).to(acc_ty)
        else:
            w = tl.zeros([BLOCK_C], dtype=acc_ty)
            bb = w
        for ts in range(tl.maximum(t0 - tc * tiles_s, 0), tl.minimum(t1 - tc * tiles_s, tiles_s)):
            cc, offs, mask = _tile(tc, ts, cg, S, stride_xo, CHANNELS_LAST, BLOCK_C, BLOCK_S)
            if stride_dyo == stride_xo:
                dy_offs = offs
            else:
                dy_offs = _offsets(tc, ts, stride_dyo, CHANNELS_LAST, BLOCK_C, BLOCK_S)
            if stride_dxo == stride_xo:
                dx_offs = offs
            else:
                dx_offs = _offsets(tc, ts, stride_dxo, CHANNELS_LAST, BLOCK_C, BLOCK_S)
            x = tl.load(x_base + offs, mask=mask, other=0.0).to(acc_ty)
            dy = tl.load(dy_base + dy_offs, mask=mask, other=0.0).to(acc_ty)
            xhat, dy = _grad_tile(x, dy, mask, mean2, e2, rstd2, w, bb, AFFINE, SILU)
            if AFFINE:
                gg = dy * w[:, None]
            else:
                gg = dy
            dx = (gg - xhat * c1 - c2) * rstd2
            tl.store(dx_base + dx_offs, dx.to(DX.dtype.element_ty), mask=mask)


# ---- launch configuration --------------------------------------------------------------------------------


def _bucket(v: int, choices: tuple[int, ...]) -> int:
    """The smallest choice >= v, else the largest."""
    for ch in choices:
        if ch >= v:
            return ch
    return choices[-1]


def group_norm_config(cg: int, s: int, channels_last: bool, dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Tile shape for groups of ``cg`` channels x ``s`` spatial elements: a function of coarse buckets of the
    unit-stride extent (S for NCHW, Cg for channels_last), the layout and fp64-or-not. Returns BLOCK_C, BLOCK_S."""
    tile = TILE_FP64 if dtype == torch.float64 else TILE
    if channels_last:
        block_c = _bucket(cg, NHWC_BLOCK_C)
        return {"BLOCK_C": block_c, "BLOCK_S": tile // block_c}
    block_s = _bucket(s, NCHW_BLOCK_S)
    return {"BLOCK_C": tile // block_s, "BLOCK_S": block_s}


def group_norm_num_warps(kernel: str, channels_last: bool, block_c: int, fp64: bool) -> int:
    """Warps per program for ``kernel`` ("stats", "apply", "bwd_reduce", "bwd_dx") on one tile shape.

    8 everywhere except two tiles where ptxas spilled a few bytes at 8 warps on sm_90 (the NCHW backward reduce
    with affine + SiLU, the one-channel NHWC apply); 16 warps halves their per-thread values. Chosen from the
    offline compile report (tests/test_codegen.py), where 16 warps everywhere spilled elsewhere instead.
    """
    if fp64:
        return NUM_WARPS
    if kernel == "bwd_reduce" and not channels_last:
        return 2 * NUM_WARPS
    if kernel == "apply" and channels_last and block_c == 1:
        return 2 * NUM_WARPS
    return NUM_WARPS


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(x: Tensor) -> int:
    """Programs that fill the machine: PROGRAMS_PER_SM per SM on CUDA, 4 SMs assumed under the interpreter."""
    if x.is_cuda:
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        return _sm_count(index) * PROGRAMS_PER_SM
    return 4 * PROGRAMS_PER_SM


def split_plan(ng: int, num_tiles: int, target: int) -> tuple[int, int]:
    """(SPLIT, tiles per program) for ``ng`` groups of ``num_tiles`` tiles aiming at ``target`` programs.
    Every program gets at least one tile."""
    split = max(1, min(num_tiles, -(-target // max(ng, 1))))
    per_prog = -(-num_tiles // split)
    return -(-num_tiles // per_prog), per_prog


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def _strides(t: Tensor, channels_last: bool) -> tuple[int, int] | None:
    """(stride_n, stride of the non-unit axis) when ``t`` is a (C, S) matrix per sample whose unit-stride axis
    is C (``channels_last``) or S; None when it is not (then the caller makes it so)."""
    spatial = [d for d in range(2, t.dim()) if t.shape[d] > 1]
    s_stride = t.stride(spatial[-1]) if spatial else 1
    for a, b in zip(spatial[:-1], spatial[1:], strict=True):
        if t.stride(a) != t.stride(b) * t.shape[b]:
            return None  # spatial dims do not flatten to one stride
    c_stride = t.stride(1) if t.shape[1] > 1 else 1
    n_stride = t.stride(0)
    if channels_last:
        return (n_stride, s_stride) if c_stride == 1 else None
    return (n_stride, c_stride) if s_stride == 1 else None


class _Geometry:
    """Layout, tile shape and split of one GroupNorm call (a function of the input's shape and layout only)."""

    def __init__(self, x: Tensor, num_groups: int):
        self.n, self.c = x.shape[0], x.shape[1]
        self.s = math.prod(x.shape[2:])
        self.g = num_groups
        self.cg = self.c // num_groups
        self.fmt = _memory_format(x)
        # With S == 1 the channels are the contiguous axis whatever the format says.
        self.channels_last = self.s == 1 or self.fmt != torch.contiguous_format
        self.cfg = group_norm_config(self.cg, self.s, self.channels_last, x.dtype)
        self.tiles_s = triton.cdiv(self.s, self.cfg["BLOCK_S"])
        self.num_tiles = triton.cdiv(self.cg, self.cfg["BLOCK_C"]) * self.tiles_s
        self.split, self.per_prog = split_plan(self.n * self.g, self.num_tiles, _target_programs(x))

    def canonical(self, t: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``t`` (copied only if its layout does not match) and its (stride_n, stride_other)."""
        st = _strides(t, self.channels_last)
        if st is None:
            t = t.contiguous(memory_format=self.fmt)
            st = _strides(t, self.channels_last)
        return t, st

    def empty_like(self, x: Tensor) -> Tensor:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=self.fmt)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.n * self.g, self.split)

    def common_args(self) -> tuple[int, ...]:
        return (self.g, self.cg, self.s, self.tiles_s, self.per_prog, self.num_tiles)


def _device_ctx(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else _NullContext()


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _affine_params(weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Both affine parameters or neither: a missing one becomes ones / zeros (C elements, nothing to speak of)."""
    if weight is None and bias is None:
        return None, None
    if weight is None:
        weight = torch.ones_like(bias)
    if bias is None:
        bias = torch.zeros_like(weight)
    return weight, bias


def group_norm_fwd_var(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float, activation: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``group_norm_fwd`` that also returns the biased group variance (N, G) acc dtype, computed from M2 (not
    from rstd, which loses it when var << eps); InstanceNorm's running_var uses it."""
    geo = _Geometry(x, num_groups)
    x, (sxn, sxo) = geo.canonical(x)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    ng = geo.n * geo.g
    dev = x.device
    pcount, pmean, pm2 = (torch.empty((ng, geo.split), dtype=acc, device=dev) for _ in range(3))
    mean, rstd, var = (torch.empty((geo.n, geo.g), dtype=acc, device=dev) for _ in range(3))
    y = geo.empty_like(x)
    _, (syn, syo) = geo.canonical(y)
    w, b = _affine_params(weight, bias)
    with _device_ctx(x):
        group_norm_stats_kernel[geo.grid](
            x, pcount, pmean, pm2, sxn, sxo, *geo.common_args(),
            CHANNELS_LAST=geo.channels_last, **geo.cfg, num_warps=NUM_WARPS,
        )
        group_norm_apply_kernel[geo.grid](
            x, y, w, b, pcount, pmean, pm2, mean, rstd, var,
            sxn, sxo, syn, syo, *geo.common_args(), eps,
            CHANNELS_LAST=geo.channels_last, AFFINE=w is not None, SILU=activation == "silu",
            PBLOCK=PARTIAL_BLOCK, **geo.cfg,
            num_warps=group_norm_num_warps("apply", geo.channels_last, geo.cfg["BLOCK_C"], acc == torch.float64),
        )
    return y, mean, rstd, var


def group_norm_fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float, activation: str
) -> tuple[Tensor, Tensor, Tensor]:
    """See ``fusednorm.backends.reference.group_norm_fwd``: x (N, C, *spatial) contiguous or channels_last,
    N * C * S > 0. Returns y (x's memory format), mean and rstd (N, G) fp32 (fp64 for fp64 x)."""
    y, mean, rstd, _ = group_norm_fwd_var(x, weight, bias, num_groups, eps, activation)
    return y, mean, rstd


def group_norm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    activation: str,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """See ``fusednorm.backends.reference.group_norm_bwd``. Returns dx (x's memory format), dweight, dbias (C,)
    in the parameters' dtypes (None when absent); dW/dB are reduced deterministically in fp32/fp64."""
    geo = _Geometry(x, num_groups)
    x, (sxn, sxo) = geo.canonical(x)
    dy, (sdn, sdo) = geo.canonical(dy)
    acc = rstd.dtype
    dev = x.device
    ng = geo.n * geo.g
    w, b = _affine_params(weight, bias)
    affine = w is not None
    psum_g, psum_gx, psum_d = (torch.empty((ng, geo.split), dtype=acc, device=dev) for _ in range(3))
    silu = activation == "silu"
    # Slots of channels a program does not cover stay zero, so these start at zero.
    dwp = torch.zeros((geo.n * geo.split, geo.c), dtype=acc, device=dev) if affine else None
    dbp = torch.zeros((geo.n * geo.split, geo.c), dtype=acc, device=dev) if affine else None
    dx = geo.empty_like(x)
    _, (sxdn, sxdo) = geo.canonical(dx)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    flags = {"CHANNELS_LAST": geo.channels_last, "AFFINE": affine, "SILU": silu}
    with _device_ctx(x):
        if silu:
            # e = mean(x - mean) first: the SiLU backward is not linear in xhat (see the reduce kernel).
            group_norm_bwd_centre_kernel[geo.grid](
                x, mean, rstd, psum_d, sxn, sxo, *geo.common_args(),
                CHANNELS_LAST=geo.channels_last, **geo.cfg, num_warps=NUM_WARPS,
            )
            # e per group, merged here (a fixed-order sum): a partial-merging loop in the reduce kernel spilled.
            e_group = psum_d.sum(dim=1) / (geo.cg * geo.s) / rstd.reshape(-1)
        group_norm_bwd_reduce_kernel[geo.grid](
            dy, x, w, b, mean, rstd, psum_g, psum_gx, e_group if silu else psum_d, dwp, dbp,
            sdn, sdo, sxn, sxo, geo.c, *geo.common_args(),
            **flags, **geo.cfg,
            num_warps=group_norm_num_warps("bwd_reduce", geo.channels_last, geo.cfg["BLOCK_C"], acc == torch.float64),
        )
        if not silu:
            # psum_d now holds the reduce kernel's partial sums of xhat, i.e. of e * rstd (see there).
            e_group = psum_d.sum(dim=1) / (geo.cg * geo.s) / rstd.reshape(-1)
        group_norm_bwd_dx_kernel[geo.grid](
            dy, x, w, b, mean, rstd, psum_g, psum_gx, e_group, dx,
            sdn, sdo, sxn, sxo, sxdn, sxdo, *geo.common_args(),
            **flags, PBLOCK=PARTIAL_BLOCK, **geo.cfg, num_warps=NUM_WARPS,
        )
    if affine and not silu:
        # The reduce pass summed dy * (xhat + e * rstd) (see there): per sample, take out e * rstd * sum(dy) of
        # each channel's group. Sums in a fixed order (deterministic); (N, SPLIT, C) -> (N, C) -> (C,).
        de = (psum_d.sum(dim=1) / (geo.cg * geo.s)).reshape(geo.n, geo.g)  # e * rstd
        dw_n = dwp.reshape(geo.n, geo.split, geo.c).sum(dim=1)
        db_n = dbp.reshape(geo.n, geo.split, geo.c).sum(dim=1)
        dw_all = (dw_n - de.repeat_interleave(geo.cg, dim=1) * db_n).sum(dim=0)
        db_all = db_n.sum(dim=0)
    elif affine:
        dw_all, db_all = dwp.sum(dim=0), dbp.sum(dim=0)
    dw = dw_all.to(weight.dtype) if weight is not None else None
    db = db_all.to(bias.dtype) if bias is not None else None
    return dx, dw, db


# ---- offline compilation ---------------------------------------------------------------------------------


def kernel_configs() -> list[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """Every (kernel, constexpr config, num_warps) the launchers above can choose, with worst-case dtypes (fp32;
    bf16 input with fp32 parameters; fp64) and 64-bit strides. Returns tuples (name "kernel tag", jit function,
    signature (constexpr entries included), constexprs, num_warps) for ``triton.compiler.ASTSource``."""
    dtype_sets = [("fp32", "fp32", "fp32"), ("bf16", "fp32", "fp32"), ("fp64", "fp64", "fp64")]
    geo = {"G": "i32", "cg": "i32", "S": "i32", "tiles_s": "i32", "tiles_per_prog": "i32", "num_tiles": "i32"}
    out = []

    kinds = {group_norm_stats_kernel: "stats", group_norm_apply_kernel: "apply",
             group_norm_bwd_centre_kernel: "bwd_centre", group_norm_bwd_reduce_kernel: "bwd_reduce",
             group_norm_bwd_dx_kernel: "bwd_dx"}

    def add(kernel, tag, sig, consts):
        warps = group_norm_num_warps(kinds[kernel], consts["CHANNELS_LAST"], consts["BLOCK_C"], "fp64" in tag)
        out.append((f"{kernel.__name__} {tag}", kernel, {**sig, **dict.fromkeys(consts, "constexpr")}, consts,
                    warps))

    for xd, pd, ad in dtype_sets:
        elems = TILE_FP64 if xd == "fp64" else TILE
        tiles = [(False, elems // bs, bs) for bs in NCHW_BLOCK_S] + [(True, bc, elems // bc) for bc in NHWC_BLOCK_C]
        for cl, bc, bs in tiles:
            tile = {"CHANNELS_LAST": cl, "BLOCK_C": bc, "BLOCK_S": bs}
            tag = f"[{xd}/{pd}] {'nhwc' if cl else 'nchw'} BLOCK_C={bc} BLOCK_S={bs}"
            sig = {"X": f"*{xd}", "PCount": f"*{ad}", "PMean": f"*{ad}", "PM2": f"*{ad}",
                   "stride_xn": "i64", "stride_xo": "i64", **geo}
            add(group_norm_stats_kernel, tag, sig, dict(tile))
            sig = {"X": f"*{xd}", "Mean": f"*{ad}", "Rstd": f"*{ad}", "PSumD": f"*{ad}",
                   "stride_xn": "i64", "stride_xo": "i64", **geo}
            add(group_norm_bwd_centre_kernel, tag, sig, dict(tile))
            for affine in (False, True):
                for silu in (False, True):
                    flags = {**tile, "AFFINE": affine, "SILU": silu}
                    ftag = f"{tag} affine={int(affine)} silu={int(silu)}"
                    sig = {"X": f"*{xd}", "Y": f"*{xd}", "W": f"*{pd}", "B": f"*{pd}",
                           "PCount": f"*{ad}", "PMean": f"*{ad}", "PM2": f"*{ad}",
                           "Mean": f"*{ad}", "Rstd": f"*{ad}", "Var": f"*{ad}",
                           "stride_xn": "i64", "stride_xo": "i64", "stride_yn": "i64", "stride_yo": "i64",
                           **geo, "eps": "fp32"}
                    add(group_norm_apply_kernel, ftag, sig, {**flags, "PBLOCK": PARTIAL_BLOCK})
                    sig = {"DY": f"*{xd}", "X": f"*{xd}", "W": f"*{pd}", "B": f"*{pd}",
                           "Mean": f"*{ad}", "Rstd": f"*{ad}", "PSumG": f"*{ad}", "PSumGX": f"*{ad}",
                           "PSumD": f"*{ad}", "DWp": f"*{ad}", "DBp": f"*{ad}",
                           "stride_dyn": "i64", "stride_dyo": "i64", "stride_xn": "i64", "stride_xo": "i64",
                           "C": "i32", **geo}
                    add(group_norm_bwd_reduce_kernel, ftag, sig, dict(flags))
                    sig = {"DY": f"*{xd}", "X": f"*{xd}", "W": f"*{pd}", "B": f"*{pd}",
                           "Mean": f"*{ad}", "Rstd": f"*{ad}", "PSumG": f"*{ad}", "PSumGX": f"*{ad}",
                           "E": f"*{ad}", "DX": f"*{xd}",
                           "stride_dyn": "i64", "stride_dyo": "i64", "stride_xn": "i64", "stride_xo": "i64",
                           "stride_dxn": "i64", "stride_dxo": "i64", **geo}
                    add(group_norm_bwd_dx_kernel, ftag, sig, {**flags, "PBLOCK": PARTIAL_BLOCK})
    return out
