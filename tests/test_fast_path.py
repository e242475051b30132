"""The eager fast paths (issue #5).

- The op layer: ``call_op`` runs a custom op's Python body without the torch.library dispatcher, and
  ``BackendPinnedFunction.call`` runs ``forward`` without ``autograd.Function.apply`` when no gradient can be
  needed; on the native backend, LayerNorm/RMSNorm, GroupNorm, BatchNorm and add+norm go to the extension's C++
  autograd ops instead (see ``fusednorm/ops/__init__.py``).
- In front of it, the native extension's whole-call entries (``backends.native_entries``, csrc/eager.cpp) take
  valid plain-eager LayerNorm/RMSNorm/GroupNorm/InstanceNorm/BatchNorm/add+norm calls on CPU tensors in one C++
  call.

Checked here, by counting calls (not by timing):
- plain eager calls of every family take the fast path (no custom-op dispatcher call; no Python autograd node
  without grad; the whole-call entry, or the C++ autograd op, and no Python autograd node at all, where the native
  backend runs it); with the entries switched off, the op layer's fast path;
- torch.compile, FakeTensorMode, a TorchDispatchMode, a torch-function mode, vmap, tensor subclasses and meta
  tensors take the dispatcher path, with correct results;
- outputs, gradients and running statistics are bit-identical between the fast and the slow path;
- the entries decline (return None) every call they must leave to the Python path.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch
from torch._library.custom_ops import CustomOpDef
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fusednorm.functional as F
import fusednorm.modules as fm
from fusednorm import backends, ops
from fusednorm.ops import BackendPinnedFunction

try:
    from fusednorm.backends import native as NATIVE

    backends._load("native")  # in the registry, as after a session's first call: the entries take calls from here
except ImportError:  # the extension is not built: every family takes the Python fast path
    NATIVE = None

# Only an install made with FUSEDNORM_NO_EXTENSION=1 lacks the extension; a failed build is not skipped but fails
# tests/test_backends.py::test_native_extension_is_built_unless_opted_out.
# Only an install made with FUSEDNORM_NO_EXTENSION=1 lacks the extension; a failed build fails
# test_backends.py::test_native_extension_is_built_unless_opted_out instead of hiding behind this skip.
needs_native = pytest.mark.skipif(
    NATIVE is None, reason="fusednorm._C absent: installed with FUSEDNORM_NO_EXTENSION=1 (optional native extension)"
)


def _native_runs(op: str, x: torch.Tensor) -> bool:
    """True when the backend in force runs ``op`` on ``x`` with the native extension (its C++ autograd ops)."""
    return NATIVE is not None and backends.select(op, x) is NATIVE


class Spy:
    """Counts the calls the whole-call entries took, fast-path op bodies, calls of the native backend's C++
    autograd ops from the op layer, dispatcher calls made by ``call_op`` and ``autograd.Function.apply`` calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, calls: bool = True) -> None:
        self.entry: Counter[str] = Counter()
        self.fast: Counter[str] = Counter()
        self.native: Counter[str] = Counter()
        self.dispatch: Counter[str] = Counter()
        self.apply = 0
        for fn, entry in list(vars(backends.native_entries).items()):
            monkeypatch.setattr(backends.native_entries, fn, self._counting_entry(fn, entry))
        for op, body in list(ops._EAGER_IMPLS.items()):
            monkeypatch.setitem(ops._EAGER_IMPLS, op, self._counting(op._name, body))
        if NATIVE is not None:
            for family, entry in list(NATIVE.AUTOGRAD_OPS.items()):
                monkeypatch.setitem(NATIVE.AUTOGRAD_OPS, family, self._counting(family, entry, self.native))
        if not calls:  # count op bodies only (dynamo must not trace patched torch internals)
            return
        real_call = CustomOpDef.__call__

        def counting_call(op, *args, **kwargs):
            self.dispatch[op._name] += 1
            return real_call(op, *args, **kwargs)

        monkeypatch.setattr(CustomOpDef, "__call__", counting_call)
        real_apply = torch.autograd.Function.apply.__func__

        def counting_apply(cls, *args):
            self.apply += 1
            return real_apply(cls, *args)

        monkeypatch.setattr(BackendPinnedFunction, "apply", classmethod(counting_apply))

    def taken(self) -> int:
        """How many fast-path calls were made: entries that took the call, op bodies run directly, C++ autograd
        ops."""
        return sum(self.entry.values()) + sum(self.fast.values()) + sum(self.native.values())

    def _counting_entry(self, name: str, entry: Callable) -> Callable:
        def run(*args):
            out = entry(*args)
            if out is not None:
                self.entry[name] += 1
            return out

        return run

    def _counting(self, name: str, body: Callable, counter: Counter[str] | None = None) -> Callable:
        counter = self.fast if counter is None else counter

        def run(*args):
            counter[name] += 1
            return body(*args)

        return run


@pytest.fixture
def spy(monkeypatch):
    return Spy(monkeypatch)


