"""Triton kernels for BatchNorm: per-channel statistics over (N, *spatial), normalize, and the backward pair.

Every tensor is addressed as (N, C, S) with S = prod(spatial) and one of two orientations:

- NCHW (``CHANNELS_LAST=False``): S is the contiguous dim. A tile is [BLOCK_R rows, BLOCK_COL positions];
  for the reductions the rows are batch indices n of one channel; for the elementwise kernel they are
  (n, c) pairs.
- channels-last (``CHANNELS_LAST=True``): C is the contiguous dim (channels_last, channels_last_3d, and plain
  (N, C) inputs). A tile is [BLOCK_R positions (n, s), BLOCK_COL channels].

The batch and the other slow dim have free strides (batch slices need no copy); a row index is split into
(n, j) with one int32 division per row, not per element. Row and tile indices are int32 (a 64-bit division
is a subroutine call on the GPU): the launchers split a batch whose rows would pass 2^31 into several
launches on views. Memory offsets are int64.

Kernels (one family, constexpr flags pick the variant):

- ``bn_reduce_kernel``: grid (channel programs, splits). Each program walks its share of one channel's (or
  one channel block's) tiles. Statistics (``IS_BWD=False``): two-step (mean, M2) per tile of x - shift (the
  program's first value of the channel, so a large |mean| costs no digits), merged with Chan's formula into
  (count, mean, M2). Backward (``IS_BWD=True``): sum(dy) and sum(dy * xhat) in acc-dtype registers. Each
  program writes its own partial row: no atomics, deterministic.
- ``bn_merge_kernel``: merges the (splits, C) partials per channel (Chan merge, or a plain ordered sum).
- ``bn_elementwise_kernel``: y = (x - mean) * rstd * w + b, or dX (training / eval formula); one read of each
  input, one write.

Config choice depends on the orientation, dtype and a power-of-two bucket of the contiguous extent (S or C)
only; N, the split count and all strides are runtime arguments, so a new batch size never recompiles.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusednorm.backends.triton.welford import welford_merge

# Elements per tile (per program iteration). fp64 tiles are halved to keep the same register footprint.
TILE = 4096
TILE_FP64 = 2048
# Narrowest contiguous block: tiny extents (S or C below this) are padded up to it.
MIN_COLS = 16
# Channels per program in the channels-last reductions: wide enough for 512-byte fp32 rows, narrow enough to
# give many channel programs.
MAX_CL_REDUCE_COLS = 128
# Channels per tile in the channels-last elementwise kernel: each thread keeps up to five per-channel vectors
# (mean, rstd, weight, two backward sums) for its columns, so very wide channel tiles would spill in fp64.
MAX_CL_ELEMENTWISE_COLS = 512
# Reduction grid: about this many programs per SM in total (channel programs x splits).
REDUCE_PROGRAMS_PER_SM = 4
# Row/tile indices inside the kernels are int32: rows per launch stay below this (a tile's padded rows too).
_INT32_ROWS = 2**31 - 2**16
# Merge kernel tile: BLOCK_K partial rows x BLOCK_C channels.
MERGE_BLOCK_K = 8
MERGE_BLOCK_C = 128


# ---- kernels ---------------------------------------------------------------------------------------------


@triton.jit
def _per_channel(P, ch, mask, CHANNELS_LAST: tl.constexpr):
    """Load a per-channel vector at indices ``ch`` and shape it to broadcast against a [rows, cols] tile."""
    v = tl.load(P + ch, mask=mask, other=0.0)
    if CHANNELS_LAST:
        out = v[None, :]
    else:
        out = v[:, None]
    return out


@triton.jit
def bn_reduce_kernel(
    X, DY, Mean, Rstd, P0, P1, P2,
    N, C, S, M,
    stride_xn, stride_xj, stride_dyn, stride_dyj,
    tiles_per_program,
    IS_BWD: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_COL: tl.constexpr,
):
    """Per-channel partial reductions. Statistics: P0/P1/P2 = count/mean/M2; backward: P0/P1 = sum(dy),
    sum(dy * xhat). Partials are (splits, C) in the acc dtype; program (channel block, split k) writes row k.

    NCHW: j is the channel, program axis 0 is one channel. Channels-last: j is the spatial position, program
    axis 0 is a block of BLOCK_COL channels and M = N * S counts the positions.
    """
    acc_ty = P1.dtype.element_ty  # fp32, or fp64 for fp64 input
    pid_c = tl.program_id(0)
    pid_k = tl.program_id(1)
    r_idx = tl.arange(0, BLOCK_R)
    c_idx = tl.arange(0, BLOCK_COL)
    # Tile and row indices are int32 (the launcher keeps M = N * S below 2^31): a 64-bit integer division
    # is a subroutine call with stack traffic on the GPU. Memory offsets are int64.
    t_begin = pid_k * tiles_per_program
    if CHANNELS_LAST:
        cols = pid_c * BLOCK_COL + c_idx  # channels
        col_mask = cols < C
        total_tiles = tl.cdiv(M, BLOCK_R)
        if IS_BWD:
            mean = tl.load(Mean + cols, mask=col_mask, other=0.0)[None, :]
            rstd = tl.load(Rstd + cols, mask=col_mask, other=0.0)[None, :]
            acc_dy = tl.zeros([BLOCK_R, BLOCK_COL], dtype=acc_ty)
            acc_dyx = tl.zeros([BLOCK_R, BLOCK_COL], dtype=acc_ty)
        else:
            count = tl.zeros([BLOCK_COL], dtype=acc_ty)
            mean_run = tl.zeros([BLOCK_COL], dtype=acc_ty)
            m2_run = tl.zeros([BLOCK_COL], dtype=acc_ty)
            # Shift: the program's first value of each channel. Tile sums of (x - shift) stay of the order of
            # the spread, so an offset |mean| >> std costs no digits in the accumulation.
            n0 = (t_begin * BLOCK_R) // S
            s0 = t_begin * BLOCK_R - n0 * S
            shift = tl.load(X + n0.to(tl.int64) * stride_xn + s0.to(tl.int64) * stride_xj + cols, mask=col_mask,
                            other=0.0).to(acc_ty)
    else:
        c64 = pid_c.to(tl.int64)
        tiles_s = tl.cdiv(S, BLOCK_COL)
        total_tiles = tl.cdiv(N, BLOCK_R) * tiles_s
        if IS_BWD:
            mean = tl.load(Mean + pid_c)
            rstd = tl.load(Rstd + pid_c)
            acc_dy = tl.zeros([BLOCK_R, BLOCK_COL], dtype=acc_ty)
            acc_dyx = tl.zeros([BLOCK_R, BLOCK_COL], dtype=acc_ty)
        else:
            zero = tl.sum(tl.zeros([BLOCK_COL], dtype=acc_ty), axis=0)
            count = zero
            mean_run = zero
            m2_run = zero
            n0 = (t_begin // tiles_s) * BLOCK_R
            s0 = (t_begin - (t_begin // tiles_s) * tiles_s) * BLOCK_COL
            shift = tl.load(X + c64 * stride_xj + n0.to(tl.int64) * stride_xn + s0).to(acc_ty)  # as above
    t_end = tl.minimum(t_begin + tiles_per_program, total_tiles)
    for t in range(t_begin, t_end):
        if CHANNELS_LAST:
            rows = t * BLOCK_R + r_idx  # positions m = n * S + s
            row_mask = rows < M
            n = rows // S
            s = rows - n * S
            mask = row_mask[:, None] & col_mask[None, :]
            n = n.to(tl.int64)
            s = s.to(tl.int64)
            x_off = (n * stride_xn + s * stride_xj)[:, None] + cols[None, :]
            valid_rows = tl.minimum(M - t * BLOCK_R, BLOCK_R).to(acc_ty)
        else:
            tile_r = t // tiles_s
            tile_s = t - tile_r * tiles_s
            n = tile_r * BLOCK_R + r_idx
            s = tile_s * BLOCK_COL + c_idx
            mask = (n < N)[:, None] & (s < S)[None, :]
            n = n.to(tl.int64)
            x_off = (c64 * stride_xj + n * stride_xn)[:, None] + s[None, :]
        x = tl.load(X + x_off, mask=mask, other=0.0).to(acc_ty)
        if IS_BWD:
            if CHANNELS_LAST:
                dy_off = (n * stride_dyn + s * stride_dyj)[:, None] + cols[None, :]
            else:
                dy_off = (c64 * stride_dyj + n * stride_dyn)[:, None] + s[None, :]
            dy = tl.load(DY + dy_off, mask=mask, other=0.0).to(acc_ty)
            acc_dy += dy
            acc_dyx += dy * ((x - mean) * rstd)  # masked lanes have dy = 0
        else:
            if CHANNELS_LAST:
                # exact two-step statistics of each channel column of this tile, then Chan merge
                xs = tl.where(mask, x - shift[None, :], 0.0)
                t_mean = tl.sum(xs, axis=0) / valid_rows
                d = tl.where(mask, xs - t_mean[None, :], 0.0)
                t_m2 = tl.sum(d * d, axis=0)
                t_mean += shift
                count, mean_run, m2_run = welford_merge(count, mean_run, m2_run, valid_rows, t_mean, t_m2)
            else:
                t_count = (tl.minimum(N - tile_r * BLOCK_R, BLOCK_R)
                           * tl.minimum(S - tile_s * BLOCK_COL, BLOCK_COL)).to(acc_ty)
                xs = tl.where(mask, x - shift, 0.0)
                t_mean = tl.sum(tl.sum(xs, axis=1), axis=0) / t_count
                d = tl.where(mask, xs - t_mean, 0.0)
                t_m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
                t_mean += shift
                count, mean_run, m2_run = welford_merge(count, mean_run, m2_run, t_count, t_mean, t_m2)
    out_row = pid_k.to(tl.int64) * C
    if CHANNELS_LAST:
        if IS_BWD:
            tl.store(P0 + out_row + cols, tl.sum(acc_dy, axis=0), mask=col_mask)
            tl.store(P1 + out_row + cols, tl.sum(acc_dyx, axis=0), mask=col_mask)
        else:
            tl.store(P0 + out_row + cols, count, mask=col_mask)
            tl.store(P1 + out_row + cols, mean_run, mask=col_mask)
            tl.store(P2 + out_row + cols, m2_run, mask=col_mask)
    else:
        if IS_BWD:
            tl.store(P0 + out_row + pid_c, tl.sum(tl.sum(acc_dy, axis=1), axis=0))
            tl.store(P1 + out_row + pid_c, tl.sum(tl.sum(acc_dyx, axis=1), axis=0))
        else:
            tl.store(P0 + out_row + pid_c, count)
            tl.store(P1 + out_row + pid_c, mean_run)
            tl.store(P2 + out_row + pid_c, m2_run)


@triton.jit
def bn_merge_kernel(
    P0, P1, P2, Out0, Out1, C, num_splits,
    IS_BWD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Second, deterministic reduction over the (splits, C) partials. Statistics: Chan merge of
    (count, mean, M2) into Out0 = mean, Out1 = M2. Backward: ordered sums Out0 = sum(P0), Out1 = sum(P1)."""
    acc_ty = P1.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    a = tl.zeros([BLOCK_C], dtype=acc_ty)
    b = tl.zeros([BLOCK_C], dtype=acc_ty)
    count = tl.zeros([BLOCK_C], dtype=acc_ty)
    if not IS_BWD:
        shift = tl.load(P1 + cols, mask=col_mask, other=0.0)  # first partial's mean: see bn_reduce_kernel
    for k0 in range(0, num_splits, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = (ks < num_splits)[:, None] & col_mask[None, :]
        off = ks.to(tl.int64)[:, None] * C + cols[None, :]
        p1 = tl.load(P1 + off, mask=mask, other=0.0)
        p0 = tl.load(P0 + off, mask=mask, other=0.0)
        if IS_BWD:
            a += tl.sum(p0, axis=0)
            b += tl.sum(p1, axis=0)
        else:
            p2 = tl.load(P2 + off, mask=mask, other=0.0)
            # BLOCK_K partials at once: M2 = sum(M2_k) + sum(n_k * (mean_k - mean)^2), the exact parallel
            # form of Chan's merge (no E[x^2] - E[x]^2), then merged into the running result
            k_count = tl.sum(p0, axis=0)
            ps = tl.where(mask, p1 - shift[None, :], 0.0)
            k_mean_s = tl.sum(p0 * ps, axis=0) / tl.maximum(k_count, 1.0)
            k_mean = k_mean_s + shift
            dev = tl.where(mask, ps - k_mean_s[None, :], 0.0)
            k_m2 = tl.sum(p2, axis=0) + tl.sum(p0 * dev * dev, axis=0)
            count, a, b = welford_merge(count, a, b, k_count, k_mean, k_m2)
    tl.store(Out0 + cols, a, mask=col_mask)
    tl.store(Out1 + cols, b, mask=col_mask)


@triton.jit
def bn_elementwise_kernel(
    X, DY, Out, Mean, Rstd, W, B, MeanDy, MeanDyXhat,
    R, J, COLS,
    stride_xn, stride_xj, stride_dyn, stride_dyj, stride_on, stride_oj,
    num_col_tiles,
    IS_BWD: tl.constexpr, TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_COL: tl.constexpr,
):
    """One pass over a [BLOCK_R, BLOCK_COL] tile of rows r = (n, j), j < J, and contiguous columns.

    Forward: Out = (x - mean) * rstd * w + b. Backward (Out = dX): training
    dx = (dy - mean_dy - xhat * mean_dy_xhat) * rstd * w, with the per-channel means of dy and dy * xhat over
    the batch (divided on the host: an fp64 division is a subroutine call in the kernel); eval
    dx = dy * rstd * w.
    """
    acc_ty = Rstd.dtype.element_ty
    pid = tl.program_id(0)
    tile_r = pid // num_col_tiles
    tile_c = pid - tile_r * num_col_tiles
    rows = tile_r * BLOCK_R + tl.arange(0, BLOCK_R)  # int32: the launcher keeps R below 2^31
    cols = tile_c * BLOCK_COL + tl.arange(0, BLOCK_COL)
    row_mask = rows < R
    col_mask = cols < COLS
    mask = row_mask[:, None] & col_mask[None, :]
    n = rows // J  # int32 division: inline on the GPU (int64 division is a call with stack traffic)
    j = rows - n * J
    if CHANNELS_LAST:
        ch = cols
        ch_mask = col_mask
    else:
        ch = j
        ch_mask = row_mask
    n = n.to(tl.int64)
    j = j.to(tl.int64)
    rstd = _per_channel(Rstd, ch, ch_mask, CHANNELS_LAST)
    scale = rstd
    if HAS_WEIGHT:
        scale = scale * _per_channel(W, ch, ch_mask, CHANNELS_LAST).to(acc_ty)
    if IS_BWD:
        dy = tl.load(DY + (n * stride_dyn + j * stride_dyj)[:, None] + cols[None, :], mask=mask, other=0.0)
        dy = dy.to(acc_ty)
        if TRAINING:
            x = tl.load(X + (n * stride_xn + j * stride_xj)[:, None] + cols[None, :], mask=mask, other=0.0)
            mean = _per_channel(Mean, ch, ch_mask, CHANNELS_LAST)
            mean_dy = _per_channel(MeanDy, ch, ch_mask, CHANNELS_LAST)
            coef = _per_channel(MeanDyXhat, ch, ch_mask, CHANNELS_LAST) * rstd
            out = (dy - mean_dy - (x.to(acc_ty) - mean) * coef) * scale
        else:
            out = dy * scale
    else:
        x = tl.load(X + (n * stride_xn + j * stride_xj)[:, None] + cols[None, :], mask=mask, other=0.0)
        mean = _per_channel(Mean, ch, ch_mask, CHANNELS_LAST)
        # (x - mean) first: x * scale + shift would cancel badly when |mean| >> std
        out = (x.to(acc_ty) - mean) * scale
        if HAS_BIAS:
            out = out + _per_channel(B, ch, ch_mask, CHANNELS_LAST).to(acc_ty)
    tl.store(Out + (n * stride_on + j * stride_oj)[:, None] + cols[None, :], out.to(Out.dtype.element_ty),
             mask=mask)


# ---- layout and configuration ----------------------------------------------------------------------------


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ncs(t: Tensor) -> tuple[int, int, int, tuple[int, int, int] | None]:
    """(N, C, S) of ``t`` and the strides of its (N, C, S) view, or None when spatial dims do not collapse."""
    n, c = t.shape[0], t.shape[1]
    s = math.prod(t.shape[2:])
    try:
        strides = t.view(n, c, s).stride()
    except RuntimeError:
        strides = None
    return n, c, s, strides


def _fits(strides: tuple[int, int, int] | None, channels_last: bool, c: int, s: int) -> bool:
    """True when the orientation's contiguous dim (C for channels-last, S otherwise) has stride 1."""
    if strides is None:
        return False
    return (strides[1] == 1 or c == 1) if channels_last else (strides[2] == 1 or s == 1)


def _orientation(strides: tuple[int, int, int] | None, c: int, s: int) -> bool | None:
    """Channels-last (True), NCHW (False), or None when neither dim is contiguous (a copy is needed)."""
    if strides is None:
        return None
    if s == 1 or (c > 1 and strides[1] == 1 and strides[2] != 1):
        return True if _fits(strides, True, c, s) else None
    return False if _fits(strides, False, c, s) else None


def _plan(x: Tensor, need_out: bool) -> tuple[Tensor, bool, Tensor | None]:
    """Pick the orientation for ``x``; returns (x or a copy of it, channels_last, output like x or None).

    The output is ``torch.empty_like(x)`` (x's strides when x is dense), so the memory format is kept. Only an
    input neither of whose candidate dims is contiguous (or whose output layout would differ) is copied.
    """
    _, c, s, strides = _ncs(x)
    cl = _orientation(strides, c, s)
    if cl is not None:
        if not need_out:
            return x, cl, None
        out = torch.empty_like(x)
        if _fits(_ncs(out)[3], cl, c, s):
            return x, cl, out
    # one copy into the layout torch.empty_like(x) would give (channels_last stays channels_last), or NCHW
    dense = torch.empty_like(x)
    dense.copy_(x)
    cl = _orientation(_ncs(dense)[3], c, s)
    if cl is None:
        dense, cl = x.contiguous(), s == 1
    return dense, cl, (torch.empty_like(dense) if need_out else None)


def _match(t: Tensor, channels_last: bool) -> Tensor:
    """``t`` with the orientation's contiguous dim (C or S) at stride 1; copied only when it is not."""
    _, c, s, strides = _ncs(t)
    if _fits(strides, channels_last, c, s):
        return t
    if channels_last:  # (N, *spatial, C) storage seen as (N, C, *spatial)
        out = torch.empty((t.shape[0], *t.shape[2:], t.shape[1]), dtype=t.dtype, device=t.device).movedim(-1, 1)
    else:
        out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out


def _slow_strides(t: Tensor, channels_last: bool) -> tuple[int, int]:
    """(stride of N, stride of the row's second index): C for NCHW, S for channels-last."""
    strides = _ncs(t)[3]
    return (strides[0], strides[2]) if channels_last else (strides[0], strides[1])


def _block_cols(extent: int, limit: int) -> int:
    return max(MIN_COLS, min(limit, triton.next_power_of_2(max(extent, 1))))


def _tile(dtype: torch.dtype) -> int:
    return TILE_FP64 if dtype == torch.float64 else TILE


def _warps(tile: int) -> int:
    return max(1, min(8, tile // 512))


def reduce_config(channels_last: bool, c: int, s: int, dtype: torch.dtype) -> dict[str, int]:
    """BLOCK_R, BLOCK_COL and num_warps of ``bn_reduce_kernel``: a function of the orientation, dtype and
    the power-of-two bucket of the contiguous extent only."""
    tile = _tile(dtype)
    block_col = _block_cols(c, MAX_CL_REDUCE_COLS) if channels_last else _block_cols(s, tile)
    return {"BLOCK_R": tile // block_col, "BLOCK_COL": block_col, "num_warps": _warps(tile)}


def elementwise_config(channels_last: bool, c: int, s: int, dtype: torch.dtype) -> dict[str, int]:
    """BLOCK_R, BLOCK_COL and num_warps of ``bn_elementwise_kernel`` (same bucketing as ``reduce_config``)."""
    tile = _tile(dtype)
    block_col = _block_cols(c, MAX_CL_ELEMENTWISE_COLS) if channels_last else _block_cols(s, tile)
    return {"BLOCK_R": tile // block_col, "BLOCK_COL": block_col, "num_warps": _warps(tile)}


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(x: Tensor) -> int:
    """Programs a reduction grid should have: REDUCE_PROGRAMS_PER_SM per SM (4 SMs under the interpreter)."""
    if not x.is_cuda:
        return 4 * REDUCE_PROGRAMS_PER_SM
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _sm_count(index) * REDUCE_PROGRAMS_PER_SM


def _device(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _reduce(x: Tensor, dy: Tensor | None, mean: Tensor | None, rstd: Tensor | None) -> tuple[Tensor, Tensor]:
    """Launch the split reduction and the merge. Statistics when ``dy`` is None, else the backward sums."""
    is_bwd = dy is not None
    x, cl, _ = _plan(x, need_out=False)
    if cl and x.numel() // x.shape[1] >= _INT32_ROWS:
        # channels-last positions N * S would overflow the int32 row index: reduce in NCHW order instead
        x, cl = x.contiguous(), False
    if is_bwd:
        dy = _match(dy, cl)
    n, c, s, _ = _ncs(x)
    acc = _acc(x.dtype)
    cfg = reduce_config(cl, c, s, x.dtype)
    block_r, block_col = cfg["BLOCK_R"], cfg["BLOCK_COL"]
    if cl:
        total_tiles = triton.cdiv(n * s, block_r)
        channel_programs = triton.cdiv(c, block_col)
    else:
        total_tiles = triton.cdiv(n, block_r) * triton.cdiv(s, block_col)
        channel_programs = c
    # Split each channel's reduction until the grid has about REDUCE_PROGRAMS_PER_SM programs per SM.
    target = _target_programs(x)
    splits = max(1, min(total_tiles, triton.cdiv(target, channel_programs), 65535))
    tiles_per_program = triton.cdiv(total_tiles, splits)
    splits = triton.cdiv(total_tiles, tiles_per_program)
    parts = [torch.empty((splits, c), dtype=acc, device=x.device) for _ in range(2 if is_bwd else 3)]
    p2 = parts[2] if not is_bwd else parts[1]
    sx = _slow_strides(x, cl)
    sdy = _slow_strides(dy, cl) if is_bwd else sx
    with _device(x):
        bn_reduce_kernel[(channel_programs, splits)](
            x, dy if is_bwd else x, mean if is_bwd else parts[1], rstd if is_bwd else parts[1],
            parts[0], parts[1], p2,
            n, c, s, n * s, sx[0], sx[1], sdy[0], sdy[1], tiles_per_program,
            IS_BWD=is_bwd, CHANNELS_LAST=cl, **cfg,
        )
        if splits == 1:  # the single partial row is the result
            if is_bwd:
                return parts[0].view(c), parts[1].view(c)
            return parts[1].view(c), parts[2].view(c)
        out0 = torch.empty((c,), dtype=acc, device=x.device)
        out1 = torch.empty((c,), dtype=acc, device=x.device)
        bn_merge_kernel[(triton.cdiv(c, MERGE_BLOCK_C),)](
            parts[0], parts[1], p2, out0, out1, c, splits,
            IS_BWD=is_bwd, BLOCK_K=MERGE_BLOCK_K, BLOCK_C=MERGE_BLOCK_C, num_warps=4,
        )
    return out0, out1


def _elementwise(
    x: Tensor,
    dy: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    sum_dy: Tensor | None,
    sum_dy_xhat: Tensor | None,
    count: int,
    training: bool,
) -> Tensor:
    is_bwd = dy is not None
    x, cl, out = _plan(x, need_out=True)
    if is_bwd:
        dy = _match(dy, cl)
    n, c, s, _ = _ncs(x)
    cfg = elementwise_config(cl, c, s, x.dtype)
    inner, cols = (s, c) if cl else (c, s)
    col_tiles = triton.cdiv(cols, cfg["BLOCK_COL"])
    sx = _slow_strides(x, cl)
    sdy = _slow_strides(dy, cl) if is_bwd else sx
    so = _slow_strides(out, cl)
    use_sums = is_bwd and training
    if use_sums:
        sum_dy, sum_dy_xhat = sum_dy / count, sum_dy_xhat / count  # (C,) means over the batch
    # rows (n, j) are int32 in the kernel: a batch with 2^31 or more rows runs as several launches on views
    chunk = max(1, (_INT32_ROWS - 1) // max(inner, 1))
    with _device(x):
        for n0 in range(0, n, chunk):
            n1 = min(n, n0 + chunk)
            rows = (n1 - n0) * inner
            grid = (triton.cdiv(rows, cfg["BLOCK_R"]) * col_tiles,)
            bn_elementwise_kernel[grid](
                x[n0:n1], dy[n0:n1] if is_bwd else x[n0:n1], out[n0:n1], mean, rstd,
                weight if weight is not None else rstd, bias if bias is not None else rstd,
                sum_dy if use_sums else rstd, sum_dy_xhat if use_sums else rstd,
                rows, inner, cols,
                sx[0], sx[1], sdy[0], sdy[1], so[0], so[1], col_tiles,
                IS_BWD=is_bwd, TRAINING=training, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                CHANNELS_LAST=cl, **cfg,
            )
    return out


# ---- backend contract (see fusednorm/backends/reference.py) ----------------------------------------------


def batch_norm_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean (C,) and M2 (C,) (acc dtype) of non-empty x (N, C, *spatial), any memory format."""
    return _reduce(x, None, None, None)


def batch_norm_apply(
    x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """y = (x - mean[c]) * rstd[c] * w[c] + b[c]; x (N, C, *spatial), mean/rstd (C,) acc dtype.

    Returns y in x's dtype with the strides of ``torch.empty_like(x)`` (memory format kept)."""
    return _elementwise(x, None, mean, rstd, weight, bias, None, None, 1, False)


def batch_norm_bwd_reduce(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel sum(dy) and sum(dy * xhat), both (C,) acc dtype, deterministic (partials, no atomics)."""
    return _reduce(x, dy, mean, rstd)


def batch_norm_bwd_dx(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: int,
    training: bool,
) -> Tensor:
    """dX of BatchNorm (training: through the batch statistics over ``count`` values; eval: dy * w * rstd).

    Returns dx in x's dtype with the strides of ``torch.empty_like(x)``."""
    return _elementwise(x, dy, mean, rstd, weight, None, sum_dy, sum_dy_xhat, int(count), training)


# ---- offline compilation ---------------------------------------------------------------------------------


def _extent_buckets(limit: int) -> list[int]:
    """Every BLOCK_COL the bucketing can produce up to ``limit`` (powers of two from MIN_COLS)."""
    return [1 << k for k in range(MIN_COLS.bit_length() - 1, limit.bit_length())]


def kernel_configs() -> list[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """Every (kernel, constexpr config, num_warps) the launchers can pick, with worst-case dtypes.

    For fp32, bf16 input with fp32 parameters, and fp64: each orientation and BLOCK_COL bucket of the
    reduction (statistics and backward) and of the elementwise kernel (forward with weight and bias, backward
    in training and eval with weight), plus the merge kernel. Tuples are (name, jit function, signature,
    constexprs, num_warps) for ``triton.compiler.ASTSource``.
    """
    configs = []
    for x_ty, p_ty, dtype in (("fp32", "fp32", torch.float32), ("bf16", "fp32", torch.bfloat16),
                              ("fp64", "fp64", torch.float64)):
        acc = "fp64" if x_ty == "fp64" else "fp32"
        tile = _tile(dtype)
        red_sig = {"X": f"*{x_ty}", "DY": f"*{x_ty}", "Mean": f"*{acc}", "Rstd": f"*{acc}", "P0": f"*{acc}",
                   "P1": f"*{acc}", "P2": f"*{acc}", "N": "i32", "C": "i32", "S": "i32", "M": "i32",
                   "stride_xn": "i64", "stride_xj": "i64", "stride_dyn": "i64", "stride_dyj": "i64",
                   "tiles_per_program": "i32"}
        ew_sig = {"X": f"*{x_ty}", "DY": f"*{x_ty}", "Out": f"*{x_ty}", "Mean": f"*{acc}", "Rstd": f"*{acc}",
                  "W": f"*{p_ty}", "B": f"*{p_ty}", "MeanDy": f"*{acc}", "MeanDyXhat": f"*{acc}", "R": "i32",
                  "J": "i32", "COLS": "i32", "stride_xn": "i64", "stride_xj": "i64",
                  "stride_dyn": "i64", "stride_dyj": "i64", "stride_on": "i64", "stride_oj": "i64",
                  "num_col_tiles": "i32"}
        merge_sig = {"P0": f"*{acc}", "P1": f"*{acc}", "P2": f"*{acc}", "Out0": f"*{acc}", "Out1": f"*{acc}",
                     "C": "i32", "num_splits": "i32"}
        for cl in (False, True):
            layout = "cl" if cl else "nchw"
            red_limit = MAX_CL_REDUCE_COLS if cl else tile
            for block_col in _extent_buckets(red_limit):
                for is_bwd in (False, True):
                    consts = {"IS_BWD": is_bwd, "CHANNELS_LAST": cl, "BLOCK_R": tile // block_col,
                              "BLOCK_COL": block_col}
                    tag = f"{'bwd' if is_bwd else 'stats'}[{x_ty}] {layout} BLOCK_R={tile // block_col} " \
                          f"BLOCK_COL={block_col}"
                    configs.append((f"bn_reduce {tag}", bn_reduce_kernel,
                                    {**red_sig, **dict.fromkeys(consts, "constexpr")}, consts, _warps(tile)))
            for block_col in _extent_buckets(MAX_CL_ELEMENTWISE_COLS if cl else tile):
                for is_bwd, training in ((False, False), (True, True), (True, False)):
                    consts = {"IS_BWD": is_bwd, "TRAINING": training, "HAS_WEIGHT": True, "HAS_BIAS": not is_bwd,
                              "CHANNELS_LAST": cl, "BLOCK_R": tile // block_col, "BLOCK_COL": block_col}
                    mode = "fwd" if not is_bwd else ("dx_train" if training else "dx_eval")
                    tag = f"{mode}[{x_ty}/{p_ty}] {layout} BLOCK_R={tile // block_col} BLOCK_COL={block_col}"
                    configs.append((f"bn_elementwise {tag}", bn_elementwise_kernel,
                                    {**ew_sig, **dict.fromkeys(consts, "constexpr")}, consts, _warps(tile)))
        for is_bwd in (False, True):
            if x_ty == "bf16":  # the merge only sees acc-dtype partials: same kernels as fp32
                continue
            consts = {"IS_BWD": is_bwd, "BLOCK_K": MERGE_BLOCK_K, "BLOCK_C": MERGE_BLOCK_C}
            configs.append((f"bn_merge {'bwd' if is_bwd else 'stats'}[{acc}]", bn_merge_kernel,
                            {**merge_sig, **dict.fromkeys(consts, "constexpr")}, consts, 4))
    return configs
