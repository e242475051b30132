"""SyncBatchNorm over torch.distributed (gloo on CPU): 2 and 3 spawned ranks with uneven batches, one of them
empty, must give the outputs, gradients and running statistics of one process on the concatenated batch; a
short DDP run must match single-process training. Plus conversion and the non-distributed fallback."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from oracle import assert_close

import fusednorm

pytestmark = pytest.mark.distributed

CL = torch.channels_last


def _fast_backend() -> str:
    return "native" if fusednorm.available_backends()["native"].available else "reference"


# ---- shared between the workers and the single-process reference -------------------------------------------


def _batches(sizes, rest, steps, seed):
    """Global (x, dy) per step, same on every process: per-channel offsets and scales."""
    g = torch.Generator().manual_seed(seed)
    c = rest[0]
    view = (1, c) + (1,) * (len(rest) - 1)
    out = []
    for _ in range(steps):
        scale = (torch.rand(c, generator=g) * 2 + 0.5).reshape(view)
        offset = (torch.randn(c, generator=g) * 3).reshape(view)
        x = torch.randn(sum(sizes), *rest, generator=g) * scale + offset
        out.append((x, torch.randn(x.shape, generator=g)))
    return out


def _init_bn(bn, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(bn.num_features, generator=g) + 1)
        bn.bias.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)


def _ddp_model():
    torch.manual_seed(11)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 5, 1), torch.nn.BatchNorm2d(5, momentum=None))


# (name, backend kind, per-rank batch sizes by world size, per-sample shape, memory format, momentum)
SCENARIOS = [
    ("nchw", "fast", {2: [4, 7], 3: [3, 0, 5]}, (3, 4, 5), None, 0.1),
    ("cl-empty-rank", "fast", {2: [0, 6], 3: [2, 5, 0]}, (5, 3, 3), CL, None),
    ("1d", "fast", {2: [5, 2], 3: [1, 1, 4]}, (6,), None, 0.3),
    ("triton-small", "triton", {2: [2, 3], 3: [1, 0, 2]}, (3, 2, 3), None, 0.1),
]
STEPS = 2
DDP_SIZES = {2: [3, 5], 3: [2, 0, 4]}
DDP_STEPS = 3


def _slice(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


# ---- worker ------------------------------------------------------------------------------------------------


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    calls = {"all_gather": 0, "all_reduce": 0}
    for name in calls:
        real = getattr(dist, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        setattr(dist, name, counted)
    try:
        results = {}
        for name, kind, sizes_by_world, rest, fmt, momentum in SCENARIOS:
            sizes = sizes_by_world[world]
            backend = _fast_backend() if kind == "fast" else kind
            bn = fusednorm.SyncBatchNorm(rest[0], momentum=momentum)
            _init_bn(bn, seed=5)
            steps = []
            for x_full, dy_full in _batches(sizes, rest, STEPS, seed=17):
                x = _slice(x_full, sizes, rank).clone()
                if fmt is not None:
                    x = x.contiguous(memory_format=fmt)
                x.requires_grad_()
                before = dict(calls)
                with fusednorm.use_backend(backend):
                    y = bn(x)
                    fwd_calls = {k: calls[k] - before[k] for k in calls}
                    y.backward(_slice(dy_full, sizes, rank))
                bwd_calls = {k: calls[k] - before[k] - fwd_calls[k] for k in calls}
                steps.append({"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad.clone(),
                              "db": bn.bias.grad.clone(), "fwd_calls": fwd_calls, "bwd_calls": bwd_calls,
                              "channels_last": fmt is None or x.numel() == 0 or y.is_contiguous(memory_format=fmt)})
                bn.zero_grad()
            bn.eval()
            x_eval = _slice(_batches(sizes, rest, 1, seed=99)[0][0], sizes, rank)
            before = dict(calls)
            with fusednorm.use_backend(backend):
                y_eval = bn(x_eval)
            results[name] = {"steps": steps, "eval": y_eval.detach(),
                             "eval_calls": {k: calls[k] - before[k] for k in calls},
                             "buffers": {k: v.clone() for k, v in bn.state_dict().items()}}
        results["ddp"] = _ddp_worker(rank, world)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


class _CpuDDP(torch.nn.parallel.DistributedDataParallel):
    """DDP without its CPU guard against SyncBatchNorm, which exists because torch's own SyncBatchNorm kernels
    are GPU-only; fusednorm's run on CPU with gloo. Everything else is DDP as shipped."""

    def _passing_sync_batchnorm_handle(self, module):
        pass


def _ddp_worker(rank, world):
    sizes = DDP_SIZES[world]
    total = sum(sizes)
    model = fusednorm.SyncBatchNorm.convert_sync_batchnorm(_ddp_model())
    assert isinstance(model[1], fusednorm.SyncBatchNorm) and isinstance(model[4], fusednorm.SyncBatchNorm)
    ddp = _CpuDDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    losses = []
    for x_full, _ in _batches(sizes, (3, 6, 7), DDP_STEPS, seed=23):
        with fusednorm.use_backend(_fast_backend()):
            out = ddp(_slice(x_full, sizes, rank))
        # DDP averages gradients over ranks: scale so the average is the gradient of the global mean loss
        loss = out.square().sum() * world / (total * 5 * 4 * 5)  # out: (n, 5, 4, 5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "losses": losses}