def _disable_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch the whole-call entries off: every call goes to the op layer."""
    for fn in vars(backends.native_entries):
        monkeypatch.setattr(backends.native_entries, fn, backends._decline)


def _force_slow_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every fast-path check fail, as it does under a mode or a transform: the pre-fast-path behaviour."""
    _disable_entries(monkeypatch)
    monkeypatch.setattr(ops, "_plain_mode", lambda: False)
    if NATIVE is not None:  # the native path's one-call form of the same check
        monkeypatch.setattr(NATIVE, "eager_unintercepted", lambda: False)


# ---- one case per family: (inputs maker, call) ---------------------------------------------------------------
# Each maker returns (differentiable inputs, other inputs); each call returns a tuple of outputs. Odd sizes,
# random parameters (never ones/zeros only).


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float32)


def _ln():
    return [_rand(3, 5, 37), _rand(37), _rand(37)], []


def _rms():
    return [_rand(3, 5, 37), _rand(37)], []


def _gn():
    return [_rand(3, 6, 5, 7), _rand(6), _rand(6)], []


def _bn():
    return [_rand(4, 6, 5, 3), _rand(6), _rand(6)], [_rand(6), _rand(6).abs() + 0.5]


def _inorm():
    return [_rand(3, 6, 5, 7), _rand(6), _rand(6)], [_rand(6), _rand(6).abs() + 0.5]


def _add():
    return [_rand(3, 5, 37), _rand(3, 5, 37), _rand(37), _rand(37)], []


def _cf():
    return [_rand(2, 7, 5, 3), _rand(7), _rand(7)], []


def _ada():
    return [_rand(2, 5, 37), _rand(2, 37), _rand(2, 37), _rand(37), _rand(37)], []


def _wn():
    return [_rand(7, 3, 5), _rand(7, 1, 1)], []


def _sn():
    return [_rand(3, 6, 5, 4), _rand(6), _rand(6), _rand(3), _rand(3)], [_rand(6), _rand(6).abs() + 0.5]


CASES: dict[str, tuple[Callable, Callable, tuple[str, ...]]] = {
    # name: (maker, call(diff, other), ops the fast path must run). Families with a C++ autograd op run that
    # instead on the native backend (NATIVE_FAMILY).
    "layer_norm": (_ln, lambda d, o: (F.layer_norm(d[0], (37,), d[1], d[2]),), ("layer_norm_fwd",)),
    "layer_norm_2d_shape": (
        _ln, lambda d, o: (F.layer_norm(d[0], (5, 37), None, None),), ("layer_norm_fwd",)
    ),
    "layer_norm_strided_rows": (
        _ln, lambda d, o: (F.layer_norm(d[0][..., :30], (30,), d[1][:30], d[2][:30]),), ("layer_norm_fwd",)
    ),
    "layer_norm_transposed": (
        _ln, lambda d, o: (F.layer_norm(d[0].transpose(0, 1), 37, d[1], None),), ("layer_norm_fwd",)
    ),
    "rms_norm": (_rms, lambda d, o: (F.rms_norm(d[0], (37,), d[1]),), ("layer_norm_fwd",)),
    "group_norm_silu": (
        _gn, lambda d, o: (F.group_norm(d[0], 3, d[1], d[2], activation="silu"),), ("group_norm_fwd",)
    ),
    "batch_norm_train_cl": (
        _bn,
        lambda d, o: (
            F.batch_norm(d[0].to(memory_format=torch.channels_last), o[0], o[1], d[1], d[2], True, 0.3), o[0], o[1]
        ),
        ("batch_norm_stats", "batch_norm_apply"),
    ),
    "instance_norm": (
        _inorm, lambda d, o: (F.instance_norm(d[0], o[0], o[1], d[1], d[2], momentum=0.3), o[0], o[1]),
        ("group_norm_fwd_var",),
    ),
    "instance_norm_no_stats": (
        _inorm, lambda d, o: (F.instance_norm(d[0], None, None, d[1], d[2]),), ("group_norm_fwd",)
    ),
    "batch_norm_train": (
        _bn, lambda d, o: (F.batch_norm(d[0], o[0], o[1], d[1], d[2], True, 0.3), o[0], o[1]),
        ("batch_norm_stats", "batch_norm_apply"),
    ),
    "batch_norm_eval": (
        _bn, lambda d, o: (F.batch_norm(d[0], o[0], o[1], d[1], d[2], False),), ("batch_norm_apply",)
    ),
    "add_layer_norm": (
        _add, lambda d, o: F.add_layer_norm(d[0], d[1], d[2], d[3], prenorm=True), ("add_norm_fwd",)
    ),
    "add_rms_norm_dropout": (
        _add, lambda d, o: F.add_rms_norm(d[0], d[1], d[2], dropout_p=0.25, prenorm=True), ("add_norm_fwd",)
    ),
    "layer_norm_2d": (_cf, lambda d, o: (F.layer_norm_2d(d[0], d[1], d[2]),), ("layer_norm_cf_fwd",)),
    "layer_norm_2d_cl": (
        _cf, lambda d, o: (F.layer_norm_2d(d[0].to(memory_format=torch.channels_last), d[1], None),),
        ("layer_norm_cf_fwd",),
    ),
    "layer_norm_2d_3d": (_cf, lambda d, o: (F.layer_norm_2d(d[0][:, :, 1], None, d[2]),), ("layer_norm_cf_fwd",)),
    "adaptive_layer_norm": (
        _ada, lambda d, o: (F.adaptive_layer_norm(d[0], d[1], d[2], d[3], d[4]),), ("ada_norm_fwd",)
    ),
    "weight_norm": (_wn, lambda d, o: (F.weight_norm_fn(d[0], d[1], 0),), ("weight_norm_fwd",)),
    "switchable_norm_train": (
        _sn, lambda d, o: (F.switchable_norm(d[0], o[0], o[1], *d[1:], training=True), o[0], o[1]),
        ("switchable_norm_fwd",),
    ),
    "switchable_norm_eval": (
        _sn, lambda d, o: (F.switchable_norm(d[0], o[0], o[1], *d[1:], training=False),),
        ("switchable_norm_fwd",),
    ),
}


