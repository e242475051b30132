"""fusednorm-bench: arguments, presets, byte model, outputs, provider discovery, and the correctness gate.

Everything runs on CPU at toy sizes with tiny timing budgets, so the whole file takes well under a minute.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from fusednorm.bench import bytes_model, cli, presets, providers, report
from fusednorm.bench.cases import DTYPES, OP_GROUPS, OPS, Case, TorchOps, canonical_mode, expand_ops, parse_shape
from fusednorm.bench.runner import (
    ERROR,
    FAILED,
    OK,
    SKIPPED,
    Result,
    RunConfig,
    check_case,
    round_speedups,
    run_case,
    scaled_error,
)
from fusednorm.bench.timing import Timer, rotation_count, summarize

CPU = torch.device("cpu")
# --system-malloc: in-process CLI runs must not change the test process's allocator (see the subprocess test).
FAST = ["--warmup-ms", "0.5", "--rep-ms", "2", "--rounds", "1", "--no-memory", "--quiet", "--system-malloc"]


def fast_cfg(**kw) -> RunConfig:
    return RunConfig(device=CPU, timer=Timer(CPU, warmup_ms=0.5, rep_ms=2, min_reps=3), memory=False,
                     rounds=1, **kw)


# ---- arguments -----------------------------------------------------------------------------------------


def test_parse_shape_and_modes():
    assert parse_shape("4096x1024") == (4096, 1024)
    assert parse_shape("8,256,56,56") == (8, 256, 56, 56)
    for bad in ("", "ax3", "0x5", "-1x4", "x"):
        with pytest.raises(ValueError):
            parse_shape(bad)
    assert canonical_mode("fwd") == "forward"
    assert canonical_mode("FWD+BWD") == "forward+backward"
    assert canonical_mode("infer") == "inference"
    with pytest.raises(ValueError, match="unknown mode"):
        canonical_mode("sideways")
    assert expand_ops(["batch_norm", "layer_norm"]) == ["batch_norm_train", "batch_norm_eval", "layer_norm"]
    with pytest.raises(ValueError, match="unknown op"):
        expand_ops(["layer_nrom"])


def test_case_validation():
    with pytest.raises(ValueError, match="tokens, hidden"):
        Case("layer_norm", (2, 3, 4))
    with pytest.raises(ValueError, match="not divisible"):
        Case("group_norm", (2, 30, 4, 4), groups=32)
    with pytest.raises(ValueError, match="layout"):
        Case("rms_norm", (4, 8), layout="channels_last")
    with pytest.raises(ValueError, match="unknown dtype"):
        Case("rms_norm", (4, 8), dtype="fp8")
    c = Case("group_norm", (2, 64, 4, 4), "bf16", "fwd+bwd", "channels_last", 16)
    assert c.mode == "forward+backward"
    assert c.label == "group_norm 2x64x4x4 NHWC G=16 bf16 fwd+bwd"
    assert Case("layer_norm", (100000, 64)).scaled_down(64 * 1000).shape == (1000, 64)


def test_select_cases_from_arguments():
    args = cli.build_parser().parse_args(
        ["--op", "batch_norm", "--shape", "4x8x5x5", "--dtype", "fp32", "bf16", "--mode", "fwd", "infer"]
    )
    cases = cli.select_cases(args, CPU)
    assert len(cases) == 2 * 2 * 2
    assert {c.op for c in cases} == {"batch_norm_train", "batch_norm_eval"}
    assert {c.mode for c in cases} == {"forward", "inference"}
    # a 2-D shape without --op means layer_norm; preset filters
    args = cli.build_parser().parse_args(["--shape", "64x128"])
    assert [c.op for c in cli.select_cases(args, CPU)] == ["layer_norm"]
    args = cli.build_parser().parse_args(["--preset", "tiny", "--op", "rms_norm", "--dtype", "bf16"])
    cases = cli.select_cases(args, CPU)
    assert cases and all(c.op == "rms_norm" and c.dtype == "bf16" for c in cases)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--op", "nonorm", "--shape", "4x4"], "unknown op"),
        (["--provider", "nosuch"], "unknown provider"),
        (["--shape", "4xq"], "bad shape"),
        (["--preset", "tiny", "--op", "rms_norm", "--dtype", "fp16", "--mode", "inference"], "no case"),
        (["--op", "group_norm", "--shape", "64x128"], "N, C, *spatial"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_choice_is_argparse_error():
    with pytest.raises(SystemExit) as e:
        cli.main(["--preset", "nope"])
    assert e.value.code == 2


def test_list_shows_cases_and_skip_reasons(capsys):
    assert cli.main(["--list", "--preset", "tiny", "--provider", "all"]) == 0
    out = capsys.readouterr().out
    assert "layer_norm 64x128 fp32 fwd" in out
    assert "interpreter" in out  # triton on CPU: skipped with its reason
    assert "not installed" in out or "CUDA tensors only" in out  # peers


# ---- presets -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", presets.preset_names())
def test_presets_well_formed(name):
    cases = presets.preset(name, CPU)
    assert cases, name
    assert len(set(cases)) == len(cases), f"{name} has duplicate cases"
    for c in cases:
        assert c.op in OPS and c.dtype in DTYPES
        assert bytes_model.bytes_moved(c) > 0


def test_preset_contents():
    default = presets.preset("default", CPU)
    assert default == presets.default_cpu() and 20 <= len(default) <= 60
    cpu = presets.cpu()
    rows = [c.shape for c in cpu if c.op in ("layer_norm", "rms_norm")]
    assert min(r[0] for r in rows) == 512 and max(r[0] for r in rows) == 8192
    assert min(r[1] for r in rows) == 768 and max(r[1] for r in rows) == 8192
    assert {c.op for c in cpu} >= {"layer_norm", "rms_norm", "group_norm", "batch_norm_train", "batch_norm_eval"}
    assert {c.mode for c in cpu} >= {"forward", "forward+backward"} and {c.dtype for c in cpu} >= {"fp32", "bf16"}
    llm = presets.llm()
    assert max(c.shape[1] for c in llm) == 262144 and max(c.shape[0] for c in llm) == 32768
    assert {c.mode for c in llm} >= {"forward", "backward", "forward+backward", "inference"}
    diff = presets.diffusion()
    unet = [c for c in diff if c.op.startswith("group_norm")]
    assert {c.shape[0] for c in unet} == {1, 2, 8} and {c.layout for c in unet} == {"contiguous", "channels_last"}
    assert "adaptive_layer_norm" in {c.op for c in diff}
    assert {"batch_norm_train", "batch_norm_eval", "group_norm"} <= {c.op for c in presets.resnet()}
    assert presets.preset("default", "cuda") == presets.default_gpu()
    # every op is in the tiny preset, and the issue-8 variants in the variants preset
    assert {c.op for c in presets.tiny()} == set(OPS)
    variant_ops = {"add_layer_norm", "add_rms_norm", "layer_norm_2d", "adaptive_layer_norm", "switchable_norm",
                   "weight_norm"}
    assert {c.op for c in presets.variants()} == variant_ops


def test_presets_include_switchable_and_weight_norm():
    """The two late variants are in the default suites (one training case each, to keep the default short), in
    the cpu comparison, and where their models live: SwitchableNorm on ResNet maps, weight norm of Linear
    (out, in) and conv (out, in, kh, kw) weights."""
    for default in (presets.default_cpu(), presets.default_gpu()):
        extra = [c for c in default if c.op in ("switchable_norm", "weight_norm")]
        assert sorted(c.op for c in extra) == ["switchable_norm", "weight_norm"]
        assert all(c.mode == "forward+backward" for c in extra)
    cpu = presets.cpu()
    for op in ("switchable_norm", "weight_norm"):
        cases = [c for c in cpu if c.op == op]
        assert {c.dtype for c in cases} == {"fp32", "bf16"} and {c.mode for c in cases} == {"forward",
                                                                                            "forward+backward"}
    assert {len(c.shape) for c in cpu if c.op == "weight_norm"} == {2, 4}
    assert (32, 256, 56, 56) in {c.shape for c in presets.resnet() if c.op == "switchable_norm"}
    assert (4096, 4096) in {c.shape for c in presets.llm() if c.op == "weight_norm"}
    assert {len(c.shape) for c in presets.variants() if c.op == "weight_norm"} == {2, 3, 4}


# ---- byte model ----------------------------------------------------------------------------------------


def test_byte_model_layer_norm_fp32():
    e, p, s = 4096 * 1024 * 4, 1024 * 4, 4096 * 4
    c = Case("layer_norm", (4096, 1024), "fp32", "inference")
    assert bytes_model.units(c) == (e, p, s)
    assert bytes_model.bytes_moved(c) == 2 * e + 2 * p
    assert bytes_model.bytes_moved(Case("layer_norm", (4096, 1024), "fp32", "forward")) == 2 * e + 2 * p + 2 * s
    assert bytes_model.bytes_moved(Case("layer_norm", (4096, 1024), "fp32", "backward")) == 3 * e + 3 * p + 2 * s
    assert bytes_model.bytes_moved(Case("layer_norm", (4096, 1024), "fp32", "fwd+bwd")) == 5 * e + 5 * p + 4 * s
    assert bytes_model.formula(Case("layer_norm", (4096, 1024), "fp32", "backward")) == "3E + 3P + 2S"
    assert bytes_model.bytes_moved(Case("layer_norm", (4096, 1024), "fp32", "forward")) == 33_595_392


def test_byte_model_dtypes_and_maps():
    # bf16 RMSNorm: 2-byte activations and weight, fp32 rstd
    c = Case("rms_norm", (1024, 4096), "bf16", "forward")
    assert bytes_model.bytes_moved(c) == 2 * (1024 * 4096 * 2) + 4096 * 2 + 1024 * 4
    # mixed: bf16 activations, fp32 parameters
    c = Case("rms_norm", (1024, 4096), "mixed", "backward")
    assert bytes_model.bytes_moved(c) == 3 * (1024 * 4096 * 2) + 2 * (4096 * 4) + 1024 * 4
    # GroupNorm statistics per (sample, group); InstanceNorm per (sample, channel); BatchNorm per channel
    e = 2 * 320 * 64 * 64 * 4
    c = Case("group_norm", (2, 320, 64, 64), "fp32", "forward", groups=32)
    assert bytes_model.bytes_moved(c) == 2 * e + 2 * 320 * 4 + 2 * (2 * 32 * 4)
    c = Case("instance_norm", (2, 320, 64, 64), "fp32", "forward")
    assert bytes_model.bytes_moved(c) == 2 * e + 2 * 320 * 4 + 2 * (2 * 320 * 4)
    c = Case("batch_norm_eval", (2, 320, 64, 64), "fp32", "inference")
    assert bytes_model.bytes_moved(c) == 2 * e + 4 * 320 * 4
    c = Case("batch_norm_train", (2, 320, 64, 64), "fp32", "forward")
    assert bytes_model.bytes_moved(c) == 2 * e + 6 * 320 * 4 + 2 * 320 * 4
    # the residual-add variants read x and residual and write y and h
    c = Case("add_layer_norm", (8, 16), "fp32", "inference")
    assert bytes_model.bytes_moved(c) == 4 * (8 * 16 * 4) + 2 * 16 * 4


def test_byte_model_adaptive_and_channels_first():
    # AdaLN: the (B, D) scale/shift vectors are the "P" unit; statistics per token
    c = Case("adaptive_layer_norm", (4, 1024, 1152), "bf16", "forward")
    e, p, s = 4 * 1024 * 1152 * 2, 4 * 1152 * 2, 4 * 1024 * 4
    assert bytes_model.units(c) == (e, p, s) and bytes_model.bytes_moved(c) == 2 * e + 2 * p + 2 * s
    # channels-first LayerNorm: parameters per channel, statistics per (n, position)
    c = Case("layer_norm_2d", (8, 96, 56, 56), "fp32", "backward")
    e, p, s = 8 * 96 * 56 * 56 * 4, 96 * 4, 8 * 56 * 56 * 4
    assert bytes_model.bytes_moved(c) == 3 * e + 3 * p + 2 * s


def test_byte_model_covers_every_op_and_mode():
    for op in OPS:
        shape = {"rows": (4, 8), "seq": (2, 3, 8), "maps": (2, 8, 3, 3), "weight": (8, 4, 3)}[OPS[op].kind]
        for mode in ("forward", "backward", "forward+backward", "inference"):
            c = Case(op, shape, "fp32", mode, groups=4)
            assert bytes_model.bytes_moved(c) >= 2 * bytes_model.units(c)[0]


def test_byte_model_switchable_norm():
    # training: x read, y written (2E); weight, bias read and running mean/var read + written (6P); per-(n, c)
    # mean and var saved (2S). backward: x, dy read, dx written (3E); weight read, dweight, dbias written (3P);
    # the two saved (n, c) vectors read (2S)
    c = Case("switchable_norm", (8, 64, 56, 56), "fp32", "forward")
    e, p, s = 8 * 64 * 56 * 56 * 4, 64 * 4, 8 * 64 * 4
    assert bytes_model.units(c) == (e, p, s)
    assert bytes_model.bytes_moved(c) == 2 * e + 6 * p + 2 * s == 12_850_688
    assert bytes_model.bytes_moved(Case("switchable_norm", (8, 64, 56, 56), "fp32", "inference")) == 2 * e + 6 * p
    assert bytes_model.bytes_moved(Case("switchable_norm", (8, 64, 56, 56), "fp32", "backward")) == (
        3 * e + 3 * p + 2 * s
    )
    c = Case("switchable_norm", (8, 64, 56, 56), "fp32", "fwd+bwd")
    assert bytes_model.bytes_moved(c) == 5 * e + 9 * p + 4 * s == 32_123_136
    assert bytes_model.formula(c) == "5E + 9P + 4S"
    # bf16 activations and parameters, fp32 statistics; mixed: fp32 parameters
    c = Case("switchable_norm", (2, 32, 7, 7), "bf16", "forward")
    assert bytes_model.bytes_moved(c) == 2 * (2 * 32 * 49 * 2) + 6 * (32 * 2) + 2 * (2 * 32 * 4)
    c = Case("switchable_norm", (2, 32, 7, 7), "mixed", "forward")
    assert bytes_model.bytes_moved(c) == 2 * (2 * 32 * 49 * 2) + 6 * (32 * 4) + 2 * (2 * 32 * 4)


def test_byte_model_weight_norm():
    # a 4096x4096 Linear weight: v read and w written (2E), g read (P), one fp32 norm per row saved (S);
    # backward: dw and v read, dv written (3E), g read and dg written (2P), the norms read (S)
    c = Case("weight_norm", (4096, 4096), "fp32", "forward")
    e, p, s = 4096 * 4096 * 4, 4096 * 4, 4096 * 4
    assert bytes_model.units(c) == (e, p, s)
    assert bytes_model.bytes_moved(c) == 2 * e + p + s == 134_250_496
    assert bytes_model.bytes_moved(Case("weight_norm", (4096, 4096), "fp32", "inference")) == 2 * e + p
    assert bytes_model.bytes_moved(Case("weight_norm", (4096, 4096), "fp32", "backward")) == 3 * e + 2 * p + s
    assert bytes_model.formula(Case("weight_norm", (4096, 4096), "fp32", "fwd+bwd")) == "5E + 3P + 2S"
    # a conv weight (out, in, kh, kw): one norm per output channel over in * kh * kw; bf16 v and g
    c = Case("weight_norm", (512, 256, 3, 3), "bf16", "fwd+bwd")
    e, p, s = 512 * 256 * 9 * 2, 512 * 2, 512 * 4
    assert bytes_model.units(c) == (e, p, s)
    assert bytes_model.bytes_moved(c) == 5 * e + 3 * p + 2 * s == 11_803_648


# ---- timing helpers ------------------------------------------------------------------------------------


def test_summarize_and_rotation():
    t = summarize([3.0, 1.0, 2.0, 4.0, 5.0])
    assert t.median == 3.0 and t.minimum == 1.0 and t.reps == 5 and t.p25 == 2.0 and t.p75 == 4.0
    assert math.isclose(t.spread, 2.0 / 3.0)
    assert rotation_count(100 * 2**20, 32 * 2**20) == 1  # bigger than the cache: no copies
    assert rotation_count(8 * 2**20, 32 * 2**20) == 8  # 8 x 8 MiB = 2 x cache
    assert rotation_count(1024, 32 * 2**20) == 16  # capped
    assert rotation_count(2**20, 2**40, budget_bytes=4 * 2**20) == 4  # memory budget


# ---- providers and the correctness gate ----------------------------------------------------------------


class _Fake(providers.Provider):
    def __init__(self, name, ns, why=None):
        self.name, self.label, self._ns, self._why = name, name, ns, why

    def namespace(self):
        return self._ns

    def unavailable(self, device):
        return self._why


class _WrongForward:
    @staticmethod
    def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        return F.layer_norm(x, normalized_shape, weight, None, eps)  # forgets the bias


class _WrongBackward:
    @staticmethod
    def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        # right values, but the weight gradient is lost
        return F.layer_norm(x, normalized_shape, weight.detach(), bias, eps)


class _Raises:
    @staticmethod
    def layer_norm(*args, **kwargs):
        raise RuntimeError("kaboom")


class _Slightly:
    @staticmethod
    def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        return F.layer_norm(x, normalized_shape, weight, bias, eps) * (1 + 1e-2)


def _by_name(results):
    return {r.provider: r for r in results}


def test_wrong_provider_is_failed_not_timed():
    ps = [providers.PROVIDERS["torch"], _Fake("wrong_fwd", _WrongForward), _Fake("raises", _Raises)]
    res = _by_name(run_case(Case("layer_norm", (64, 96), "fp32", "forward"), ps, fast_cfg()))
    assert res["torch"].status == OK and res["torch"].timing is not None and res["torch"].speedup == 1.0
    assert res["wrong_fwd"].status == FAILED and res["wrong_fwd"].timing is None
    assert res["wrong_fwd"].gbps is None and res["wrong_fwd"].speedup is None
    assert "y:" in res["wrong_fwd"].detail
    assert res["raises"].status == ERROR and "kaboom" in res["raises"].detail and res["raises"].timing is None


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_small_relative_error_is_caught(dtype):
    # 1 % off is far beyond rounding even in bf16 (torch's own error is ~0.2 % of the max)
    ps = [providers.PROVIDERS["torch"], _Fake("slightly", _Slightly)]
    res = _by_name(run_case(Case("layer_norm", (32, 256), dtype, "inference"), ps, fast_cfg()))
    assert res["torch"].status == OK
    assert res["slightly"].status == FAILED


def test_wrong_gradient_is_failed_in_backward_modes_only():
    ps = [providers.PROVIDERS["torch"], _Fake("wrong_bwd", _WrongBackward)]
    fwd = _by_name(run_case(Case("layer_norm", (32, 64), "fp32", "forward"), ps, fast_cfg()))
    assert fwd["wrong_bwd"].status == OK
    bwd = _by_name(run_case(Case("layer_norm", (32, 64), "fp32", "backward"), ps, fast_cfg()))
    assert bwd["wrong_bwd"].status == FAILED and "dweight" in bwd["wrong_bwd"].detail


def test_missing_provider_and_missing_op_are_skipped_with_reason():
    peer = providers.PeerProvider("ghost", "ghost-kernels", "no_such_module_xyz", "pip install ghost", TorchOps)
    ps = [providers.PROVIDERS["torch"], peer, _Fake("no_rms", _WrongForward), providers.PROVIDERS["triton"]]
    res = _by_name(run_case(Case("rms_norm", (16, 32), "fp32", "forward"), ps, fast_cfg()))
    assert res["ghost"].status == SKIPPED and "not installed" in res["ghost"].detail
    assert res["no_rms"].status == SKIPPED and "no rms_norm" in res["no_rms"].detail
    assert res["triton"].status == SKIPPED and "interpreter" in res["triton"].detail
    assert res["torch"].status == OK


class _SwitchableSwapped:
    """SwitchableNorm with the mean and variance mixing logits swapped (a plausible argument-order bug)."""

    @staticmethod
    def switchable_norm(input, running_mean, running_var, weight, bias, mean_weight, var_weight, *args, **kw):
        return TorchOps.switchable_norm(input, running_mean, running_var, weight, bias, var_weight, mean_weight,
                                        *args, **kw)


class _SwitchableStale:
    """Right output, but the running statistics are never updated."""

    @staticmethod
    def switchable_norm(input, running_mean, running_var, *args, **kw):
        return TorchOps.switchable_norm(input, running_mean.clone(), running_var.clone(), *args, **kw)


class _SwitchableNoLogitGrad:
    """Right values, but no gradient reaches the mean mixing logits."""

    @staticmethod
    def switchable_norm(input, running_mean, running_var, weight, bias, mean_weight, var_weight, *args, **kw):
        return TorchOps.switchable_norm(input, running_mean, running_var, weight, bias, mean_weight.detach(),
                                        var_weight, *args, **kw)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, factor):
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


class _SwitchableLogitGradOff:
    """Right values; the variance mixing-logit gradient 1 % too large (beyond check_slack's 1e-3)."""

    @staticmethod
    def switchable_norm(input, running_mean, running_var, weight, bias, mean_weight, var_weight, *args, **kw):
        return TorchOps.switchable_norm(input, running_mean, running_var, weight, bias, mean_weight,
                                        _ScaleGrad.apply(var_weight, 1.01), *args, **kw)


class _WeightNormWhole:
    """Normalizes by the norm of the whole weight instead of one norm per output row."""

    @staticmethod
    def weight_norm_fn(v, g, dim=0):
        return TorchOps.weight_norm_fn(v, g, 0) * (torch.linalg.vector_norm(v.detach(), dim=tuple(range(1, v.dim())),
                                                                           keepdim=True) / v.detach().norm())


class _WeightNormNoGGrad:
    """Right values, but g gets no gradient."""

    @staticmethod
    def weight_norm_fn(v, g, dim=0):
        return TorchOps.weight_norm_fn(v, g.detach(), dim)


class _VariantsSlightly:
    """The variants scaled by (1 + off): far beyond rounding at fp32 (1e-3); at bf16 the gate's floor is
    8e-3 + 2x torch's error (~0.25 % here), so 2 % must be caught."""

    off = {torch.float32: 1e-3, torch.bfloat16: 2e-2}

    @staticmethod
    def switchable_norm(*args, **kw):
        y = TorchOps.switchable_norm(*args, **kw)
        return y * (1 + _VariantsSlightly.off[y.dtype])

    @staticmethod
    def weight_norm_fn(v, g, dim=0):
        w = TorchOps.weight_norm_fn(v, g, dim)
        return w * (1 + _VariantsSlightly.off[w.dtype])


@pytest.mark.parametrize(
    "op, shape, ns, what, grad_only",
    [
        ("switchable_norm", (3, 6, 5, 5), _SwitchableSwapped, "y:", False),
        ("switchable_norm", (3, 6, 5, 5), _SwitchableStale, "running_mean:", False),
        ("switchable_norm", (3, 6, 5, 5), _SwitchableNoLogitGrad, "dmean_weight:", True),
        ("switchable_norm", (3, 6, 5, 5), _SwitchableLogitGradOff, "dvar_weight:", True),
        ("weight_norm", (12, 40), _WeightNormWhole, "y:", False),
        ("weight_norm", (6, 3, 3, 3), _WeightNormNoGGrad, "dg:", True),
    ],
)
def test_wrong_variant_provider_is_failed(op, shape, ns, what, grad_only):
    """SwitchableNorm and weight norm go through the same gate: a wrong output, running statistic or gradient is
    FAILED (and not timed); a gradient-only bug passes the forward-only modes."""
    ps = [providers.PROVIDERS["torch"], _Fake("wrong", ns)]
    for mode in ("forward", "backward", "forward+backward", "inference"):
        res = _by_name(run_case(Case(op, shape, "fp32", mode), ps, fast_cfg()))
        assert res["torch"].status == OK, (mode, res["torch"].detail)
        if grad_only and mode in ("forward", "inference"):
            assert res["wrong"].status == OK, (mode, res["wrong"].detail)
        else:
            assert res["wrong"].status == FAILED and res["wrong"].timing is None, (mode, res["wrong"].detail)
            assert what in res["wrong"].detail, res["wrong"].detail


@pytest.mark.parametrize("op, shape", [("switchable_norm", (2, 8, 4, 4)), ("weight_norm", (16, 3, 3, 3))])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_small_relative_error_in_a_variant_is_caught(op, shape, dtype):
    ps = [providers.PROVIDERS["torch"], _Fake("slightly", _VariantsSlightly)]
    res = _by_name(run_case(Case(op, shape, dtype, "inference"), ps, fast_cfg()))
    assert res["torch"].status == OK
    assert res["slightly"].status == FAILED


def test_torch_baselines_of_switchable_and_weight_norm():
    """The torch-eager twins (also the float64 oracle of the bench) agree with independent definitions: torch's
    own weight norm (torch._weight_norm, the parametrization) and SwitchableNorm as the paper writes it."""
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(6, 3, 4, 5, dtype=torch.float64, generator=gen)
    for dim in (0, 1, 3, -1):
        g = torch.rand(torch.norm_except_dim(v, 2, dim).shape, dtype=torch.float64, generator=gen) + 0.5
        torch.testing.assert_close(TorchOps.weight_norm_fn(v, g, dim), torch._weight_norm(v, g, dim))
    torch.testing.assert_close(TorchOps.weight_norm_fn(v, g, None), torch._weight_norm(v, g, -1))
    lin = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(40, 12, dtype=torch.float64))
    with torch.no_grad():
        lin.parametrizations.weight.original0.mul_(torch.rand(12, 1, dtype=torch.float64, generator=gen) + 0.5)
    p = lin.parametrizations.weight
    torch.testing.assert_close(TorchOps.weight_norm_fn(p.original1, p.original0, 0), lin.weight)

    x = torch.randn(3, 5, 4, 6, dtype=torch.float64, generator=gen) * 2 + 0.7
    w, b = torch.randn(5, dtype=torch.float64, generator=gen), torch.randn(5, dtype=torch.float64, generator=gen)
    mw, vw = torch.randn(3, dtype=torch.float64, generator=gen), torch.randn(3, dtype=torch.float64, generator=gen)
    rm, rv = torch.randn(5, dtype=torch.float64, generator=gen), torch.rand(5, dtype=torch.float64, generator=gen)
    xs = x.reshape(3, 5, -1)
    mean_in, var_in = xs.mean(-1), xs.var(-1, unbiased=False)
    sq = var_in + mean_in**2
    mean_ln, mean_bn = mean_in.mean(1, keepdim=True), mean_in.mean(0, keepdim=True)
    var_ln, var_bn = sq.mean(1, keepdim=True) - mean_ln**2, sq.mean(0, keepdim=True) - mean_bn**2
    sm, sv = torch.softmax(mw, 0), torch.softmax(vw, 0)
    mu = sm[0] * mean_in + sm[1] * mean_ln + sm[2] * mean_bn
    var = sv[0] * var_in + sv[1] * var_ln + sv[2] * var_bn
    want = ((xs - mu[..., None]) / (var[..., None] + 1e-5).sqrt()).reshape(x.shape) * w[:, None, None] \
        + b[:, None, None]
    want_rm, want_rv = 0.9 * rm + 0.1 * mean_bn[0], 0.9 * rv + 0.1 * var_bn[0]
    got = TorchOps.switchable_norm(x, rm, rv, w, b, mw, vw, training=True, momentum=0.1, eps=1e-5)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(rm, want_rm)
    torch.testing.assert_close(rv, want_rv)
    # eval: the running statistics replace the batch ones
    mu = sm[0] * mean_in + sm[1] * mean_ln + sm[2] * rm
    var = sv[0] * var_in + sv[1] * var_ln + sv[2] * rv
    want = ((xs - mu[..., None]) / (var[..., None] + 1e-5).sqrt()).reshape(x.shape) * w[:, None, None] \
        + b[:, None, None]
    torch.testing.assert_close(TorchOps.switchable_norm(x, rm, rv, w, b, mw, vw, training=False), want)


