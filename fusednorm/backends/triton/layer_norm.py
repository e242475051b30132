"""Triton kernels for LayerNorm and RMSNorm (one kernel family, ``IS_RMS`` picks the statistics).

Forward, ``row_norm_fwd_kernel``: each program owns ``ROWS_PER_PROGRAM`` rows.
- Single-tile path (N <= max_single_tile(dtype)): the row lives in registers; one read of X, exact two-step
  statistics, fused affine, one write of Y.
- LayerNorm statistics are those of x - K with K the row's first element (mean = K + mean(x - K), y from
  (x - K) - mean(x - K)): with |mean| >> std a plain fp32 row sum rounds the mean by several ulps.
- Chunked path (any larger N): a Welford pass over BLOCK_N-wide chunks merged with Chan's formula, then a
  normalize pass. X is read twice; nothing is limited to N <= 64K.

Backward, ``row_norm_bwd_kernel``: a persistent grid (about SM count x k programs). Each program walks its
rows, writes dX, and keeps its share of dW/dB in fp32; xhat is recomputed as ((x - mean) - e) * rstd with
e = mean(x - mean), which removes the saved fp32 mean's rounding (dX cancels when |mean| >> std). The
per-program partials (programs, N) are summed by a second, deterministic reduction (no atomics).

Config choice depends on N and dtype only (never on M), so a new batch size never recompiles; M, strides and
eps are runtime arguments (eps as fp32).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusednorm.backends.triton.welford import row_shift, row_stats, welford_merge

# Largest row kept entirely in registers (elements). Above it the chunked path runs. Backward keeps five
# row-sized arrays live (x, dy, w, dW and dB partials), so its limit is half the forward's: 16 warps x 32
# threads at 16K fp32 elements would need > 128 registers per thread and spill.
MAX_SINGLE_TILE = 16384
MAX_SINGLE_TILE_BWD = 8192
# Chunk width of the chunked path.
CHUNK_N = 4096
# A tile holds at least this many elements: small rows are packed several per program.
MIN_TILE_ELEMENTS = 1024


@triton.jit
def row_norm_fwd_kernel(
    X, Y, W, B, Mean, Rstd,
    stride_x_row, stride_y_row, M, N, eps,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr, SINGLE_TILE: tl.constexpr,
):
    acc_ty = Rstd.dtype.element_ty  # fp32, or fp64 for fp64 input
    rows = tl.program_id(0) * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)  # 64-bit offsets: M * stride may exceed 2^31
    x_rows = X + rows64[:, None] * stride_x_row
    y_rows = Y + rows64[:, None] * stride_y_row
    cols = tl.arange(0, BLOCK_N)

    if SINGLE_TILE:
        mask = row_mask[:, None] & (cols[None, :] < N)
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(acc_ty)
        if IS_RMS:
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
            xhat = x * rstd[:, None]
        else:
            shift = row_shift(x_rows, row_mask).to(acc_ty)
            xs = x - shift[:, None]
            mean_s, m2 = row_stats(xs, mask, N.to(acc_ty))
            rstd = 1.0 / tl.sqrt(m2 / N + eps)
            xhat = (xs - mean_s[:, None]) * rstd[:, None]
            tl.store(Mean + rows, shift + mean_s, mask=row_mask)
        tl.store(Rstd + rows, rstd, mask=row_mask)
        y = xhat
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(acc_ty)[None, :]
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(acc_ty)[None, :]
        tl.store(y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Pass 1: statistics over chunks. RMS only needs sum(x^2), which has no cancellation problem.
        count = tl.zeros([ROWS_PER_PROGRAM], dtype=acc_ty)
        mean = tl.zeros([ROWS_PER_PROGRAM], dtype=acc_ty)
        m2 = tl.zeros([ROWS_PER_PROGRAM], dtype=acc_ty)
        sum_sq = tl.zeros([ROWS_PER_PROGRAM, BLOCK_N], dtype=acc_ty)
        if not IS_RMS:
            shift = row_shift(x_rows, row_mask).to(acc_ty)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(acc_ty)
            if IS_RMS:
                sum_sq += x * x
            else:
                chunk_count = tl.minimum(N - start, BLOCK_N).to(acc_ty)
                chunk_mean, chunk_m2 = row_stats(x - shift[:, None], mask, chunk_count)
                count, mean, m2 = welford_merge(count, mean, m2, chunk_count, chunk_mean, chunk_m2)
        if IS_RMS:
            rstd = 1.0 / tl.sqrt(tl.sum(sum_sq, axis=1) / N + eps)
        else:
            rstd = 1.0 / tl.sqrt(m2 / N + eps)
            tl.store(Mean + rows, shift + mean, mask=row_mask)  # ``mean`` is the shifted mean
        tl.store(Rstd + rows, rstd, mask=row_mask)
        # Pass 2: normalize.
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(acc_ty)
            if IS_RMS:
                y = x * rstd[:, None]
            else:
                y = ((x - shift[:, None]) - mean[:, None]) * rstd[:, None]
            if HAS_WEIGHT:
                y = y * tl.load(W + c, mask=c < N, other=0.0).to(acc_ty)[None, :]
            if HAS_BIAS:
                y = y + tl.load(B + c, mask=c < N, other=0.0).to(acc_ty)[None, :]
            tl.store(y_rows + c[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def row_bwd_coefficients(sum_gx, sum_g, sum_d, rstd, N, IS_RMS: tl.constexpr):
    """The row terms of a chunked LayerNorm/RMSNorm backward from pass 1's (R, BLOCK_N) running sums of
    g * xhat, g and (LayerNorm) d = x - mean: c1 = mean(g * xhat), c2 = mean(g), and e = mean(x - mean), the
    saved fp32 mean's rounding (0 for RMS). Pass 1's xhat = d * rstd still carries e; c1 is linear in xhat, so
    it is corrected here: sum(g * xhat) - e * rstd * sum(g). Pass 2 then uses xhat = ((x - mean) - e) * rstd."""
    sg = tl.sum(sum_g, axis=1)
    c2 = sg / N
    if IS_RMS:
        e = tl.zeros_like(c2)
        c1 = tl.sum(sum_gx, axis=1) / N
    else:
        e = tl.sum(sum_d, axis=1) / N
        c1 = (tl.sum(sum_gx, axis=1) - (e * rstd) * sg) / N
    return c1, c2, e


@triton.jit
def row_norm_bwd_kernel(
    DY, X, W, Mean, Rstd, DX, DW_partial, DB_partial,
    stride_dy_row, stride_x_row, stride_dx_row, M, N,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr, SINGLE_TILE: tl.constexpr,
):
    acc_ty = Rstd.dtype.element_ty
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_row_blocks = tl.cdiv(M, ROWS_PER_PROGRAM)
    cols = tl.arange(0, BLOCK_N)
    partial_row = pid.to(tl.int64) * N  # this program's row of the (programs, N) dW/dB partials
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
        x_rows = X + rows64[:, None] * stride_x_row
        dy_rows = DY + rows64[:, None] * stride_dy_row
        dx_rows = DX + rows64[:, None] * stride_dx_row
        if SINGLE_TILE:
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(acc_ty)
            dy = tl.load(dy_rows + cols[None, :], mask=mask, other=0.0).to(acc_ty)
            if IS_RMS:
                xhat = x * rstd[:, None]
            else:
                # Remove the saved fp32 mean's rounding: e = mean(x - mean), subtracted on its own (not mean + e,
                # which would round again). It matters when |mean| >> std, where dx cancels.
                d = tl.where(mask, x - mean[:, None], 0.0)
                e = tl.sum(d, axis=1) / N
                xhat = (d - e[:, None]) * rstd[:, None]
            xhat = tl.where(mask, xhat, 0.0)
            if HAS_WEIGHT:
                g = dy * w[None, :]
                dw_acc += tl.sum(dy * xhat, axis=0)
            else:
                g = dy
            if HAS_BIAS:
                db_acc += tl.sum(dy, axis=0)
            c1 = tl.sum(g * xhat, axis=1) / N
            if IS_RMS:
                dx = (g - xhat * c1[:, None]) * rstd[:, None]
            else:
                c2 = tl.sum(g, axis=1) / N
                dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            tl.store(dx_rows + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        else:
            # Pass 1: the running sums behind c1, c2 and e (see row_bwd_coefficients).
            sum_gx = tl.zeros([ROWS_PER_PROGRAM, BLOCK_N], dtype=acc_ty)
            sum_g = tl.zeros([ROWS_PER_PROGRAM, BLOCK_N], dtype=acc_ty)
            sum_d = tl.zeros([ROWS_PER_PROGRAM, BLOCK_N], dtype=acc_ty)  # unused (and dropped) for RMS
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_mask[:, None] & (c[None, :] < N)
                x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(acc_ty)
                dy = tl.load(dy_rows + c[None, :], mask=mask, other=0.0).to(acc_ty)
                if IS_RMS:
                    xhat = x * rstd[:, None]
                else:
                    d = tl.where(mask, x - mean[:, None], 0.0)
                    sum_d += d
                    xhat = d * rstd[:, None]
                if HAS_WEIGHT:
                    dy = dy * tl.load(W + c, mask=c < N, other=0.0).to(acc_ty)[None, :]
                sum_gx += dy * xhat
                sum_g += dy
            c1, c2, e = row_bwd_coefficients(sum_gx, sum_g, sum_d, rstd, N, IS_RMS)
            # Pass 2: dX, and this program's dW/dB partials (a row only it touches: no atomics needed).
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_mask[:, None] & (c[None, :] < N)
                x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(acc_ty)
                dy = tl.load(dy_rows + c[None, :], mask=mask, other=0.0).to(acc_ty)
                if IS_RMS:
                    xhat = x * rstd[:, None]
                else:
                    xhat = ((x - mean[:, None]) - e[:, None]) * rstd[:, None]
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
                    dx = (g - xhat * c1[:, None]) * rstd[:, None]
                else:
                    dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
                tl.store(dx_rows + c[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if SINGLE_TILE:
        if HAS_WEIGHT:
            tl.store(DW_partial + partial_row + cols, dw_acc, mask=col_mask)
        if HAS_BIAS:
            tl.store(DB_partial + partial_row + cols, db_acc, mask=col_mask)


# ---- launch configuration ------------------------------------------------------------------------------


def row_norm_config(n: int, dtype: torch.dtype, backward: bool = False) -> dict[str, int | bool]:
    """Kernel meta-parameters for rows of ``n`` elements of ``dtype``: a function of (n, dtype, direction) only.

    Returns BLOCK_N, ROWS_PER_PROGRAM, SINGLE_TILE and num_warps. fp64 values take two registers each, so
    fp64 rows get half the register-resident width.
    """
    limit = MAX_SINGLE_TILE_BWD if backward else MAX_SINGLE_TILE
    if dtype == torch.float64:
        limit //= 2
    single = n <= limit
    block_n = triton.next_power_of_2(n) if single else CHUNK_N
    min_tile = MIN_TILE_ELEMENTS // 4 if dtype == torch.float64 else MIN_TILE_ELEMENTS
    rows_per_program = max(1, min_tile // block_n) if single else 1
    tile = block_n * rows_per_program
    # Backward holds about twice the live values per element (x, dy, xhat, dW/dB sums): spread it thinner.
    num_warps = min(16, max(1, tile // (128 if backward else 256)))
    return {
        "BLOCK_N": block_n,
        "ROWS_PER_PROGRAM": rows_per_program,
        "SINGLE_TILE": single,
        "num_warps": num_warps,
    }


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def persistent_programs(x: Tensor, work_items: int, per_sm: int) -> int:
    """Programs for a persistent grid: about ``per_sm`` per SM on CUDA (4 SMs assumed under the interpreter)."""
    sms = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
        if x.is_cuda else 4
    return max(1, min(work_items, sms * per_sm))


def _device_ctx(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else _nullcontext()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def layer_norm_fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, is_rms: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """See ``fusednorm.backends.reference.layer_norm_fwd``: x (M, N) with contiguous last dim."""
    m, n = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    mean = torch.empty((0 if is_rms else m,), dtype=acc, device=x.device)
    rstd = torch.empty((m,), dtype=acc, device=x.device)
    cfg = row_norm_config(n, x.dtype)
    grid = (triton.cdiv(m, cfg["ROWS_PER_PROGRAM"]),)
    with _device_ctx(x):
        row_norm_fwd_kernel[grid](
            x, y, weight, bias, mean if not is_rms else rstd, rstd,
            x.stride(0), y.stride(0), m, n, eps,
            IS_RMS=is_rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **cfg,
        )
    return y, mean, rstd


def layer_norm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    is_rms: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """See ``fusednorm.backends.reference.layer_norm_bwd``: dy, x (M, N) with contiguous last dims."""
    m, n = x.shape
    acc = rstd.dtype
    cfg = row_norm_config(n, x.dtype, backward=True)
    row_blocks = triton.cdiv(m, cfg["ROWS_PER_PROGRAM"])
    per_sm = 1 if not cfg["SINGLE_TILE"] else (4 if cfg["BLOCK_N"] * cfg["ROWS_PER_PROGRAM"] <= 4096 else 2)
    programs = persistent_programs(x, row_blocks, per_sm)
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    # The chunked path accumulates into its partial row in place, so it must start from zero.
    alloc = torch.empty if cfg["SINGLE_TILE"] else torch.zeros
    dw_partial = alloc((programs, n), dtype=acc, device=x.device) if weight is not None else None
    db_partial = alloc((programs, n), dtype=acc, device=x.device) if bias is not None else None
    with _device_ctx(x):
        row_norm_bwd_kernel[(programs,)](
            dy, x, weight, mean if not is_rms else rstd, rstd, dx, dw_partial, db_partial,
            dy.stride(0), x.stride(0), dx.stride(0), m, n,
            IS_RMS=is_rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **cfg,
        )
    dw = dw_partial.sum(dim=0).to(weight.dtype) if weight is not None else None
    db = db_partial.sum(dim=0).to(bias.dtype) if bias is not None else None
    return dx, dw, db


# ---- offline compilation (fusednorm-bench --kernels, tests/test_codegen.py) -----------------------------------


def kernel_configs() -> list[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """Every (kernel, constexpr config, num_warps) ``row_norm_config`` can pick, with worst-case dtypes.

    Rows of each power-of-two width up to the single-tile limit plus the chunked path, for fp32, bf16 input with
    fp32 parameters, and fp64, with every flag on (weight and bias; the RMS variant separately). Returns tuples
    (name, jit function, signature, constexprs, num_warps) for ``triton.compiler.ASTSource``.
    """
    widths = [1 << k for k in range(MAX_SINGLE_TILE.bit_length())] + [MAX_SINGLE_TILE + 1]
    configs = []
    for x_ty, p_ty, dtype in (("fp32", "fp32", torch.float32), ("bf16", "fp32", torch.bfloat16),
                              ("fp64", "fp64", torch.float64)):
        acc = "fp64" if x_ty == "fp64" else "fp32"
        fwd_sig = {"X": f"*{x_ty}", "Y": f"*{x_ty}", "W": f"*{p_ty}", "B": f"*{p_ty}",
                   "Mean": f"*{acc}", "Rstd": f"*{acc}", "stride_x_row": "i32", "stride_y_row": "i32",
                   "M": "i32", "N": "i32", "eps": "fp32"}
        bwd_sig = {"DY": f"*{x_ty}", "X": f"*{x_ty}", "W": f"*{p_ty}", "Mean": f"*{acc}",
                   "Rstd": f"*{acc}", "DX": f"*{x_ty}", "DW_partial": f"*{acc}", "DB_partial": f"*{acc}",
                   "stride_dy_row": "i32", "stride_x_row": "i32", "stride_dx_row": "i32", "M": "i32", "N": "i32"}
        for name, fn, sig, backward in (("row_norm_fwd", row_norm_fwd_kernel, fwd_sig, False),
                                        ("row_norm_bwd", row_norm_bwd_kernel, bwd_sig, True)):
            seen = set()
            for n in widths:
                cfg = row_norm_config(n, dtype, backward=backward)
                key = tuple(cfg.items())
                if key in seen:
                    continue
                seen.add(key)
                meta = {k: v for k, v in cfg.items() if k != "num_warps"}
                for is_rms in (False, True):
                    consts = {"IS_RMS": is_rms, "HAS_WEIGHT": True, "HAS_BIAS": not is_rms, **meta}
                    tag = (f"{'rms' if is_rms else 'ln'}[{x_ty}/{p_ty}] BLOCK_N={meta['BLOCK_N']} "
                           f"R={meta['ROWS_PER_PROGRAM']} {'single' if meta['SINGLE_TILE'] else 'chunked'}")
                    configs.append((f"{name} {tag}", fn, {**sig, **dict.fromkeys(consts, "constexpr")},
                                    consts, cfg["num_warps"]))
    return configs
