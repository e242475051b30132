"""Backend registry: which implementation runs an op on a given tensor.

Backends (each a module exposing the functions documented in ``reference.py``):

- ``triton``: the Triton kernels (``backends/triton/``). CUDA tensors, or CPU tensors when Triton runs in its
  interpreter (``TRITON_INTERPRET=1``; that is how the kernels are tested without a GPU).
- ``native``: the compiled extension ``fusednorm._C`` (``csrc/``): CPU kernels, and CUDA kernels when built
  with CUDA.
- ``reference``: plain torch ops; always there. The test oracle and the last-resort fallback.

The choice is ``auto`` unless forced, in order of precedence, by ``use_backend(name)`` (a context manager),
``set_backend(name)``, or the ``FUSEDNORM_BACKEND`` environment variable read at import. ``auto`` picks, for a
CUDA tensor, triton, else native, else reference; for a CPU tensor, native, else reference. A forced backend
that cannot run the op on that tensor raises ``BackendUnavailableError`` naming why; it never silently
falls back. Nothing here touches the GPU at import.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import os
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace

import torch

BACKEND_NAMES = ("auto", "triton", "native", "reference")


class BackendUnavailableError(RuntimeError):
    """Raised when a forced backend cannot run the requested op on the given tensor."""


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """Whether a backend can be used on this machine, and why (not)."""

    available: bool
    detail: str

    def __bool__(self) -> bool:
        return self.available


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKEND_NAMES:
        raise ValueError(f"unknown fusednorm backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}")
    return name.lower()


_global_backend: str = _check_name(os.environ.get("FUSEDNORM_BACKEND", "auto") or "auto")
_scoped_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("fusednorm_backend", default=None)


def set_backend(name: str) -> None:
    """Force backend ``name`` (``auto``, ``triton``, ``native`` or ``reference``) for every later call."""
    global _global_backend
    _global_backend = _check_name(name)


def get_backend() -> str:
    """The backend name in force here: a ``use_backend`` scope, else ``set_backend``, else the env var."""
    scoped = _scoped_backend.get()
    return scoped if scoped is not None else _global_backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager forcing backend ``name`` inside the ``with`` block (thread- and task-local)."""
    token = _scoped_backend.set(_check_name(name))
    try:
        yield
    finally:
        _scoped_backend.reset(token)


# ---- the native extension's whole-call entries -----------------------------------------------------------


def _decline(*args: object) -> None:
    return None


#: ``fusednorm._C``'s whole-call eager entries (csrc/eager.cpp), by ``fusednorm.functional`` function name
#: (``add_norm`` serves add_layer_norm and add_rms_norm, with an is_rms flag last). Each takes that function's
#: arguments, positionally, and returns its result for a plain-eager call on CPU tensors that the native backend
#: runs, or None: the Python path then takes the call (and raises torch's error for bad arguments).
#: ``backends/native.py`` installs them when it loads; until then each declines.
native_entries = SimpleNamespace(
    layer_norm=_decline, rms_norm=_decline, group_norm=_decline, instance_norm=_decline, batch_norm=_decline,
    add_norm=_decline, layer_norm_2d=_decline,
)


# ---- loading -------------------------------------------------------------------------------------------

_loaded: dict[str, ModuleType | BaseException] = {}


