"""Op layer: torch.library custom ops (``fusednorm::*``) and the autograd.Functions that call them.

One file per op family. Each custom op's implementation asks ``fusednorm.backends.select`` which backend runs
it, so the choice happens at run time (also under ``torch.compile``, where the op is opaque). Custom ops cannot
return ``None``, so absent gradients travel as 0-size tensors and are turned back into ``None`` here.

Eager fast path. Going through the torch.library dispatcher costs ~12 us per custom-op call on the CPU, and
``autograd.Function.apply`` another ~8 us; for small tensors that is more than the kernel. So, in plain eager
execution (see ``plain_eager``), the families skip both:

- ``call_op(op, *args)`` runs the op's Python body directly (the function registered with ``custom_op`` below)
  instead of ``torch.ops.fusednorm.<op>``. It is the same code the dispatcher would run on a CPU/CUDA tensor,
  minus the dispatcher; the op stays registered and is what ``torch.compile``, FakeTensor / dispatch-mode
  tracing, ``torch.jit.trace``, functorch transforms and ``opcheck`` see.
- ``BackendPinnedFunction.call(*args)`` runs the Function's ``forward`` directly (with a throw-away context)
  when no gradient can be needed (grad mode off, or no tensor argument requires grad), else ``apply``.

Anything that is not plain eager (a tensor subclass, FakeTensor, a meta tensor, an active TorchDispatchMode or
torch-function mode, tracing, compiling, a vmap/grad transform, a forward-AD dual level, a running profiler, a
``create_graph=True`` backward) takes the original path, so the results there are unchanged.
``tests/test_fast_path.py`` checks both sides and bit-identical outputs. One check is lost on the fast path: the
dispatcher's "output aliases an input" check of custom ops (a debugging aid; ``opcheck`` covers the bodies).

Native autograd. Even the fast path builds a Python autograd node and runs a Python backward, which costs ~100 us
per call when the caches are cold (the normal state after a memory-bound kernel). When the native backend runs
a call, LayerNorm/RMSNorm, LayerNorm2d, GroupNorm, BatchNorm and residual-add + norm go instead to the extension's
C++ autograd ops (``csrc/autograd.cpp``, listed in the backend's ``AUTOGRAD_OPS``): one dispatcher call that runs
the same backend ops and records a C++ autograd node. ``native_autograd_op`` decides, with the same plain-eager checks;
once the extension is loaded they take one call of it (``fusednorm._C.eager_unintercepted``), and ``select``
answers the CPU + native case first.

Whole-call entries. On CPU tensors most such calls never reach this layer: ``fusednorm.functional`` first offers
them to the extension's whole-call entries (``backends.native_entries``, csrc/eager.cpp), which do the argument
checks and this layer's work in C++ and call the same C++ autograd ops. The calls they decline come here."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from fusednorm import backends
from fusednorm.backends import get_backend, use_backend


def absent_like(ref: Tensor) -> Tensor:
    """The 0-size placeholder a backward op returns for a gradient whose parameter is absent."""
    return ref.new_empty(0)


def grad_or_empty(g: Tensor | None, ref: Tensor) -> Tensor:
    """A backend's gradient, or the 0-size placeholder when the backend returned None."""
    return absent_like(ref) if g is None else g


def none_if_absent(g: Tensor, present: bool) -> Tensor | None:
    """Turn a backward op's placeholder back into ``None`` for autograd."""
    return g if present else None


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- eager fast path -----------------------------------------------------------------------------------

# Exactly these types are "plain" tensors: a Parameter dispatches like a Tensor (its __torch_function__ is
# disabled); any other subclass (FakeTensor, DTensor, user subclasses) may override dispatch and must see the op.
_PLAIN_TENSOR_TYPES = frozenset({Tensor, torch.nn.Parameter})

_is_compiling = torch.compiler.is_compiling
_dispatch_stack_len = torch._C._len_torch_dispatch_stack
_torch_function_mode_on = torch._C._is_torch_function_mode_enabled
_functorch_stack_top = torch._C._functorch.peek_interpreter_stack
_jit_tracing_state = torch._C._get_tracing_state
_profiler_on = torch._C._autograd._profiler_enabled

_EAGER_IMPLS: dict[Any, Callable[..., Any]] = {}


def custom_op(name: str, *, mutates_args: Sequence[str] | str = ()) -> Callable[[Callable[..., Any]], Any]:
    """``torch.library.custom_op(name, mutates_args=...)`` that also remembers the op's Python body, which
    ``call_op`` runs directly in plain eager mode. Returns the ``CustomOpDef`` (``register_fake`` etc. as usual)."""

    def register(fn: Callable[..., Any]) -> Any:
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        _EAGER_IMPLS[op] = fn
        return op

    return register


def _plain_mode() -> bool:
    """True when nothing intercepts ops globally: not compiling/tracing, no dispatch or torch-function mode, no
    functorch transform (vmap, grad, ...) in progress, no profiler running (a profile should show the
    ``fusednorm::*`` ops, which only the dispatcher records)."""
    return not (
        _is_compiling()
        or _dispatch_stack_len()
        or _torch_function_mode_on()
        or _functorch_stack_top() is not None
        or _jit_tracing_state() is not None
        or _profiler_on()
    )


def _plain_args(args: Sequence[Any], grad: bool) -> bool:
    """True when every tensor in ``args`` is a plain ``torch.Tensor`` (or Parameter) off the meta device (meta
    tensors go to the fake impl), and, if ``grad``, none requires grad."""
    for a in args:
        t = type(a)
        if t in _PLAIN_TENSOR_TYPES:
            if a.is_meta or (grad and a.requires_grad):
                return False
        elif t not in _NON_TENSOR_TYPES and isinstance(a, Tensor):  # a subclass (FakeTensor, DTensor, ...)
            return False
    return True


