"""Determinism (issue 9): the same inputs give bit-identical outputs, gradients and running statistics on every
run, for every public functional and every backend here (no float atomics, no order-dependent reductions).

The shapes are chosen so that the backward passes reduce parameter gradients over several programs / threads
(the place where a non-deterministic reduction would show). ``CASES`` is also used by ``test_memory.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import cpu_backends

import fusednorm
import fusednorm.functional as F
from fusednorm.backends import _load

BACKENDS = cpu_backends()

# Backend functions (``fusednorm/backends/reference.py`` contract) each public functional runs on.
NEEDS: dict[str, tuple[str, ...]] = {
    "layer_norm": ("layer_norm_fwd", "layer_norm_bwd"),
    "rms_norm": ("layer_norm_fwd", "layer_norm_bwd"),
    "group_norm": ("group_norm_fwd", "group_norm_bwd"),
    "instance_norm": ("group_norm_fwd", "group_norm_bwd"),
    "batch_norm": ("batch_norm_stats", "batch_norm_apply", "batch_norm_bwd_reduce", "batch_norm_bwd_dx"),
    "add_layer_norm": ("add_norm_fwd", "add_norm_bwd"),
    "add_rms_norm": ("add_norm_fwd", "add_norm_bwd"),
    "adaptive_layer_norm": ("ada_norm_fwd", "ada_norm_bwd"),
    "layer_norm_2d": ("layer_norm_cf_fwd", "layer_norm_cf_bwd"),
    "switchable_norm": ("plane_stats", "plane_affine", "plane_bwd_reduce", "plane_bwd_dx"),
    "weight_norm": ("weight_norm_fwd", "weight_norm_bwd"),
}


def backends_for(name: str) -> list[str]:
    """The CPU-capable backends that implement every backend function functional ``name`` needs (the native
    extension implements a subset; forcing it for the rest raises BackendUnavailableError, tested elsewhere)."""
    family = next(k for k in sorted(NEEDS, key=len, reverse=True) if name.startswith(k))
    out = []
    for backend in cpu_backends():
        module = _load(backend)
        if not isinstance(module, BaseException) and all(module.supports(op) for op in NEEDS[family]):
            out.append(backend)
    return out


def _r(gen: torch.Generator, *shape: int, offset: float = 0.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) + offset).to(dtype)


def make_cases(dtype: torch.dtype = torch.float32) -> dict[str, tuple[Callable, list, list, bool]]:
    """name -> (fn(*leaves, *buffers), leaves (differentiable inputs; None allowed), buffers, buffers_may_change).

    Small enough for the Triton interpreter, large enough for multi-program reductions (e.g. 40 rows).
    Parameters are float32 (the AMP case when ``dtype`` is low precision).
    """
    g = torch.Generator().manual_seed(1234)
    p = torch.float32 if dtype != torch.float64 else torch.float64

    def r(*shape, offset=0.0, dt=dtype):
        return _r(g, *shape, offset=offset, dtype=dt)

    c = 6
    rm, rv = r(c, dt=p), r(c, dt=p).abs() + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    rm3, rv3 = rm.clone(), rv.clone()
    rm4, rv4 = rm.clone(), rv.clone()
    return {
        "layer_norm": (lambda x, w, b: F.layer_norm(x, (37,), w, b), [r(40, 37), r(37, offset=1, dt=p), r(37, dt=p)],
                       [], False),
        "rms_norm": (lambda x, w: F.rms_norm(x, (37,), w), [r(40, 37), r(37, offset=1, dt=p)], [], False),
        "group_norm": (lambda x, w, b: F.group_norm(x, 3, w, b, activation="silu"),
                       [r(2, c, 3, 5), r(c, offset=1, dt=p), r(c, dt=p)], [], False),
        "instance_norm_train": (
            lambda x, w, b, rm, rv: F.instance_norm(x, rm, rv, w, b, True, 0.1),
            [r(2, c, 3, 5), r(c, offset=1, dt=p), r(c, dt=p)], [rm, rv], True),
        "instance_norm_eval": (
            lambda x, w, b, rm, rv: F.instance_norm(x, rm, rv, w, b, False),
            [r(2, c, 3, 5), r(c, offset=1, dt=p), r(c, dt=p)], [rm2, rv2], False),
        "batch_norm_train": (
            lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, True, 0.1),
            [r(5, c, 6, 7).contiguous(memory_format=torch.channels_last), r(c, offset=1, dt=p), r(c, dt=p)],
            [rm3, rv3], True),
        "batch_norm_eval": (
            lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, False),
            [r(5, c, 6, 7), r(c, offset=1, dt=p), r(c, dt=p)], [rm4, rv4], False),
        "add_layer_norm": (
            lambda x, res, w, b: F.add_layer_norm(x, res, w, b, prenorm=True),
            [r(40, 37), r(40, 37), r(37, offset=1, dt=p), r(37, dt=p)], [], False),
        "add_rms_norm_dropout": (
            lambda x, res, w: _seeded(lambda: F.add_rms_norm(x, res, w, dropout_p=0.3)),
            [r(40, 37), r(40, 37), r(37, offset=1, dt=p)], [], False),
        "adaptive_layer_norm": (
            lambda x, sc, sh, w, b: F.adaptive_layer_norm(x, sc, sh, w, b),
            [r(3, 13, 37), r(3, 37), r(3, 37), r(37, offset=1, dt=p), r(37, dt=p)], [], False),
        "layer_norm_2d": (lambda x, w, b: F.layer_norm_2d(x, w, b),
                          [r(2, c, 3, 5).contiguous(memory_format=torch.channels_last), r(c, offset=1, dt=p),
                           r(c, dt=p)], [], False),
        "switchable_norm": (
            lambda x, w, b, mw, vw, rm, rv: F.switchable_norm(x, rm, rv, w, b, mw, vw, True, 0.1),
            [r(2, c, 3, 5), r(c, offset=1, dt=p), r(c, dt=p), r(3, dt=p), r(3, dt=p)],
            [rm.clone(), rv.clone()], True),
        "weight_norm": (lambda v, g: F.weight_norm_fn(v, g, 0), [r(17, 3, 5), r(17, 1, 1, offset=1, dt=p)], [],
                        False),
    }


def _seeded(fn: Callable):
    """Run ``fn`` with torch's generator at a fixed seed (the dropout seed is drawn from it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(99)
        return fn()


