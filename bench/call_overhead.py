"""Fixed cost of one eager call: fusednorm.functional against torch.nn.functional on tiny CPU tensors.

The kernels do almost nothing at these sizes, so the time is the Python / dispatcher path (see the eager fast
path in fusednorm/ops/__init__.py). Run: ``python bench/call_overhead.py``; microseconds per call, one thread.

- warm: best of 5 runs of 2000 back-to-back calls (everything the path touches stays in cache);
- cold: median of 200 calls, each right after a 64 MiB copy has swept the caches. That is the situation of a
  norm layer in a real model, where the previous layer's kernel has just streamed its tensors through memory,
  and a path that touches many Python objects pays a cache miss on most of them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

import fusednorm.functional as F

TF = torch.nn.functional


def per_call_us(fn: Callable[[], object], calls: int = 2000, runs: int = 5) -> float:
    """Best of ``runs`` averages over ``calls`` calls of ``fn``, in microseconds."""
    for _ in range(100):
        fn()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def cold_call_us(fn: Callable[[], object], calls: int = 200, sweep_bytes: int = 64 << 20) -> float:
    """Median time of one call of ``fn`` right after copying ``sweep_bytes`` (caches evicted), in microseconds."""
    src = torch.ones(sweep_bytes // 4)
    dst = torch.empty_like(src)
    samples = []
    for _ in range(calls):
        dst.copy_(src)
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main() -> None:
    torch.set_num_threads(1)
    x, w, b = torch.randn(4, 64), torch.randn(64), torch.randn(64)
    xm = torch.randn(2, 64, 4, 4)
    c = torch.ones(64), torch.zeros(64)
    rm, rv = torch.zeros(64), torch.ones(64)
    xg = xm.clone().requires_grad_(True)
    cg = torch.ones(64, requires_grad=True), torch.zeros(64, requires_grad=True)
    rm2, rv2 = torch.zeros(64), torch.ones(64)
    cases = {
        "layer_norm 4x64": (lambda: F.layer_norm(x, (64,), w, b), lambda: TF.layer_norm(x, (64,), w, b)),
        "group_norm 2x64x4x4": (lambda: F.group_norm(xm, 4, *c), lambda: TF.group_norm(xm, 4, *c)),
        "group_norm (grad)": (lambda: F.group_norm(xg, 4, *cg), lambda: TF.group_norm(xg, 4, *cg)),
        "batch_norm eval 2x64x4x4": (
            lambda: F.batch_norm(xm, rm, rv, *c, False),
            lambda: TF.batch_norm(xm, rm, rv, *c, False),
        ),
        "batch_norm train (grad)": (
            lambda: F.batch_norm(xg, rm, rv, *cg, True),
            lambda: TF.batch_norm(xg, rm2, rv2, *cg, True),
        ),
    }
    print(f"{'case':26s} {'fusednorm warm':>14s} {'torch warm':>10s} {'fusednorm cold':>14s} {'torch cold':>10s}")
    for name, (ours, theirs) in cases.items():
        print(
            f"{name:26s} {per_call_us(ours):14.1f} {per_call_us(theirs):10.1f}"
            f" {cold_call_us(ours):14.1f} {cold_call_us(theirs):10.1f}"
        )


if __name__ == "__main__":
    main()