def test_provider_registry():
    names = [p.name for p in providers.get_providers()]
    assert names[:4] == ["triton", "native", "torch", "torch_compile"] and "reference" not in names
    assert [p.name for p in providers.get_providers(["eager", "compile"])] == ["torch", "torch_compile"]
    with pytest.raises(ValueError, match="unknown provider"):
        providers.get_providers(["nope"])
    assert providers.PROVIDERS["liger"].unavailable(CPU)  # never runs on CPU tensors


def test_every_op_and_mode_checks_out_for_torch_and_reference():
    """The harness itself: torch eager and fusednorm's plain-torch reference pass the check on every case of
    the tiny preset they can run (fusednorm ops not written yet are skipped, with that reason)."""
    ps = [providers.PROVIDERS["torch"], providers.PROVIDERS["reference"]]
    cfg = fast_cfg()
    seen_ok = set()
    for case in presets.tiny():
        for r in run_case(case, ps, cfg):
            assert r.status in (OK, SKIPPED), (case.label, r.provider, r.detail)
            if r.status == SKIPPED:  # an op not written yet, or not in the reference backend
                assert r.provider == "reference", (case.label, r.detail)
                assert "does not exist yet" in r.detail or "does not implement" in r.detail, r.detail
            else:
                assert r.timing is not None and r.timing.median > 0 and r.check_err is not None
                assert r.check_err <= r.check_tol
                seen_ok.add((r.provider, case.op))
    assert ("reference", "layer_norm") in seen_ok and ("torch", "batch_norm_train") in seen_ok


