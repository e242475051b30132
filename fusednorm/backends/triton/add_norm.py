"""Triton kernels for residual-add (+ dropout) + LayerNorm/RMSNorm: one kernel family with constexpr flags.

Forward, ``add_norm_fwd_kernel``: s = dropout(x) + residual is formed in registers, written once (it is the
prenorm output and what backward normalizes again), and normalized exactly like ``row_norm_fwd_kernel``
(single-tile rows in registers; chunked Welford + normalize pass above ``MAX_SINGLE_TILE``).

Backward, ``add_norm_bwd_kernel``: a persistent grid; per row, the norm's input gradient plus the prenorm
output's gradient gives ds; dresidual = ds, dx = ds * mask / (1 - p). dW/dB go to per-program fp32 partials.

The dropout mask is regenerated in both directions from (seed, element index) by ``dropout_keep``, the same
counter-based hash as ``reference_variants.dropout_keep_mask`` (so every backend draws the same mask).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusednorm.backends.reference_variants import dropout_scale, dropout_threshold
from fusednorm.backends.triton.layer_norm import (
    MAX_SINGLE_TILE,
    _device_ctx,
    persistent_programs,
    row_bwd_coefficients,
    row_norm_config,
)
from fusednorm.backends.triton.welford import row_stats, welford_merge


def add_norm_bwd_config(n: int, dtype: torch.dtype) -> dict[str, int | bool]:
    """Backward meta-parameters: ``row_norm_config``'s backward choice (lower single-tile limit: backward keeps
    more row-sized values live, and the forward's 16K-wide tile would spill)."""
    return row_norm_config(n, dtype, backward=True)


@triton.jit
def hash32(h):
    """32-bit xorshift-multiply mixer on uint32 (wrapping multiplies)."""
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    return h ^ (h >> 16)


@triton.jit
def dropout_keep(rows64, cols, N, seed, threshold):
    """Keep mask (R, BLOCK) of elements row * N + col: the hash of ``reference_variants.dropout_keep_mask``."""
    idx = rows64[:, None] * N + cols[None, :]
    lo = idx.to(tl.uint32)  # truncation keeps the low 32 bits
    hi = (idx >> 32).to(tl.uint32)
    k = hash32(hash32(hi) ^ seed.to(tl.uint32))
    h = hash32(hash32(lo ^ k) + k)
    return (h >> 8) >= threshold.to(tl.uint32)


