"""fusednorm modules inside real training machinery: torch.compile(fullgraph=True) forward and backward with no
graph breaks, autocast bf16 on CPU, activation checkpointing, and (on a GPU) CUDA graph capture.

Models are built from torch.nn norms and converted with ``replace_norms``, so the conversion path (including
the generated classes for Hugging Face-style norms) is what gets compiled.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from oracle import assert_close
from test_convert import GemmaStyleRMSNorm, LlamaStyleRMSNorm
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint

import fusednorm
import fusednorm.modules as fm


class RowBlock(nn.Module):
    """Transformer-ish MLP block with every row norm kind: torch LayerNorm/RMSNorm and HF-style RMSNorms."""

    def __init__(self, d: int = 24) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 3 * d)
        self.rms = nn.RMSNorm(3 * d, eps=1e-6)
        self.fc2 = nn.Linear(3 * d, d)
        self.llama = LlamaStyleRMSNorm(d)
        self.gemma = GemmaStyleRMSNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(nn.functional.gelu(self.rms(self.fc1(self.ln(x)))))
        return self.gemma(self.llama(x + h))


class ConvBlock(nn.Module):
    """Conv block with GroupNorm and BatchNorm2d (the channel norms)."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.gn = nn.GroupNorm(3, c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv2(nn.functional.silu(self.gn(self.conv1(x)))))


