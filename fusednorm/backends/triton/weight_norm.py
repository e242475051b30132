"""Triton kernels for weight normalization: w[o] = g[o] * v[o] / ||v[o]|| over rows of v (O, K).

One program per row. The forward accumulates sum(v^2) in fp32 over BLOCK_K chunks (a sum of squares has no
cancellation problem), then scales; the backward forms <dw, v> the same way and writes
dv = g/||v|| * (dw - v <dw, v>/||v||^2) and dg = <dw, v>/||v||. Rows up to BLOCK_K stay in registers between
the two passes' loads (the second load hits L1/L2), longer rows are streamed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusednorm.backends.triton.layer_norm import _device_ctx

MAX_BLOCK_K = 4096


@triton.jit
def weight_norm_fwd_kernel(V, G, W, Norm, K, BLOCK_K: tl.constexpr):
    acc_ty = Norm.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    v_row = V + row * K
    sum_sq = tl.zeros([BLOCK_K], dtype=acc_ty)
    for start in range(0, K, BLOCK_K):
        c = start + cols
        v = tl.load(v_row + c, mask=c < K, other=0.0).to(acc_ty)
        sum_sq += v * v
    norm = tl.sqrt(tl.sum(sum_sq, axis=0))
    tl.store(Norm + row, norm)
    factor = tl.load(G + row).to(acc_ty) / norm
    for start in range(0, K, BLOCK_K):
        c = start + cols
        v = tl.load(v_row + c, mask=c < K, other=0.0).to(acc_ty)
        tl.store(W + row * K + c, (v * factor).to(W.dtype.element_ty), mask=c < K)


@triton.jit
def weight_norm_bwd_kernel(DW, V, G, Norm, DV, DG, K, BLOCK_K: tl.constexpr):
    acc_ty = Norm.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    v_row = V + row * K
    dw_row = DW + row * K
    dot_acc = tl.zeros([BLOCK_K], dtype=acc_ty)
    for start in range(0, K, BLOCK_K):
        c = start + cols
        v = tl.load(v_row + c, mask=c < K, other=0.0).to(acc_ty)
        dw = tl.load(dw_row + c, mask=c < K, other=0.0).to(acc_ty)
        dot_acc += v * dw
    dot = tl.sum(dot_acc, axis=0)
    norm = tl.load(Norm + row)
    g = tl.load(G + row).to(acc_ty)
    tl.store(DG + row, (dot / norm).to(DG.dtype.element_ty))
    a = g / norm
    bcoef = a * dot / (norm * norm)
    for start in range(0, K, BLOCK_K):
        c = start + cols
        v = tl.load(v_row + c, mask=c < K, other=0.0).to(acc_ty)
        dw = tl.load(dw_row + c, mask=c < K, other=0.0).to(acc_ty)
        tl.store(DV + row * K + c, (a * dw - bcoef * v).to(DV.dtype.element_ty), mask=c < K)


def _config(k: int) -> tuple[int, int]:
    block = min(MAX_BLOCK_K, triton.next_power_of_2(max(k, 1)))
    return block, min(8, max(1, block // 256))


def weight_norm_fwd(v: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """See ``fusednorm.backends.reference_variants.weight_norm_fwd``: v (O, K) contiguous, g (O,)."""
    o, k = v.shape
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    w = torch.empty((o, k), dtype=v.dtype, device=v.device)
    norm = torch.empty((o,), dtype=acc, device=v.device)
    block, warps = _config(k)
    with _device_ctx(v):
        weight_norm_fwd_kernel[(o,)](v, g, w, norm, k, BLOCK_K=block, num_warps=warps)
    return w, norm


def weight_norm_bwd(dw: Tensor, v: Tensor, g: Tensor, norm: Tensor) -> tuple[Tensor, Tensor]:
    """See ``fusednorm.backends.reference_variants.weight_norm_bwd``: dw, v (O, K) contiguous."""
    o, k = v.shape
    dv = torch.empty((o, k), dtype=v.dtype, device=v.device)
    dg = torch.empty((o,), dtype=g.dtype, device=v.device)
    block, warps = _config(k)
    with _device_ctx(v):
        weight_norm_bwd_kernel[(o,)](dw, v, g, norm, dv, dg, k, BLOCK_K=block, num_warps=warps)
    return dv, dg


def kernel_configs() -> list[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """Every (name, jit function, signature, constexprs, num_warps) the launchers can pick."""
    configs = []
    for x_ty, p_ty in (("fp32", "fp32"), ("bf16", "fp32"), ("fp64", "fp64")):
        acc = "fp64" if x_ty == "fp64" else "fp32"
        for block in [1 << k for k in range(MAX_BLOCK_K.bit_length())]:
            _, warps = _config(block)
            consts = {"BLOCK_K": block}
            fwd = {"V": f"*{x_ty}", "G": f"*{p_ty}", "W": f"*{x_ty}", "Norm": f"*{acc}", "K": "i32"}
            bwd = {"DW": f"*{x_ty}", "V": f"*{x_ty}", "G": f"*{p_ty}", "Norm": f"*{acc}", "DV": f"*{x_ty}",
                   "DG": f"*{p_ty}", "K": "i32"}
            for name, fn, sig in (("weight_norm_fwd", weight_norm_fwd_kernel, fwd),
                                  ("weight_norm_bwd", weight_norm_bwd_kernel, bwd)):
                configs.append((f"{name} [{x_ty}/{p_ty}] BLOCK_K={block}", fn, {**sig, "BLOCK_K": "constexpr"},
                                dict(consts), warps))
    return configs
