"""Swap a whole model's normalization layers for fusednorm's: ``replace_norms`` and ``restore_norms``.

What gets replaced
------------------
- ``torch.nn`` norms: LayerNorm, RMSNorm, GroupNorm, BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm1d/2d/3d
  become the fusednorm class of the same name (looked up when ``replace_norms`` runs, so a class added to
  ``fusednorm.modules`` later is picked up without touching this file). A user subclass of one of those
  that does not override ``forward`` is handled too; one that overrides ``forward`` is left alone.
- Third-party row norms recognised by structure: a leaf module whose only parameters are a 1-D ``weight``
  (and optionally ``bias``), with an epsilon attribute (``variance_epsilon``, ``eps`` or ``epsilon``) and a
  one-argument ``forward``. Hugging Face ``LlamaRMSNorm``/``MistralRMSNorm``/``Qwen2RMSNorm``/``T5LayerNorm``
  and the Gemma-style ``(1 + weight)`` RMSNorms are examples. Which formula a class computes is found by
  probing its own ``forward`` on a small fixed input (no global RNG use, hooks not fired) and comparing with
  RMSNorm ``x*rstd*w``, Gemma RMSNorm ``x*rstd*(1+w)`` and LayerNorm; a second probe in another dtype finds
  its output-dtype rule. On the meta device the class name decides (``*RMSNorm``; ``Gemma`` in the name
  means ``1 + w``).

How
---
Each module keeps its identity: only ``module.__class__`` changes, to the fusednorm class (or to a generated
subclass of the original third-party class, so ``isinstance(m, LlamaRMSNorm)`` still holds). Parameter and
buffer objects, hooks, device, dtype, training mode and state_dict keys are untouched, so an optimizer built
before the swap keeps working and checkpoints load both ways. ``restore_norms`` sets the original classes
back. Patched modules deep-copy and pickle (the generated classes rebuild themselves on load).

Numerics of third-party RMSNorms: Llama-style ``w * (x_fp32 * rstd).to(x.dtype)`` is computed fused when
``x`` and ``w`` share a dtype (one rounding of the product instead of two: at most one ulp away from Hugging
Face in bf16/fp16, identical math in fp32). With different dtypes (e.g. fp32 weights, bf16 input) the
normalisation is fused and the weight product is done as Hugging Face does, so the output dtype and rounding
match. Gemma-style ``(x_fp32 * rstd * (1 + w_fp32)).to(x.dtype)`` is matched exactly (``1 + w`` is formed in
fp32).

Hugging Face one-liner (no download needed; works on a model built from a config as well)::

    model = fusednorm.replace_norms(AutoModelForCausalLM.from_config(config))   # or .from_pretrained(...)

DDP / FSDP / torch.compile
--------------------------
Call ``replace_norms`` on the plain model *before* wrapping it: before ``DistributedDataParallel``,
``FullyShardedDataParallel`` / ``fully_shard`` (FSDP2 itself swaps ``__class__`` to an ``FSDP<Name>`` class,
and FSDP1 with ``use_orig_params=False`` flattens parameters, so probing needs the unsharded module) and
before ``torch.compile``. Convert BatchNorm to SyncBatchNorm with ``torch.nn.SyncBatchNorm.
convert_sync_batchnorm`` first, then call ``replace_norms``. Because parameters are the same objects, DDP's
gradient hooks and an existing optimizer are unaffected by the swap itself.

``backend=`` pins a fusednorm backend per module by running its forward inside ``fusednorm.use_backend``.
That scope is a context variable, which ``torch.compile`` cannot trace; inside a compiled graph the pin is
not applied and the backend in force when the graph runs (``set_backend`` / ``FUSEDNORM_BACKEND``) is used.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Union

import torch
from torch import Tensor, nn

from fusednorm import functional as F
from fusednorm.backends import BACKEND_NAMES, use_backend

__all__ = ["ReplacementSummary", "replace_norms", "replacement_summary", "restore_norms"]

# torch.nn class names with a fusednorm drop-in of the same name in fusednorm.modules.
TORCH_NORM_NAMES = (
    "LayerNorm",
    "RMSNorm",
    "GroupNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
)

# Epsilon attribute names used by third-party norms, in the order we look for them.
EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")

# Per-module attributes (kept in the module's __dict__; not parameters or buffers, so not in state_dict).
_ORIGINAL = "_fusednorm_original_class"
_BACKEND = "_fusednorm_backend"
_SPEC = "_fusednorm_spec"
# Summaries live beside the model, not in it: they name generated classes, which must not be pickled by name.
_SUMMARIES: weakref.WeakKeyDictionary[nn.Module, ReplacementSummary] = weakref.WeakKeyDictionary()

Filter = Union[str, type, Iterable[Union[str, type]], None]


@dataclasses.dataclass(frozen=True)
class RowNormSpec:
    """What a third-party row norm computes, as found by probing it.

    kind: ``"rms"`` or ``"layer"``; offset: added to the weight (1.0 for Gemma-style, else 0.0);
    out_dtype: ``"promote"`` (promote(weight, input), Llama), ``"input"`` (Gemma) or ``"weight"`` (T5 with
    half weights); eps_attr: the module attribute holding epsilon; has_bias: LayerNorm with a bias.
    """

    kind: str
    offset: float
    out_dtype: str
    eps_attr: str
    has_bias: bool = False


@dataclasses.dataclass(frozen=True)
class Replaced:
    """One replaced module: qualified name, original class, class now in place, kind, pinned backend."""

    name: str
    original: type
    replacement: type
    kind: str
    backend: str | None


@dataclasses.dataclass
class ReplacementSummary:
    """What ``replace_norms`` did: modules replaced and candidates skipped (with the reason)."""

    replaced: list[Replaced] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, type, str]] = dataclasses.field(default_factory=list)

    def names(self) -> list[str]:
        """Qualified names of the replaced modules ("" is the root)."""
        return [r.name for r in self.replaced]

    def __str__(self) -> str:
        lines = [f"fusednorm.replace_norms: replaced {len(self.replaced)} module(s)"]
        width = max([len(r.name or "<root>") for r in self.replaced] + [4])
        for r in self.replaced:
            pin = f"  [backend={r.backend}]" if r.backend else ""
            lines.append(
                f"  {r.name or '<root>':<{width}}  {_qualname(r.original)} -> {_qualname(r.replacement)}"
                f"  ({r.kind}){pin}"
            )
        for name, cls, why in self.skipped:
            lines.append(f"  skipped {name or '<root>'} ({_qualname(cls)}): {why}")
        return "\n".join(lines)


def _qualname(cls: type) -> str:
    mod = cls.__module__
    if mod.startswith("torch.nn.modules"):
        mod = "torch.nn"
    elif mod.startswith("fusednorm.modules"):
        mod = "fusednorm"
    return f"{mod}.{cls.__qualname__}"


# ==== class lookup ========================================================================================


def _torch_to_fused() -> dict[type, type]:
    """torch.nn class -> fusednorm class, for the fusednorm classes that exist right now."""
    import fusednorm.modules as fm

    table = {}
    for name in TORCH_NORM_NAMES:
        tcls, fcls = getattr(nn, name, None), getattr(fm, name, None)
        if tcls is not None and fcls is not None and issubclass(fcls, tcls):
            table[tcls] = fcls
    return table


def _torch_norm_base(cls: type) -> type | None:
    """The most derived class in ``cls``'s MRO that is one of the torch.nn norms we map."""
    wanted = {getattr(nn, n) for n in TORCH_NORM_NAMES if hasattr(nn, n)}
    for base in cls.__mro__:
        if base in wanted:
            return base
    return None


