"""Training the tiny GPT of examples/train_tiny_gpt.py with torch norms and after replace_norms: the loss
curves must agree step by step (same initial weights, same batches, fp32)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import fusednorm
from fusednorm import backends

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_tiny_gpt.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("train_tiny_gpt", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_tiny_gpt", mod)
    spec.loader.exec_module(mod)
    return mod


gpt = _load_example()

# A float32 loss near 3 has an ulp of 2.4e-7; twenty steps of AdamW through different (equally accurate)
# norm kernels stay within a few ulps (measured: <= 5e-7). A wrong eps, affine or gradient shows up as 1e-3
# or more at step 0 or 1.
LOSS_ATOL = 4e-6


@pytest.fixture(autouse=True)
def _one_thread():
    # The model is tiny: intra-op threads only add synchronisation (and stall badly on a loaded 2-core CI box).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cpu_fast_backend() -> str:
    """The native CPU backend when the extension is built, the reference backend otherwise."""
    return "native" if fusednorm.available_backends()["native"].available else "reference"


def _spy_backends(monkeypatch) -> list[str]:
    used: list[str] = []
    real = backends.select

    def spy(op, x):
        module = real(op, x)
        used.append(module.__name__.rsplit(".", 1)[-1])
        return module

    monkeypatch.setattr(backends, "select", spy)
    # A call the native extension's whole-call entry takes runs on the native backend without select.
    for name, entry in list(vars(backends.native_entries).items()):

        def counting(*args, entry=entry):
            out = entry(*args)
            if out is not None:
                used.append("native")
            return out

        monkeypatch.setattr(backends.native_entries, name, counting)
    return used


def _twin_runs(config, steps, backend, batch_size, monkeypatch):
    data, chars = gpt.load_corpus(vocab_size=config.vocab_size)
    base = gpt.build_model(config)
    fused = fusednorm.replace_norms(copy.deepcopy(base), backend=backend)
    assert len(fusednorm.replacement_summary(fused).names()) == 2 * config.n_layer + 1
    ref = gpt.train(base, data, steps, batch_size=batch_size)
    used = _spy_backends(monkeypatch)
    new = gpt.train(fused, data, steps, batch_size=batch_size)
    return ref.losses, new.losses, used


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_tiny_gpt_losses_match_torch(norm, monkeypatch):
    backend = cpu_fast_backend()
    config = gpt.GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, norm=norm)
    ref, new, used = _twin_runs(config, 20, backend, 8, monkeypatch)
    assert set(used) == {backend}, f"ops ran on {set(used)}, expected only {backend}"
    diffs = [abs(a - b) for a, b in zip(ref, new, strict=True)]
    assert max(diffs) <= LOSS_ATOL, f"loss curves diverge: max diff {max(diffs):.3e} at step {diffs.index(max(diffs))}"
    assert new[-1] < new[0] - 0.5, f"the model did not learn: {new[0]:.3f} -> {new[-1]:.3f}"


def test_tiny_gpt_losses_match_torch_triton_interpreter(monkeypatch):
    if not fusednorm.available_backends()["triton"].available:
        pytest.skip(f"triton backend unavailable: {fusednorm.available_backends()['triton'].detail}")
    config = gpt.GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16, norm="layernorm")
    ref, new, used = _twin_runs(config, 3, "triton", 2, monkeypatch)
    assert used and set(used) == {"triton"}, f"ops ran on {set(used)}"
    diffs = [abs(a - b) for a, b in zip(ref, new, strict=True)]
    assert max(diffs) <= LOSS_ATOL, f"loss curves diverge: {diffs}"


def test_example_main_runs(capsys):
    gpt.main(["--steps", "4", "--device", "cpu", "--print-every", "2", "--backend", cpu_fast_backend()])
    out = capsys.readouterr().out
    assert "tokens/s" in out and "max |loss difference|" in out