class _TritonInterpreted(providers.FusednormBackend):
    """fusednorm's Triton backend on CPU tensors through the interpreter (conftest sets TRITON_INTERPRET=1): the
    bench itself skips it on CPU because interpreter times mean nothing, but its answers can be checked."""

    def __init__(self) -> None:
        super().__init__("triton")

    def unavailable(self, device):
        import fusednorm

        info = fusednorm.available_backends()["triton"]
        return None if info.available else info.detail


def _native_missing() -> str | None:
    import fusednorm

    info = fusednorm.available_backends()["native"]
    return None if info.available else info.detail


def test_switchable_and_weight_norm_check_out_on_every_backend():
    """Every tiny case of the two variants, every mode, fp32/bf16/mixed: fusednorm's native, reference and
    (interpreted) Triton backends and torch eager pass the float64 gate."""
    triton = _TritonInterpreted()
    ps = [providers.PROVIDERS["native"], providers.PROVIDERS["reference"], providers.PROVIDERS["torch"], triton]
    cases = [c for c in presets.tiny() if c.op in ("switchable_norm", "weight_norm")]
    assert {c.mode for c in cases} == set(("forward", "backward", "forward+backward", "inference"))
    assert {c.dtype for c in cases} == {"fp32", "bf16", "mixed"}
    missing = {"native": _native_missing(), "triton": triton.unavailable(CPU)}
    for case in cases:
        results, _ = check_case(case, ps, fast_cfg())
        for name, r in results.items():
            if missing.get(name):
                assert r.status == SKIPPED, (case.label, name, r.status)
                continue
            assert r.status == OK, (case.label, name, r.status, r.detail)
            assert r.check_err is not None and r.check_err <= r.check_tol, (case.label, name)
    if any(missing.values()):
        pytest.skip(f"backends not available here: {missing}")