# The case's C++ autograd op on the native backend (the first op the case's Python path runs decides).
NATIVE_FAMILY = {
    "layer_norm": "layer_norm", "layer_norm_2d_shape": "layer_norm", "layer_norm_strided_rows": "layer_norm",
    "layer_norm_transposed": "layer_norm", "rms_norm": "layer_norm", "group_norm_silu": "group_norm",
    "instance_norm_no_stats": "group_norm", "batch_norm_train": "batch_norm", "batch_norm_train_cl": "batch_norm",
    "batch_norm_eval": "batch_norm", "add_layer_norm": "add_norm", "add_rms_norm_dropout": "add_norm",
    "layer_norm_2d": "layer_norm_cf", "layer_norm_2d_cl": "layer_norm_cf", "layer_norm_2d_3d": "layer_norm_cf",
}

# The whole-call entry that takes the case on the native backend (instance_norm with running statistics is left
# to the op layer).
NATIVE_ENTRY = {
    "layer_norm": "layer_norm", "layer_norm_2d_shape": "layer_norm", "layer_norm_strided_rows": "layer_norm",
    "layer_norm_transposed": "layer_norm", "rms_norm": "rms_norm", "group_norm_silu": "group_norm",
    "instance_norm_no_stats": "instance_norm", "batch_norm_train": "batch_norm",
    "batch_norm_train_cl": "batch_norm", "batch_norm_eval": "batch_norm", "add_layer_norm": "add_norm",
    "add_rms_norm_dropout": "add_norm", "layer_norm_2d": "layer_norm_2d", "layer_norm_2d_cl": "layer_norm_2d",
    "layer_norm_2d_3d": "layer_norm_2d",
}


def _run(name: str, inputs, grad: bool):
    """Run case ``name`` on copies of ``inputs``; returns (outputs, gradients of the differentiable inputs)."""
    _, call, _ = CASES[name]
    diff, other = inputs
    diff = [t.clone().requires_grad_(grad) for t in diff]
    other = [t.clone() for t in other]
    torch.manual_seed(1234)  # the dropout seed comes from torch's generator
    outs = call(diff, other)
    grads: list[torch.Tensor | None] = []
    if grad:
        g = torch.Generator().manual_seed(7)
        loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs if o.requires_grad)
        loss.backward()
        grads = [t.grad for t in diff]
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("entries", [True, False], ids=["entries", "op_layer"])
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("name", list(CASES))
def test_fast_path_taken_and_bit_identical(name, grad, entries, monkeypatch):
    maker, _, fast_ops = CASES[name]
    inputs = maker()
    if not entries:
        _disable_entries(monkeypatch)
    spy = Spy(monkeypatch)
    fast_out, fast_grads = _run(name, inputs, grad)
    family, entry = NATIVE_FAMILY.get(name), NATIVE_ENTRY.get(name)
    native = family is not None and _native_runs(fast_ops[0], inputs[0][0])
    if entries and entry is not None and native:
        assert spy.entry == Counter({entry: 1}) and not spy.native and not spy.fast, (spy.entry, spy.native)
        assert spy.apply == 0, "the entry runs the C++ autograd op: no Python autograd.Function"
    elif family is not None and native:
        assert spy.native[family] == 1 and not spy.fast and not spy.entry, (spy.native, spy.fast, spy.entry)
        assert spy.apply == 0, "the C++ autograd op records its own node: no Python autograd.Function"
    else:
        assert not spy.native and not spy.entry, (spy.native, spy.entry)
        for op in fast_ops:
            assert spy.fast[op] >= 1, (op, spy.fast)
        if grad:
            assert spy.apply >= 1  # an autograd node is needed
        else:
            assert spy.apply == 0, "no input requires grad: no autograd.Function.apply"
    assert not spy.dispatch, f"plain eager went through the dispatcher: {spy.dispatch}"

    with monkeypatch.context() as m:
        _force_slow_path(m)
        before, native_before = sum(spy.fast.values()), sum(spy.native.values())
        slow_out, slow_grads = _run(name, inputs, grad)
        assert sum(spy.fast.values()) == before, "the forced slow path ran an op body directly"
        assert sum(spy.native.values()) == native_before, "the forced slow path ran a C++ autograd op"
        assert spy.dispatch, "the slow path must call the custom ops"

    assert len(fast_out) == len(slow_out)
    for a, b in zip(fast_out, slow_out, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b), "fast and slow path outputs differ"
    for a, b in zip(fast_grads, slow_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b), "fast and slow path gradients differ"