# ---- single-process reference ------------------------------------------------------------------------------


def _reference(rest, sizes, momentum, dtype):
    cls = {1: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm2d, 4: torch.nn.BatchNorm3d}[len(rest)]
    bn = cls(rest[0], momentum=momentum)
    _init_bn(bn, seed=5)
    bn = bn.to(dtype)
    steps = []
    for x, dy in _batches(sizes, rest, STEPS, seed=17):
        x = x.to(dtype).requires_grad_()
        y = bn(x)
        y.backward(dy.to(dtype))
        steps.append({"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad.clone(), "db": bn.bias.grad.clone()})
        bn.zero_grad()
    bn.eval()
    y_eval = bn(_batches(sizes, rest, 1, seed=99)[0][0].to(dtype))
    return {"steps": steps, "eval": y_eval.detach(), "buffers": bn.state_dict()}


def _run_world(world, tmp_path):
    init_file = tmp_path / "store"
    mp.spawn(_worker, args=(world, str(init_file), str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def world_results(request, tmp_path_factory):
    world = request.param
    return world, _run_world(world, tmp_path_factory.mktemp(f"sync{world}"))


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s[0])
def test_sync_matches_single_process_on_concatenated_batch(world_results, scenario):
    world, ranks = world_results
    name, _, sizes_by_world, rest, _, momentum = scenario
    sizes = sizes_by_world[world]
    ref = _reference(rest, sizes, momentum, torch.float64)
    tref = _reference(rest, sizes, momentum, torch.float32)
    for step in range(STEPS):
        got = [r[name]["steps"][step] for r in ranks]
        for key in ("y", "dx"):
            assert_close(torch.cat([g[key] for g in got]), ref["steps"][step][key], tref["steps"][step][key],
                         f"{name} step {step} {key}")
        for key in ("dw", "db"):  # each rank's gradient is local; DDP sums/averages them
            total = torch.stack([g[key] for g in got]).sum(0)
            assert_close(total, ref["steps"][step][key], tref["steps"][step][key], f"{name} step {step} {key}")
        for g in got:
            assert g["fwd_calls"] == {"all_gather": 1, "all_reduce": 0}, g["fwd_calls"]
            assert g["bwd_calls"] == {"all_gather": 0, "all_reduce": 1}, g["bwd_calls"]
            assert g["channels_last"]
    for r in ranks:
        assert r[name]["eval_calls"] == {"all_gather": 0, "all_reduce": 0}
        for key, value in r[name]["buffers"].items():
            if key == "num_batches_tracked":
                assert torch.equal(value, ref["buffers"][key])
            else:
                assert_close(value, ref["buffers"][key], tref["buffers"][key], f"{name} {key}")
    assert_close(torch.cat([r[name]["eval"] for r in ranks]), ref["eval"], tref["eval"], f"{name} eval")


def test_ddp_training_matches_single_process(world_results):
    world, ranks = world_results
    sizes = DDP_SIZES[world]
    model = _ddp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, _ in _batches(sizes, (3, 6, 7), DDP_STEPS, seed=23):
        out = model(x)
        loss = out.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for r in ranks:
        for key, value in model.state_dict().items():
            torch.testing.assert_close(r["ddp"]["state"][key], value, atol=2e-5, rtol=1e-4, msg=key)
    final = float(loss.detach())
    assert abs(float(sum(r["ddp"]["losses"][-1] for r in ranks)) / world - final) < 1e-4 * final


# ---- without a process group -------------------------------------------------------------------------------


def test_falls_back_to_local_statistics_when_not_distributed():
    assert not dist.is_initialized()
    ours, theirs = fusednorm.SyncBatchNorm(3), torch.nn.BatchNorm2d(3)
    _init_bn(theirs, seed=1)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for _ in range(2):
        x = torch.randn(4, 3, 2, 5) * 2 + 1
        torch.testing.assert_close(ours(x), theirs(x))
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value)


def test_world_size_one_group_uses_local_statistics(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ours, theirs = fusednorm.SyncBatchNorm(3, momentum=None), torch.nn.BatchNorm2d(3, momentum=None)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        x = torch.randn(4, 3, 2, 5) * 2 + 1
        torch.testing.assert_close(ours(x), theirs(x))
        torch.testing.assert_close(ours.running_var, theirs.running_var)
    finally:
        dist.destroy_process_group()


def test_convert_sync_batchnorm():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4),
                                torch.nn.Sequential(fusednorm.BatchNorm1d(6, affine=False), torch.nn.ReLU()),
                                torch.nn.SyncBatchNorm(2, momentum=None, track_running_stats=False))
    model[1].running_mean.normal_()
    model.eval()
    weight = model[1].weight
    converted = fusednorm.SyncBatchNorm.convert_sync_batchnorm(model, process_group=None)
    assert converted is model
    for m in (converted[1], converted[2][0], converted[3]):
        assert type(m) is fusednorm.SyncBatchNorm
        assert not m.training
    assert converted[1].weight is weight and torch.equal(converted[1].running_mean, model[1].running_mean)
    assert converted[2][0].weight is None and converted[3].momentum is None
    assert converted[3].running_mean is None
    single = fusednorm.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm3d(5, eps=1e-3))
    assert type(single) is fusednorm.SyncBatchNorm and single.eps == 1e-3