def _is_fused_class(cls: type) -> bool:
    return any(base.__module__.startswith("fusednorm.modules") for base in cls.__mro__)


# ==== generated classes ===================================================================================

_CLASS_CACHE: dict[tuple, type] = {}


def _pinned(forward: Callable) -> Callable:
    """Wrap ``forward`` so the module's ops run with its pinned backend, forward and backward (eager)."""

    def pinned_forward(self, *args: Any, **kwargs: Any) -> Any:
        backend = getattr(self, _BACKEND, None)
        # torch.compile cannot trace a ContextVar.set; under compile the pin is skipped (documented above).
        if backend is None or torch.compiler.is_compiling():
            return forward(self, *args, **kwargs)
        with use_backend(backend):
            out = forward(self, *args, **kwargs)
        if torch.is_grad_enabled():
            _pin_backward(out, (*args, *kwargs.values()), backend)
        return out

    return pinned_forward


def _pin_backward(out: Any, inputs: tuple, backend: str) -> None:
    """Run the autograd nodes this module's forward created inside ``use_backend(backend)`` too.

    The backward runs long after the forward's ``with`` block has exited, so each node created by the forward
    (found by walking from the outputs back to the inputs' nodes and the parameters' AccumulateGrad) gets a
    pre-hook entering the scope and a post-hook leaving it; the scope is thread-local and a node's hooks and
    body run on one thread.
    """
    outs = out if isinstance(out, (tuple, list)) else (out,)
    stack = [t.grad_fn for t in outs if isinstance(t, Tensor) and t.grad_fn is not None]
    if not stack:
        return
    stop = {t.grad_fn for t in inputs if isinstance(t, Tensor) and t.grad_fn is not None}
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in stop or node in seen:
            continue
        seen.add(node)
        if not node.next_functions and "AccumulateGrad" in node.name():
            continue  # a parameter's leaf node: nothing runs there
        scopes: list = []

        def enter(grad_outputs, scopes=scopes):
            scope = use_backend(backend)
            scope.__enter__()
            scopes.append(scope)

        def leave(grad_inputs, grad_outputs, scopes=scopes):
            if scopes:
                scopes.pop().__exit__(None, None, None)

        node.register_prehook(enter)
        node.register_hook(leave)
        stack.extend(n for n, _ in node.next_functions)