def test_no_grad_mode_skips_autograd_even_with_requires_grad(spy):
    x = torch.randn(4, 9, requires_grad=True)
    w = torch.randn(9, requires_grad=True)
    with torch.no_grad():
        y = F.layer_norm(x, (9,), w)
    assert spy.apply == 0 and not spy.dispatch and not y.requires_grad
    with torch.inference_mode():
        y2 = F.layer_norm(x, (9,), w)
    assert spy.apply == 0 and torch.equal(y, y2)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (9,), w).detach())


def test_modules_with_parameters_take_the_fast_path(spy):
    ln = fm.LayerNorm(16)
    bn = fm.BatchNorm2d(6).eval()
    gn = fm.GroupNorm(3, 6)
    x = torch.randn(2, 16)
    native = _native_runs("layer_norm_fwd", x)
    with torch.no_grad():
        ln(x)
        bn(torch.randn(2, 6, 3, 3))
        gn(torch.randn(2, 6, 3, 3))
    if native:
        assert spy.entry == Counter({"layer_norm": 1, "batch_norm": 1, "group_norm": 1}), spy.entry
        assert not spy.native and not spy.fast
    else:
        assert spy.fast["layer_norm_fwd"] == 1
        assert spy.fast["batch_norm_apply"] == 1
        assert spy.fast["group_norm_fwd"] == 1
    assert not spy.dispatch and spy.apply == 0
    y = ln(torch.randn(2, 16))  # Parameters require grad: autograd, but still no dispatcher
    y.sum().backward()
    assert not spy.dispatch and ln.weight.grad is not None
    if native:
        assert spy.apply == 0 and spy.entry["layer_norm"] == 2 and not spy.fast
        assert y.grad_fn.name().endswith("autograd_ops::LayerNormFunction>")
    else:
        assert spy.apply == 1 and spy.fast["layer_norm_bwd"] == 1


# ---- where the fast path must not be taken -------------------------------------------------------------------


def _ln_ref(x, w, b):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b)


def test_not_taken_under_fake_tensor_mode(spy):
    with FakeTensorMode():
        x = torch.randn(3, 11)
        w = torch.randn(11)
        y = F.layer_norm(x, (11,), w, None)
        z = F.batch_norm(torch.randn(2, 4, 3), torch.zeros(4), torch.ones(4), training=True)
    assert y.shape == (3, 11) and z.shape == (2, 4, 3)
    assert not spy.taken()
    assert spy.dispatch["layer_norm_fwd"] == 1 and spy.dispatch["batch_norm_stats"] == 1


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_not_taken_under_a_dispatch_mode(spy):
    x, w, b = torch.randn(5, 13), torch.randn(13), torch.randn(13)
    expected = F.layer_norm(x, (13,), w, b)
    fast_before = spy.taken()
    with _Recorder() as rec:
        y = F.layer_norm(x, (13,), w, b)
    assert spy.taken() == fast_before
    assert any("fusednorm.layer_norm_fwd" in s for s in rec.seen), rec.seen
    assert torch.equal(y, expected)


class _FunctionRecorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_not_taken_under_a_torch_function_mode(spy):
    x, w = torch.randn(5, 13), torch.randn(13)
    expected = F.rms_norm(x, (13,), w)
    fast_before = spy.taken()
    with _FunctionRecorder():
        y = F.rms_norm(x, (13,), w)
    assert spy.taken() == fast_before
    assert spy.dispatch["layer_norm_fwd"] == 1
    assert torch.equal(y, expected)


class _Sub(torch.Tensor):
    """A trivial subclass: torch's default __torch_function__ keeps the subclass through ops."""


def test_not_taken_for_tensor_subclasses(spy):
    x, w, b = torch.randn(4, 10), torch.randn(10), torch.randn(10)
    expected = F.layer_norm(x, (10,), w, b)
    fast_before = spy.taken()
    y = F.layer_norm(x.as_subclass(_Sub), (10,), w, b)
    assert spy.taken() == fast_before
    assert spy.dispatch["layer_norm_fwd"] == 1
    assert torch.equal(y.as_subclass(torch.Tensor), expected)


def test_not_taken_for_meta_tensors(spy):
    y = F.group_norm(torch.empty(2, 6, 4, 4, device="meta"), 3)
    assert y.device.type == "meta" and y.shape == (2, 6, 4, 4)
    assert not spy.taken() and spy.dispatch["group_norm_fwd"] == 1


