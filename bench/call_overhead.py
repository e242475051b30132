"""Fixed cost of one eager call: fusednorm.functional against torch.nn.functional on tiny CPU tensors.

The kernels do almost nothing at these sizes, so the time is the Python / dispatcher path (see the eager fast
path in fusednorm/ops/__init__.py). Run: ``python bench/call_overhead.py`` (one thread, best of 5 runs of
2000 calls each, in microseconds per call).
"""

from __future__ import annotations

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


def main() -> None:
    torch.set_num_threads(1)
    x, w, b = torch.randn(4, 64), torch.randn(64), torch.randn(64)
    xm = torch.randn(2, 64, 4, 4)
    c = torch.ones(64), torch.zeros(64)
    rm, rv = torch.zeros(64), torch.ones(64)
    cases = {
        "layer_norm 4x64": (lambda: F.layer_norm(x, (64,), w, b), lambda: TF.layer_norm(x, (64,), w, b)),
        "group_norm 2x64x4x4": (lambda: F.group_norm(xm, 4, *c), lambda: TF.group_norm(xm, 4, *c)),
        "batch_norm eval 2x64x4x4": (
            lambda: F.batch_norm(xm, rm, rv, *c, False),
            lambda: TF.batch_norm(xm, rm, rv, *c, False),
        ),
    }
    print(f"{'case':28s} {'fusednorm us':>12s} {'torch us':>9s}")
    for name, (ours, theirs) in cases.items():
        print(f"{name:28s} {per_call_us(ours):12.1f} {per_call_us(theirs):9.1f}")


if __name__ == "__main__":
    main()
