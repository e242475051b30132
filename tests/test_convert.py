"""replace_norms / restore_norms: every supported norm type, third-party RMSNorms, state, hooks, optimizers.

The reference for outputs and gradients is the same model in float64 (the oracle in tests/oracle.py): the
patched float32 model must be within 2x the unpatched float32 model's error plus the fp32 atol.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from oracle import assert_close
from torch import nn

import fusednorm
import fusednorm.modules as fm
from fusednorm import backends
from fusednorm.convert import TORCH_NORM_NAMES

# ---- third-party style norms, written the way Hugging Face models write theirs -------------------------


class LlamaStyleRMSNorm(nn.Module):
    """Statistics in fp32, cast back to the input dtype, then scaled by the weight (output: promoted dtype)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        in_dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(in_dtype)


class GemmaStyleRMSNorm(nn.Module):
    """Everything in fp32 with a (1 + weight) scale, one cast to the input dtype at the end."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


class OffsetScaleNorm(GemmaStyleRMSNorm):
    """Gemma math under a name that says nothing: must be recognised by probing, not by name."""


class ScaleWithEps(nn.Module):
    """Has a weight and an eps but is not a norm: must be left alone."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight / (1 + self.eps)


class MyLayerNorm(nn.LayerNorm):
    """A user subclass that keeps torch's forward: replaceable."""


class MyOddLayerNorm(nn.LayerNorm):
    """A user subclass with its own forward: must be left alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


# ---- a model with every supported type ------------------------------------------------------------------

H = 7  # odd hidden size for the row norms
C = 6  # channels for the channel norms

# name -> (constructor, input shape)
NORMS = {
    "ln": (lambda: nn.LayerNorm(H), (5, H)),
    "ln_nobias": (lambda: nn.LayerNorm(H, bias=False), (3, 2, H)),
    "ln_2d": (lambda: nn.LayerNorm((3, H), eps=1e-3), (4, 3, H)),
    "rms": (lambda: nn.RMSNorm(H), (5, H)),
    "rms_eps": (lambda: nn.RMSNorm(H, eps=1e-4), (2, 3, H)),
    "gn": (lambda: nn.GroupNorm(3, C), (4, C, 5)),
    "bn1d": (lambda: nn.BatchNorm1d(C), (4, C, 5)),
    "bn2d": (lambda: nn.BatchNorm2d(C, momentum=0.3), (4, C, 3, 5)),
    "bn3d": (lambda: nn.BatchNorm3d(C), (2, C, 3, 2, 3)),
    "sync_bn": (lambda: nn.SyncBatchNorm(C), (4, C, 3, 5)),
    "in1d": (lambda: nn.InstanceNorm1d(C, affine=True), (4, C, 5)),
    "in2d": (lambda: nn.InstanceNorm2d(C, affine=True, track_running_stats=True), (4, C, 3, 5)),
    "in3d": (lambda: nn.InstanceNorm3d(C), (2, C, 3, 2, 3)),
    "llama": (lambda: LlamaStyleRMSNorm(H, eps=0.1), (5, H)),  # large eps: a dropped eps must show
    "gemma": (lambda: GemmaStyleRMSNorm(H), (5, H)),
    "gemma_unnamed": (lambda: OffsetScaleNorm(H, eps=0.25), (5, H)),
}
THIRD_PARTY = {"llama": LlamaStyleRMSNorm, "gemma": GemmaStyleRMSNorm, "gemma_unnamed": OffsetScaleNorm}


class AllNorms(nn.Module):
    def __init__(self, names=tuple(NORMS)) -> None:
        super().__init__()
        self.norms = nn.ModuleDict({n: NORMS[n][0]() for n in names})

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: m(inputs[n]) for n, m in self.norms.items()}


def randomize(model: nn.Module) -> nn.Module:
    """Random affine parameters and running statistics (never the ones/zeros defaults)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape) + 0.5)
    return model


def make_inputs(names, dtype=torch.float32):
    xs = {n: (torch.randn(NORMS[n][1], dtype=torch.float64) * 2 + 0.5).to(dtype) for n in names}
    dys = {n: torch.randn(NORMS[n][1], dtype=torch.float64).to(dtype) for n in names}
    return xs, dys


def run(model: nn.Module, xs, dys, dtype):
    """Forward + backward; returns outputs, input grads, parameter grads and buffers (by name)."""
    xs = {n: x.detach().to(dtype).requires_grad_(True) for n, x in xs.items()}
    model.zero_grad(set_to_none=True)
    outs = model(xs)
    loss = sum((outs[n] * dys[n].to(outs[n].dtype)).sum() for n in outs)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    bufs = {n: b.clone() for n, b in model.named_buffers() if b.is_floating_point()}
    return outs, {n: x.grad for n, x in xs.items()}, grads, bufs