# Argument types that are known not to be tensors: skips the (slower) isinstance check for the common ones.
_NON_TENSOR_TYPES = frozenset({type(None), bool, int, float, str, torch.dtype})


def plain_eager(args: Sequence[Any]) -> bool:
    """True when a call with ``args`` may skip the dispatcher: plain eager mode (see above), every tensor in
    ``args`` a plain ``torch.Tensor`` (or Parameter) that is not on the meta device (meta goes to the fake impl),
    and nothing to record for autograd (grad mode off, or no tensor requiring grad).

    The last condition matters for a backward run with ``create_graph=True``: the dispatcher runs an op's body
    below autograd and raises a clear error for the missing double-backward formula; the body called directly
    would record its inner ops and give silently wrong higher-order gradients."""
    return _plain_mode() and _plain_args(args, torch.is_grad_enabled())


def call_op(op: Any, *args: Any) -> Any:
    """Call custom op ``op`` (a ``CustomOpDef`` made with ``custom_op``) with positional ``args``: its Python body
    directly when ``plain_eager(args)``, else through the dispatcher (``torch.ops.fusednorm.<name>``)."""
    if _plain_mode() and _plain_args(args, torch.is_grad_enabled()):
        return _EAGER_IMPLS[op](*args)
    return op(*args)


_NO_AUTOGRAD_OPS: dict[str, Callable[..., Any]] = {}


def native_autograd_op(family: str, backend_op: str, x: Tensor, args: Sequence[Any]) -> Callable[..., Any] | None:
    """The native extension's C++ autograd op for ``family`` (``"layer_norm"``, ``"layer_norm_cf"``,
    ``"group_norm"``, ``"batch_norm"``, ``"add_norm"``) when this call may use it, else None (use the Python
    autograd.Function).

    It may when the call is plain eager (as for ``call_op``; gradients may be required: the op records its own
    node), no forward-AD level is active (the C++ node has no forward derivative; the Python path raises the
    error), and the backend in force runs ``backend_op`` on ``x`` with the native extension. The caller handles
    zero-size tensors itself (the C++ ops do not)."""
    # Every Python-level call here costs microseconds once the caches are cold. ``is_compiling`` comes first:
    # under torch.compile nothing after it may run (or be traced). Once the extension is loaded, its
    # ``eager_unintercepted`` asks ``_plain_mode``'s other five C-level questions in one call.
    if _is_compiling() or _forward_ad._current_level >= 0:
        return None
    native = backends.loaded("native")
    plain = native.eager_unintercepted() if native is not None else _plain_mode()
    if not plain or not _plain_args(args, False):
        return None
    return getattr(backends.select(backend_op, x), "AUTOGRAD_OPS", _NO_AUTOGRAD_OPS).get(family)


def forward_op(ctx: Any, op: Any, *args: Any) -> Any:
    """``call_op`` for use inside ``BackendPinnedFunction.forward``: when ``call`` runs the forward without
    autograd it has already checked plain eager mode and the tensor arguments (the op's arguments come from them
    or from plain torch ops on them), so the body runs directly without checking again."""
    if type(ctx) is _InferenceCtx:
        return _EAGER_IMPLS[op](*args)
    return call_op(op, *args)


class _InferenceCtx:
    """Stand-in for the autograd context when ``BackendPinnedFunction.call`` runs ``forward`` without autograd:
    whatever the forward saves or marks is dropped (no backward can run)."""

    def save_for_backward(self, *tensors: Tensor | None) -> None:
        pass

    def mark_non_differentiable(self, *tensors: Tensor) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass


class BackendPinnedFunction(torch.autograd.Function):
    """``torch.autograd.Function`` whose backward runs on the backend that was in force during its forward.

    A ``use_backend`` scope is context-local, and autograd runs CUDA backward passes on its own device threads,
    where the caller's scope is not visible; without this, ``with use_backend("native"): loss.backward()`` could
    run the backward on another backend than the forward. Subclasses define ``forward``/``backward`` as usual
    and are called with ``call`` (not ``apply``), which skips autograd when no gradient can be needed.
    Under ``torch.compile`` nothing is recorded: compiled code runs on the backend selected at run time.
    """

    _plain_forward: Callable[..., Any]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        forward, backward = cls.forward, cls.backward

        @functools.wraps(forward)
        def pinned_forward(ctx, *args, **kw):
            ctx.fusednorm_backend = None if torch.compiler.is_compiling() else get_backend()
            return forward(ctx, *args, **kw)

        @functools.wraps(backward)
        def pinned_backward(ctx, *grads):
            name = getattr(ctx, "fusednorm_backend", None)
            with use_backend(name) if name is not None else contextlib.nullcontext():
                return backward(ctx, *grads)

        cls._plain_forward = staticmethod(forward)
        cls.forward = staticmethod(pinned_forward)
        cls.backward = staticmethod(pinned_backward)

    @classmethod
    def call(cls, *args: Any) -> Any:
        """``cls.apply(*args)``, or, in plain eager mode when no gradient can be needed (grad mode off or no
        tensor argument requiring grad, no forward-AD level), ``forward`` run directly: the same outputs (and the
        same in-place running-statistics updates) without building an autograd node."""
        if _forward_ad._current_level < 0 and _plain_mode() and _plain_args(args, torch.is_grad_enabled()):
            return cls._plain_forward(_InferenceCtx(), *args)
        return cls.apply(*args)
