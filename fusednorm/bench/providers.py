"""Who gets measured: fusednorm's backends, torch eager, torch.compile, and peers when installed.

A provider is a *functional namespace* (an object with some of ``layer_norm``, ``rms_norm``, ``group_norm``,
``instance_norm``, ``batch_norm``, ``add_layer_norm``, ``add_rms_norm``, ``layer_norm_2d``,
``adaptive_layer_norm``, ``switchable_norm``, ``weight_norm_fn`` with ``torch.nn.functional``'s or
``fusednorm.functional``'s signatures, see ``cases.TorchOps``), plus how to enter it (a forced fusednorm
backend) and how to wrap a call (``torch.compile``). Every provider answers, before anything runs, why it
cannot run here (``unavailable``) or cannot run one case (``unsupported``); those reasons are reported as
'skipped', never as errors.

To add a peer: write a namespace class with the functions it implements (import the peer inside them),
and append a ``PeerProvider`` to ``_build_registry``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fusednorm.bench.cases import Case, Inputs, TorchOps

Call = Callable[[Inputs], Any]

TRITON_ON_CPU = (
    "Triton on CPU tensors only runs under the slow interpreter (TRITON_INTERPRET=1); its times would "
    "measure the interpreter, not the kernels"
)


class Provider:
    """Base class: a namespace of functional ops, run inside ``context()``, optionally wrapped."""

    name: str = ""
    label: str = ""
    default: bool = True  # part of the default provider list

    def namespace(self) -> Any:
        raise NotImplementedError

    def unavailable(self, device: torch.device) -> str | None:
        """Why this provider cannot run at all on ``device`` (None when it can)."""
        return None

    def unsupported(self, case: Case) -> str | None:
        """Why this provider cannot run ``case`` (None when it can)."""
        fn = case.spec.fn
        ns = self.namespace()
        if not hasattr(ns, fn):
            return f"{self.label} has no {fn}"
        if case.op == "group_norm_silu" and "activation" not in _params(getattr(ns, fn)):
            return f"{self.label}'s group_norm has no fused activation"
        return None

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Entered around every run of this provider (checks, warm-up, timing)."""
        yield

    def make_call(self, case: Case) -> Call:
        """A function inputs -> op outputs for ``case`` (called once per case; may compile)."""
        ns, call = self.namespace(), case.spec.call
        return lambda t: call(ns, t)


def _params(fn: Any) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


# ---- torch ---------------------------------------------------------------------------------------------


class TorchEager(Provider):
    """torch eager (``torch.nn.functional``): the baseline every speedup is measured against."""

    name, label = "torch", "torch eager"

    def namespace(self) -> Any:
        return TorchOps


class TorchCompile(Provider):
    """``torch.compile`` of the same torch-eager call, static shapes, compiled once per case."""

    name, label = "torch_compile", "torch.compile"

    def namespace(self) -> Any:
        return TorchOps

    def unavailable(self, device: torch.device) -> str | None:
        if device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
            return "torch.compile on CPU needs a C++ compiler (none on PATH)"
        if device.type == "cuda" and importlib.util.find_spec("triton") is None:
            return "torch.compile on CUDA needs triton (not installed)"
        return None

    def make_call(self, case: Case) -> Call:
        # Dynamo keeps compiled variants per code object and falls back to eager past its recompile limit;
        # every case compiles the same lambda, so start each case from a clean cache (on-disk caches stay).
        torch._dynamo.reset()
        # The backward-only mode replays one graph's backward (retain_graph=True), which compiled graphs allow
        # only without donated buffers; the other modes keep inductor's default.
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = case.mode != "backward"
        call = case.spec.call
        return torch.compile(lambda t: call(TorchOps, t), dynamic=False)


# ---- fusednorm -----------------------------------------------------------------------------------------


class FusednormBackend(Provider):
    """``fusednorm.functional`` with one backend forced (``triton``, ``native`` or ``reference``)."""

    def __init__(self, backend: str, default: bool = True) -> None:
        self.backend = backend
        self.name = backend
        self.label = f"fusednorm {backend}"
        self.default = default

    def namespace(self) -> Any:
        return importlib.import_module("fusednorm.functional")

    def unavailable(self, device: torch.device) -> str | None:
        try:
            import fusednorm
        except Exception as exc:  # noqa: BLE001 - any import failure is the reason
            return f"import fusednorm failed: {type(exc).__name__}: {exc}"
        if self.backend == "triton" and device.type == "cpu":
            return TRITON_ON_CPU
        info = fusednorm.available_backends().get(self.backend)
        if info is None:
            return f"fusednorm has no backend named {self.backend!r}"
        if not info.available:
            return f"backend unavailable: {info.detail}"
        if self.backend == "native" and device.type == "cuda" and "CUDA" not in info.detail:
            return f"the native extension has no CUDA kernels ({info.detail})"
        return None

    def unsupported(self, case: Case) -> str | None:
        ns = self.namespace()
        if not hasattr(ns, case.spec.fn):
            return f"fusednorm.functional.{case.spec.fn} does not exist yet"
        return super().unsupported(case)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        # Force the backend globally as well as in this context: autograd may run backward on another
        # thread (CUDA), where a context-local use_backend() scope is not visible.
        import fusednorm

        previous = fusednorm.get_backend()
        fusednorm.set_backend(self.backend)
        try:
            with fusednorm.use_backend(self.backend):
                yield
        finally:
            fusednorm.set_backend(previous)


# ---- peers (CUDA only; imported lazily, only when installed) -----------------------------------------