def _randomize(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "fc" not in name and "conv" not in name:  # norm affine: not ones/zeros
                p.copy_(torch.randn(p.shape) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    return model


def _pair(kind: str):
    """(torch-norm model, fusednorm-converted twin, input) for a block kind."""
    if kind == "rows":
        model, x = RowBlock(), torch.randn(3, 5, 24)
    else:
        missing = [n for n in ("GroupNorm", "BatchNorm2d") if not hasattr(fm, n)]
        assert not missing, f"fusednorm.{', fusednorm.'.join(missing)} missing"
        model, x = ConvBlock(), torch.randn(2, 6, 5, 7)
    model = _randomize(model)
    fused = fusednorm.replace_norms(copy.deepcopy(model))
    assert not fusednorm.replacement_summary(fused).skipped
    return model, fused, x


def _fwd_bwd(model: nn.Module, x: torch.Tensor, fn=None):
    """Output, input grad and parameter grads of sum(out * fixed random dy)."""
    fn = model if fn is None else fn
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (out * dy.to(out.dtype)).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def _assert_same(a, b, rtol=1e-5, atol=1e-5):
    for u, v, what in ((a[0], b[0], "output"), (a[1], b[1], "input grad")):
        torch.testing.assert_close(u, v, rtol=rtol, atol=atol, msg=what)
    assert a[2].keys() == b[2].keys()
    for n in a[2]:
        torch.testing.assert_close(a[2][n], b[2][n], rtol=rtol, atol=atol, msg=n)


def _compile(model: nn.Module, backend: str, **kw):
    torch._dynamo.reset()
    counters.clear()
    return torch.compile(model, backend=backend, fullgraph=True, **kw)


def _assert_no_graph_breaks(model: nn.Module, x: torch.Tensor) -> None:
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("kind", ["rows", "conv"])
def test_compile_fullgraph_aot_eager_matches_eager(kind):
    model, fused, x = _pair(kind)
    eager = _fwd_bwd(fused, x)
    _assert_same(eager, _fwd_bwd(model, x))  # the converted model is the torch model
    compiled = _compile(fused, "aot_eager")
    _assert_same(_fwd_bwd(fused, x, compiled), eager)
    _assert_no_graph_breaks(fused, x)


def test_compile_dynamic_shapes_and_pinned_backend():
    model, _, _ = _pair("rows")
    fused = fusednorm.replace_norms(copy.deepcopy(model), backend="reference")
    compiled = _compile(fused, "aot_eager", dynamic=True)
    for batch in (3, 7):
        x = torch.randn(batch, 4, 24)
        _assert_same(_fwd_bwd(fused, x, compiled), _fwd_bwd(model, x))
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compile_inductor_rows():
    model, fused, x = _pair("rows")
    compiled = _compile(fused, "inductor")
    _assert_same(_fwd_bwd(fused, x, compiled), _fwd_bwd(model, x))
    assert not counters["graph_break"], dict(counters["graph_break"])


def _record_norm_dtypes(model: nn.Module, fused: nn.Module) -> dict[str, list[torch.dtype]]:
    """Forward hooks appending each norm's output dtype, per model ("torch" / "fused")."""
    dtypes: dict[str, list[torch.dtype]] = {"torch": [], "fused": []}
    for tag, m in (("torch", model), ("fused", fused)):
        for name, mod in m.named_children():
            if name in ("ln", "rms", "llama", "gemma", "gn", "bn"):
                mod.register_forward_hook(lambda mod, a, out, tag=tag: dtypes[tag].append(out.dtype))
    return dtypes


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager"])
def test_autocast_bf16_cpu(compiled):
    """Under autocast the norms see bf16 activations and fp32 parameters. The converted model must follow
    torch's dtype for every norm output and be as accurate as the torch model against a float64 run."""
    model, fused, x = _pair("rows")
    ref64 = copy.deepcopy(model).double()
    dtypes = _record_norm_dtypes(model, fused)
    fn = _compile(fused, "aot_eager") if compiled else fused
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t_out, t_gx, t_gp = _fwd_bwd(model, x)
        f_out, f_gx, f_gp = _fwd_bwd(fused, x, fn)
    r_out, r_gx, r_gp = _fwd_bwd(ref64, x.double())
    assert f_out.dtype == t_out.dtype
    if not compiled:  # compiled graphs do not run module hooks one by one the same way; eager checks dtypes
        assert dtypes["fused"] == dtypes["torch"], dtypes
        assert torch.bfloat16 in dtypes["torch"]  # some norm really ran on bf16 activations
    assert_close(f_out, r_out, t_out, "output")
    assert_close(f_gx, r_gx, t_gx, "input grad")
    for n in r_gp:
        assert_close(f_gp[n], r_gp[n], t_gp[n], n)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager"])
def test_activation_checkpointing(compiled):
    model, fused, x = _pair("rows")
    plain = _fwd_bwd(fused, x)

    def ckpt(inp):
        return checkpoint(fused, inp, use_reentrant=False)

    fn = _compile(ckpt, "aot_eager") if compiled else ckpt
    _assert_same(_fwd_bwd(fused, x, fn), plain, rtol=0, atol=0 if not compiled else 1e-5)
    if compiled:
        assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast needs a CUDA device")
@pytest.mark.parametrize("kind", ["rows", "conv"])
def test_cuda_autocast_norm_dtypes_follow_torch(kind):
    """CUDA autocast runs layer_norm/group_norm in fp32 (fp32 outputs); a drop-in must give the same dtypes."""
    model, fused, x = _pair(kind)
    model, fused, x = model.cuda(), fused.cuda(), x.cuda()
    dtypes = _record_norm_dtypes(model, fused)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        t_out, *_ = _fwd_bwd(model, x)
        f_out, *_ = _fwd_bwd(fused, x)
    assert dtypes["fused"] == dtypes["torch"], dtypes
    assert f_out.dtype == t_out.dtype


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_capture_forward_backward():
    model, fused, _ = _pair("rows")
    fused = fused.cuda()
    x = torch.randn(8, 16, 24, device="cuda")
    static_x = x.clone().requires_grad_(True)
    opt_params = list(fused.parameters())
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (kernel compilation, autotuning) outside the capture
        for _ in range(3):
            fused(static_x).square().sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    for p in opt_params:
        p.grad = None
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # fails if any op syncs with the host during capture
        static_out = fused(static_x)
        static_out.square().sum().backward()
    new_x = torch.randn_like(x)
    static_x.data.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    ref_model = model.cuda()
    xr = new_x.clone().requires_grad_(True)
    ref_out = ref_model(xr)
    ref_out.square().sum().backward()
    torch.testing.assert_close(static_out, ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(static_x.grad, xr.grad, rtol=1e-4, atol=1e-4)