def _load(name: str) -> ModuleType | BaseException:
    """Import a backend module once; remember the exception if it fails to import."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(f"fusednorm.backends.{name}")
        except Exception as exc:  # noqa: BLE001 - any import failure means 'unavailable', with its reason
            _loaded[name] = exc
    return _loaded[name]


def triton_interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _device_problem(name: str, module: ModuleType, device_type: str) -> str | None:
    """Why backend ``name`` cannot run on tensors of device type ``device_type`` (None when it can)."""
    if name == "native":
        if device_type == "cpu":
            return None
        if device_type == "cuda" and module.has_cuda():
            return None
        return f"the native extension was built without {device_type} kernels"
    if name == "reference":
        return None
    if name == "triton":
        if device_type == "cuda":
            return None
        if device_type == "cpu" and triton_interpret_enabled():
            return None
        return (
            f"the triton backend runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1 set before "
            f"fusednorm's Triton kernels are imported); got a {device_type} tensor"
        )
    return f"unknown backend {name}"


def _try(name: str, op: str, device_type: str) -> tuple[ModuleType | None, str]:
    module = _loaded.get(name)
    if module is None:
        module = _load(name)
    if isinstance(module, BaseException):
        return None, f"backend {name!r} is unavailable: {type(module).__name__}: {module}"
    problem = _device_problem(name, module, device_type)
    if problem is not None:
        return None, problem
    if not module.supports(op):
        return None, f"backend {name!r} does not implement {op!r}"
    return module, ""


def _device_type(x: torch.Tensor) -> str:
    # x.device.type costs ~0.4 us per call (select runs once per op call); the two common answers come from
    # cheap properties.
    if x.is_cpu:
        return "cpu"
    if x.is_cuda:
        return "cuda"
    return x.device.type


_AUTO_ORDER = {"cuda": ("triton", "native", "reference")}
_AUTO_ORDER_OTHER = ("native", "reference")


def select(op: str, x: torch.Tensor) -> ModuleType:
    """The backend module that runs ``op`` (a function name from ``reference.py``) on tensor ``x``.

    Not cached on purpose: the answer depends on state that may change between calls (the backend in force,
    a backend failing to load, ``TRITON_INTERPRET``), and the checks cost about a microsecond.
    """
    name = get_backend()
    if (name == "auto" or name == "native") and x.is_cpu:
        # The common eager case (a CPU tensor, the native extension loaded) without the general search: the
        # same answer, in fewer Python calls (each costs microseconds once the caches are cold).
        native = loaded("native")
        if native is not None and native.supports(op):
            return native
    device_type = _device_type(x)
    if name != "auto":
        module, why = _try(name, op, device_type)
        if module is None:
            raise BackendUnavailableError(f"fusednorm: cannot run {op} with the forced backend: {why}")
        return module
    for candidate in _AUTO_ORDER.get(device_type, _AUTO_ORDER_OTHER):
        module, _ = _try(candidate, op, device_type)
        if module is not None:
            return module
    raise BackendUnavailableError(f"fusednorm: no backend can run {op} on {device_type} tensors")


def loaded(name: str) -> ModuleType | None:
    """The backend module ``name`` if it has already been imported successfully, else None (never imports)."""
    module = _loaded.get(name)
    return None if module is None or isinstance(module, BaseException) else module


def available_backends() -> dict[str, BackendInfo]:
    """Each backend name mapped to whether it can be used here and, when not, why.

    ``triton`` counts as available when it imports and either a CUDA device or the interpreter is present;
    ``native`` when ``fusednorm._C`` loaded (its detail says whether CUDA kernels were built).
    """
    info: dict[str, BackendInfo] = {"auto": BackendInfo(True, "picks the fastest backend per tensor")}
    tri = _load("triton")
    if isinstance(tri, BaseException):
        info["triton"] = BackendInfo(False, f"{type(tri).__name__}: {tri}")
    elif torch.cuda.is_available():
        info["triton"] = BackendInfo(True, "CUDA device present")
    elif triton_interpret_enabled():
        info["triton"] = BackendInfo(True, "Triton interpreter on CPU tensors (TRITON_INTERPRET=1)")
    else:
        info["triton"] = BackendInfo(False, "no CUDA device and TRITON_INTERPRET is not set")
    nat = _load("native")
    if isinstance(nat, BaseException):
        info["native"] = BackendInfo(False, f"{type(nat).__name__}: {nat}")
    else:
        detail = f"CPU kernels ({nat.cpu_isa()} copy)" + (" and CUDA kernels" if nat.has_cuda() else "")
        info["native"] = BackendInfo(True, detail)
    info["reference"] = BackendInfo(True, "plain torch ops")
    return info
