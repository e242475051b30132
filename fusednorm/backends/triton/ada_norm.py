"""Triton kernels for adaptive LayerNorm/RMSNorm (DiT AdaLN): y = norm(x) * (1 + scale[b]) + shift[b].

x is (B, L, D) with a contiguous last dim; scale/shift (B, D) broadcast over L. Rows of D elements are kept in
registers (D <= ``MAX_SINGLE_TILE``); the modulation is fused into the normalize pass, so x is read once and y
written once.

Backward runs a (B, J) grid: program (b, j) walks every J-th block of rows of batch b, so scale[b]/shift[b]
are loaded once, and dscale/dshift/dweight/dbias are accumulated in fp32 registers and written as per-program
partials, reduced afterwards in a fixed order (deterministic, no atomics).

Rows wider than ``MAX_SINGLE_TILE`` (``BWD_MAX_D`` for the backward, which holds seven row-sized vectors per
program and would spill above it; halved for fp64) run the same math as torch ops on the device. DiT/SD3/Flux
widths (1152-3072) are all below it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusednorm.backends.triton.layer_norm import (
    MAX_SINGLE_TILE,
    _device_ctx,
    persistent_programs,
    row_norm_config,
)
from fusednorm.backends.triton.welford import row_shift, row_stats

BWD_MAX_D = 4096


@triton.jit
def ada_norm_fwd_kernel(
    X, SCALE, SHIFT, Y, W, B, Mean, Rstd,
    stride_xb, stride_xl, stride_scale_b, stride_shift_b, L, M, N, eps,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
):
    acc_ty = Rstd.dtype.element_ty
    rows = tl.program_id(0) * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    bidx = rows64 // L
    lidx = rows64 % L
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    x_rows = X + (bidx * stride_xb + lidx * stride_xl)[:, None]
    x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0)
    x = x.to(acc_ty)
    if IS_RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
        xhat = x * rstd[:, None]
    else:
        # statistics of x - K, K the row's first element (see welford.row_shift): no large offset in the sums
        shift = row_shift(x_rows, row_mask).to(acc_ty)
        xs = x - shift[:, None]
        mean_s, m2 = row_stats(xs, mask, N.to(acc_ty))
        rstd = 1.0 / tl.sqrt(m2 / N + eps)
        xhat = (xs - mean_s[:, None]) * rstd[:, None]
        tl.store(Mean + rows, shift + mean_s, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)
    y = xhat
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_mask, other=0.0).to(acc_ty)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_mask, other=0.0).to(acc_ty)[None, :]
    scale = tl.load(SCALE + bidx[:, None] * stride_scale_b + cols[None, :], mask=mask, other=0.0).to(acc_ty)
    shift = tl.load(SHIFT + bidx[:, None] * stride_shift_b + cols[None, :], mask=mask, other=0.0).to(acc_ty)
    y = y * (1.0 + scale) + shift
    tl.store(Y + rows64[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def ada_norm_bwd_kernel(
    DY, X, SCALE, W, B, Mean, Rstd, DX, DSCALE_partial, DSHIFT_partial, DW_partial, DB_partial,
    stride_dyb, stride_dyl, stride_xb, stride_xl, stride_scale_b, L, N, num_l_blocks,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
):
    acc_ty = Rstd.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    num_j = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    one_plus_scale = 1.0 + tl.load(SCALE + b * stride_scale_b + cols, mask=col_mask, other=0.0).to(acc_ty)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(acc_ty)
    if HAS_BIAS:
        bias = tl.load(B + cols, mask=col_mask, other=0.0).to(acc_ty)
    dscale_acc = tl.zeros([BLOCK_N], dtype=acc_ty)
    dshift_acc = tl.zeros([BLOCK_N], dtype=acc_ty)
    dw_acc = tl.zeros([BLOCK_N], dtype=acc_ty)
    db_acc = tl.zeros([BLOCK_N], dtype=acc_ty)
    for lb in range(j, num_l_blocks, num_j):
        l = lb * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)
        l_mask = l < L
        l64 = l.to(tl.int64)
        rows = b * L + l64
        mask = l_mask[:, None] & col_mask[None, :]
        rstd = tl.load(Rstd + rows, mask=l_mask, other=0.0)
        x = tl.load(X + (b * stride_xb + l64 * stride_xl)[:, None] + cols[None, :], mask=mask, other=0.0)
        x = x.to(acc_ty)
        dy = tl.load(DY + (b * stride_dyb + l64 * stride_dyl)[:, None] + cols[None, :], mask=mask, other=0.0)
        dy = dy.to(acc_ty)
        if IS_RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(Mean + rows, mask=l_mask, other=0.0)
            # Remove the saved fp32 mean's rounding: e = mean(x - mean), subtracted on its own (not mean + e,
            # which would round again). It matters when |mean| >> std, where dx cancels.
            d = tl.where(mask, x - mean[:, None], 0.0)
            e = tl.sum(d, axis=1) / N
            xhat = (d - e[:, None]) * rstd[:, None]
        xhat = tl.where(mask, xhat, 0.0)
        nrm = xhat
        if HAS_WEIGHT:
            nrm = nrm * w[None, :]
        if HAS_BIAS:
            nrm = nrm + bias[None, :]
        dscale_acc += tl.sum(dy * nrm, axis=0)
        dshift_acc += tl.sum(dy, axis=0)
        dn = dy * one_plus_scale[None, :]
        if HAS_WEIGHT:
            dw_acc += tl.sum(dn * xhat, axis=0)
            g = dn * w[None, :]
        else:
            g = dn
        if HAS_BIAS:
            db_acc += tl.sum(dn, axis=0)
        c1 = tl.sum(g * xhat, axis=1) / N
        if IS_RMS:
            dx = (g - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(g, axis=1) / N
            dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    part = (b * num_j + j) * N + cols
    tl.store(DSCALE_partial + part, dscale_acc, mask=col_mask)
    tl.store(DSHIFT_partial + part, dshift_acc, mask=col_mask)
    if HAS_WEIGHT:
        tl.store(DW_partial + part, dw_acc, mask=col_mask)
    if HAS_BIAS:
        tl.store(DB_partial + part, db_acc, mask=col_mask)


# The backward reduces dscale/dshift/dW/dB over the rows of a tile (axis 0): tiles of many short rows make that
# cross-warp reduction spill (ptxas, sm_80), so backward tiles hold at most this many rows.
BWD_MAX_ROWS = 16


def _config(n: int, dtype: torch.dtype, backward: bool = False) -> dict[str, int | bool]:
    cfg = dict(row_norm_config(n, dtype, backward=backward))
    cfg.pop("SINGLE_TILE")
    if backward and cfg["ROWS_PER_PROGRAM"] > BWD_MAX_ROWS:
        cfg["ROWS_PER_PROGRAM"] = BWD_MAX_ROWS
        cfg["num_warps"] = min(16, max(1, cfg["BLOCK_N"] * BWD_MAX_ROWS // 256))
    return cfg


def _fits(n: int, dtype: torch.dtype, backward: bool) -> bool:
    """Whether rows of n elements run in the register-resident kernels (else torch ops on the device)."""
    limit = BWD_MAX_D if backward else MAX_SINGLE_TILE
    return n <= (limit // 2 if dtype == torch.float64 else limit)


def ada_norm_fwd(
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    is_rms: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """See ``fusednorm.backends.reference_variants.ada_norm_fwd``: x (B, L, D), scale/shift (B, D)."""
    bsz, seq, n = x.shape
    if not _fits(n, x.dtype, backward=False):
        from fusednorm.backends.reference_variants import ada_norm_fwd as torch_ops

        return torch_ops(x, scale, shift, weight, bias, eps, is_rms)
    m = bsz * seq
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.empty((bsz, seq, n), dtype=x.dtype, device=x.device)
    mean = torch.empty((0,) if is_rms else (bsz, seq), dtype=acc, device=x.device)
    rstd = torch.empty((bsz, seq), dtype=acc, device=x.device)
    cfg = _config(n, x.dtype)
    grid = (triton.cdiv(m, cfg["ROWS_PER_PROGRAM"]),)
    with _device_ctx(x):
        ada_norm_fwd_kernel[grid](
            x, scale, shift, y, weight, bias, mean if not is_rms else rstd, rstd,
            x.stride(0), x.stride(1), scale.stride(0), shift.stride(0), seq, m, n, eps,
            IS_RMS=is_rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **cfg,
        )
    return y, mean, rstd


def ada_norm_bwd(
    dy: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    is_rms: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """See ``fusednorm.backends.reference_variants.ada_norm_bwd``."""
    bsz, seq, n = x.shape
    if not _fits(n, x.dtype, backward=True):
        from fusednorm.backends.reference_variants import ada_norm_bwd as torch_ops

        return torch_ops(dy, x, scale, shift, weight, bias, mean, rstd, is_rms)
    acc = rstd.dtype
    cfg = _config(n, x.dtype, backward=True)
    num_l_blocks = triton.cdiv(seq, cfg["ROWS_PER_PROGRAM"])
    # about 4 programs per SM in total, split over the batch
    per_batch = max(1, min(num_l_blocks, persistent_programs(x, bsz * num_l_blocks, 4) // max(bsz, 1)))
    dx = torch.empty((bsz, seq, n), dtype=x.dtype, device=x.device)
    parts = [torch.empty((bsz * per_batch, n), dtype=acc, device=x.device) for _ in range(2)]
    dw_p = torch.empty((bsz * per_batch, n), dtype=acc, device=x.device) if weight is not None else None
    db_p = torch.empty((bsz * per_batch, n), dtype=acc, device=x.device) if bias is not None else None
    with _device_ctx(x):
        ada_norm_bwd_kernel[(bsz, per_batch)](
            dy, x, scale, weight, bias, mean if not is_rms else rstd, rstd, dx, parts[0], parts[1], dw_p, db_p,
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), scale.stride(0), seq, n, num_l_blocks,
            IS_RMS=is_rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **cfg,
        )
    dscale = parts[0].view(bsz, per_batch, n).sum(dim=1).to(scale.dtype)
    dshift = parts[1].view(bsz, per_batch, n).sum(dim=1).to(shift.dtype)
    dw = dw_p.sum(dim=0).to(weight.dtype) if weight is not None else None
    db = db_p.sum(dim=0).to(bias.dtype) if bias is not None else None
    return dx, dscale, dshift, dw, db


def _fwd_sig(x_ty: str, p_ty: str, acc: str) -> dict[str, str]:
    return {"X": f"*{x_ty}", "SCALE": f"*{x_ty}", "SHIFT": f"*{x_ty}", "Y": f"*{x_ty}", "W": f"*{p_ty}",
            "B": f"*{p_ty}", "Mean": f"*{acc}", "Rstd": f"*{acc}", "stride_xb": "i32", "stride_xl": "i32",
            "stride_scale_b": "i32", "stride_shift_b": "i32", "L": "i32", "M": "i32", "N": "i32", "eps": "fp32"}


def _bwd_sig(x_ty: str, p_ty: str, acc: str) -> dict[str, str]:
    return {"DY": f"*{x_ty}", "X": f"*{x_ty}", "SCALE": f"*{x_ty}", "W": f"*{p_ty}", "B": f"*{p_ty}",
            "Mean": f"*{acc}", "Rstd": f"*{acc}", "DX": f"*{x_ty}", "DSCALE_partial": f"*{acc}",
            "DSHIFT_partial": f"*{acc}", "DW_partial": f"*{acc}", "DB_partial": f"*{acc}", "stride_dyb": "i32",
            "stride_dyl": "i32", "stride_xb": "i32", "stride_xl": "i32", "stride_scale_b": "i32", "L": "i32",
            "N": "i32", "num_l_blocks": "i32"}


def kernel_configs() -> list[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """Every (name, jit function, signature, constexprs, num_warps) the launchers can pick (worst-case flags)."""
    configs = []
    widths = [1 << k for k in range(MAX_SINGLE_TILE.bit_length())]
    for x_ty, p_ty, dtype in (("fp32", "fp32", torch.float32), ("bf16", "fp32", torch.bfloat16),
                              ("fp64", "fp64", torch.float64)):
        acc = "fp64" if x_ty == "fp64" else "fp32"
        for backward in (False, True):
            seen = set()
            for n in widths:
                if not _fits(n, dtype, backward):
                    continue
                cfg = _config(n, dtype, backward)
                key = tuple(cfg.items())
                if key in seen:
                    continue
                seen.add(key)
                meta = {k: v for k, v in cfg.items() if k != "num_warps"}
                for is_rms in (False, True):
                    consts = {"IS_RMS": is_rms, "HAS_WEIGHT": True, "HAS_BIAS": True, **meta}
                    tag = f"{'rms' if is_rms else 'ln'}[{x_ty}/{p_ty}] BLOCK_N={meta['BLOCK_N']} " \
                          f"R={meta['ROWS_PER_PROGRAM']}"
                    name, fn, sig = ("ada_norm_bwd", ada_norm_bwd_kernel, _bwd_sig(x_ty, p_ty, acc)) if backward \
                        else ("ada_norm_fwd", ada_norm_fwd_kernel, _fwd_sig(x_ty, p_ty, acc))
                    configs.append((f"{name} {tag}", fn, {**sig, **dict.fromkeys(consts, "constexpr")},
                                    dict(consts), cfg["num_warps"]))
    return configs
