"""Memory behaviour (issue 9): what backward keeps alive, growth over many iterations, and input immutability.

- Saved tensors: every op's autograd node keeps at most one tensor of the input's size (x itself, or s for the
  residual-add ops) plus small per-row/per-channel statistics and the parameters; never the output, never a
  dropout mask, never an fp32 copy of a low-precision input. Inspected with
  ``torch.autograd.graph.saved_tensors_hooks`` around the forward.
- No growth: 1,000 forward+backward iterations on small tensors (native and reference backends; the Triton
  interpreter is Python and would measure itself) leave the resident set within a fixed slack and the number of
  live tensors unchanged.
- Immutability: no functional writes to its inputs, parameters or the incoming gradient; running statistics
  change only where documented (training-mode batch/instance/switchable norm).
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
from test_determinism import CASE_NAMES, backends_for, make_cases

import fusednorm
import fusednorm.functional as F

# Tensors the size of the input each op's backward may keep (x, or s = x + residual for the add-norm ops).
BIG_SAVED_ALLOWED = 1
# RSS slack over 1,000 iterations after a warm-up: allocator caching and Python's own arenas, not per-iteration
# growth (a leak of even one 4 KiB tensor per iteration would exceed it).
RSS_SLACK_BYTES = 3 * 1024 * 1024


def _saved_tensors(fn, leaves, buffers, backend):
    """Run fn under saved_tensors_hooks; return (output tuple, list of saved tensors)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    ls = [t.detach().clone().requires_grad_() if t is not None else None for t in leaves]
    bs = [b.clone() for b in buffers]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fusednorm.use_backend(backend):
        out = fn(*ls, *bs)
    return (out if isinstance(out, tuple) else (out,)), saved, ls


CASE_PARAMS = [(n, b) for n in CASE_NAMES for b in backends_for(n)]
def _saved_params():
    """(dtype, name, backend): what is saved is decided in the op layer, so the slow Triton interpreter runs fp32
    only; bf16 (the case where a saved fp32 copy would double memory) runs on the compiled backends."""
    out = []
    for name, backend in CASE_PARAMS:
        for dtype in (torch.float32, torch.bfloat16):
            if backend == "triton" and dtype != torch.float32:
                continue
            out.append(pytest.param(dtype, name, backend,
                                    id=f"{str(dtype)[6:]}-{name}-{backend}"))
    return out


@pytest.mark.parametrize("dtype,name,backend", _saved_params())
def test_backward_saves_only_what_it_needs(name, backend, dtype):
    fn, leaves, buffers, _ = make_cases(dtype)[name]
    outs, saved, ls = _saved_tensors(fn, leaves, buffers, backend)
    x = ls[0]
    # y is never saved (prenorm's s output is the one input-sized tensor the add-norm ops keep, by design)
    out_ptrs = {outs[0].untyped_storage().data_ptr()} if outs[0].numel() else set()
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) <= BIG_SAVED_ALLOWED, (
        f"{name}: backward keeps {len(big)} input-sized tensors "
        f"({[(tuple(t.shape), t.dtype) for t in big]}), expected at most {BIG_SAVED_ALLOWED}")
    for t in big:
        # an fp32 copy of a bf16 input doubles the memory backward keeps
        assert t.element_size() <= x.element_size(), f"{name}: saves a {t.dtype} copy of the {x.dtype} input"
    for t in saved:
        assert t.untyped_storage().data_ptr() not in out_ptrs or t.numel() < x.numel(), \
            f"{name}: backward keeps the output alive"
    small_bytes = sum(t.numel() * t.element_size() for t in saved if t.numel() < x.numel())
    assert small_bytes <= x.numel() * x.element_size(), f"{name}: {small_bytes} bytes of statistics saved"
    # and the graph really works with only these
    torch.autograd.backward(list(outs), [torch.ones_like(o) for o in outs])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors() -> int:
    return sum(1 for o in gc.get_objects() if torch.is_tensor(o))


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm (Linux) for RSS")
@pytest.mark.parametrize("backend", [b for b in ("native", "reference") if b in backends_for("layer_norm")][:1])
def test_no_growth_over_1000_iterations(backend):
    """The compiled backend when there is one (else the reference): LayerNorm + BatchNorm (running stats)."""
    x = torch.randn(8, 64)
    w, b = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    xb = torch.randn(4, 6, 5, 5)
    wb, bb = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    rm, rv = torch.zeros(6), torch.ones(6)
    do_bn = backend in backends_for("batch_norm")

    def step():
        xi = x.detach().requires_grad_()
        with fusednorm.use_backend(backend):
            y = F.layer_norm(xi, (64,), w, b).sum()
            if do_bn:
                xbi = xb.detach().requires_grad_()
                y = y + F.batch_norm(xbi, rm, rv, wb, bb, True, 0.1).sum()
        y.backward()

    for _ in range(100):  # warm-up: allocator pools, op caches, lazy imports
        step()
    gc.collect()
    rss0, live0 = _rss_bytes(), _live_tensors()
    for _ in range(1000):
        step()
    gc.collect()
    rss1, live1 = _rss_bytes(), _live_tensors()
    assert live1 <= live0, f"live tensors grew from {live0} to {live1} over 1000 iterations"
    assert rss1 - rss0 <= RSS_SLACK_BYTES, f"RSS grew by {(rss1 - rss0) / 2**20:.2f} MiB over 1000 iterations"


def _snapshot(ts):
    return [t.detach().clone() if t is not None else None for t in ts]


def _same_bits(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("name,backend", CASE_PARAMS)
def test_inputs_and_grad_outputs_are_never_modified(name, backend):
    fn, leaves, buffers, buffers_may_change = make_cases(torch.float32)[name]
    ls = [t.detach().clone().requires_grad_() if t is not None else None for t in leaves]
    bs = [b.clone() for b in buffers]
    before_l, before_b = _snapshot(ls), _snapshot(bs)
    with fusednorm.use_backend(backend):
        out = fn(*ls, *bs)
    outs = out if isinstance(out, tuple) else (out,)
    dys = [torch.randn_like(o) for o in outs]
    before_dy = _snapshot(dys)
    torch.autograd.backward(list(outs), dys)
    for i, (t, t0) in enumerate(zip(ls, before_l, strict=True)):
        if t is not None:
            assert _same_bits(t.detach(), t0), f"{name}: input {i} modified"
    for i, (d, d0) in enumerate(zip(dys, before_dy, strict=True)):
        assert _same_bits(d, d0), f"{name}: incoming gradient {i} modified by backward"
    for i, (b, b0) in enumerate(zip(bs, before_b, strict=True)):
        if not buffers_may_change:
            assert _same_bits(b, b0), f"{name}: buffer {i} modified though not documented to change"
        else:
            assert not _same_bits(b, b0), f"{name}: running statistic {i} not updated in training"
    for o in outs:  # outputs are fresh tensors, never aliases of inputs
        for t in ls:
            if t is not None and o.numel() and t.numel():
                assert o.untyped_storage().data_ptr() != t.untyped_storage().data_ptr(), f"{name}: output aliases input"


@pytest.mark.parametrize("backend", backends_for("layer_norm"))
def test_strided_view_input_and_its_base_untouched(backend):
    """A sliced view's neighbours in the same storage are not written (e.g. the other heads of a qkv tensor)."""
    base = torch.randn(6, 3, 40)
    before = base.clone()
    x = base[:, 1, 5:35]
    xi = x.detach().requires_grad_()
    with fusednorm.use_backend(backend):
        y = F.layer_norm(xi, (30,), torch.randn(30), torch.randn(30))
    y.sum().backward()
    assert torch.equal(base, before)