def test_not_taken_under_vmap(spy):
    """Under a functorch transform the op goes through the dispatcher (which has no batching rule for it)."""
    x = torch.randn(3, 4, 8)

    def body(t):
        return ops.call_op(ops.layer_norm.layer_norm_fwd, t, None, None, 1e-5, False)[0]

    try:
        y = torch.vmap(body)(x)
    except RuntimeError:
        y = None  # no batching rule: an error is fine, running the body on batched tensors silently is not
    assert not spy.taken() and spy.dispatch["layer_norm_fwd"] >= 1
    if y is not None:
        # Another implementation (torch's fp32 layer_norm) on rows of 8 values of order 1: agreement to ~100 fp32
        # ulps, not bit-identity (which the other tests of this file check between fusednorm's own two paths).
        assert torch.allclose(y, _ln_ref(x, None, None), rtol=1e-5, atol=1e-5)
    # The functional's autograd.Function has no vmap rule: it must fail the same way as before the fast path.
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.vmap(lambda t: F.layer_norm(t, (8,)))(x)
    assert not spy.taken()


@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_not_taken_under_torch_compile(grad, monkeypatch):
    spy = Spy(monkeypatch, calls=False)
    torch._dynamo.reset()
    x = torch.randn(6, 20, requires_grad=grad)
    w = torch.randn(20, requires_grad=grad)
    xb = torch.randn(4, 5, 3, 3, requires_grad=grad)
    rm, rv = torch.randn(5), torch.rand(5) + 0.5

    def f(x, w, xb, rm, rv):
        return F.layer_norm(x, (20,), w, None), F.batch_norm(xb, rm, rv, None, None, True, 0.2)

    rm_e, rv_e = rm.clone(), rv.clone()
    expected = f(x, w, xb, rm_e, rv_e)
    fast_eager = spy.taken()
    assert fast_eager > 0
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(x, w, xb, rm, rv)
    assert spy.taken() == fast_eager, "compiled code ran an op body through the fast path"
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(rm, rm_e) and torch.equal(rv, rv_e)
    if grad:
        sum(o.sum() for o in got).backward()
        assert x.grad is not None and w.grad is not None and xb.grad is not None
        assert spy.taken() == fast_eager
    torch._dynamo.reset()


def test_not_taken_under_the_profiler(spy):
    """A profile must show the fusednorm::* ops, which only the dispatcher records."""
    x, w = torch.randn(4, 12), torch.randn(12)
    expected = F.layer_norm(x, (12,), w)
    fast_before = spy.taken()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = F.layer_norm(x, (12,), w)
    assert spy.taken() == fast_before
    assert any(e.key == "fusednorm::layer_norm_fwd" for e in prof.key_averages())
    assert torch.equal(y, expected)


@pytest.mark.parametrize("case", ["layer_norm", "layer_norm_2d", "group_norm", "batch_norm", "add_norm",
                                  "switchable_norm"])
@pytest.mark.parametrize("path", ["fast", "slow"])
def test_double_backward_raises(case, path, spy, monkeypatch):
    """With create_graph=True the first-order gradients are still right, but a second backward through them must
    raise (no double-backward formula), never give silently wrong higher-order gradients. The slow path's backward
    ops go through the dispatcher, the native fast path's C++ nodes give the gradients an erroring node."""
    if path == "slow":
        _force_slow_path(monkeypatch)
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    x4 = x.view(3, 8, 1, 1).expand(3, 8, 2, 2)
    if case == "layer_norm":
        y = F.layer_norm(x, (8,), w)
    elif case == "layer_norm_2d":
        y = F.layer_norm_2d(x4, w)
    elif case == "group_norm":
        y = F.group_norm(x4, 4, w)
    elif case == "batch_norm":
        y = F.batch_norm(x4, None, None, w, None, True)
    elif case == "add_norm":
        y = F.add_layer_norm(x, torch.randn(3, 8), w, None)
    else:
        y = F.switchable_norm(x4, None, None, w, torch.randn(8), torch.randn(3), torch.randn(3), True)
    loss = (y * y).sum()
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    (expected,) = torch.autograd.grad(loss, x, retain_graph=True)
    assert torch.equal(g.detach(), expected), "create_graph=True must not change the first-order gradient"
    if path == "slow" or case == "switchable_norm" or not _native_runs("layer_norm_fwd", x):
        assert spy.dispatch, "the backward op must go through the dispatcher under create_graph=True"
    else:
        # the expanded GroupNorm input is left to the op layer (the entry takes the layouts kernels address)
        family = "layer_norm_cf" if case == "layer_norm_2d" else case
        assert spy.native[family] + spy.entry[case] == 1 and not spy.dispatch
    with pytest.raises(RuntimeError, match="no autograd formula"):
        g.sum().backward()


def test_plain_eager_predicate():
    x = torch.randn(2, 2)
    assert not ops.plain_eager((torch.nn.Parameter(x),))  # grad mode on and it requires grad
    with torch.no_grad():
        assert ops.plain_eager((torch.nn.Parameter(x),))
    assert ops.plain_eager((x, 1.0, None, True, torch.float32))
    assert not ops.plain_eager((x.as_subclass(_Sub),))
    assert not ops.plain_eager((torch.empty(2, device="meta"),))
    with _Recorder():
        assert not ops.plain_eager((x,))
    with FakeTensorMode() as mode:
        assert not ops.plain_eager((mode.from_tensor(x),))


# ---- the native backend's C++ autograd ops against the Python autograd path --------------------------------