@triton.jit
def _load_sum(X, R, S, Rstd, x_off, r_off, s_off, rows64, c, mask, N, drop_scale, seed, threshold,
              HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """s = dropout(x) + residual for one tile, stored to S; returns s as read back (rounded to S's dtype)."""
    acc_ty = Rstd.dtype.element_ty
    x = tl.load(X + x_off, mask=mask, other=0.0).to(acc_ty)
    if HAS_DROPOUT:
        keep = dropout_keep(rows64, c, N, seed, threshold)
        x = tl.where(keep, x * drop_scale, 0.0)
    if HAS_RESIDUAL:
        x += tl.load(R + r_off, mask=mask, other=0.0).to(acc_ty)
    s = x.to(S.dtype.element_ty)
    tl.store(S + s_off, s, mask=mask)
    # statistics of the rounded s: backward re-normalizes exactly what was stored
    return tl.where(mask, s.to(acc_ty), 0.0)


@triton.jit
def add_norm_fwd_kernel(
    X, R, S, Y, W, B, Mean, Rstd,
    stride_x_row, stride_r_row, stride_s_row, stride_y_row, M, N, eps, drop_scale, seed, threshold,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr, SINGLE_TILE: tl.constexpr,
):
    acc_ty = Rstd.dtype.element_ty
    rows = tl.program_id(0) * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    x_row = rows64[:, None] * stride_x_row
    r_row = rows64[:, None] * stride_r_row
    s_row = rows64[:, None] * stride_s_row
    y_rows = Y + rows64[:, None] * stride_y_row
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_TILE:
        mask = row_mask[:, None] & (cols[None, :] < N)
        s = _load_sum(X, R, S, Rstd, x_row + cols[None, :], r_row + cols[None, :], s_row + cols[None, :], rows64,
                      cols, mask, N, drop_scale, seed, threshold, HAS_RESIDUAL, HAS_DROPOUT)
        if IS_RMS:
            rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=1) / N + eps)
            xhat = s * rstd[:, None]
        else:
            # statistics of s - K, K the row's first element (as the LayerNorm forward): no large offset in the sums
            shift = tl.sum(tl.where(cols[None, :] == 0, s, 0.0), axis=1)
            ss = s - shift[:, None]
            mean_s, m2 = row_stats(ss, mask, N.to(acc_ty))
            rstd = 1.0 / tl.sqrt(m2 / N + eps)
            xhat = (ss - mean_s[:, None]) * rstd[:, None]
            tl.store(Mean + rows, shift + mean_s, mask=row_mask)
        tl.store(Rstd + rows, rstd, mask=row_mask)
        y = xhat
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(acc_ty)[None, :]
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(acc_ty)[None, :]
        tl.store(y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Pass 1: form and store s chunk by chunk, merging chunk statistics with Chan's formula.
        count = tl.zeros([ROWS_PER_PROGRAM], dtype=acc_ty)
        mean = tl.zeros([ROWS_PER_PROGRAM], dtype=acc_ty)  # of s - shift
        m2 = tl.zeros([ROWS_PER_PROGRAM], dtype=acc_ty)
        shift = tl.zeros([ROWS_PER_PROGRAM], dtype=acc_ty)
        sum_sq = tl.zeros([ROWS_PER_PROGRAM, BLOCK_N], dtype=acc_ty)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            s = _load_sum(X, R, S, Rstd, x_row + c[None, :], r_row + c[None, :], s_row + c[None, :], rows64,
                          c, mask, N, drop_scale, seed, threshold, HAS_RESIDUAL, HAS_DROPOUT)
            if IS_RMS:
                sum_sq += s * s
            else:
                # the shift K is the row's first element, taken from the first chunk
                shift = tl.where(start == 0, tl.sum(tl.where(c[None, :] == 0, s, 0.0), axis=1), shift)
                chunk_count = tl.minimum(N - start, BLOCK_N).to(acc_ty)
                chunk_mean, chunk_m2 = row_stats(s - shift[:, None], mask, chunk_count)
                count, mean, m2 = welford_merge(count, mean, m2, chunk_count, chunk_mean, chunk_m2)
        if IS_RMS:
            rstd = 1.0 / tl.sqrt(tl.sum(sum_sq, axis=1) / N + eps)
        else:
            rstd = 1.0 / tl.sqrt(m2 / N + eps)
            tl.store(Mean + rows, shift + mean, mask=row_mask)
        tl.store(Rstd + rows, rstd, mask=row_mask)
        tl.debug_barrier()  # pass 2 reads back S written by other threads of this program
        # Pass 2: normalize s (read back from S, L2-resident for a row of this size).
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            s = tl.load(S + s_row + c[None, :], mask=mask, other=0.0).to(acc_ty)
            if IS_RMS:
                y = s * rstd[:, None]
            else:
                y = ((s - shift[:, None]) - mean[:, None]) * rstd[:, None]
            if HAS_WEIGHT:
                y = y * tl.load(W + c, mask=c < N, other=0.0).to(acc_ty)[None, :]
            if HAS_BIAS:
                y = y + tl.load(B + c, mask=c < N, other=0.0).to(acc_ty)[None, :]
            tl.store(y_rows + c[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _store_grads(DX, DR, ds, dx_off, dr_off, rows64, c, mask, N, drop_scale, seed, threshold,
                 HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """dresidual = ds; dx = ds * mask * scale (the forward's mask, regenerated from the seed)."""
    if HAS_RESIDUAL:
        tl.store(DR + dr_off, ds.to(DR.dtype.element_ty), mask=mask)
    if HAS_DROPOUT:
        keep = dropout_keep(rows64, c, N, seed, threshold)
        ds = tl.where(keep, ds * drop_scale, 0.0)
    tl.store(DX + dx_off, ds.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def add_norm_bwd_kernel(
    DY, DS, S, W, Mean, Rstd, DX, DR, DW_partial, DB_partial,
    stride_dy_row, stride_ds_row, stride_s_row, stride_dx_row, stride_dr_row, M, N, drop_scale, seed, threshold,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr, SINGLE_TILE: tl.constexpr,
):
    acc_ty = Rstd.dtype.element_ty
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_row_blocks = tl.cdiv(M, ROWS_PER_PROGRAM)
    cols = tl.arange(0, BLOCK_N)
    partial_row = pid.to(tl.int64) * N
    if SINGLE_TILE:
        col_mask = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(acc_ty)
        dw_acc = tl.zeros([BLOCK_N], dtype=acc_ty)
        db_acc = tl.zeros([BLOCK_N], dtype=acc_ty)
    for block in range(pid, num_row_blocks, num_programs):
        rows = block * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)
        row_mask = rows < M
        rows64 = rows.to(tl.int64)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        if not IS_RMS:
            mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        s_rows = S + rows64[:, None] * stride_s_row
        dy_rows = DY + rows64[:, None] * stride_dy_row
        if HAS_DS:
            ds_rows = DS + rows64[:, None] * stride_ds_row
        dx_row = rows64[:, None] * stride_dx_row
        dr_row = rows64[:, None] * stride_dr_row
        if SINGLE_TILE:
            mask = row_mask[:, None] & col_mask[None, :]
            s = tl.load(s_rows + cols[None, :], mask=mask, other=0.0).to(acc_ty)
            # (statement order here, dy loaded late and c2 before c1, keeps ptxas from spilling on sm_80)
            if IS_RMS:
                xhat = tl.where(mask, s * rstd[:, None], 0.0)
            else:
                # Remove the saved fp32 mean's rounding: e = mean(s - mean), subtracted on its own (not mean + e,
                # which would round again). It matters when |mean| >> std, where ds cancels.
                d = tl.where(mask, s - mean[:, None], 0.0)
                e = tl.sum(d, axis=1) / N
                xhat = tl.where(mask, (d - e[:, None]) * rstd[:, None], 0.0)
            dy = tl.load(dy_rows + cols[None, :], mask=mask, other=0.0).to(acc_ty)
            if HAS_WEIGHT:
                g = dy * w[None, :]
                dw_acc += tl.sum(dy * xhat, axis=0)
            else:
                g = dy
            if HAS_BIAS:
                db_acc += tl.sum(dy, axis=0)
            if not IS_RMS:
                c2 = tl.sum(g, axis=1) / N
            c1 = tl.sum(g * xhat, axis=1) / N
            if IS_RMS:
                ds = (g - xhat * c1[:, None]) * rstd[:, None]
            else:
                ds = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            if HAS_DS:
                ds += tl.load(ds_rows + cols[None, :], mask=mask, other=0.0).to(acc_ty)
            _store_grads(DX, DR, ds, dx_row + cols[None, :], dr_row + cols[None, :], rows64, cols, mask, N,
                         drop_scale, seed, threshold, HAS_RESIDUAL, HAS_DROPOUT)
        else:
            # Pass 1: the running sums behind c1, c2 and e (see layer_norm.row_bwd_coefficients).
            sum_gx = tl.zeros([ROWS_PER_PROGRAM, BLOCK_N], dtype=acc_ty)
            sum_g = tl.zeros([ROWS_PER_PROGRAM, BLOCK_N], dtype=acc_ty)
            sum_d = tl.zeros([ROWS_PER_PROGRAM, BLOCK_N], dtype=acc_ty)  # unused (and dropped) for RMS
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_mask[:, None] & (c[None, :] < N)
                s = tl.load(s_rows + c[None, :], mask=mask, other=0.0).to(acc_ty)
                dy = tl.load(dy_rows + c[None, :], mask=mask, other=0.0).to(acc_ty)
                if IS_RMS:
                    xhat = s * rstd[:, None]
                else:
                    d = tl.where(mask, s - mean[:, None], 0.0)
                    sum_d += d
                    xhat = d * rstd[:, None]
                if HAS_WEIGHT:
                    dy = dy * tl.load(W + c, mask=c < N, other=0.0).to(acc_ty)[None, :]
                sum_gx += dy * xhat
                sum_g += dy
            c1, c2, e = row_bwd_coefficients(sum_gx, sum_g, sum_d, rstd, N, IS_RMS)
            # Pass 2: ds with the corrected xhat (which also feeds dW).
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_mask[:, None] & (c[None, :] < N)
                s = tl.load(s_rows + c[None, :], mask=mask, other=0.0).to(acc_ty)
                dy = tl.load(dy_rows + c[None, :], mask=mask, other=0.0).to(acc_ty)
                if IS_RMS:
                    xhat = s * rstd[:, None]
                else:
                    xhat = ((s - mean[:, None]) - e[:, None]) * rstd[:, None]
                xhat = tl.where(mask, xhat, 0.0)
                if HAS_WEIGHT:
                    g = dy * tl.load(W + c, mask=c < N, other=0.0).to(acc_ty)[None, :]
                    dw_ptr = DW_partial + partial_row + c
                    tl.store(dw_ptr, tl.load(dw_ptr, mask=c < N) + tl.sum(dy * xhat, axis=0), mask=c < N)
                else:
                    g = dy
                if HAS_BIAS:
                    db_ptr = DB_partial + partial_row + c
                    tl.store(db_ptr, tl.load(db_ptr, mask=c < N) + tl.sum(dy, axis=0), mask=c < N)
                if IS_RMS:
                    ds = (g - xhat * c1[:, None]) * rstd[:, None]
                else:
                    ds = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
                if HAS_DS:
                    ds += tl.load(ds_rows + c[None, :], mask=mask, other=0.0).to(acc_ty)
                _store_grads(DX, DR, ds, dx_row + c[None, :], dr_row + c[None, :], rows64, c, mask, N,
                             drop_scale, seed, threshold, HAS_RESIDUAL, HAS_DROPOUT)
    if SINGLE_TILE:
        if HAS_WEIGHT:
            tl.store(DW_partial + partial_row + cols, dw_acc, mask=col_mask)
        if HAS_BIAS:
            tl.store(DB_partial + partial_row + cols, db_acc, mask=col_mask)


# ---- launchers -----------------------------------------------------------------------------------------


def add_norm_fwd(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    is_rms: bool,
    dropout_p: float,
    seed: int,
    s_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """See ``fusednorm.backends.reference_variants.add_norm_fwd``."""
    m, n = x.shape
    acc = torch.float64 if s_dtype == torch.float64 else torch.float32
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    s = torch.empty((m, n), dtype=s_dtype, device=x.device)
    mean = torch.empty((0 if is_rms else m,), dtype=acc, device=x.device)
    rstd = torch.empty((m,), dtype=acc, device=x.device)
    cfg = row_norm_config(n, acc if acc == torch.float64 else x.dtype)
    grid = (triton.cdiv(m, cfg["ROWS_PER_PROGRAM"]),)
    with _device_ctx(x):
        add_norm_fwd_kernel[grid](
            x, residual, s, y, weight, bias, mean if not is_rms else rstd, rstd,
            x.stride(0), residual.stride(0) if residual is not None else 0, s.stride(0), y.stride(0),
            m, n, eps, dropout_scale(dropout_p), seed, dropout_threshold(dropout_p),
            IS_RMS=is_rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_RESIDUAL=residual is not None, HAS_DROPOUT=dropout_p > 0.0, **cfg,
        )
    return y, s, mean, rstd


def add_norm_bwd(
    dy: Tensor,
    ds: Tensor | None,
    s: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    is_rms: bool,
    dropout_p: float,
    seed: int,
    x_dtype: torch.dtype,
    residual_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """See ``fusednorm.backends.reference_variants.add_norm_bwd``."""
    m, n = s.shape
    acc = rstd.dtype
    cfg = add_norm_bwd_config(n, acc if acc == torch.float64 else s.dtype)
    row_blocks = triton.cdiv(m, cfg["ROWS_PER_PROGRAM"])
    per_sm = 1 if not cfg["SINGLE_TILE"] else (4 if cfg["BLOCK_N"] * cfg["ROWS_PER_PROGRAM"] <= 4096 else 2)
    programs = persistent_programs(s, row_blocks, per_sm)
    dx = torch.empty((m, n), dtype=x_dtype, device=s.device)
    dres = torch.empty((m, n), dtype=residual_dtype, device=s.device) if residual_dtype is not None else None
    alloc = torch.empty if cfg["SINGLE_TILE"] else torch.zeros
    dw_partial = alloc((programs, n), dtype=acc, device=s.device) if weight is not None else None
    db_partial = alloc((programs, n), dtype=acc, device=s.device) if bias is not None else None
    with _device_ctx(s):
        add_norm_bwd_kernel[(programs,)](
            dy, ds, s, weight, mean if not is_rms else rstd, rstd, dx, dres, dw_partial, db_partial,
            dy.stride(0), ds.stride(0) if ds is not None else 0, s.stride(0), dx.stride(0),
            dres.stride(0) if dres is not None else 0, m, n,
            dropout_scale(dropout_p), seed, dropout_threshold(dropout_p),
            IS_RMS=is_rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_DS=ds is not None,
            HAS_RESIDUAL=dres is not None, HAS_DROPOUT=dropout_p > 0.0, **cfg,
        )
    dw = dw_partial.sum(dim=0).to(weight.dtype) if weight is not None else None
    db = db_partial.sum(dim=0).to(bias.dtype) if bias is not None else None
    return dx, dres, dw, db


# ---- offline compilation list --------------------------------------------------------------------------


def _fwd_sig(x_ty: str, p_ty: str, s_ty: str, acc: str) -> dict[str, str]:
    return {"X": f"*{x_ty}", "R": f"*{s_ty}", "S": f"*{s_ty}", "Y": f"*{x_ty}", "W": f"*{p_ty}", "B": f"*{p_ty}",
            "Mean": f"*{acc}", "Rstd": f"*{acc}", "stride_x_row": "i32", "stride_r_row": "i32",
            "stride_s_row": "i32", "stride_y_row": "i32", "M": "i32", "N": "i32", "eps": "fp32",
            "drop_scale": "fp32", "seed": "i32", "threshold": "i32"}


def _bwd_sig(x_ty: str, p_ty: str, s_ty: str, acc: str) -> dict[str, str]:
    return {"DY": f"*{x_ty}", "DS": f"*{s_ty}", "S": f"*{s_ty}", "W": f"*{p_ty}", "Mean": f"*{acc}",
            "Rstd": f"*{acc}", "DX": f"*{x_ty}", "DR": f"*{s_ty}", "DW_partial": f"*{acc}", "DB_partial": f"*{acc}",
            "stride_dy_row": "i32", "stride_ds_row": "i32", "stride_s_row": "i32", "stride_dx_row": "i32",
            "stride_dr_row": "i32", "M": "i32", "N": "i32", "drop_scale": "fp32", "seed": "i32", "threshold": "i32"}


def kernel_configs() -> list[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """Every (name, JITFunction, signature, constexprs, num_warps) the launchers can pick, worst-case flags.

    Rows of each power-of-two width up to the single-tile limit plus the chunked path; fp32 data, bf16 data
    with fp32 parameters and an fp32 residual stream (residual_in_fp32), and fp64; residual, dropout, weight and
    bias on (prenorm gradient on in backward), LayerNorm and RMSNorm.
    """
    widths = [1 << k for k in range(MAX_SINGLE_TILE.bit_length())] + [MAX_SINGLE_TILE + 1]
    configs = []
    for x_ty, p_ty, s_ty, dtype in (("fp32", "fp32", "fp32", torch.float32), ("bf16", "fp32", "fp32", torch.bfloat16),
                                    ("fp64", "fp64", "fp64", torch.float64)):
        acc = "fp64" if x_ty == "fp64" else "fp32"
        for direction, config_fn in (("fwd", row_norm_config), ("bwd", add_norm_bwd_config)):
            seen = set()
            for n in widths:
                cfg = config_fn(n, dtype)
                key = tuple(cfg.items())
                if key in seen:
                    continue
                seen.add(key)
                meta = {k: v for k, v in cfg.items() if k != "num_warps"}
                for is_rms in (False, True):
                    flags = {"IS_RMS": is_rms, "HAS_WEIGHT": True, "HAS_BIAS": not is_rms, "HAS_RESIDUAL": True,
                             "HAS_DROPOUT": True}
                    tag = f"{'rms' if is_rms else 'ln'}[{x_ty}/{p_ty}/{s_ty}] BLOCK_N={meta['BLOCK_N']} " \
                          f"R={meta['ROWS_PER_PROGRAM']} {'single' if meta['SINGLE_TILE'] else 'chunked'}"
                    if direction == "fwd":
                        name, fn, sig, extra = "add_norm_fwd", add_norm_fwd_kernel, _fwd_sig(x_ty, p_ty, s_ty, acc), {}
                    else:
                        name, fn, sig, extra = ("add_norm_bwd", add_norm_bwd_kernel, _bwd_sig(x_ty, p_ty, s_ty, acc),
                                                {"HAS_DS": True})
                    consts = {**flags, **extra, **meta}
                    configs.append((f"{name} {tag}", fn, {**sig, **dict.fromkeys(consts, "constexpr")}, consts,
                                    cfg["num_warps"]))
    return configs
