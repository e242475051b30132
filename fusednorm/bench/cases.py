"""What a benchmark case is, and how each op builds its inputs and is called.

A ``Case`` names one measurement: an op from ``OPS``, an input shape, a dtype label, a mode and a memory
layout. Every provider runs the same case on the same tensors; an ``OpSpec`` knows how to build those tensors
and how to call the op through a *functional namespace*: ``fusednorm.functional``, the torch-eager twin
``TorchOps`` below, or a peer's adapter (``providers.py``). Because all namespaces share the
``torch.nn.functional`` signatures, one ``call`` per op serves every provider.

Shapes: row norms (layer_norm, rms_norm and the residual-add variants) take ``(tokens, hidden)`` and normalize
the last dim; adaptive_layer_norm takes ``(batch, length, hidden)``; map norms (group_norm, instance_norm,
batch_norm, layer_norm_2d, switchable_norm) take ``(N, C, *spatial)``; weight_norm takes a weight ``(out, *in)``
(a Linear ``(out, in)`` or a conv ``(out, in, *kernel)``) and normalizes each output row (``dim=0``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# ---- dtypes and modes ----------------------------------------------------------------------------------

#: dtype label -> (activation dtype, parameter dtype). "mixed" is the AMP case: bf16 activations, fp32 params.
DTYPES: dict[str, tuple[torch.dtype, torch.dtype]] = {
    "fp32": (torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "mixed": (torch.bfloat16, torch.float32),
}

#: Canonical mode names. forward = training forward (autograd records, statistics saved); backward = the
#: backward alone (forward run once outside the timed region); inference = forward under ``torch.no_grad``.
MODES = ("forward", "backward", "forward+backward", "inference")
MODE_ALIASES = {
    "fwd": "forward",
    "forward": "forward",
    "bwd": "backward",
    "backward": "backward",
    "fwd+bwd": "forward+backward",
    "fwdbwd": "forward+backward",
    "forward+backward": "forward+backward",
    "train": "forward+backward",
    "infer": "inference",
    "inference": "inference",
    "nograd": "inference",
}
MODE_SHORT = {"forward": "fwd", "backward": "bwd", "forward+backward": "fwd+bwd", "inference": "infer"}
GRAD_MODES = ("backward", "forward+backward")

LAYOUTS = ("contiguous", "channels_last")


def canonical_mode(mode: str) -> str:
    """Map a mode name or alias (``fwd``, ``bwd``, ``fwd+bwd``, ``infer`` ...) to its canonical name."""
    try:
        return MODE_ALIASES[mode.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(sorted(MODE_ALIASES))}") from None


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``"4096x1024"`` (or ``4096,1024``) into a tuple of positive ints."""
    parts = text.lower().replace(",", "x").replace("*", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        raise ValueError(f"bad shape {text!r}: expected sizes joined by 'x', e.g. 4096x1024") from None
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"bad shape {text!r}: expected positive sizes joined by 'x', e.g. 4096x1024")
    return shape


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


