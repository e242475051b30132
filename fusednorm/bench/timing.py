"""Timing: warm-up, then per-call samples summarized by median and spread; copy bandwidth; peak memory.

CPU: each call is timed with ``time.perf_counter`` (CPU kernels are synchronous). CUDA: each call is
bracketed by CUDA events and the samples are read after one synchronize, so host overhead between calls does
not count unless the GPU starves (then it should count: the user would see it too).

Callers pass a *list* of zero-argument callables that do the same work on different input copies; samples
cycle through them so that, when one input set is smaller than the last-level cache, consecutive calls do not
find their data already cached (``rotation_count`` picks how many copies).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import torch


def resolve_device(name: str | None) -> torch.device:
    """``auto``/None -> ``cuda`` when a GPU is visible, else ``cpu``; anything else as torch parses it."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    return dev


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(device: torch.device) -> int:
    """Size of the last-level cache the inputs should not fit in (GPU L2, CPU L3), with a safe fallback."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    with contextlib.suppress(OSError):
        for entry in os.listdir(base):
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip().upper()
                mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
                best = max(best, int(text.rstrip("KMG")) * mult)
    return best or 32 * 2**20


def rotation_count(set_bytes: int, cache: int, max_sets: int = 16, budget_bytes: int = 2**30) -> int:
    """How many input copies to cycle through so that the copies together exceed twice the cache
    (at most ``max_sets``, and never more than ``budget_bytes`` of copies)."""
    if set_bytes <= 0 or set_bytes >= 2 * cache:
        return 1
    k = math.ceil(2 * cache / set_bytes)
    k = min(k, max_sets, max(1, budget_bytes // set_bytes))
    return max(1, k)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Summary of per-call samples, in seconds."""

    median: float
    p25: float
    p75: float
    minimum: float
    reps: int

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (0.05 = +-5 %)."""
        return (self.p75 - self.p25) / self.median if self.median > 0 else float("nan")


def summarize(samples: Sequence[float]) -> Timing:
    """Median, quartiles and minimum of ``samples`` (seconds)."""
    if not samples:
        raise ValueError("no timing samples")
    s = sorted(samples)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0], s[0], s[0]]
    return Timing(median=statistics.median(s), p25=q[0], p75=q[2], minimum=s[0], reps=len(s))


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class Timer:
    """Samples per-call times of callables on one device.

    warmup_ms: run at least this long (and at least 2 calls) before sampling; rep_ms: aim for this much
    sampled time per provider per case, within [min_reps, max_reps] calls.
    """

    def __init__(
        self,
        device: torch.device,
        warmup_ms: float = 25.0,
        rep_ms: float = 100.0,
        min_reps: int = 5,
        max_reps: int = 2000,
    ) -> None:
        self.device = device
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        self.min_reps = min_reps
        self.max_reps = max_reps

    def warmup(self, fns: Sequence[Callable[[], object]]) -> float:
        """Run ``fns`` for warm-up; returns the estimated seconds per call."""
        per_call: list[float] = []
        t_end = time.perf_counter() + self.warmup_ms / 1e3
        i = 0
        while i < 2 or (time.perf_counter() < t_end and i < 1000):
            synchronize(self.device)
            t0 = time.perf_counter()
            fns[i % len(fns)]()
            synchronize(self.device)
            per_call.append(time.perf_counter() - t0)
            i += 1
        # the first call pays one-time costs (allocation, compilation); leave it out of the estimate
        return statistics.median(per_call[1:])

    def reps_for(self, per_call_s: float, share: float = 1.0) -> int:
        """Number of calls that fill ``rep_ms * share`` given ``per_call_s``."""
        budget = self.rep_ms * share / 1e3
        n = int(budget / max(per_call_s, 1e-7))
        return max(self.min_reps, min(self.max_reps, n))

    def samples(self, fns: Sequence[Callable[[], object]], n: int) -> list[float]:
        """``n`` per-call times in seconds, cycling through ``fns``."""
        k = len(fns)
        with _gc_paused():
            if self.device.type == "cuda":
                starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
                ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
                torch.cuda.synchronize(self.device)
                for i in range(n):
                    starts[i].record()
                    fns[i % k]()
                    ends[i].record()
                torch.cuda.synchronize(self.device)
                return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends, strict=True)]
            out = []
            clock = time.perf_counter
            for i in range(n):
                fn = fns[i % k]
                t0 = clock()
                fn()
                out.append(clock() - t0)
            return out

    def measure(self, fns: Sequence[Callable[[], object]]) -> Timing:
        """Warm up, then sample for about ``rep_ms``; the summary of the samples."""
        est = self.warmup(fns)
        return summarize(self.samples(fns, self.reps_for(est)))


def warm_up_device(device: torch.device, seconds: float = 1.0) -> None:
    """Keep the device busy with a parallel op for ``seconds`` before anything is measured.

    On CPU the first parallel regions of a process can be orders of magnitude slower than later ones (thread
    pool start-up, frequency ramp, and on a loaded machine a worker thread waiting for a core); on GPU the
    clocks ramp up. Measuring only after this keeps the first case and the copy bandwidth honest.
    """
    a = torch.ones(2**20, device=device)
    b = torch.empty_like(a)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        torch.mul(a, 1.0001, out=b)
        synchronize(device)


def copy_bandwidth(device: torch.device, timer: Timer, nbytes: int | None = None) -> tuple[float, int]:
    """GB/s of a large device-to-same-device tensor copy (read + write counted), and the copy size used.

    The size is 4x the last-level cache (at least 64 MiB) so the copy streams from memory; on GPU at least
    256 MiB. This is the yardstick behind the '% of copy' column.
    """
    if nbytes is None:
        floor = 256 * 2**20 if device.type == "cuda" else 64 * 2**20
        nbytes = max(floor, 4 * cache_bytes(device))
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = timer.measure([lambda: dst.copy_(src)])
    return 2 * n * 4 / t.median / 1e9, n * 4


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence fd 2 for a moment (the profiler's C++ side prints start/stop lines there)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated by one call of ``fn`` above what was allocated before it (outputs included).

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the torch profiler's allocation records (every CPU
    tensor allocation and free during the call, replayed in order); None when that is not available.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    if device.type != "cpu":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
            del out
        records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        records.sort(key=lambda e: e.start_ns())
        current = peak = 0
        for e in records:
            current += e.nbytes()
            peak = max(peak, current)
        return int(peak)
    except Exception:  # noqa: BLE001 - a profiler problem means 'unknown', reported as n/a
        return None


def keep_freed_cpu_memory() -> str | None:
    """Make glibc keep freed memory for reuse instead of returning it to the OS; a description, or None.

    torch has no caching allocator on CPU. glibc serves blocks above its mmap threshold (at most 32 MiB)
    with a fresh mmap and unmaps them on free, and trims the heap top, so a large output is page-faulted in
    again on every call. On a VM a fault costs microseconds: for a 64 MiB output that is tens of ms,
    several times the kernel itself, identical for every provider, and it hides the kernels being compared.
    With M_MMAP_MAX=0 and no trimming, freed blocks are reused from the heap, which is what the CUDA caching
    allocator gives GPU runs. Applies to this process only; `fusednorm-bench --system-malloc` skips it.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
    if libc.mallopt(m_mmap_max, 0) != 1 or libc.mallopt(m_trim_threshold, 2**31 - 1) != 1:
        return None
    return "glibc keeps freed memory (M_MMAP_MAX=0, no trimming): reused outputs are not page-faulted again"