def _reduce_patched(self: nn.Module, protocol: int):
    # Generated classes are not importable by name: rebuild the class from its key when unpickling.
    return (_new_patched, (type(self)._fusednorm_class_key,), self.__dict__.copy())


def _new_patched(key: tuple) -> nn.Module:
    cls = _patched_class(*key)
    return cls.__new__(cls)


def _patched_class(original: type, fused_base: type | None, spec: RowNormSpec | None, pinned: bool) -> type:
    """The class a module of class ``original`` gets.

    fused_base: the fusednorm class for torch.nn norms (None for third-party norms, whose forward comes from
    ``spec``); pinned: forward runs inside ``use_backend`` with the module's pinned backend.
    """
    if fused_base is not None and original in fused_base.__mro__ and not pinned:
        return fused_base  # the common case: plain torch.nn norm -> fusednorm class, nothing generated
    key = (original, fused_base, spec, pinned)
    cls = _CLASS_CACHE.get(key)
    if cls is not None:
        return cls
    if fused_base is not None:
        # User subclass of a torch norm: the fusednorm forward first in the MRO, the user's class behind it.
        bases = (fused_base,) if original in fused_base.__mro__ else (fused_base, original)
        forward = fused_base.forward
    else:
        bases = (original,)
        forward = _row_norm_forward
    ns = {
        "forward": _pinned(forward) if pinned else forward,
        "__reduce_ex__": _reduce_patched,
        "__module__": __name__,
        "_fusednorm_class_key": key,
        "__doc__": f"{original.__qualname__} computed by fusednorm (generated by fusednorm.replace_norms).",
    }
    cls = type(f"Fused{original.__name__}", bases, ns)
    _CLASS_CACHE[key] = cls
    return cls


# ==== third-party row norms ===============================================================================


def _out_dtype(rule: str, x: torch.dtype, w: torch.dtype) -> torch.dtype:
    if rule == "input":
        return x
    if rule == "weight" and w in (torch.float16, torch.bfloat16):
        return w
    return torch.promote_types(x, w)