def fused_class_for(module_type: type) -> type:
    return getattr(fm, module_type.__name__)


def test_every_torch_norm_type_has_a_fusednorm_class():
    missing = [n for n in TORCH_NORM_NAMES if not isinstance(getattr(fm, n, None), type)]
    assert not missing, f"fusednorm.modules lacks drop-ins for: {', '.join(missing)}"


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_all_types_same_outputs_grads_and_buffers(mode):
    names = tuple(NORMS)
    torch_model = randomize(AllNorms(names))
    ref64 = copy.deepcopy(torch_model).double()
    model = copy.deepcopy(torch_model)
    for m in (torch_model, ref64, model):
        m.train(mode == "train")
    fusednorm.replace_norms(model)
    summary = fusednorm.replacement_summary(model)
    assert not summary.skipped, f"not replaced: {summary.skipped}"
    assert sorted(summary.names()) == sorted(f"norms.{n}" for n in names)
    for n, m in model.norms.items():
        if n in THIRD_PARTY:
            assert isinstance(m, THIRD_PARTY[n]) and type(m) is not THIRD_PARTY[n]
        else:
            assert type(m) is fused_class_for(type(torch_model.norms[n])), n
        assert m.training == (mode == "train")

    xs, dys = make_inputs(names)
    o64, gx64, gp64, b64 = run(ref64, xs, dys, torch.float64)
    ot, gxt, gpt, bt = run(torch_model, xs, dys, torch.float32)
    of, gxf, gpf, bf = run(model, xs, dys, torch.float32)
    for n in names:
        assert_close(of[n], o64[n], ot[n], f"{n} output")
        assert_close(gxf[n], gx64[n], gxt[n], f"{n} input grad")
    assert gpf.keys() == gp64.keys()
    for n in gp64:
        assert_close(gpf[n], gp64[n], gpt[n], f"{n} grad")
    assert bf.keys() == b64.keys()
    for n in b64:
        assert_close(bf[n], b64[n], bt[n], f"buffer {n}")


def test_state_dict_parameters_and_optimizer_survive_the_swap():
    torch_model = randomize(AllNorms())
    model = copy.deepcopy(torch_model)
    params_before = dict(model.named_parameters())
    buffers_before = dict(model.named_buffers())
    keys_before = list(model.state_dict().keys())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built BEFORE the swap
    opt_ref = torch.optim.SGD(torch_model.parameters(), lr=0.1)

    fusednorm.replace_norms(model)
    assert list(model.state_dict().keys()) == keys_before
    for n, p in model.named_parameters():
        assert p is params_before[n], f"{n} is a new Parameter object"
    for n, b in model.named_buffers():
        assert b is buffers_before[n], f"{n} is a new buffer object"
    # Checkpoints load strictly both ways.
    model.load_state_dict(torch_model.state_dict(), strict=True)
    torch_model.load_state_dict(model.state_dict(), strict=True)

    xs, dys = make_inputs(tuple(NORMS))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for m, o in ((model, opt), (torch_model, opt_ref)):
        run(m, xs, dys, torch.float32)
        o.step()
    ref_after = dict(torch_model.named_parameters())
    for n, p in model.named_parameters():
        assert not torch.equal(p.detach(), before[n]), f"optimizer step did not change {n}"
        torch.testing.assert_close(p.detach(), ref_after[n].detach(), rtol=1e-5, atol=1e-5, msg=n)


def test_hooks_survive_and_fire():
    model = randomize(AllNorms(("ln", "llama", "bn2d")))
    calls = []
    for n, m in model.norms.items():
        m.register_forward_pre_hook(lambda mod, args, n=n: calls.append(("pre", n)))
        m.register_forward_hook(lambda mod, args, out, n=n: out * 0 + 3.0 if n == "ln" else None)
        m.register_full_backward_hook(lambda mod, gin, gout, n=n: calls.append(("bwd", n)))
    fusednorm.replace_norms(model)
    assert type(model.norms["ln"]) is fm.LayerNorm
    xs, dys = make_inputs(("ln", "llama", "bn2d"))
    outs, *_ = run(model, xs, dys, torch.float32)
    assert torch.equal(outs["ln"], torch.full_like(outs["ln"], 3.0)), "forward hook's replacement output lost"
    for n in ("ln", "llama", "bn2d"):
        assert ("pre", n) in calls and ("bwd", n) in calls, n