@pytest.mark.parametrize(
    "op, shape, formula, tiny_case",
    [
        ("switchable_norm", "3x6x5x5", "5E + 9P + 4S", "switchable_norm 2x8x4x4 mixed fwd+bwd"),
        ("weight_norm", "16x3x3x3", "5E + 3P + 2S", "weight_norm 6x3x3x3 fp32 infer"),
    ],
)
def test_cli_single_case_switchable_and_weight_norm(op, shape, formula, tiny_case, tmp_path, capsys):
    """``fusednorm-bench --op <variant> --shape ...`` with the native and reference providers: every provider is
    checked and timed, the byte model is the variant's, the table shows the case."""
    assert op in cli.build_parser().epilog and expand_ops([op]) == [op]
    assert cli.main(["--list", "--preset", "tiny", "--op", op]) == 0
    listed = capsys.readouterr().out
    assert tiny_case in listed and "layer_norm" not in listed
    path = tmp_path / "r.csv"
    argv = ["--op", op, "--shape", shape, "--mode", "fwd+bwd", "--dtype", "fp32", "bf16", "--provider", "native",
            "reference", "--csv", str(path), *FAST]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"{op} {shape} fp32 fwd+bwd" in out and f"{op} {shape} bf16 fwd+bwd" in out
    rows = list(csv.DictReader(path.open()))
    assert sorted((r["provider"], r["dtype"]) for r in rows) == sorted(
        (p, d) for p in ("native", "reference", "torch") for d in ("fp32", "bf16")
    )
    native_missing = _native_missing()
    for r in rows:
        assert r["byte_model"] == formula
        if r["provider"] == "native" and native_missing:
            assert r["status"] == "skipped"
            continue
        assert r["status"] == "ok", r
        assert float(r["median_ms"]) > 0 and float(r["gbps"]) > 0 and float(r["check_err"]) <= float(r["check_tol"])
    if native_missing:
        pytest.skip(f"native extension unavailable: {native_missing}")