def _row_norm_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    """forward() of a patched third-party row norm; reproduces the probed formula and dtype rule."""
    spec: RowNormSpec = getattr(self, _SPEC)
    x, w = hidden_states, self.weight
    b = self.bias if spec.has_bias else None
    eps = float(getattr(self, spec.eps_attr))
    shape = (w.shape[-1],)
    out = _out_dtype(spec.out_dtype, x.dtype, w.dtype)
    if spec.offset:
        # Gemma: (1 + w) in fp32 (in bf16 a weight near zero would lose its low bits), whole product in fp32,
        # one rounding at the end. fusednorm with fp32 weights and low-precision x does exactly that.
        w_eff = w.float() + spec.offset
        b_eff = b.float() if b is not None else None
    else:
        w_eff, b_eff = w, b
    fused = x.dtype == w.dtype or spec.offset or spec.out_dtype == "input"
    if fused:
        if spec.kind == "rms":
            y = F.rms_norm(x, shape, w_eff, eps)
        else:
            y = F.layer_norm(x, shape, w_eff, b_eff, eps)
        return y if y.dtype == out else y.to(out)
    # Llama/T5 with mixed dtypes: normalise (fp32 statistics) and round to the intermediate dtype the original
    # rounds to, then scale in torch so the product's dtype and rounding are the original's.
    xhat = F.rms_norm(x, shape, None, eps) if spec.kind == "rms" else F.layer_norm(x, shape, None, None, eps)
    mid = w.dtype if spec.out_dtype == "weight" and w.dtype in (torch.float16, torch.bfloat16) else x.dtype
    y = w * xhat.to(mid)
    return y + b if b is not None else y


def _eps_attr(module: nn.Module) -> str | None:
    for name in EPS_ATTRS:
        v = module.__dict__.get(name)
        if isinstance(v, (float, int)) and not isinstance(v, bool):
            return name
    return None