def test_restore_norms_restores_classes_and_outputs():
    model = randomize(AllNorms(("ln", "rms", "llama", "gemma")))
    original_types = {n: type(m) for n, m in model.named_modules()}
    params = dict(model.named_parameters())
    xs, dys = make_inputs(("ln", "rms", "llama", "gemma"))
    before, *_ = run(model, xs, dys, torch.float32)
    fusednorm.replace_norms(model, backend="reference")
    assert type(model.norms["ln"]) is not nn.LayerNorm
    assert fusednorm.restore_norms(model) is model
    assert {n: type(m) for n, m in model.named_modules()} == original_types
    assert all(p is params[n] for n, p in model.named_parameters())
    assert not any(k.startswith("_fusednorm") for m in model.modules() for k in m.__dict__)
    assert fusednorm.replacement_summary(model) is None
    after, *_ = run(model, xs, dys, torch.float32)
    for n in before:
        assert torch.equal(before[n], after[n]), n


def test_include_exclude_by_type_and_name():
    names = ("ln", "rms", "llama", "gemma")
    m = fusednorm.replace_norms(AllNorms(names), include=[nn.LayerNorm, "norms.llama"])
    assert sorted(fusednorm.replacement_summary(m).names()) == ["norms.llama", "norms.ln"]
    assert type(m.norms["rms"]) is nn.RMSNorm and type(m.norms["gemma"]) is GemmaStyleRMSNorm

    m = fusednorm.replace_norms(AllNorms(names), exclude=["RMSNorm", "norms.gem*"])
    assert sorted(fusednorm.replacement_summary(m).names()) == ["norms.llama", "norms.ln"]

    m = fusednorm.replace_norms(AllNorms(names), exclude="norms")  # a name covers its subtree
    assert fusednorm.replacement_summary(m).names() == []


def test_non_norms_and_overridden_forward_are_left_alone(capsys):
    model = nn.Sequential(ScaleWithEps(H), MyLayerNorm(H), MyOddLayerNorm(H), fm.LayerNorm(H), nn.Linear(H, H))
    randomize(model)
    x = torch.randn(3, H)
    ref = model(x)
    fusednorm.replace_norms(model, verbose=True)
    printed = capsys.readouterr().out
    assert "replaced 1 module" in printed and "MyLayerNorm" in printed
    summary = fusednorm.replacement_summary(model)
    assert summary.names() == ["1"]
    assert isinstance(model[1], MyLayerNorm) and isinstance(model[1], fm.LayerNorm)
    assert type(model[0]) is ScaleWithEps and type(model[2]) is MyOddLayerNorm
    assert type(model[3]) is fm.LayerNorm  # already fusednorm: untouched
    assert [name for name, _, _ in summary.skipped] == ["2"]  # overrides forward: reported
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_backend_pin_is_used_in_eager(monkeypatch):
    seen = []
    real_select = backends.select

    def spy(op, x):
        seen.append(fusednorm.get_backend())
        return real_select(op, x)

    monkeypatch.setattr(backends, "select", spy)
    # The native extension's whole-call entries choose the native backend without select: switch them off so the
    # spy sees every choice (tests/test_fast_path.py checks that they decline under a pinned backend).
    for name in vars(backends.native_entries):
        monkeypatch.setattr(backends.native_entries, name, backends._decline)
    model = randomize(AllNorms(("ln", "llama")))
    fusednorm.replace_norms(model, backend="reference")
    xs, dys = make_inputs(("ln", "llama"))
    run(model, xs, dys, torch.float32)
    assert seen and set(seen) == {"reference"}, seen
    # A second call re-patches with another pin; None removes the pin.
    seen.clear()
    fusednorm.replace_norms(model)
    run(model, xs, dys, torch.float32)
    assert seen and set(seen) == {"auto"}, seen
    with pytest.raises(ValueError, match="unknown fusednorm backend"):
        fusednorm.replace_norms(model, backend="cudnn")


def test_deepcopy_and_pickle_of_a_patched_model():
    model = randomize(AllNorms(("ln", "llama", "gemma", "gemma_unnamed")))
    fusednorm.replace_norms(model, backend="reference")
    xs, dys = make_inputs(("ln", "llama", "gemma", "gemma_unnamed"))
    ref, *_ = run(model, xs, dys, torch.float32)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone.norms["llama"]) is type(model.norms["llama"])
        assert clone.norms["llama"]._fusednorm_backend == "reference"
        out, *_ = run(clone, xs, dys, torch.float32)
        for n in ref:
            assert torch.equal(out[n], ref[n]), n
        fusednorm.restore_norms(clone)
        assert type(clone.norms["gemma"]) is GemmaStyleRMSNorm


