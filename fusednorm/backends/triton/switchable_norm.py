"""Triton kernels for SwitchableNorm: per-plane passes over x viewed as (N*C, P) planes (P = H*W).

SwitchableNorm needs instance, layer and batch statistics. All three come from one read of x: ``plane_stats``
gives each (n, c) plane's exact (mean, M2); the layer (per n) and batch (per c) statistics are Chan merges of
those small (N, C) partials, done on the host side of the op. The normalization is then a per-plane affine map
y = (x - mu[r]) * a[r] + b[r] (``plane_affine``), and the backward is one per-plane reduction (``plane_bwd_reduce``:
sum(dy), sum(dy * (x - centre))) plus one per-plane affine map of (dy, x) (``plane_bwd_dx``).

Tiles are (ROWS_PER_PROGRAM planes, BLOCK_N pixels), chosen by ``row_norm_config`` from P and dtype only; each
program loops over the plane in BLOCK_N chunks merged with Chan's formula (exact for one chunk).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusednorm.backends.triton.layer_norm import MAX_SINGLE_TILE, _device_ctx, row_norm_config
from fusednorm.backends.triton.welford import row_stats, welford_merge

CHUNK = 4096


@triton.jit
def plane_stats_kernel(X, Mean, M2, stride_x_row, R, P, BLOCK_N: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr):
    acc_ty = Mean.dtype.element_ty
    rows = tl.program_id(0) * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)
    row_mask = rows < R
    row_start = X + rows.to(tl.int64) * stride_x_row
    x_rows = row_start[:, None]
    cols = tl.arange(0, BLOCK_N)
    # Statistics of x - x[r, 0]: the sums run over small differences, so the mean is correctly rounded when
    # |mean| >> std (the backward's centred terms x - mean amplify any error in it) and exact for a constant plane.
    # (P == 0: no load; a tensor comparison because the interpreter passes P as a Python int.)
    shift = tl.load(row_start, mask=row_mask & (tl.zeros_like(rows) < P), other=0.0).to(acc_ty)
    count = tl.zeros([ROWS_PER_PROGRAM], dtype=acc_ty)
    mean = tl.zeros([ROWS_PER_PROGRAM], dtype=acc_ty)
    m2 = tl.zeros([ROWS_PER_PROGRAM], dtype=acc_ty)
    for start in range(0, P, BLOCK_N):
        c = start + cols
        mask = row_mask[:, None] & (c[None, :] < P)
        x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(acc_ty) - shift[:, None]
        chunk_count = tl.minimum(P - start, BLOCK_N).to(acc_ty)
        chunk_mean, chunk_m2 = row_stats(x, mask, chunk_count)
        count, mean, m2 = welford_merge(count, mean, m2, chunk_count, chunk_mean, chunk_m2)
    mean = mean + shift
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(M2 + rows, m2, mask=row_mask)


@triton.jit
def plane_affine_kernel(X, Center, A, Bc, Y, stride_x_row, R, P,
                        BLOCK_N: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr):
    acc_ty = A.dtype.element_ty
    rows = tl.program_id(0) * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)
    row_mask = rows < R
    rows64 = rows.to(tl.int64)
    center = tl.load(Center + rows, mask=row_mask, other=0.0)
    a = tl.load(A + rows, mask=row_mask, other=0.0)
    b = tl.load(Bc + rows, mask=row_mask, other=0.0)
    cols = tl.arange(0, BLOCK_N)
    for start in range(0, P, BLOCK_N):
        c = start + cols
        mask = row_mask[:, None] & (c[None, :] < P)
        x = tl.load(X + rows64[:, None] * stride_x_row + c[None, :], mask=mask, other=0.0).to(acc_ty)
        y = (x - center[:, None]) * a[:, None] + b[:, None]
        tl.store(Y + rows64[:, None] * P + c[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def plane_bwd_reduce_kernel(DY, X, Center, SumDy, SumDyXc, stride_dy_row, stride_x_row, R, P,
                            BLOCK_N: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr):
    acc_ty = Center.dtype.element_ty
    rows = tl.program_id(0) * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)
    row_mask = rows < R
    rows64 = rows.to(tl.int64)
    center = tl.load(Center + rows, mask=row_mask, other=0.0)
    cols = tl.arange(0, BLOCK_N)
    s_dy = tl.zeros([ROWS_PER_PROGRAM, BLOCK_N], dtype=acc_ty)
    s_dyx = tl.zeros([ROWS_PER_PROGRAM, BLOCK_N], dtype=acc_ty)
    for start in range(0, P, BLOCK_N):
        c = start + cols
        mask = row_mask[:, None] & (c[None, :] < P)
        dy = tl.load(DY + rows64[:, None] * stride_dy_row + c[None, :], mask=mask, other=0.0).to(acc_ty)
        x = tl.load(X + rows64[:, None] * stride_x_row + c[None, :], mask=mask, other=0.0).to(acc_ty)
        s_dy += dy
        # centred on the statistics' mean: no cancellation when |mean| >> std
        s_dyx += tl.where(mask, dy * (x - center[:, None]), 0.0)
    tl.store(SumDy + rows, tl.sum(s_dy, axis=1), mask=row_mask)
    tl.store(SumDyXc + rows, tl.sum(s_dyx, axis=1), mask=row_mask)


@triton.jit
def plane_bwd_dx_kernel(DY, X, Center, Kc, Pc, Qc, DX, stride_dy_row, stride_x_row, R, P,
                        BLOCK_N: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr):
    acc_ty = Kc.dtype.element_ty
    rows = tl.program_id(0) * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)
    row_mask = rows < R
    rows64 = rows.to(tl.int64)
    center = tl.load(Center + rows, mask=row_mask, other=0.0)
    k = tl.load(Kc + rows, mask=row_mask, other=0.0)
    p = tl.load(Pc + rows, mask=row_mask, other=0.0)
    q = tl.load(Qc + rows, mask=row_mask, other=0.0)
    cols = tl.arange(0, BLOCK_N)
    for start in range(0, P, BLOCK_N):
        c = start + cols
        mask = row_mask[:, None] & (c[None, :] < P)
        dy = tl.load(DY + rows64[:, None] * stride_dy_row + c[None, :], mask=mask, other=0.0).to(acc_ty)
        x = tl.load(X + rows64[:, None] * stride_x_row + c[None, :], mask=mask, other=0.0).to(acc_ty)
        dx = dy * k[:, None] + (x - center[:, None]) * p[:, None] + q[:, None]
        tl.store(DX + rows64[:, None] * P + c[None, :], dx.to(DX.dtype.element_ty), mask=mask)


# Tiles of many tiny planes (P <= 8) spill their per-plane vectors (ptxas, sm_80): at most this many planes.
MAX_ROWS = 128


def plane_config(p: int, dtype: torch.dtype) -> dict[str, int]:
    """BLOCK_N, ROWS_PER_PROGRAM and num_warps for planes of p elements: planes up to 4096 in one chunk."""
    cfg = row_norm_config(min(p, CHUNK), dtype)
    rows, warps = cfg["ROWS_PER_PROGRAM"], cfg["num_warps"]
    if rows > MAX_ROWS:
        rows, warps = MAX_ROWS, max(1, cfg["BLOCK_N"] * MAX_ROWS // 256)
    return {"BLOCK_N": cfg["BLOCK_N"], "ROWS_PER_PROGRAM": rows, "num_warps": warps}


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _grid(r: int, cfg: dict[str, int]) -> tuple[int]:
    return (triton.cdiv(r, cfg["ROWS_PER_PROGRAM"]),)


def plane_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """See ``fusednorm.backends.reference_variants.plane_stats``: x (R, P), last dim contiguous."""
    r, p = x.shape
    mean = torch.empty((r,), dtype=_acc(x), device=x.device)
    m2 = torch.empty((r,), dtype=_acc(x), device=x.device)
    cfg = plane_config(p, x.dtype)
    with _device_ctx(x):
        plane_stats_kernel[_grid(r, cfg)](x, mean, m2, x.stride(0), r, p, **cfg)
    return mean, m2


def plane_affine(x: Tensor, center: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """See ``fusednorm.backends.reference_variants.plane_affine``."""
    r, p = x.shape
    y = torch.empty((r, p), dtype=x.dtype, device=x.device)
    cfg = plane_config(p, x.dtype)
    with _device_ctx(x):
        plane_affine_kernel[_grid(r, cfg)](x, center, a, b, y, x.stride(0), r, p, **cfg)
    return y


def plane_bwd_reduce(dy: Tensor, x: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
    """See ``fusednorm.backends.reference_variants.plane_bwd_reduce``."""
    r, p = x.shape
    s1 = torch.empty((r,), dtype=center.dtype, device=x.device)
    s2 = torch.empty((r,), dtype=center.dtype, device=x.device)
    cfg = plane_config(p, x.dtype)
    with _device_ctx(x):
        plane_bwd_reduce_kernel[_grid(r, cfg)](dy, x, center, s1, s2, dy.stride(0), x.stride(0), r, p, **cfg)
    return s1, s2


def plane_bwd_dx(dy: Tensor, x: Tensor, center: Tensor, k: Tensor, p_coef: Tensor, q: Tensor) -> Tensor:
    """See ``fusednorm.backends.reference_variants.plane_bwd_dx``."""
    r, p = x.shape
    dx = torch.empty((r, p), dtype=x.dtype, device=x.device)
    cfg = plane_config(p, x.dtype)
    with _device_ctx(x):
        plane_bwd_dx_kernel[_grid(r, cfg)](dy, x, center, k, p_coef, q, dx, dy.stride(0), x.stride(0), r, p, **cfg)
    return dx


def kernel_configs() -> list[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """Every (name, jit function, signature, constexprs, num_warps) ``plane_config`` can pick."""
    configs = []
    for x_ty, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp64", torch.float64)):
        acc = "fp64" if x_ty == "fp64" else "fp32"
        seen = set()
        for p in [1 << k for k in range(min(CHUNK, MAX_SINGLE_TILE).bit_length())]:
            cfg = plane_config(p, dtype)
            key = tuple(cfg.items())
            if key in seen:
                continue
            seen.add(key)
            consts = {"BLOCK_N": cfg["BLOCK_N"], "ROWS_PER_PROGRAM": cfg["ROWS_PER_PROGRAM"]}
            common = {"R": "i32", "P": "i32"}
            sigs = {
                "plane_stats": (plane_stats_kernel, {"X": f"*{x_ty}", "Mean": f"*{acc}", "M2": f"*{acc}",
                                                     "stride_x_row": "i32", **common}),
                "plane_affine": (plane_affine_kernel, {
                    "X": f"*{x_ty}", "Center": f"*{acc}", "A": f"*{acc}", "Bc": f"*{acc}", "Y": f"*{x_ty}",
                    "stride_x_row": "i32", **common}),
                "plane_bwd_reduce": (plane_bwd_reduce_kernel, {
                    "DY": f"*{x_ty}", "X": f"*{x_ty}", "Center": f"*{acc}", "SumDy": f"*{acc}",
                    "SumDyXc": f"*{acc}", "stride_dy_row": "i32", "stride_x_row": "i32", **common}),
                "plane_bwd_dx": (plane_bwd_dx_kernel, {
                    "DY": f"*{x_ty}", "X": f"*{x_ty}", "Center": f"*{acc}", "Kc": f"*{acc}", "Pc": f"*{acc}",
                    "Qc": f"*{acc}", "DX": f"*{x_ty}", "stride_dy_row": "i32", "stride_x_row": "i32", **common}),
            }
            for name, (fn, sig) in sigs.items():
                configs.append((f"{name} [{x_ty}] BLOCK_N={consts['BLOCK_N']} R={consts['ROWS_PER_PROGRAM']}", fn,
                                {**sig, **dict.fromkeys(consts, "constexpr")}, dict(consts), cfg["num_warps"]))
    return configs