def test_scaled_error():
    ref = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    assert scaled_error(ref.float(), ref) == 0.0
    assert math.isclose(scaled_error(torch.tensor([1.0, -2.0, 4.4]), ref), 0.1, rel_tol=1e-6)
    assert scaled_error(torch.tensor([1.0, float("nan"), 4.0]), ref) == math.inf
    assert scaled_error(torch.ones(2), ref) == math.inf
    assert scaled_error(None, ref) == math.inf
    with_nan = torch.tensor([1.0, float("nan"), 4.0], dtype=torch.float64)
    assert scaled_error(torch.tensor([1.0, float("nan"), 4.0]), with_nan) == 0.0  # NaN where torch has NaN
    assert scaled_error(torch.tensor([1.0, 2.0, 4.0]), with_nan) == math.inf


# ---- end to end: outputs -------------------------------------------------------------------------------


def test_round_speedups():
    assert round_speedups([2.0, 3.0, 4.0], [1.0, 3.0, 8.0]) == (0.5, 2.0)
    assert round_speedups(None, [1.0]) is None and round_speedups([1.0], []) is None


def test_provider_summaries():
    """Geometric mean over the provider's timed cases, the slower cases with their per-round range, and the
    large cases' share of copy bandwidth; the baseline and untimed results are left out."""
    small, large = Case("layer_norm", (64, 128), "fp32", "forward"), Case("layer_norm", (4096, 4096), "fp32", "forward")

    def res(case, provider, speedup, pct=None, nbytes=1000, rounds=None, status=OK):
        return Result(case, provider, f"fusednorm {provider}", status, bytes=nbytes, speedup=speedup,
                      pct_copy=pct, speedup_rounds=rounds)

    results = [
        res(small, "torch", 1.0), res(small, "native", 0.5, rounds=(0.4, 1.1)),
        res(large, "torch", 1.0, pct=40.0, nbytes=10**9), res(large, "native", 2.0, pct=55.0, nbytes=10**9),
        res(small, "other", None, status=FAILED),
    ]
    env = {"large_bytes": 10**8}
    (s,) = report.provider_summaries(results, env)
    assert s["provider"] == "fusednorm native" and s["cases"] == 2 and math.isclose(s["geomean_speedup"], 1.0)
    assert s["slower"] == [{"case": small.label, "speedup": 0.5, "round_min": 0.4, "round_max": 1.1}]
    assert (s["large_cases"], s["large_under_60pct_copy"], s["large_pct_copy_min"]) == (1, 1, 55.0)
    text = "\n".join(report.summary_lines(results, env))
    assert "1.00x geometric mean" in text and "1 slower" in text and "per round 0.40-1.10x" in text
    assert "1 under 60%" in text
    # a peer's (or torch.compile's) slower cases are counted, not listed
    peer = Result(small, "compile", "torch.compile", OK, bytes=1000, speedup=0.5, speedup_rounds=(0.4, 0.6))
    lines = report.summary_lines([peer], env)
    assert lines == ["torch.compile: 0.50x geometric mean over torch eager, 1 cases, 1 slower than torch"]