def _family_call(family: str, x, w, b, bufs):
    if family.startswith("add_"):  # bufs[2]: the residual, a second input with its own gradient
        residual = bufs[2]
        fn = F.add_layer_norm if family == "add_layer_norm" else F.add_rms_norm
        kwargs = {"bias": b} if family == "add_layer_norm" else {}
        # add+LayerNorm without dropout (x and an fp32 residual share one gradient tensor), add+RMSNorm with it
        p = 0.0 if family == "add_layer_norm" else 0.2
        y, s = fn(x, residual, w, **kwargs, dropout_p=p, prenorm=True)
        return y * 1.5 + s  # both outputs carry gradient (s is the next residual)
    if family == "layer_norm":
        return F.layer_norm(x, (x.shape[-1],), w, b)
    if family == "rms_norm":
        return F.rms_norm(x, (x.shape[-1],), w)
    if family == "group_norm":
        return F.group_norm(x, 3, w, b)
    if family.startswith("layer_norm_2d"):
        return F.layer_norm_2d(x, w, b)
    training = family == "batch_norm_train"
    return F.batch_norm(x, bufs[0], bufs[1], w, b, training, 0.25)


@needs_native
@pytest.mark.parametrize("entries", [True, False], ids=["entries", "op_layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("needs", ["x", "params", "all"])
@pytest.mark.parametrize(
    ("family", "affine"),
    [
        (f, a)
        for f in ("layer_norm", "rms_norm", "group_norm", "batch_norm_train", "batch_norm_eval", "add_layer_norm",
                  "add_rms_norm", "layer_norm_2d", "layer_norm_2d_nchw")
        for a in (("none", "weight") if f.endswith("rms_norm") else ("none", "weight", "bias", "both"))
    ],
)
def test_native_autograd_ops_match_the_python_path(family, affine, needs, dtype, entries, monkeypatch):
    """Every combination of absent parameters and of which inputs require grad (the C++ node indexes only the
    tensors given), fp32 and bf16 input with fp32 parameters, channels_last for the (N, C, H, W) families (and NCHW
    for LayerNorm2d, whose two layouts run different kernels):
    outputs, gradients and running buffers bit-identical to the Python autograd.Function path, whether the C++
    autograd op is reached from a whole-call entry or from the op layer."""
    if not entries:
        _disable_entries(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    rows = family in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
    x0 = torch.randn((5, 2, 19) if rows else (4, 6, 5, 3), generator=gen).to(dtype)
    if not rows and family != "layer_norm_2d_nchw":
        x0 = x0.to(memory_format=torch.channels_last)
    n = x0.shape[-1] if rows else x0.shape[1]
    w0 = torch.randn(n, generator=gen) if affine in ("weight", "both") else None
    b0 = torch.randn(n, generator=gen) if affine in ("bias", "both") else None
    bufs0 = (torch.randn(n, generator=gen), torch.rand(n, generator=gen) + 0.5, torch.randn(x0.shape, generator=gen))
    dy = torch.randn(x0.shape, generator=gen).to(dtype)

    def run():
        x = x0.clone().requires_grad_(needs in ("x", "all"))
        w, b = (None if p is None else p.clone().requires_grad_(needs in ("params", "all")) for p in (w0, b0))
        bufs = [t.clone() for t in bufs0]
        residual = bufs[2] if family.startswith("add_") else None  # fp32 with a bf16 x: mixed dtypes
        torch.manual_seed(1234)  # add+norm's dropout seed comes from torch's generator
        if residual is not None:
            residual.requires_grad_(needs in ("x", "all"))
        y = _family_call(family, x, w, b, bufs)
        leaves = [t for t in (x, w, b, residual) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(y, leaves, dy) if leaves and y.requires_grad else ()
        return y.detach(), grads, bufs

    spy = Spy(monkeypatch)
    fast = run()
    assert sum(spy.entry.values()) == entries and sum(spy.native.values()) == (not entries), spy.entry
    assert not spy.fast and spy.apply == 0
    _force_slow_path(monkeypatch)
    slow = run()
    assert fast[0].stride() == slow[0].stride() and torch.equal(fast[0], slow[0])
    assert len(fast[1]) == len(slow[1])
    for a, b in zip(fast[1], slow[1], strict=True):
        assert a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b)
    for a, b in zip(fast[2], slow[2], strict=True):
        assert torch.equal(a.detach(), b.detach())


# ids not "slow": conftest skips tests whose keywords include "slow" unless --slow is given
@pytest.mark.parametrize("path", ["fast", "slow"], ids=["fast_path", "forced_slow_path"])
def test_batch_norm_inference_buffers_rejected_before_any_write(path, monkeypatch):
    """Running buffers made under inference_mode cannot be updated outside it: both paths raise torch's error,
    and neither writes part of the update first (the C++ loop bumps the version counters before writing)."""
    if path == "slow":
        _force_slow_path(monkeypatch)
    x = torch.randn(4, 3, 5, 5)
    with torch.inference_mode():
        rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        F.batch_norm(x, rm, rv, None, None, True, 0.1)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@needs_native
def test_eager_unintercepted_sees_every_interceptor():
    """The native path's one-call plain-mode check (csrc/eager.cpp) must say False wherever ``_plain_mode`` does."""
    check = NATIVE.eager_unintercepted
    seen: dict[str, bool] = {}

    def record(name: str, t: torch.Tensor) -> torch.Tensor:
        seen[name] = check()
        return t * 2

    assert check() and ops._plain_mode()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        seen["profiler"] = check()
    torch.vmap(lambda t: record("vmap", t))(torch.ones(2, 3))
    torch.func.grad(lambda t: record("grad", t).sum())(torch.ones(3))
    with _Recorder():
        seen["dispatch mode"] = check()
    with _FunctionRecorder():
        seen["torch-function mode"] = check()
    torch.jit.trace(lambda t: record("jit.trace", t), torch.ones(3), check_trace=False)
    assert seen == dict.fromkeys(["profiler", "vmap", "grad", "dispatch mode", "torch-function mode", "jit.trace"],
                                 False), seen
    assert check(), "back to plain eager after the scopes"


# ---- the whole-call entries decline what the Python path must handle ----------------------------------------


def _declined_calls() -> list[tuple[str, str, tuple]]:
    """(entry, why, positional arguments) for calls each entry must leave to the Python path: invalid arguments
    (the Python path raises torch's error), and valid ones only the Python path handles."""
    x, w, b = torch.randn(3, 5, 8), torch.randn(8), torch.randn(8)
    x4, c4 = torch.randn(2, 6, 4, 3), torch.randn(6)
    rm, rv = torch.zeros(6), torch.ones(6)
    return [
        ("layer_norm", "integer input", (torch.arange(24).view(3, 8), (8,), None, None, 1e-5)),
        ("layer_norm", "meta input", (torch.empty(3, 8, device="meta"), (8,), None, None, 1e-5)),
        ("layer_norm", "tensor subclass", (x.as_subclass(_Sub), (8,), w, b, 1e-5)),
        ("layer_norm", "zero-size input", (torch.randn(0, 8), (8,), w, b, 1e-5)),
        ("layer_norm", "sparse input", (torch.randn(3, 8).to_sparse(), (8,), None, None, 1e-5)),
        ("layer_norm", "weight on another device", (x, (8,), torch.randn(8, device="meta"), b, 1e-5)),
        ("layer_norm", "weight of the wrong shape", (x, (8,), torch.randn(7), b, 1e-5)),
        ("layer_norm", "bias of the wrong shape", (x, (8,), w, torch.randn(1, 8), 1e-5)),
        ("layer_norm", "empty normalized_shape", (x, (), None, None, 1e-5)),
        ("layer_norm", "normalized_shape not trailing", (x, (5,), None, None, 1e-5)),
        ("layer_norm", "normalized_shape longer than input", (x, (2, 3, 5, 8), None, None, 1e-5)),
        ("layer_norm", "normalized_shape of floats", (x, (8.0,), None, None, 1e-5)),
        ("layer_norm", "eps a bool", (x, (8,), w, b, True)),
        ("layer_norm", "eps a tensor", (x, (8,), w, b, torch.tensor(1e-5))),
        ("rms_norm", "integer weight", (x, (8,), torch.arange(8), None)),
        ("rms_norm", "input of another shape", (x, [5, 7], None, None)),
        ("group_norm", "groups not dividing channels", (x4, 4, c4, c4, 1e-5, None)),
        ("group_norm", "zero groups", (x4, 0, None, None, 1e-5, None)),
        ("group_norm", "groups a bool", (x4, True, None, None, 1e-5, None)),
        ("group_norm", "one value per group", (torch.randn(1, 2, 1), 2, None, None, 1e-5, None)),
        ("group_norm", "1-D input", (torch.randn(6), 3, None, None, 1e-5, None)),
        ("group_norm", "weight not a vector", (x4, 3, c4.view(2, 3), None, 1e-5, None)),
        ("group_norm", "bias of the wrong size", (x4, 3, None, torch.randn(5), 1e-5, None)),
        ("group_norm", "unknown activation", (x4, 3, None, None, 1e-5, "relu")),
        ("group_norm", "layout the kernels do not address", (x4.transpose(2, 3), 3, None, None, 1e-5, None)),
        ("instance_norm", "running statistics", (x4, rm, rv, None, None, True, 0.1, 1e-5)),
        ("instance_norm", "running statistics in use", (x4, rm, rv, None, None, False, 0.1, 1e-5)),
        ("instance_norm", "eps == 0", (x4, None, None, None, None, True, 0.1, 0.0)),
        ("instance_norm", "one value per instance", (torch.randn(2, 6, 1), None, None, None, None, True, 0.1, 1e-5)),
        ("instance_norm", "2-D input", (torch.randn(2, 6), None, None, None, None, True, 0.1, 1e-5)),
        ("batch_norm", "tensor momentum", (x4, rm, rv, None, None, True, torch.tensor(0.1), 1e-5)),
        ("batch_norm", "training as an int", (x4, rm, rv, None, None, 1, 0.1, 1e-5)),
        ("batch_norm", "one value per channel", (torch.randn(1, 6), rm, rv, None, None, True, 0.1, 1e-5)),
        ("batch_norm", "evaluation without running_var", (x4, rm, None, None, None, False, 0.1, 1e-5)),
        ("batch_norm", "only running_mean in training", (x4, rm, None, None, None, True, 0.1, 1e-5)),
        ("batch_norm", "eps == 0 in training", (x4, rm, rv, None, None, True, 0.1, 0.0)),
        ("batch_norm", "negative eps", (x4, rm, rv, None, None, False, 0.1, -1e-5)),
        ("batch_norm", "running_mean of the wrong size", (x4, torch.zeros(5), rv, None, None, True, 0.1, 1e-5)),
        ("batch_norm", "integer running_var", (x4, rm, torch.ones(6, dtype=torch.int64), None, None, False, 0.1,
                                               1e-5)),
        ("add_norm", "0-dim input", (torch.tensor(1.0), None, None, None, 1e-5, 0.0, False, False, False)),
        ("add_norm", "zero-size input", (torch.randn(0, 8), None, w, b, 1e-5, 0.0, False, False, False)),
        ("add_norm", "residual of another shape", (x, torch.randn(5, 8), w, b, 1e-5, 0.0, False, False, False)),
        ("add_norm", "weight of the wrong shape", (x, x, torch.randn(1, 8), b, 1e-5, 0.0, False, False, False)),
        ("add_norm", "dropout probability above 1", (x, x, w, b, 1e-5, 1.5, False, False, False)),
        ("add_norm", "negative dropout probability", (x, x, w, b, 1e-5, -0.1, False, False, False)),
        ("add_norm", "prenorm not a bool", (x, x, w, b, 1e-5, 0.0, 1, False, False)),
        ("add_norm", "residual subclass", (x, x.as_subclass(_Sub), w, b, 1e-5, 0.0, False, False, False)),
        ("add_norm", "eps None for LayerNorm", (x, x, w, b, None, 0.0, False, False, False)),
        ("layer_norm_2d", "1-D input", (torch.randn(6), None, None, 1e-6)),
        ("layer_norm_2d", "zero-size input", (torch.randn(0, 6, 2, 2), c4, None, 1e-6)),
        ("layer_norm_2d", "weight of the wrong size", (x4, torch.randn(5), None, 1e-6)),
        ("layer_norm_2d", "bias not a vector", (x4, None, c4.view(2, 3), 1e-6)),
        ("layer_norm_2d", "integer input", (torch.arange(24).view(1, 6, 2, 2), None, None, 1e-6)),
        ("layer_norm_2d", "eps None", (x4, c4, c4, None)),
        ("layer_norm_2d", "spatial dims that do not view as one", (x4.transpose(2, 3), None, None, 1e-6)),
    ]


@needs_native
@pytest.mark.parametrize(("entry", "why", "args"), _declined_calls(), ids=[c[1] for c in _declined_calls()])
def test_entries_decline_calls_left_to_the_python_path(entry, why, args):
    assert getattr(backends.native_entries, entry)(*args) is None, why


_VALID_CALLS = {
    "layer_norm": (torch.randn(3, 8), (8,), torch.randn(8), torch.randn(8), 1e-5),
    "rms_norm": (torch.randn(3, 8), 8, torch.randn(8), None),
    "group_norm": (torch.randn(2, 6, 3), 3, None, torch.randn(6), 1e-5, "silu"),
    "instance_norm": (torch.randn(2, 6, 3), None, None, None, None, True, 0.1, 1e-5),
    "batch_norm": (torch.randn(2, 6, 3), torch.zeros(6), torch.ones(6), None, None, False, 0.1, 1e-5),
    "add_norm": (torch.randn(3, 8), torch.randn(3, 8), torch.randn(8), None, None, 0.0, True, False, True),
    "layer_norm_2d": (torch.randn(2, 6, 3, 2), torch.randn(6), None, 1e-6),
}


@needs_native
@pytest.mark.parametrize("entry", list(_VALID_CALLS))
def test_entries_decline_outside_plain_eager_with_the_native_backend(entry, monkeypatch):
    """A valid call is taken in plain eager mode with the native backend in force, and declined under another
    backend (a scope or set_backend), a broken native extension, a forward-AD level, a dispatch or torch-function
    mode, vmap and the profiler."""
    fn = getattr(backends.native_entries, entry)
    args = _VALID_CALLS[entry]
    assert fn(*args) is not None
    with backends.use_backend("native"):
        assert fn(*args) is not None
    with backends.use_backend("reference"):
        assert fn(*args) is None
        with backends.use_backend("auto"):
            assert fn(*args) is not None
    previous = backends.get_backend()
    backends.set_backend("reference")
    try:
        assert fn(*args) is None
    finally:
        backends.set_backend(previous)
    with torch.autograd.forward_ad.dual_level():
        assert fn(*args) is None
    with _Recorder():
        assert fn(*args) is None
    with _FunctionRecorder():
        assert fn(*args) is None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert fn(*args) is None
    seen = []
    torch.vmap(lambda t: seen.append(fn(t, *args[1:])) or t)(args[0].unsqueeze(0))
    assert seen == [None]
    monkeypatch.setitem(backends._loaded, "native", ImportError("fusednorm._C: undefined symbol: foo"))
    assert fn(*args) is None
    monkeypatch.undo()
    assert fn(*args) is not None