def run_once(fn: Callable, leaves: list, buffers: list, backend: str, seed: int = 7):
    """Forward + backward with fixed output gradients. Returns (outputs, gradients, buffers after)."""
    ls = [t.detach().clone().requires_grad_() if t is not None else None for t in leaves]
    bs = [b.clone() for b in buffers]
    with fusednorm.use_backend(backend):
        out = fn(*ls, *bs)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(seed)
    dys = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outs]
    torch.autograd.backward(list(outs), dys)
    return [o.detach() for o in outs], [t.grad for t in ls if t is not None], bs


CASE_NAMES = list(make_cases())
CASE_PARAMS = [(n, b) for n in CASE_NAMES for b in backends_for(n)]


def _assert_bitwise(a: list, b: list, what: str) -> None:
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b, strict=True)):
        assert u.dtype == v.dtype and u.shape == v.shape, f"{what}[{i}]"
        # bit patterns, so that NaN payloads and signed zeros count too
        same = torch.equal(u.contiguous().view(torch.uint8), v.contiguous().view(torch.uint8))
        assert same, f"{what}[{i}] differs between two runs (max diff {(u.double() - v.double()).abs().max():.3e})"


# The Triton interpreter is slow: fp32 only there (one kernel code path serves every dtype); bf16 (fp32 params)
# on the compiled backends.
DTYPE_CASE_PARAMS = [pytest.param(d, n, b, id=f"{str(d)[6:]}-{n}-{b}") for n, b in CASE_PARAMS
                     for d in (torch.float32, torch.bfloat16) if b != "triton" or d == torch.float32]


@pytest.mark.parametrize("dtype,name,backend", DTYPE_CASE_PARAMS)
def test_bitwise_identical_runs(name, backend, dtype):
    fn, leaves, buffers, _ = make_cases(dtype)[name]
    first = run_once(fn, leaves, buffers, backend)
    second = run_once(fn, leaves, buffers, backend)
    for what, a, b in zip(("outputs", "gradients", "buffers"), first, second, strict=True):
        _assert_bitwise(a, b, f"{name}/{backend} {what}")


@pytest.mark.parametrize("backend", backends_for("add_layer_norm"))
def test_dropout_mask_depends_only_on_torch_seed(backend):
    """The fused dropout draws its seed from torch's generator: same seed, same mask; another seed, another."""
    x, res, w = torch.randn(40, 37), torch.randn(40, 37), torch.randn(37)
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        with fusednorm.use_backend(backend):
            outs.append(F.add_layer_norm(x, res, w, None, dropout_p=0.5))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_native_independent_of_thread_count():
    """Native CPU kernels: results do not depend on how many threads ran them (the partial-sum splits are a
    constant, not the thread count; torch's own CPU kernels do not promise this)."""
    if "native" not in BACKENDS:
        pytest.skip("native extension not built here")
    prev = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results[threads] = {n: run_once(fn, ls, bs, "native")
                                for n, (fn, ls, bs, _) in make_cases(torch.float32).items()
                                if "native" in backends_for(n)}
    finally:
        torch.set_num_threads(prev)
    for n in results[1]:
        for what, a, b in zip(("outputs", "gradients", "buffers"), results[1][n], results[2][n], strict=True):
            _assert_bitwise(a, b, f"{n} {what} (1 vs 2 threads)")
