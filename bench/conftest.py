"""pytest-benchmark suites over fusednorm-bench's cases and providers.

    pytest bench/ --benchmark-only                          # the default preset on this machine's device
    pytest bench/ --benchmark-only --bench-preset cpu       # any preset of fusednorm.bench.presets
    pytest bench/ --benchmark-only --bench-provider native torch --benchmark-json out.json

Each test is one (case, provider): it is skipped with the provider's reason when the provider cannot run the
case, fails when the provider's result is wrong (the same float64 check as ``fusednorm-bench``), and
otherwise hands the timed call (inputs rotated as in the CLI) to pytest-benchmark. ``extra_info`` carries the
byte model's bytes, so GB/s = bytes / median.
"""

from __future__ import annotations

import itertools

import pytest

from fusednorm.bench import bytes_model, presets
from fusednorm.bench.providers import get_providers
from fusednorm.bench.runner import OK, SKIPPED, RunConfig, check_case, input_sets, mode_fn
from fusednorm.bench.timing import Timer, resolve_device


def pytest_addoption(parser):
    group = parser.getgroup("fusednorm-bench")
    group.addoption("--bench-preset", default="default", help="fusednorm.bench preset to run (default: default)")
    group.addoption("--bench-provider", nargs="+", default=None, help="providers (default: fusednorm-bench's)")
    group.addoption("--bench-device", default="auto", help="auto, cpu or cuda")


def _device(config):
    return resolve_device(config.getoption("--bench-device"))


def pytest_generate_tests(metafunc):
    """Parametrize ``case`` x ``provider`` from the options; a test module picks its family with FAMILY."""
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    family = getattr(metafunc.module, "FAMILY", None)
    cases = [c for c in presets.preset(config.getoption("--bench-preset"), _device(config))
             if family is None or c.spec.kind == family]
    provs = get_providers(config.getoption("--bench-provider"))
    metafunc.parametrize("case", cases, ids=[c.label.replace(" ", "-") for c in cases])
    metafunc.parametrize("provider", provs, ids=[p.name for p in provs])


@pytest.fixture(scope="session")
def bench_cfg(request):
    device = _device(request.config)
    return RunConfig(device=device, timer=Timer(device), memory=False,
                     check_numel=2**22 if device.type == "cpu" else 2**26)


@pytest.fixture
def run_benchmark(benchmark, bench_cfg):
    """run_benchmark(case, provider): check, skip or fail, then benchmark the provider's timed call."""

    def run(case, provider):
        results, calls = check_case(case, [provider], bench_cfg)
        res = results[provider.name]
        if res.status == SKIPPED:
            pytest.skip(f"{provider.label}: {res.detail}")
        assert res.status == OK, f"{provider.label} on {case.label}: {res.status}: {res.detail}"
        with provider.context():
            fns = itertools.cycle([mode_fn(case, calls[provider.name], t) for t in input_sets(case, bench_cfg)])
            if bench_cfg.device.type == "cuda":
                # pytest-benchmark times on the host clock, so each call waits for the GPU (launch and sync
                # overhead included; the CLI's CUDA-event timings are the precise ones)
                import torch

                def step():
                    next(fns)()
                    torch.cuda.synchronize()
            else:

                def step():
                    next(fns)()

            benchmark.extra_info.update(
                {"case": case.label, "provider": provider.label, "bytes": bytes_model.bytes_moved(case),
                 "byte_model": bytes_model.formula(case), "check_err": res.check_err}
            )
            benchmark(step)
        median = benchmark.stats.stats.median if benchmark.stats else None
        if median:
            benchmark.extra_info["gbps"] = bytes_model.bytes_moved(case) / median / 1e9

    return run
