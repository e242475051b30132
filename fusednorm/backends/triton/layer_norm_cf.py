"""Triton kernels for channels-first LayerNorm (``LayerNorm2d``): normalize over C at every pixel of (N, C, P).

The tensor is read in place through its strides (NCHW: pixels contiguous, channels_last: channels contiguous),
so no permute copy is made. Each tile is (BLOCK_C channels, BLOCK_P pixels) and the reduction runs over axis 0.

- Single-tile path (C <= ``MAX_SINGLE_C``): all channels of BLOCK_P pixels sit in registers; exact two-step
  statistics, one read of X, one write of Y.
- Chunked path (larger C): Welford over channel chunks merged with Chan's formula, then a normalize pass.

Backward: a persistent grid; each program walks (image, pixel-block) tiles, writes dX and keeps its dW/dB share
in fp32 (registers on the single-tile path, its own partial row otherwise); the (programs, C) partials are
summed afterwards (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusednorm.backends.triton.layer_norm import _device_ctx, persistent_programs
from fusednorm.backends.triton.welford import welford_merge

MAX_SINGLE_C = 512
# Backward keeps x, dy, xhat and g tiles live: its single-tile limit and tile are smaller (ptxas: no spills).
MAX_SINGLE_C_BWD = 128
TILE_ELEMENTS = 4096
CHUNK_C = 64
CHUNK_P = 64


@triton.jit
def _col_stats(x, mask, count):
    """Exact two-step (mean, M2) over axis 0 of the (BLOCK_C, BLOCK_P) tile ``x`` (masked lanes ignored)."""
    mean = tl.sum(tl.where(mask, x, 0.0), axis=0) / tl.maximum(count, 1.0)
    centred = tl.where(mask, x - mean[None, :], 0.0)
    return mean, tl.sum(centred * centred, axis=0)


@triton.jit
def layer_norm_cf_fwd_kernel(
    X, Y, W, B, Mean, Rstd,
    stride_xn, stride_xc, stride_xp, stride_yn, stride_yc, stride_yp, C, P, num_p_blocks, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    acc_ty = Rstd.dtype.element_ty
    pid = tl.program_id(0)
    n = (pid // num_p_blocks).to(tl.int64)
    p = (pid % num_p_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < P
    p64 = p.to(tl.int64)
    x_base = X + n * stride_xn + p64[None, :] * stride_xp
    y_base = Y + n * stride_yn + p64[None, :] * stride_yp
    stat_off = n * P + p64
    cs = tl.arange(0, BLOCK_C)
    if SINGLE_TILE:
        mask = (cs[:, None] < C) & p_mask[None, :]
        x = tl.load(x_base + cs[:, None].to(tl.int64) * stride_xc, mask=mask, other=0.0).to(acc_ty)
        # statistics of x - x[channel 0]: exact for a constant pixel (mean == x, not x +- 1 ulp)
        k = tl.sum(tl.where(cs[:, None] == 0, x, 0.0), axis=0)
        d = x - k[None, :]
        mean_d, m2 = _col_stats(d, mask, C.to(acc_ty))
        mean = k + mean_d
        rstd = 1.0 / tl.sqrt(m2 / C + eps)
        y = (d - mean_d[None, :]) * rstd[None, :]
        if HAS_WEIGHT:
            y = y * tl.load(W + cs, mask=cs < C, other=0.0).to(acc_ty)[:, None]
        if HAS_BIAS:
            y = y + tl.load(B + cs, mask=cs < C, other=0.0).to(acc_ty)[:, None]
        tl.store(y_base + cs[:, None].to(tl.int64) * stride_yc, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # statistics of x - x[channel 0] (exact for a constant pixel), merged over chunks with Chan's formula
        k = tl.load(X + n * stride_xn + p64 * stride_xp, mask=p_mask, other=0.0).to(acc_ty)
        count = tl.zeros([BLOCK_P], dtype=acc_ty)
        mean_d = tl.zeros([BLOCK_P], dtype=acc_ty)
        m2 = tl.zeros([BLOCK_P], dtype=acc_ty)
        for start in range(0, C, BLOCK_C):
            c = start + cs
            mask = (c[:, None] < C) & p_mask[None, :]
            x = tl.load(x_base + c[:, None].to(tl.int64) * stride_xc, mask=mask, other=0.0).to(acc_ty)
            chunk_count = tl.minimum(C - start, BLOCK_C).to(acc_ty)
            chunk_mean, chunk_m2 = _col_stats(x - k[None, :], mask, chunk_count)
            count, mean_d, m2 = welford_merge(count, mean_d, m2, chunk_count, chunk_mean, chunk_m2)
        mean = k + mean_d
        rstd = 1.0 / tl.sqrt(m2 / C + eps)
        for start in range(0, C, BLOCK_C):
            c = start + cs
            mask = (c[:, None] < C) & p_mask[None, :]
            x = tl.load(x_base + c[:, None].to(tl.int64) * stride_xc, mask=mask, other=0.0).to(acc_ty)
            y = (x - k[None, :] - mean_d[None, :]) * rstd[None, :]
            if HAS_WEIGHT:
                y = y * tl.load(W + c, mask=c < C, other=0.0).to(acc_ty)[:, None]
            if HAS_BIAS:
                y = y + tl.load(B + c, mask=c < C, other=0.0).to(acc_ty)[:, None]
            tl.store(y_base + c[:, None].to(tl.int64) * stride_yc, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + stat_off, mean, mask=p_mask)
    tl.store(Rstd + stat_off, rstd, mask=p_mask)


@triton.jit
def layer_norm_cf_bwd_kernel(
    DY, X, W, Mean, Rstd, DX, DW_partial, DB_partial,
    stride_dyn, stride_dyc, stride_dyp, stride_xn, stride_xc, stride_xp, stride_dxn, stride_dxc, stride_dxp,
    C, P, num_p_blocks, num_tiles,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    acc_ty = Rstd.dtype.element_ty
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cs = tl.arange(0, BLOCK_C)
    partial_row = pid.to(tl.int64) * C
    if SINGLE_TILE:
        c_mask = cs < C
        if HAS_WEIGHT:
            w = tl.load(W + cs, mask=c_mask, other=0.0).to(acc_ty)
        dw_acc = tl.zeros([BLOCK_C], dtype=acc_ty)
        db_acc = tl.zeros([BLOCK_C], dtype=acc_ty)
    for tile in range(pid, num_tiles, num_programs):
        n = (tile // num_p_blocks).to(tl.int64)
        p = (tile % num_p_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = p < P
        p64 = p.to(tl.int64)
        mean = tl.load(Mean + n * P + p64, mask=p_mask, other=0.0)
        rstd = tl.load(Rstd + n * P + p64, mask=p_mask, other=0.0)
        x_base = X + n * stride_xn + p64[None, :] * stride_xp
        dy_base = DY + n * stride_dyn + p64[None, :] * stride_dyp
        dx_base = DX + n * stride_dxn + p64[None, :] * stride_dxp
        if SINGLE_TILE:
            mask = c_mask[:, None] & p_mask[None, :]
            c64 = cs[:, None].to(tl.int64)
            x = tl.load(x_base + c64 * stride_xc, mask=mask, other=0.0).to(acc_ty)
            dy = tl.load(dy_base + c64 * stride_dyc, mask=mask, other=0.0).to(acc_ty)
            # Remove the saved fp32 mean's rounding: e = mean(x - mean), subtracted on its own (not mean + e,
            # which would round again). It matters when |mean| >> std, where dx cancels.
            d = tl.where(mask, x - mean[None, :], 0.0)
            e = tl.sum(d, axis=0) / C
            xhat = tl.where(mask, (d - e[None, :]) * rstd[None, :], 0.0)
            if HAS_WEIGHT:
                g = dy * w[:, None]
                dw_acc += tl.sum(dy * xhat, axis=1)
            else:
                g = dy
            if HAS_BIAS:
                db_acc += tl.sum(dy, axis=1)
            c1 = tl.sum(g * xhat, axis=0) / C
            c2 = tl.sum(g, axis=0) / C
            dx = (g - xhat * c1[None, :] - c2[None, :]) * rstd[None, :]
            tl.store(dx_base + c64 * stride_dxc, dx.to(DX.dtype.element_ty), mask=mask)
        else:
            # Pass 1: c1 = mean(g * xhat), c2 = mean(g), and e = mean(x - mean), the saved fp32 mean's rounding.
            # xhat here still carries it; c1 is linear in xhat, so it is corrected afterwards.
            sum_gx = tl.zeros([BLOCK_C, BLOCK_P], dtype=acc_ty)
            sum_g = tl.zeros([BLOCK_C, BLOCK_P], dtype=acc_ty)
            sum_d = tl.zeros([BLOCK_C, BLOCK_P], dtype=acc_ty)
            for start in range(0, C, BLOCK_C):
                c = start + cs
                mask = (c[:, None] < C) & p_mask[None, :]
                c64 = c[:, None].to(tl.int64)
                x = tl.load(x_base + c64 * stride_xc, mask=mask, other=0.0).to(acc_ty)
                dy = tl.load(dy_base + c64 * stride_dyc, mask=mask, other=0.0).to(acc_ty)
                d = tl.where(mask, x - mean[None, :], 0.0)
                sum_d += d
                xhat = d * rstd[None, :]
                if HAS_WEIGHT:
                    dy = dy * tl.load(W + c, mask=c < C, other=0.0).to(acc_ty)[:, None]
                sum_gx += dy * xhat
                sum_g += dy
            sg = tl.sum(sum_g, axis=0)
            c2 = sg / C
            e = tl.sum(sum_d, axis=0) / C
            c1 = (tl.sum(sum_gx, axis=0) - (e * rstd) * sg) / C
            # Pass 2: dx with the corrected xhat (which also feeds dW).
            for start in range(0, C, BLOCK_C):
                c = start + cs
                mask = (c[:, None] < C) & p_mask[None, :]
                c64 = c[:, None].to(tl.int64)
                x = tl.load(x_base + c64 * stride_xc, mask=mask, other=0.0).to(acc_ty)
                dy = tl.load(dy_base + c64 * stride_dyc, mask=mask, other=0.0).to(acc_ty)
                xhat = tl.where(mask, ((x - mean[None, :]) - e[None, :]) * rstd[None, :], 0.0)
                if HAS_WEIGHT:
                    g = dy * tl.load(W + c, mask=c < C, other=0.0).to(acc_ty)[:, None]
                    dw_ptr = DW_partial + partial_row + c
                    tl.store(dw_ptr, tl.load(dw_ptr, mask=c < C) + tl.sum(dy * xhat, axis=1), mask=c < C)
                else:
                    g = dy
                if HAS_BIAS:
                    db_ptr = DB_partial + partial_row + c
                    tl.store(db_ptr, tl.load(db_ptr, mask=c < C) + tl.sum(dy, axis=1), mask=c < C)
                dx = (g - xhat * c1[None, :] - c2[None, :]) * rstd[None, :]
                tl.store(dx_base + c64 * stride_dxc, dx.to(DX.dtype.element_ty), mask=mask)
    if SINGLE_TILE:
        if HAS_WEIGHT:
            tl.store(DW_partial + partial_row + cs, dw_acc, mask=c_mask)
        if HAS_BIAS:
            tl.store(DB_partial + partial_row + cs, db_acc, mask=c_mask)


def layer_norm_cf_config(c: int, dtype: torch.dtype = torch.float32, backward: bool = False) -> dict[str, int | bool]:
    """BLOCK_C, BLOCK_P, SINGLE_TILE, num_warps for C channels: a function of (C, dtype, direction) only (no
    recompiles per shape). The backward (x, dy, xhat and g tiles live) gets smaller tiles, at most 8 warps (so
    up to 255 registers per thread), and for fp64 a lower single-tile limit: checked with ptxas, no spills."""
    fp64 = dtype == torch.float64
    if backward:  # 8 (fp32) / 4 (fp64) tile elements per thread
        limit = MAX_SINGLE_C_BWD // 2 if fp64 else MAX_SINGLE_C_BWD
        tile, per_warp = (TILE_ELEMENTS // 4, 128) if fp64 else (TILE_ELEMENTS // 2, 256)
    else:
        limit, tile, per_warp = MAX_SINGLE_C, TILE_ELEMENTS // (2 if fp64 else 1), 512
    if c <= limit:
        block_c = triton.next_power_of_2(c)
        block_p = max(16, min(256, tile // block_c))
        single = True
    else:
        block_c, block_p, single = CHUNK_C, CHUNK_P, False
    num_warps = min(8, max(1, block_c * block_p // per_warp))
    return {"BLOCK_C": block_c, "BLOCK_P": block_p, "SINGLE_TILE": single, "num_warps": num_warps}


def _strides3(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def layer_norm_cf_fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """See ``fusednorm.backends.reference_variants.layer_norm_cf_fwd``: x (N, C, P), any strides."""
    n, c, p = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.empty_like(x)  # keeps x's strides for a dense x (NCHW or channels_last)
    mean = torch.empty((n, p), dtype=acc, device=x.device)
    rstd = torch.empty((n, p), dtype=acc, device=x.device)
    cfg = layer_norm_cf_config(c, x.dtype)
    num_p_blocks = triton.cdiv(p, cfg["BLOCK_P"])
    with _device_ctx(x):
        layer_norm_cf_fwd_kernel[(n * num_p_blocks,)](
            x, y, weight, bias, mean, rstd, *_strides3(x), *_strides3(y), c, p, num_p_blocks, eps,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **cfg,
        )
    return y, mean, rstd


def layer_norm_cf_bwd(
    dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """See ``fusednorm.backends.reference_variants.layer_norm_cf_bwd``."""
    n, c, p = x.shape
    acc = rstd.dtype
    cfg = layer_norm_cf_config(c, x.dtype, backward=True)
    num_p_blocks = triton.cdiv(p, cfg["BLOCK_P"])
    tiles = n * num_p_blocks
    programs = persistent_programs(x, tiles, 4 if cfg["SINGLE_TILE"] else 2)
    dx = torch.empty_like(x)
    alloc = torch.empty if cfg["SINGLE_TILE"] else torch.zeros
    dw_partial = alloc((programs, c), dtype=acc, device=x.device) if weight is not None else None
    db_partial = alloc((programs, c), dtype=acc, device=x.device) if bias is not None else None
    with _device_ctx(x):
        layer_norm_cf_bwd_kernel[(programs,)](
            dy, x, weight, mean, rstd, dx, dw_partial, db_partial,
            *_strides3(dy), *_strides3(x), *_strides3(dx), c, p, num_p_blocks, tiles,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **cfg,
        )
    dw = dw_partial.sum(dim=0).to(weight.dtype) if weight is not None else None
    db = db_partial.sum(dim=0).to(bias.dtype) if bias is not None else None
    return dx, dw, db


def kernel_configs() -> list[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """Every (name, jit function, signature, constexprs, num_warps) ``layer_norm_cf_config`` can pick.

    Channel counts of every power of two up to ``MAX_SINGLE_C`` plus the chunked path; fp32 and bf16 data with
    fp32 parameters, and fp64; weight and bias on (the worst case).
    """
    configs = []
    widths = [1 << k for k in range(MAX_SINGLE_C.bit_length())] + [MAX_SINGLE_C + 1]
    strides = lambda pre: {f"stride_{pre}{d}": "i32" for d in "ncp"}  # noqa: E731
    for x_ty, p_ty, dtype in (("fp32", "fp32", torch.float32), ("bf16", "fp32", torch.bfloat16),
                              ("fp64", "fp64", torch.float64)):
        acc = "fp64" if x_ty == "fp64" else "fp32"
        fwd_sig = {"X": f"*{x_ty}", "Y": f"*{x_ty}", "W": f"*{p_ty}", "B": f"*{p_ty}", "Mean": f"*{acc}",
                   "Rstd": f"*{acc}", **strides("x"), **strides("y"), "C": "i32", "P": "i32",
                   "num_p_blocks": "i32", "eps": "fp32"}
        bwd_sig = {"DY": f"*{x_ty}", "X": f"*{x_ty}", "W": f"*{p_ty}", "Mean": f"*{acc}", "Rstd": f"*{acc}",
                   "DX": f"*{x_ty}", "DW_partial": f"*{acc}", "DB_partial": f"*{acc}", **strides("dy"),
                   **strides("x"), **strides("dx"), "C": "i32", "P": "i32", "num_p_blocks": "i32",
                   "num_tiles": "i32"}
        for backward in (False, True):
            seen = set()
            for c in widths:
                cfg = layer_norm_cf_config(c, dtype, backward)
                key = tuple(cfg.items())
                if key in seen:
                    continue
                seen.add(key)
                meta = {k: v for k, v in cfg.items() if k != "num_warps"}
                consts = {"HAS_WEIGHT": True, "HAS_BIAS": True, **meta}
                tag = f"[{x_ty}/{p_ty}] BLOCK_C={meta['BLOCK_C']} BLOCK_P={meta['BLOCK_P']} " \
                      f"{'single' if meta['SINGLE_TILE'] else 'chunked'}"
                name, fn, sig = ("layer_norm_cf_bwd", layer_norm_cf_bwd_kernel, bwd_sig) if backward else \
                    ("layer_norm_cf_fwd", layer_norm_cf_fwd_kernel, fwd_sig)
                configs.append((f"{name} {tag}", fn, {**sig, **dict.fromkeys(consts, "constexpr")}, dict(consts),
                                cfg["num_warps"]))
    return configs