def test_outputs_csv_json_md_plot(tmp_path, capsys):
    out = {k: tmp_path / f"r.{k}" for k in ("csv", "json", "md", "png")}
    argv = ["--op", "layer_norm", "rms_norm", "--shape", "64x128", "256x128", "--mode", "fwd", "fwd+bwd",
            "--provider", "torch", "reference", "--csv", str(out["csv"]), "--json", str(out["json"]),
            "--md", str(out["md"]), "--plot", str(out["png"]), *FAST]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "layer_norm 64x128 fp32 fwd" in text and "torch eager" in text and "copy bandwidth" in text
    rows = list(csv.DictReader(out["csv"].open()))
    assert len(rows) == 2 * 2 * 2 * 2
    assert {r["provider"] for r in rows} == {"torch", "reference"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(float(r["median_ms"]) > 0 and float(r["gbps"]) > 0 for r in ok)
    doc = json.loads(out["json"].read_text())
    env = doc["environment"]
    for key in ("device_name", "cpu_model", "torch", "triton", "git_commit", "copy_gbps", "python"):
        assert key in env, key
    assert env["torch"] == torch.__version__ and env["copy_gbps"] > 0
    assert len(doc["results"]) == len(rows)
    (summary,) = doc["summary"]  # reference against torch eager
    assert summary["provider"] == "fusednorm reference" and summary["cases"] == len(ok) // 2
    assert summary["geomean_speedup"] > 0 and isinstance(env["env_vars"], dict) and env["large_bytes"] > 0
    timed = [r for r in doc["results"] if r["provider"] == "reference" and r["status"] == "ok"]
    assert all(r["speedup_round_min"] <= r["speedup_round_max"] for r in timed)
    md = out["md"].read_text()
    assert md.startswith("# fusednorm-bench results") and "| layer_norm 64x128 fp32 fwd" in md
    assert "## Summary" in md and "geometric mean over torch eager" in md
    png = out["png"].read_bytes()
    assert len(png) > 1000 and png[:8] == b"\x89PNG\r\n\x1a\n"


def test_cpu_runs_keep_freed_memory_and_say_so(tmp_path):
    """By default a CPU run keeps freed memory mapped (see timing.keep_freed_cpu_memory) and the report says
    which allocator the numbers were taken with; --system-malloc leaves glibc alone and says that."""
    for flag, want in (([], "glibc keeps freed memory"), (["--system-malloc"], "system default")):
        md = tmp_path / f"r{len(flag)}.md"
        res = subprocess.run(
            [sys.executable, "-m", "fusednorm.bench", "--op", "layer_norm", "--shape", "64x128", "--mode", "fwd",
             "--provider", "reference", "--md", str(md), *[a for a in FAST if a != "--system-malloc"], *flag],
            capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert f"CPU allocator: {want}" in md.read_text()


def test_cli_exit_1_when_a_provider_is_wrong(monkeypatch, capsys):
    monkeypatch.setitem(providers.PROVIDERS, "wrong", _Fake("wrong", _WrongForward))
    assert cli.main(["--shape", "32x64", "--provider", "wrong", *FAST]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "wrong result" in out


def test_memory_is_measured_on_cpu():
    cfg = fast_cfg()
    cfg.memory = True
    res = _by_name(run_case(Case("layer_norm", (64, 256), "fp32", "forward"), [providers.PROVIDERS["torch"]], cfg))
    # y alone is 64 KiB; the profiler's record must see at least that
    assert res["torch"].peak_mem is None or res["torch"].peak_mem >= 64 * 256 * 4


# ---- --kernels -----------------------------------------------------------------------------------------


def test_kernels_report_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fusednorm.backends.triton.codegen", None)
    assert cli.main(["--kernels"]) == 1
    assert "compile report is not available" in capsys.readouterr().err


def test_kernels_report_table(monkeypatch, capsys):
    rows = [
        {"kernel": "ln_fwd", "config": "BLOCK=1024", "arch": "sm_80", "num_warps": 4, "registers": 40,
         "spills": False, "spill_bytes": 0, "shared_bytes": 0, "ok": True, "error": ""},
        {"kernel": "ln_bwd", "config": "BLOCK=8192", "arch": "sm_90", "num_warps": 8, "registers": 255,
         "spills": True, "spill_bytes": 96, "shared_bytes": 4096, "ok": False, "error": "96 bytes of spill"},
    ]
    fake = types.ModuleType("fusednorm.backends.triton.codegen")
    fake.compile_report = lambda archs=(80, 90): [r for r in rows if int(r["arch"][3:]) in archs]
    monkeypatch.setitem(sys.modules, "fusednorm.backends.triton.codegen", fake)
    assert cli.main(["--kernels"]) == 1  # a spilling configuration fails the report
    out = capsys.readouterr().out
    assert "ln_fwd" in out and "sm_90" in out and "sm_sm" not in out and "96 B" in out
    assert "1 with errors or spills" in out
    assert cli.main(["--kernels", "--archs", "80"]) == 0
    assert "ln_bwd" not in capsys.readouterr().out
    seen = {}
    fake.compile_report = lambda archs=(80, 90), families=None: seen.update(families=families) or rows[:1]
    assert cli.main(["--kernels", "--family", "layer_norm"]) == 0 and seen["families"] == ("layer_norm",)


def test_readme_benchmarks_section_lists_every_op():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Benchmarks", 1)[1].split("\n## ", 1)[0]
    missing = [op for op in [*OPS, *OP_GROUPS] if f"`{op}`" not in section]
    assert not missing, f"README's Benchmarks section does not mention {missing}"


def test_import_fusednorm_does_not_import_the_bench():
    code = "import sys, fusednorm; sys.exit(any(m.startswith('fusednorm.bench') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
