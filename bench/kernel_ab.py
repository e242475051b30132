"""The native C ops alone against torch's ATen kernels, cold inputs, interleaved: where the kernels stand
without fusednorm's Python op layer (compare with ``fusednorm-bench``, which times the public functions).

Run: ``python bench/kernel_ab.py`` (CPU, the extension built). Each case cycles over enough input copies to
exceed the last-level cache; calls alternate between the providers so that consecutive calls never share an
input copy; GC is off while sampling. Prints medians in ms and torch's median over ours (above 1: ours is
faster). The machine's noise applies: repeat a run before trusting a difference under ~10 %.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import torch

from fusednorm.bench.timing import keep_freed_cpu_memory

Fn = Callable[[int], object]


def interleaved_ms(fns: dict[str, Fn], copies: int, calls: int = 60) -> dict[str, float]:
    """Median ms per provider; call i of provider p uses input copy (i * P + p) % copies."""
    for f in fns.values():
        for i in range(3):
            f(i % copies)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    gc.collect()
    gc.disable()
    try:
        for i in range(calls):
            for p, (name, f) in enumerate(fns.items()):
                start = time.perf_counter()
                f((i * len(fns) + p) % copies)
                samples[name].append((time.perf_counter() - start) * 1e3)
    finally:
        gc.enable()
    return {k: statistics.median(v) for k, v in samples.items()}


def _copies(nbytes: int) -> int:
    return (128 << 20) // max(nbytes, 1) + 2


C = torch.ops.fusednorm_C
ATEN = torch.ops.aten


def report(name: str, ms: dict[str, float]) -> None:
    print(f"{name:42s} {ms['native']:10.3f} {ms['torch']:9.3f} {ms['torch'] / ms['native']:11.2f}x")


def layer_norm_bwd(m: int, n: int, dtype: torch.dtype = torch.float32) -> None:
    k = _copies(2 * m * n * dtype.itemsize)
    xs = [torch.randn(m, n, dtype=dtype) for _ in range(k)]
    dys = [torch.randn(m, n, dtype=dtype) for _ in range(k)]
    # fp32 parameters and statistics for both: torch's mixed-precision path for bf16 / fp16 x
    w, b = torch.randn(n), torch.randn(n)
    stats = [C.layer_norm_fwd(x, w, b, 1e-5, False) for x in xs]
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    report(f"layer_norm bwd {m}x{n} {name}", interleaved_ms({
        "native": lambda i: C.layer_norm_bwd(dys[i], xs[i], w, b, stats[i][1], stats[i][2], False),
        "torch": lambda i: ATEN.native_layer_norm_backward(
            dys[i], xs[i], (n,), stats[i][1].view(m, 1), stats[i][2].view(m, 1), w, b, [True, True, True]),
    }, k))


def group_norm_fwd(shape: tuple[int, int, int, int], fmt: torch.memory_format) -> None:
    nb, c, hw = shape[0], shape[1], shape[2] * shape[3]
    k = _copies(nb * c * hw * 4)
    xs = [torch.randn(shape).contiguous(memory_format=fmt) for _ in range(k)]
    w, b = torch.randn(c), torch.randn(c)
    layout = "NHWC" if fmt == torch.channels_last else "NCHW"
    report(f"group_norm fwd {'x'.join(map(str, shape))} {layout} fp32", interleaved_ms({
        "native": lambda i: C.group_norm_fwd(xs[i], w, b, 32, 1e-5, "none"),
        "torch": lambda i: ATEN.native_group_norm(xs[i], w, b, nb, c, hw, 32, 1e-5),
    }, k))


def batch_norm_train_fwd_cl(shape: tuple[int, int, int, int]) -> None:
    """Statistics + rstd + apply (what the op layer runs) against torch's whole forward."""
    c = shape[1]
    count = shape[0] * shape[2] * shape[3]
    k = _copies(count * c * 4)
    xs = [torch.randn(shape).contiguous(memory_format=torch.channels_last) for _ in range(k)]
    w, b = torch.randn(c), torch.randn(c)

    def native(i: int) -> torch.Tensor:
        mean, m2 = C.batch_norm_stats(xs[i])
        return C.batch_norm_apply(xs[i], mean, (m2 / count).add_(1e-5).rsqrt_(), w, b)

    report(f"batch_norm train fwd {'x'.join(map(str, shape))} NHWC fp32", interleaved_ms({
        "native": native,
        "torch": lambda i: ATEN.native_batch_norm(xs[i], w, b, None, None, True, 0.1, 1e-5),
    }, k))


def main() -> None:
    keep_freed_cpu_memory()
    import fusednorm.backends.native  # noqa: F401  (loads the extension: torch.ops.fusednorm_C)

    torch.set_num_threads(2)
    print(f"{'case':42s} {'native ms':>10s} {'torch ms':>9s} {'torch/native':>12s}")
    # short rows (ViT / ConvNeXt widths, channels_last LayerNorm2d) take one row at a time, long rows two
    for m, n in ((1568, 384), (2048, 512), (2048, 768), (4096, 768), (1024, 8192)):
        layer_norm_bwd(m, n)
    for m, n in ((2048, 1024), (4096, 4096)):
        layer_norm_bwd(m, n, torch.bfloat16)
    group_norm_fwd((2, 320, 64, 64), torch.contiguous_format)
    group_norm_fwd((8, 256, 56, 56), torch.channels_last)
    batch_norm_train_fwd_cl((32, 64, 56, 56))
    batch_norm_train_fwd_cl((32, 512, 14, 14))


if __name__ == "__main__":
    main()