# ---- the case ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement. ``groups`` is GroupNorm's num_groups (ignored by other ops)."""

    op: str
    shape: tuple[int, ...]
    dtype: str = "fp32"
    mode: str = "forward"
    layout: str = "contiguous"
    groups: int = 32

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}; expected one of {', '.join(OPS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        object.__setattr__(self, "mode", canonical_mode(self.mode))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; expected one of {', '.join(LAYOUTS)}")
        OPS[self.op].validate(self)

    @property
    def spec(self) -> OpSpec:
        return OPS[self.op]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def label(self) -> str:
        """Short human label, e.g. ``layer_norm 4096x1024 bf16 fwd``."""
        extra = ""
        if self.spec.kind == "maps":
            if self.layout == "channels_last":
                extra += " NHWC"
            if self.op.startswith("group_norm"):
                extra += f" G={self.groups}"
        return f"{self.op} {shape_str(self.shape)}{extra} {self.dtype} {MODE_SHORT[self.mode]}"

    def scaled_down(self, max_numel: int) -> Case:
        """The same case with a smaller leading dim so that numel <= max_numel (used for the correctness check
        of huge shapes: rows/batch are independent, the per-row or per-channel size is what kernels key on)."""
        if self.numel <= max_numel:
            return self
        inner = self.numel // self.shape[0]
        lead = max(1, max_numel // inner)
        return dataclasses.replace(self, shape=(lead, *self.shape[1:]))


# ---- torch-eager namespace -----------------------------------------------------------------------------


class TorchOps:
    """torch eager with fusednorm.functional's signatures (fused variants written as torch compositions)."""

    layer_norm = staticmethod(F.layer_norm)
    rms_norm = staticmethod(F.rms_norm)
    batch_norm = staticmethod(F.batch_norm)
    instance_norm = staticmethod(F.instance_norm)

    @staticmethod
    def group_norm(
        input: Tensor,
        num_groups: int,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        eps: float = 1e-5,
        activation: str | None = None,
    ) -> Tensor:
        y = F.group_norm(input, num_groups, weight, bias, eps)
        return F.silu(y) if activation == "silu" else y

    @staticmethod
    def add_layer_norm(
        x: Tensor,
        residual: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float = 1e-5,
        dropout_p: float = 0.0,
        prenorm: bool = False,
        residual_in_fp32: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        return TorchOps._add_norm(x, residual, weight, bias, eps, dropout_p, prenorm, residual_in_fp32, False)

    @staticmethod
    def add_rms_norm(
        x: Tensor,
        residual: Tensor | None,
        weight: Tensor | None,
        eps: float | None = None,
        dropout_p: float = 0.0,
        prenorm: bool = False,
        residual_in_fp32: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        return TorchOps._add_norm(x, residual, weight, None, eps, dropout_p, prenorm, residual_in_fp32, True)

    @staticmethod
    def layer_norm_2d(
        input: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-6
    ) -> Tensor:
        # channels-first LayerNorm (ConvNeXt): normalize over C at every position, via a channels-last view
        c = input.shape[1]
        perm = (0, *range(2, input.dim()), 1)
        inv = (0, input.dim() - 1, *range(1, input.dim() - 1))
        return F.layer_norm(input.permute(perm), (c,), weight, bias, eps).permute(inv)

    @staticmethod
    def adaptive_layer_norm(
        x: Tensor,
        scale: Tensor,
        shift: Tensor,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        eps: float = 1e-6,
        rms: bool = False,
    ) -> Tensor:
        d = (x.shape[-1],)
        y = F.rms_norm(x, d, weight, eps) if rms else F.layer_norm(x, d, weight, None, eps)
        if rms and bias is not None:
            y = y + bias
        return y * (1 + scale[:, None, :]) + shift[:, None, :]

    @staticmethod
    def switchable_norm(
        input: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        weight: Tensor,
        bias: Tensor,
        mean_weight: Tensor,
        var_weight: Tensor,
        training: bool = False,
        momentum: float = 0.1,
        eps: float = 1e-5,
        using_moving_average: bool = True,
        num_batches_tracked: Tensor | None = None,
    ) -> Tensor:
        # SwitchableNorm in plain torch ops, computed the way torch's own norm kernels compute (BatchNorm,
        # GroupNorm): statistics and normalization in fp32 (fp64 for fp64), one rounding of the result to
        # input's dtype (also fusednorm's output dtype for bf16 input with fp32 parameters). A chain of bf16 ops
        # instead would err by ~1 % in y and up to ~80 % in the mixing-logit gradients, and that error is the
        # budget every provider is checked against. Each statistic comes from its own var_mean (never
        # E[x^2] - E[x]^2, which cancels when |mean| >> std).
        n, c = input.shape[0], input.shape[1]
        acc = torch.promote_types(input.dtype, torch.float32)
        x = input.reshape(n, c, -1).to(acc)
        var_in, mean_in = torch.var_mean(x, dim=2, correction=0)
        var_ln, mean_ln = torch.var_mean(x, dim=(1, 2), correction=0)
        if training or running_mean is None:
            var_bn, mean_bn = torch.var_mean(x, dim=(0, 2), correction=0)
        else:
            mean_bn, var_bn = running_mean.to(acc), running_var.to(acc)
        wm, wv = torch.softmax(mean_weight.to(acc), 0), torch.softmax(var_weight.to(acc), 0)
        mu = wm[0] * mean_in + wm[1] * mean_ln[:, None] + wm[2] * mean_bn[None, :]
        var = wv[0] * var_in + wv[1] * var_ln[:, None] + wv[2] * var_bn[None, :]
        scale = torch.rsqrt(var + eps) * weight.to(acc)[None, :]
        y = (x - mu[..., None]) * scale[..., None] + bias.to(acc)[:, None]
        if training and running_mean is not None and running_var is not None:
            m = momentum if using_moving_average else 1.0 / float(num_batches_tracked)
            with torch.no_grad():
                running_mean.mul_(1 - m).add_(mean_bn.detach().to(running_mean.dtype) * m)
                running_var.mul_(1 - m).add_(var_bn.detach().to(running_var.dtype) * m)
        return y.reshape(input.shape).to(input.dtype)

    @staticmethod
    def weight_norm_fn(v: Tensor, g: Tensor, dim: int | None = 0) -> Tensor:
        # torch's own weight norm: torch._weight_norm is what torch.nn.utils.parametrizations.weight_norm runs
        # (fused kernels with fp32 accumulation for dim 0 / last). It rejects bf16 v with fp32 g on CPU, so mixed
        # dtypes get its math written out, w = v * (g / ||v||), rounded to v's dtype (fusednorm's contract).
        d = -1 if dim is None else dim
        if v.dtype == g.dtype:
            return torch._weight_norm(v, g, d)
        acc = torch.promote_types(torch.promote_types(v.dtype, g.dtype), torch.float32)
        if d == -1 or v.dim() == 0:
            return (v * (g.reshape(()) / torch.linalg.vector_norm(v, dtype=acc))).to(v.dtype)
        keep = d % v.dim()
        norm = torch.linalg.vector_norm(v, dim=[i for i in range(v.dim()) if i != keep], keepdim=True, dtype=acc)
        return (v * (g.reshape(norm.shape) / norm)).to(v.dtype)

    @staticmethod
    def _add_norm(x, residual, weight, bias, eps, dropout_p, prenorm, residual_in_fp32, is_rms):
        # the unfused torch program: h = dropout(x) + residual in the residual's dtype, then the norm of h
        # in x's dtype (what fusednorm.functional.add_layer_norm / add_rms_norm fuse)
        h = F.dropout(x, dropout_p) if dropout_p > 0 else x
        if residual is not None:
            h = h + residual
        if residual_in_fp32:
            h = h.float()
        elif residual is not None:
            h = h.to(residual.dtype)
        n = (x.shape[-1],)
        hx = h.to(x.dtype)
        y = F.rms_norm(hx, n, weight, eps) if is_rms else F.layer_norm(hx, n, weight, bias, eps)
        return (y, h) if prenorm else y


# ---- op table ------------------------------------------------------------------------------------------

Inputs = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """How one op is built and called.

    kind: ``rows`` (shape (M, N)), ``seq`` (shape (B, L, D), normalized over D), ``maps`` (shape
    (N, C, *spatial)) or ``weight`` (a weight (O, *K), one norm per output row O). fn: the function name looked
    up in a provider's namespace. tensors: input tensor names, of which ``params`` have the parameter dtype and
    ``state`` are buffers the op mutates (BatchNorm running stats, compared after the correctness run).
    grads: the tensors gradients are taken for in backward modes. call(ns, inputs) runs the op.
    param_shapes: parameters whose shape is not the per-feature vector (features = hidden, C, or O), by name:
    a function of the case's shape (SwitchableNorm's (3,) mixing logits, weight norm's (O, 1, ..., 1) g).
    check_slack: extra scaled-error tolerance for outputs that are ill-conditioned by construction (see the
    runner's check), by output name; keep it far below the error of a real bug.
    """

    name: str
    kind: str
    fn: str
    activations: tuple[str, ...]
    params: tuple[str, ...]
    state: tuple[str, ...]
    grads: tuple[str, ...]
    call: Callable[[Any, Inputs], Any]
    description: str
    cond: tuple[str, ...] = ()  # per-sample conditioning vectors (B, D) in the activation dtype (AdaLN)
    param_shapes: dict[str, Callable[[tuple[int, ...]], tuple[int, ...]]] = dataclasses.field(default_factory=dict)
    check_slack: dict[str, float] = dataclasses.field(default_factory=dict)

    def validate(self, case: Case) -> None:
        if self.kind == "rows" and len(case.shape) != 2:
            raise ValueError(f"{self.name} takes a (tokens, hidden) shape, got {shape_str(case.shape)}")
        if self.kind == "seq" and len(case.shape) != 3:
            raise ValueError(f"{self.name} takes a (batch, length, hidden) shape, got {shape_str(case.shape)}")
        if self.kind == "weight" and len(case.shape) < 2:
            raise ValueError(f"{self.name} takes a weight shape (out, *in), got {shape_str(case.shape)}")
        if self.kind == "maps":
            if len(case.shape) < 3:
                raise ValueError(f"{self.name} takes an (N, C, *spatial) shape, got {shape_str(case.shape)}")
            if case.layout == "channels_last" and len(case.shape) not in (4, 5):
                raise ValueError("channels_last needs a 4-D or 5-D shape")
            if self.name.startswith("group_norm") and case.shape[1] % case.groups:
                raise ValueError(
                    f"{self.name}: {case.shape[1]} channels are not divisible by {case.groups} groups"
                )
        if self.kind != "maps" and case.layout != "contiguous":
            raise ValueError(f"{self.name}: layout {case.layout} applies only to (N, C, *spatial) maps")

    def build(self, case: Case, device: torch.device | str, seed: int = 0, requires_grad: bool = False) -> Inputs:
        """Fresh inputs for ``case`` on ``device`` (deterministic in ``seed``); activations in the case's
        activation dtype and layout, params in its parameter dtype. ``dy`` holds one output gradient per
        output in backward modes (empty otherwise). Weights and biases are random (never all ones / zeros)."""
        act_dtype, param_dtype = DTYPES[case.dtype]
        device = torch.device(device)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)

        def rand(shape: Sequence[int], dtype: torch.dtype, scale: float = 1.0, shift: float = 0.0) -> Tensor:
            t = torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32)
            return (t * scale + shift).to(dtype)

        x_shape = case.shape
        feat = features(case)
        fmt = _memory_format(case)
        out: Inputs = {"case": case}
        for name in self.activations:
            # a small offset keeps the mean away from zero so centring errors would show
            out[name] = rand(x_shape, act_dtype, 1.0, 0.5 if name == "x" else 0.0).contiguous(memory_format=fmt)
        for name in self.cond:
            out[name] = rand((case.shape[0], case.shape[-1]), act_dtype, 0.2, 0.0)
        for name in self.params:
            shape = self.param_shapes[name](case.shape) if name in self.param_shapes else feat
            if name in ("weight", "g"):  # scales: around 1
                out[name] = rand(shape, param_dtype, 0.2, 1.0)
            elif name in ("mean_weight", "var_weight"):  # mixing logits: clearly unequal softmax weights
                out[name] = rand(shape, param_dtype, 0.5, 0.0)
            else:
                out[name] = rand(shape, param_dtype, 0.2, 0.0)
        for name in self.state:
            if name == "running_mean":
                out[name] = rand(feat, param_dtype, 0.1, 0.5)
            else:  # running_var: positive
                out[name] = (rand(feat, torch.float32, 0.1, 0.0).abs() + 0.9).to(param_dtype)
        for name in self.grads:
            if requires_grad:
                out[name].requires_grad_(True)
        # output gradients only where a backward runs (they would double the memory of huge forward cases)
        n_dy = self.num_outputs if case.mode in GRAD_MODES else 0
        out["dy"] = [rand(x_shape, act_dtype).contiguous(memory_format=fmt) for _ in range(n_dy)]
        return out

    @property
    def num_outputs(self) -> int:
        return 2 if self.name.startswith("add_") else 1


def features(case: Case) -> tuple[int, ...]:
    """The per-feature parameter shape of ``case``: (C,) for maps, (O,) for a weight, else (hidden,)."""
    kind = case.spec.kind
    return (case.shape[1],) if kind == "maps" else (case.shape[0],) if kind == "weight" else (case.shape[-1],)


def _memory_format(case: Case) -> torch.memory_format:
    if case.layout == "channels_last":
        return torch.channels_last if len(case.shape) == 4 else torch.channels_last_3d
    return torch.contiguous_format


def cast_inputs(inputs: Inputs, dtype: torch.dtype, requires_grad: bool) -> Inputs:
    """A copy of ``inputs`` with every tensor cast to ``dtype`` (the float64 reference), same layout."""
    spec = inputs["case"].spec
    out: Inputs = {"case": inputs["case"]}
    for k, v in inputs.items():
        if k == "case":
            continue
        if k == "dy":
            out[k] = [d.detach().to(dtype) for d in v]
        else:
            t = v.detach().to(dtype)
            out[k] = t.requires_grad_(requires_grad and k in spec.grads)
    return out


def clone_inputs(inputs: Inputs, requires_grad: bool) -> Inputs:
    """An independent copy (same values, dtypes, layouts), fresh autograd leaves."""
    spec = inputs["case"].spec
    out: Inputs = {"case": inputs["case"]}
    for k, v in inputs.items():
        if k == "case":
            continue
        if k == "dy":
            out[k] = [d.detach().clone() for d in v]
        else:
            out[k] = v.detach().clone().requires_grad_(requires_grad and k in spec.grads)
    return out


def _n(t: Inputs) -> tuple[int, ...]:
    return (t["case"].shape[-1],)


OPS: dict[str, OpSpec] = {}


def _register(spec: OpSpec) -> None:
    OPS[spec.name] = spec


_register(
    OpSpec(
        "layer_norm", "rows", "layer_norm", ("x",), ("weight", "bias"), (), ("x", "weight", "bias"),
        lambda ns, t: ns.layer_norm(t["x"], _n(t), t["weight"], t["bias"], 1e-5),
        "LayerNorm over the last dim, affine",
    )
)
_register(
    OpSpec(
        "rms_norm", "rows", "rms_norm", ("x",), ("weight",), (), ("x", "weight"),
        lambda ns, t: ns.rms_norm(t["x"], _n(t), t["weight"], 1e-6),
        "RMSNorm over the last dim, with weight",
    )
)
_register(
    OpSpec(
        "add_layer_norm", "rows", "add_layer_norm", ("x", "residual"), ("weight", "bias"), (),
        ("x", "residual", "weight", "bias"),
        lambda ns, t: ns.add_layer_norm(t["x"], t["residual"], t["weight"], t["bias"], 1e-5, prenorm=True),
        "h = x + residual; returns (LayerNorm(h), h) (prenorm: the new residual stream too)",
    )
)
_register(
    OpSpec(
        "add_rms_norm", "rows", "add_rms_norm", ("x", "residual"), ("weight",), (),
        ("x", "residual", "weight"),
        lambda ns, t: ns.add_rms_norm(t["x"], t["residual"], t["weight"], 1e-6, prenorm=True),
        "h = x + residual; returns (RMSNorm(h), h) (prenorm: the new residual stream too)",
    )
)
_register(
    OpSpec(
        "group_norm", "maps", "group_norm", ("x",), ("weight", "bias"), (), ("x", "weight", "bias"),
        lambda ns, t: ns.group_norm(t["x"], t["case"].groups, t["weight"], t["bias"], 1e-5),
        "GroupNorm, affine",
    )
)
_register(
    OpSpec(
        "group_norm_silu", "maps", "group_norm", ("x",), ("weight", "bias"), (), ("x", "weight", "bias"),
        lambda ns, t: ns.group_norm(t["x"], t["case"].groups, t["weight"], t["bias"], 1e-5, activation="silu"),
        "GroupNorm, affine, then SiLU (the diffusion UNet block)",
    )
)
_register(
    OpSpec(
        "instance_norm", "maps", "instance_norm", ("x",), ("weight", "bias"), (), ("x", "weight", "bias"),
        lambda ns, t: ns.instance_norm(
            t["x"], None, None, weight=t["weight"], bias=t["bias"], use_input_stats=True, momentum=0.1, eps=1e-5
        ),
        "InstanceNorm, affine, no running stats",
    )
)
_register(
    OpSpec(
        "batch_norm_train", "maps", "batch_norm", ("x",), ("weight", "bias"), ("running_mean", "running_var"),
        ("x", "weight", "bias"),
        lambda ns, t: ns.batch_norm(
            t["x"], t["running_mean"], t["running_var"], weight=t["weight"], bias=t["bias"], training=True,
            momentum=0.1, eps=1e-5,
        ),
        "BatchNorm in training (batch statistics, running stats updated)",
    )
)
_register(
    OpSpec(
        "batch_norm_eval", "maps", "batch_norm", ("x",), ("weight", "bias"), ("running_mean", "running_var"),
        ("x", "weight", "bias"),
        lambda ns, t: ns.batch_norm(
            t["x"], t["running_mean"], t["running_var"], weight=t["weight"], bias=t["bias"], training=False,
            momentum=0.1, eps=1e-5,
        ),
        "BatchNorm in eval (running statistics)",
    )
)

_register(
    OpSpec(
        "layer_norm_2d", "maps", "layer_norm_2d", ("x",), ("weight", "bias"), (), ("x", "weight", "bias"),
        lambda ns, t: ns.layer_norm_2d(t["x"], t["weight"], t["bias"], 1e-6),
        "channels-first LayerNorm over C at every position (ConvNeXt)",
    )
)
_register(
    OpSpec(
        "adaptive_layer_norm", "seq", "adaptive_layer_norm", ("x",), (), (), ("x", "scale", "shift"),
        lambda ns, t: ns.adaptive_layer_norm(t["x"], t["scale"], t["shift"], None, None, 1e-6),
        "DiT AdaLN: LayerNorm(x) * (1 + scale) + shift, scale/shift (B, D) per sample, no affine",
        cond=("scale", "shift"),
    )
)

_register(
    OpSpec(
        "switchable_norm", "maps", "switchable_norm", ("x",), ("weight", "bias", "mean_weight", "var_weight"),
        ("running_mean", "running_var"), ("x", "weight", "bias", "mean_weight", "var_weight"),
        lambda ns, t: ns.switchable_norm(
            t["x"], t["running_mean"], t["running_var"], t["weight"], t["bias"], t["mean_weight"],
            t["var_weight"], training=True, momentum=0.1, eps=1e-5,
        ),
        "SwitchableNorm in training: softmax mix of instance, layer and batch statistics, running stats updated",
        param_shapes={"mean_weight": lambda shape: (3,), "var_weight": lambda shape: (3,)},
        # The mixing-logit gradients are 3 numbers, each a sum over N*C terms that nearly cancel (a softmax
        # Jacobian times sums of dmu * mean and dvar * var). fp32 rounding alone leaves ~1e-5 to 1e-4 of their
        # max, and two correct summation orders differ by 2-4x there (torch.compile vs eager measured: 8.9e-5
        # vs 3.9e-5 on 8x64x56x56), so "2x torch's error" is a coin flip. 1e-3 still fails any real bug (a
        # missing branch or swapped logits is off by O(1)).
        check_slack={"dmean_weight": 1e-3, "dvar_weight": 1e-3},
    )
)
_register(
    OpSpec(
        "weight_norm", "weight", "weight_norm_fn", ("v",), ("g",), (), ("v", "g"),
        lambda ns, t: ns.weight_norm_fn(t["v"], t["g"], 0),
        "weight norm w = g * v / ||v||, one norm per output row (dim=0; Linear and conv weights)",
        param_shapes={"g": lambda shape: (shape[0],) + (1,) * (len(shape) - 1)},
    )
)

#: ``--op`` names that expand to several ops.
OP_GROUPS = {"batch_norm": ("batch_norm_train", "batch_norm_eval")}


def expand_ops(names: Sequence[str]) -> list[str]:
    """Expand group names (``batch_norm``) and check every op name."""
    out: list[str] = []
    for name in names:
        for op in OP_GROUPS.get(name, (name,)):
            if op not in OPS:
                known = ", ".join([*OPS, *OP_GROUPS])
                raise ValueError(f"unknown op {op!r}; expected one of {known}")
            if op not in out:
                out.append(op)
    return out