def _third_party_shape(module: nn.Module) -> tuple[str | None, str]:
    """(eps attribute, "") when ``module`` looks like a third-party row norm, else (None, why not)."""
    cls = type(module)
    if cls.__module__.startswith(("torch.", "fusednorm.")):
        return None, "torch/fusednorm class"
    params = {k: v for k, v in module._parameters.items() if v is not None}
    w = params.get("weight")
    if w is None or set(params) - {"weight", "bias"} or module._modules:
        return None, "not a leaf with weight (and bias) only"
    if w.dim() != 1 or w.numel() == 0 or ("bias" in params and params["bias"].shape != w.shape):
        return None, "weight is not a 1-D vector"
    eps_attr = _eps_attr(module)
    if eps_attr is None:
        return None, "no epsilon attribute"
    try:
        sig = inspect.signature(cls.forward)
    except (TypeError, ValueError):
        return None, "forward has no signature"
    ps = list(sig.parameters.values())[1:]
    positional = [p for p in ps if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in ps if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not positional or len(required) > 1:
        return None, "forward does not take a single tensor"
    return eps_attr, ""


def _candidates(x: Tensor, w: Tensor, b: Tensor | None, eps: float) -> dict[tuple[str, float], Tensor]:
    """The formulas a row norm may compute, in float64: (kind, weight offset) -> output."""
    ms = x.square().mean(-1, keepdim=True)
    rms_hat = x * torch.rsqrt(ms + eps)
    mu = x.mean(-1, keepdim=True)
    ln_hat = (x - mu) * torch.rsqrt((x - mu).square().mean(-1, keepdim=True) + eps)
    out = {}
    for kind, hat in (("rms", rms_hat), ("layer", ln_hat)):
        for offset in (0.0, 1.0):
            y = hat * (w + offset)
            out[(kind, offset)] = y + b if b is not None else y
    return out


def _probe(module: nn.Module, eps_attr: str) -> tuple[RowNormSpec | None, str]:
    """Find the formula and output-dtype rule of a third-party row norm by calling its own forward."""
    cls = type(module)
    w = module.weight
    b = module._parameters.get("bias")
    eps = float(getattr(module, eps_attr))
    sharded = type(w).__name__ == "DTensor" or type(getattr(w, "data", w)).__name__ == "DTensor"
    if w.device.type == "meta" or sharded:
        # Nothing to run (no data, or a shard of it): trust the name. Only RMSNorms are common enough to guess.
        name = cls.__name__
        if "rmsnorm" not in name.lower() or b is not None:
            where = "sharded (DTensor)" if sharded else "on the meta device"
            return None, f"{where} and not named *RMSNorm, cannot probe"
        gemma = "gemma" in name.lower()
        return RowNormSpec("rms", 1.0 if gemma else 0.0, "input" if gemma else "promote", eps_attr), ""
    n = w.numel()
    gen = torch.Generator().manual_seed(20240607)  # private generator: the global RNG stream is not touched
    x64 = torch.randn(4, n, generator=gen, dtype=torch.float64) * 1.5 + 0.7
    probe_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    try:
        with torch.no_grad():
            # cls.forward, not module(...): the module's hooks must not see the probe.
            y = cls.forward(module, x64.to(device=w.device, dtype=probe_dtype))
    except Exception as exc:  # noqa: BLE001 - any failure means: not a norm we understand
        return None, f"probe forward failed ({type(exc).__name__}: {exc})"
    if not isinstance(y, Tensor) or y.shape != x64.shape:
        return None, "probe forward returned something else than a tensor shaped like its input"
    y64 = y.detach().double().cpu()
    w64 = w.detach().double().cpu()
    b64 = b.detach().double().cpu() if b is not None else None
    matches = []
    for (kind, offset), ref in _candidates(x64, w64, b64, eps).items():
        scale = max(1.0, float(ref.abs().max()))
        if float((y64 - ref).abs().max()) <= 2e-2 * scale:  # loose enough for a half-precision weight
            matches.append((kind, offset))
    if len(matches) != 1:
        return None, "probe output matches no single RMSNorm/LayerNorm formula"
    kind, offset = matches[0]
    if kind == "rms" and b is not None:
        return None, "RMSNorm with a bias is not supported"
    return RowNormSpec(kind, offset, _probe_dtype_rule(module, w, n), eps_attr, b is not None), ""


def _probe_dtype_rule(module: nn.Module, w: Tensor, n: int) -> str:
    """Output-dtype rule: run once with an input dtype differing from the weight's and see what comes out."""
    xd = torch.bfloat16 if w.dtype == torch.float16 else torch.float16
    if w.dtype == torch.float64:
        xd = torch.float32
    try:
        with torch.no_grad():
            y = type(module).forward(module, torch.ones(2, n, device=w.device, dtype=xd))
    except Exception:  # noqa: BLE001 - e.g. no fp16 kernels on this device: assume the Llama rule
        return "promote"
    if y.dtype == xd:
        return "input"
    if y.dtype == w.dtype and w.dtype != torch.promote_types(w.dtype, xd):
        return "weight"
    return "promote"


# ==== filters =============================================================================================


def _as_list(f: Filter) -> list[str | type]:
    if f is None:
        return []
    if isinstance(f, (str, type)):
        return [f]
    return list(f)


def _matches(name: str, cls: type, patterns: list[str | type]) -> bool:
    for p in patterns:
        if isinstance(p, type):
            if issubclass(cls, p):
                return True
        elif p in (cls.__name__, cls.__qualname__) or fnmatch.fnmatchcase(name, p) or name.startswith(p + "."):
            return True
    return False


# ==== public API ==========================================================================================


def replace_norms(
    model: nn.Module,
    *,
    include: Filter = None,
    exclude: Filter = None,
    backend: str | None = None,
    verbose: bool = False,
) -> nn.Module:
    """Replace, in place, every supported normalization layer in ``model`` with fusednorm's; return ``model``.

    model: any ``nn.Module`` (the root itself may be a norm). include / exclude: a module type, a type name
    (``"LayerNorm"``, ``"LlamaRMSNorm"``), a qualified-name glob (``"layers.*.input_layernorm"``; a plain
    name also covers its whole subtree), or a list of these; types match the *original* class (subclasses
    included). ``include=None`` means every supported norm; ``exclude`` wins over ``include``.
    backend: pin ``"triton"``/``"native"``/``"reference"``/``"auto"`` for the replaced modules (eager only,
    see the module docstring); None follows the global choice. verbose: print the summary.

    Only ``__class__`` changes: parameters, buffers, hooks, device, dtype and training mode stay, so an
    optimizer built before the call still updates the same tensors. Calling it again re-patches (e.g. with
    another backend). The summary is returned by ``replacement_summary(model)``. Undo with ``restore_norms``.
    """
    if backend is not None and (not isinstance(backend, str) or backend.lower() not in BACKEND_NAMES):
        raise ValueError(f"unknown fusednorm backend {backend!r}; expected one of {', '.join(BACKEND_NAMES)}")
    backend = backend.lower() if backend is not None else None
    includes, excludes = _as_list(include), _as_list(exclude)
    table = _torch_to_fused()
    summary = ReplacementSummary()
    for name, module in model.named_modules():
        original = module.__dict__.get(_ORIGINAL, type(module))
        if includes and not _matches(name, original, includes):
            continue
        if excludes and _matches(name, original, excludes):
            continue
        if any(c.__name__ == "FSDPModule" for c in type(module).__mro__):
            summary.skipped.append((name, original, "already wrapped by FSDP; call replace_norms before it"))
            continue
        _unpatch(module)  # a second call re-patches from the original class (e.g. with another backend)
        fused_base, spec, why = _plan(module, table)
        if why is None:  # not a norm at all: nothing to report
            continue
        if why:
            summary.skipped.append((name, original, why))
            continue
        cls = _patched_class(original, fused_base, spec, backend is not None)
        module.__class__ = cls
        module.__dict__[_ORIGINAL] = original
        module.__dict__[_BACKEND] = backend
        module.__dict__[_SPEC] = spec
        if spec is None:
            kind = "torch.nn"
        else:
            kind = f"{spec.kind}, weight+{spec.offset:g}" if spec.offset else spec.kind
        summary.replaced.append(Replaced(name, original, cls, kind, backend))
    _SUMMARIES[model] = summary
    if verbose:
        print(summary)
    return model


def _plan(module: nn.Module, table: dict[type, type]) -> tuple[type | None, RowNormSpec | None, str | None]:
    """(fusednorm base class, third-party spec, reason): reason None = not a norm, "" = replace, else skip."""
    original = type(module)
    if _is_fused_class(original):
        return None, None, None  # built as a fusednorm module already
    tbase = _torch_norm_base(original)
    if tbase is not None:
        fused = table.get(tbase)
        if fused is None:
            return None, None, f"fusednorm.{tbase.__name__} is not available in this fusednorm build"
        if original.forward is not tbase.forward:
            return None, None, "subclass overrides forward"
        return fused, None, ""
    eps_attr, _ = _third_party_shape(module)
    if eps_attr is None:
        return None, None, None
    spec, why = _probe(module, eps_attr)
    if spec is None and "norm" not in original.__name__.lower():
        return None, None, None  # weight + eps but not a norm (e.g. a scale layer): not worth a report
    return None, spec, why


def _unpatch(module: nn.Module) -> None:
    original = module.__dict__.pop(_ORIGINAL, None)
    if original is not None:
        module.__class__ = original
        module.__dict__.pop(_BACKEND, None)
        module.__dict__.pop(_SPEC, None)


def restore_norms(model: nn.Module) -> nn.Module:
    """Undo ``replace_norms``: put every patched module's original class back (same parameters); return model."""
    for module in model.modules():
        _unpatch(module)
    _SUMMARIES.pop(model, None)
    return model


def replacement_summary(model: nn.Module) -> ReplacementSummary | None:
    """The summary of the last ``replace_norms(model)`` call (None when it was not called or was restored)."""
    return _SUMMARIES.get(model)