def test_probe_does_not_touch_global_rng_or_hooks():
    model = AllNorms(("llama", "gemma"))
    fired = []
    model.norms["llama"].register_forward_hook(lambda *a: fired.append(1))
    state = torch.get_rng_state()
    fusednorm.replace_norms(model)
    assert torch.equal(state, torch.get_rng_state())
    assert not fired


def test_meta_device_uses_class_names():
    with torch.device("meta"):
        model = AllNorms(("llama", "gemma", "gemma_unnamed", "ln"))
    fusednorm.replace_norms(model)
    s = fusednorm.replacement_summary(model)
    assert sorted(s.names()) == ["norms.gemma", "norms.llama", "norms.ln"]
    assert model.norms["gemma"]._fusednorm_spec.offset == 1.0
    assert model.norms["llama"]._fusednorm_spec.offset == 0.0
    assert [n for n, _, _ in s.skipped] == ["norms.gemma_unnamed"]  # cannot be probed, name says nothing


# ---- third-party RMSNorm in low precision: same dtype rule, at most torch-like error ------------------


@pytest.mark.parametrize("cls", [LlamaStyleRMSNorm, GemmaStyleRMSNorm])
@pytest.mark.parametrize(
    "x_dtype,w_dtype",
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
     (torch.float32, torch.bfloat16)],
)
def test_third_party_rmsnorm_low_precision(cls, x_dtype, w_dtype):
    n = 67
    hf = cls(n).to(w_dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(n) * 0.3 + (0.0 if cls is GemmaStyleRMSNorm else 1.0))
    ref64 = copy.deepcopy(hf).double()
    patched = fusednorm.replace_norms(copy.deepcopy(hf))
    x = torch.randn(9, n, dtype=torch.float64) * 3 + 1
    dy = torch.randn(9, n, dtype=torch.float64)

    def fwd_bwd(mod, dtype):
        xx = x.to(dtype).requires_grad_(True)
        out = mod(xx)
        out.backward(dy.to(out.dtype))
        g = mod.weight.grad
        mod.weight.grad = None
        return out, xx.grad, g

    o_hf, gx_hf, gw_hf = fwd_bwd(hf, x_dtype)
    o_fu, gx_fu, gw_fu = fwd_bwd(patched, x_dtype)
    o64, gx64, gw64 = fwd_bwd(ref64, torch.float64)
    assert o_fu.dtype == o_hf.dtype  # the original's output-dtype rule (promotion for Llama) is kept
    assert_close(o_fu, o64, o_hf, "output")
    assert_close(gx_fu, gx64, gx_hf, "input grad")
    assert_close(gw_fu, gw64, gw_hf, "weight grad", atol=None if gw_fu.dtype != torch.float16 else 1e-2)


# ---- Hugging Face transformers (CI installs it with the test extras) -----------------------------------


def _hf_case(family: str):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    if family == "llama":
        config, cls = transformers.LlamaConfig(**kw), transformers.LlamaForCausalLM
    else:
        config, cls = transformers.GemmaConfig(head_dim=16, **kw), transformers.GemmaForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(config)
    with torch.no_grad():  # random norm weights: the defaults (ones / zeros) hide a wrong scale
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape) * 0.3 + (1.0 if family == "llama" else 0.0))
    return model


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_hf_model_patched_matches(family):
    model = _hf_case(family)
    ref64 = copy.deepcopy(model).double()
    patched = fusednorm.replace_norms(copy.deepcopy(model))
    names = fusednorm.replacement_summary(patched).names()
    assert len(names) == 2 * 2 + 1, names  # two norms per layer and the final norm
    assert all(type(m).__name__.startswith("Fused") for n, m in patched.named_modules() if n in names)
    ids = torch.randint(0, 97, (2, 11))

    def fwd_bwd(m):
        m.zero_grad(set_to_none=True)
        logits = m(input_ids=ids).logits
        logits.float().square().mean().backward()
        return logits, {n: p.grad for n, p in m.named_parameters()}

    lt, gt = fwd_bwd(model)
    lf, gf = fwd_bwd(patched)
    l64, g64 = fwd_bwd(ref64)
    assert_close(lf, l64, lt, "logits")
    for n in g64:
        if g64[n] is not None:
            assert_close(gf[n], g64[n], gt[n], n)