class LigerOps:
    """Liger-Kernel's functional entry points, in fusednorm.functional's signatures."""

    @staticmethod
    def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        from liger_kernel.transformers.functional import liger_layer_norm

        return liger_layer_norm(x, weight, bias, eps)

    @staticmethod
    def rms_norm(x, normalized_shape, weight=None, eps=None):
        from liger_kernel.transformers.functional import liger_rms_norm

        return liger_rms_norm(x, weight, eps, offset=0.0, casting_mode="llama", in_place=False)

    @staticmethod
    def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
        from liger_kernel.transformers.functional import liger_group_norm

        return liger_group_norm(x, weight, bias, x.shape[1], num_groups, eps)


class ApexOps:
    """NVIDIA apex fused layer norms."""

    @staticmethod
    def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine

        return fused_layer_norm_affine(x, weight, bias, tuple(normalized_shape), eps)

    @staticmethod
    def rms_norm(x, normalized_shape, weight=None, eps=None):
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine

        return fused_rms_norm_affine(x, weight, tuple(normalized_shape), eps)


class FlashAttnOps:
    """flash-attention's Triton layer norm (``flash_attn.ops.triton.layer_norm``), residual variants too."""

    @staticmethod
    def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        from flash_attn.ops.triton.layer_norm import layer_norm_fn

        return layer_norm_fn(x, weight, bias, eps=eps)

    @staticmethod
    def rms_norm(x, normalized_shape, weight=None, eps=None):
        from flash_attn.ops.triton.layer_norm import rms_norm_fn

        return rms_norm_fn(x, weight, None, eps=eps)

    @staticmethod
    def add_layer_norm(x, residual, weight, bias, eps=1e-5, dropout_p=0.0, prenorm=False, residual_in_fp32=False):
        from flash_attn.ops.triton.layer_norm import layer_norm_fn

        return layer_norm_fn(x, weight, bias, residual=residual, eps=eps, dropout_p=dropout_p, prenorm=prenorm,
                             residual_in_fp32=residual_in_fp32)

    @staticmethod
    def add_rms_norm(x, residual, weight, eps=None, dropout_p=0.0, prenorm=False, residual_in_fp32=False):
        from flash_attn.ops.triton.layer_norm import rms_norm_fn

        return rms_norm_fn(x, weight, None, residual=residual, eps=eps, dropout_p=dropout_p, prenorm=prenorm,
                           residual_in_fp32=residual_in_fp32)


class QuackOps:
    """quack (CuTe DSL) RMSNorm."""

    @staticmethod
    def rms_norm(x, normalized_shape, weight=None, eps=None):
        from quack.rmsnorm import rmsnorm

        return rmsnorm(x, weight, eps=eps)


class PeerProvider(Provider):
    """A peer library: available when its module imports, on CUDA tensors only."""

    def __init__(self, name: str, label: str, module: str, install: str, ops: type) -> None:
        self.name, self.label, self.module, self.install, self.ops = name, label, module, install, ops

    def namespace(self) -> Any:
        return self.ops

    def unavailable(self, device: torch.device) -> str | None:
        try:
            found = importlib.util.find_spec(self.module) is not None
        except Exception:  # noqa: BLE001 - a parent package that fails to import counts as not installed
            found = False
        if not found:
            return f"not installed ({self.install})"
        if device.type != "cuda":
            return f"{self.label} runs on CUDA tensors only"
        return None


# ---- registry ------------------------------------------------------------------------------------------


def _build_registry() -> dict[str, Provider]:
    providers: list[Provider] = [
        FusednormBackend("triton"),
        FusednormBackend("native"),
        TorchEager(),
        TorchCompile(),
        PeerProvider("liger", "Liger-Kernel", "liger_kernel", "pip install liger-kernel", LigerOps),
        # the submodule, not the top-level name: an unrelated PyPI package is also called "apex"
        PeerProvider("apex", "apex", "apex.normalization", "build NVIDIA apex from source", ApexOps),
        PeerProvider("flash_attn", "flash-attn", "flash_attn", "pip install flash-attn", FlashAttnOps),
        PeerProvider("quack", "quack", "quack", "pip install quack-kernels", QuackOps),
        # the plain-torch fallback: useful to check the harness, not a performance contender
        FusednormBackend("reference", default=False),
    ]
    return {p.name: p for p in providers}


PROVIDERS: dict[str, Provider] = _build_registry()
BASELINE = "torch"

#: accepted spellings on the command line
ALIASES = {
    "eager": "torch",
    "torch_eager": "torch",
    "compile": "torch_compile",
    "torch.compile": "torch_compile",
    "inductor": "torch_compile",
    "fusednorm_triton": "triton",
    "fusednorm_native": "native",
    "fusednorm_reference": "reference",
    "liger_kernel": "liger",
    "flash-attn": "flash_attn",
    "flash_attention": "flash_attn",
}


def get_providers(names: list[str] | None = None) -> list[Provider]:
    """Providers by name (aliases accepted; ``all`` = every registered one), default: the default set."""
    if not names:
        return [p for p in PROVIDERS.values() if p.default]
    out: list[Provider] = []
    for raw in names:
        if raw == "all":
            chosen = list(PROVIDERS.values())
        else:
            key = ALIASES.get(raw.lower(), raw.lower())
            if key not in PROVIDERS:
                known = ", ".join([*PROVIDERS, "all"])
                raise ValueError(f"unknown provider {raw!r}; expected one of {known}")
            chosen = [PROVIDERS[key]]
        out.extend(p for p in chosen if p not in out)
    return out
