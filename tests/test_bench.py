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

from fusednorm.bench import bytes_model, cli, presets, providers
from fusednorm.bench.cases import DTYPES, OPS, Case, TorchOps, canonical_mode, expand_ops, parse_shape
from fusednorm.bench.runner import ERROR, FAILED, OK, SKIPPED, RunConfig, run_case, scaled_error
from fusednorm.bench.timing import Timer, rotation_count, summarize

CPU = torch.device("cpu")
FAST = ["--warmup-ms", "0.5", "--rep-ms", "2", "--rounds", "1", "--no-memory", "--quiet"]


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
        shape = {"rows": (4, 8), "seq": (2, 3, 8), "maps": (2, 8, 3, 3)}[OPS[op].kind]
        for mode in ("forward", "backward", "forward+backward", "inference"):
            c = Case(op, shape, "fp32", mode, groups=4)
            assert bytes_model.bytes_moved(c) >= 2 * bytes_model.units(c)[0]


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
    md = out["md"].read_text()
    assert md.startswith("# fusednorm-bench results") and "| layer_norm 64x128 fp32 fwd" in md
    png = out["png"].read_bytes()
    assert len(png) > 1000 and png[:8] == b"\x89PNG\r\n\x1a\n"


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


def test_import_fusednorm_does_not_import_the_bench():
    code = "import sys, fusednorm; sys.exit(any(m.startswith('fusednorm.bench') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
