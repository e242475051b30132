"""Test configuration: Triton runs in its interpreter on CPU tensors, so every kernel is checked without a GPU.

TRITON_INTERPRET must be set before fusednorm's Triton kernels are imported (``triton.jit`` reads it when a kernel
is defined), hence at the very top of conftest. ``--slow`` also runs the tests marked ``slow``.

On a GPU machine, ``FUSEDNORM_TEST_DEVICE=cuda`` makes CUDA the default device for tensors the tests create
(``torch.set_default_device``) and runs Triton compiled instead of interpreted (bench/run_gpu.sh sets it).
"""

from __future__ import annotations

import os

TEST_DEVICE = os.environ.get("FUSEDNORM_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fusednorm  # noqa: E402

if TEST_DEVICE != "cpu":
    torch.set_default_device(TEST_DEVICE)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow test: run with --slow")
    for item in items:
        # the marker itself, not item.keywords: a parametrize id "slow" is a keyword too and must not skip
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip_slow)


def cpu_backends() -> list[str]:
    """Backends that can run the test device's tensors in this session (on CPU: triton via its interpreter)."""
    info = fusednorm.available_backends()
    names = [name for name in ("triton", "native", "reference") if info[name].available]
    if TEST_DEVICE != "cpu" and "native" in names and "CUDA" not in info["native"].detail:
        names.remove("native")
    return names


@pytest.fixture(autouse=True)
def _seed_and_reset_backend():
    torch.manual_seed(0)
    fusednorm.set_backend("auto")
    yield
    fusednorm.set_backend("auto")


@pytest.fixture
def poison_empty(monkeypatch):
    """Make ``torch.empty``/``torch.empty_like``/``new_empty`` return NaN-filled (or -7 for ints) memory, so a
    kernel that leaves any output element unwritten produces NaN instead of passing by luck."""
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def _poison(t):
        if t.numel():
            t.fill_(float("nan") if t.is_floating_point() else -7)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: _poison(real_new_empty(self, *a, **k)))
    yield
