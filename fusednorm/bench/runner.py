"""Run one case across providers: check correctness first, then time the providers that were right.

Per case:

1. Skip providers that cannot run here or cannot run this op (reason recorded).
2. Correctness: build inputs (at a reduced leading dim for huge shapes), compute a float64 torch-eager
   reference, run each provider once on a fresh copy, and compare every output (forward outputs; input,
   weight and bias gradients in backward modes; BatchNorm's running statistics). The scaled error of a
   tensor is ``max|out - ref| / max(max|ref|, 1e-6)``; a provider passes when, for every tensor, its error
   is at most ``2 x`` torch eager's own error at the same dtype plus a small dtype-dependent term (plus the
   op's ``check_slack`` for tensors that are ill-conditioned by construction), and its output dtypes equal
   torch's. A provider that fails is FAILED and not timed; one that raises is 'error'.
3. Timing: the same input sets for every provider (rotated when one set fits in the last-level cache),
   warm-up per provider, then ``rounds`` interleaved rounds of samples (provider A, B, C, A, B, C, ...) so
   slow drifts on a shared machine hit every provider alike. Then peak extra memory of one call.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from fusednorm.bench import bytes_model
from fusednorm.bench.cases import GRAD_MODES, Case, Inputs, TorchOps, cast_inputs, clone_inputs
from fusednorm.bench.providers import BASELINE, Call, Provider
from fusednorm.bench.timing import Timer, Timing, cache_bytes, peak_extra_memory, rotation_count, summarize

#: the dtype-dependent slack added to 2x torch's error (scaled errors, see the module doc)
CHECK_ATOL = {"fp32": 1e-5, "fp16": 1e-3, "bf16": 8e-3, "mixed": 8e-3}

OK, FAILED, ERROR, SKIPPED = "ok", "FAILED", "error", "skipped"


@dataclasses.dataclass
class Result:
    """One (case, provider) outcome. Times in seconds; memory in bytes; None where not measured."""

    case: Case
    provider: str
    label: str
    status: str
    detail: str = ""
    timing: Timing | None = None
    bytes: int = 0
    gbps: float | None = None
    pct_copy: float | None = None
    speedup: float | None = None
    #: per sampling round, the median call time (rounds interleave the providers, so round i of every provider
    #: ran at about the same time) and, against the baseline's round i, the lowest and highest speedup
    round_medians: list[float] | None = None
    speedup_rounds: tuple[float, float] | None = None
    peak_mem: int | None = None
    check_err: float | None = None
    check_tol: float | None = None
    check_shape: tuple[int, ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        """Flat, JSON/CSV-friendly view."""
        c, t = self.case, self.timing
        return {
            "op": c.op,
            "shape": "x".join(map(str, c.shape)),
            "dtype": c.dtype,
            "mode": c.mode,
            "layout": c.layout,
            "groups": c.groups if c.op.startswith("group_norm") else None,
            "numel": c.numel,
            "provider": self.provider,
            "provider_label": self.label,
            "status": self.status,
            "detail": self.detail,
            "median_ms": t.median * 1e3 if t else None,
            "p25_ms": t.p25 * 1e3 if t else None,
            "p75_ms": t.p75 * 1e3 if t else None,
            "min_ms": t.minimum * 1e3 if t else None,
            "reps": t.reps if t else None,
            "spread": t.spread if t else None,
            "bytes": self.bytes,
            "byte_model": bytes_model.formula(c),
            "gbps": self.gbps,
            "pct_copy": self.pct_copy,
            "speedup_vs_torch": self.speedup,
            "speedup_round_min": self.speedup_rounds[0] if self.speedup_rounds else None,
            "speedup_round_max": self.speedup_rounds[1] if self.speedup_rounds else None,
            "peak_mem_bytes": self.peak_mem,
            "check_err": self.check_err,
            "check_tol": self.check_tol,
            "check_shape": "x".join(map(str, self.check_shape)) if self.check_shape else None,
        }


@dataclasses.dataclass
class RunConfig:
    """Knobs of a run (the CLI fills these)."""

    device: torch.device
    timer: Timer
    copy_gbps: float | None = None
    check: bool = True
    check_numel: int = 2**22
    memory: bool = True
    rounds: int = 8
    seed: int = 0
    rotate_budget_bytes: int = 2**30


# ---- running a provider in a mode ----------------------------------------------------------------------


def _as_list(out: Any) -> list[Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def mode_fn(case: Case, call: Call, t: Inputs) -> Callable[[], Any]:
    """The zero-argument function timed for ``case.mode`` on inputs ``t``.

    backward runs the forward once here, outside the timed function, and keeps its graph.
    """
    grads = [t[n] for n in case.spec.grads]
    if case.mode == "inference":

        def infer() -> Any:
            with torch.no_grad():
                return call(t)

        return infer
    if case.mode == "forward":
        return lambda: call(t)
    if case.mode == "forward+backward":
        return lambda: torch.autograd.grad(_as_list(call(t)), grads, t["dy"])
    outs = _as_list(call(t))
    return lambda: torch.autograd.grad(outs, grads, t["dy"], retain_graph=True)


def collect(case: Case, call: Call, t: Inputs) -> dict[str, Tensor]:
    """Run ``case`` once on ``t``; every tensor that must match the reference, by name."""
    spec = case.spec
    if case.mode in GRAD_MODES:
        outs = _as_list(call(t))
        grads = torch.autograd.grad(outs, [t[n] for n in spec.grads], t["dy"], allow_unused=True)
    elif case.mode == "forward":  # autograd records, as in the timed forward (the op may save statistics)
        outs = _as_list(call(t))
        grads = ()
    else:
        with torch.no_grad():
            outs = _as_list(call(t))
        grads = ()
    result = {f"out{i}" if i else "y": o.detach() for i, o in enumerate(outs)}
    for name, g in zip(spec.grads, grads, strict=False):
        result[f"d{name}"] = g
    for name in spec.state:
        result[name] = t[name].detach()
    return result


def scaled_error(out: Tensor | None, ref: Tensor) -> float:
    """max|out - ref| / max(max|ref|, 1e-6) in float64 over ref's finite elements; inf on a missing tensor, a
    wrong shape, or a NaN/inf pattern that differs from the reference's."""
    if out is None or tuple(out.shape) != tuple(ref.shape):
        return math.inf
    if ref.numel() == 0:
        return 0.0
    a = out.detach().to(torch.float64)
    finite = torch.isfinite(ref)
    if bool((torch.isfinite(a) != finite).any()):  # a NaN/inf where torch has none, or the reverse
        return math.inf
    if not bool(finite.any()):
        return 0.0
    scale = max(float(ref[finite].abs().max()), 1e-6)
    return float((a[finite] - ref[finite]).abs().max()) / scale


def compare(
    outs: dict[str, Tensor], ref: dict[str, Tensor], baseline: dict[str, float] | None,
    dtypes: dict[str, torch.dtype] | None, atol: float, slack: dict[str, float] | None = None,
) -> tuple[bool, float, float, str]:
    """Check ``outs`` against ``ref``: (passed, worst error, its tolerance, what failed). ``slack``: extra
    tolerance per tensor name (``OpSpec.check_slack``)."""
    worst_err, worst_tol, why = 0.0, atol, ""
    passed = True
    for name, r in ref.items():
        o = outs.get(name)
        if dtypes is not None and o is not None and name in dtypes and o.dtype != dtypes[name]:
            return False, math.inf, atol, f"{name} dtype {o.dtype} differs from torch's {dtypes[name]}"
        err = scaled_error(o, r)
        tol = 2 * (baseline or {}).get(name, 0.0) + atol + (slack or {}).get(name, 0.0)
        if err > tol and passed:
            passed = False
            why = f"{name}: scaled error {err:.3g} > tolerance {tol:.3g}"
        if err / tol >= worst_err / worst_tol:
            worst_err, worst_tol = err, tol
    return passed, worst_err, worst_tol, why


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _is_unsupported(exc: BaseException) -> bool:
    """A forced fusednorm backend that does not implement an op is 'skipped', not an error."""
    return type(exc).__name__ == "BackendUnavailableError"


# ---- one case ------------------------------------------------------------------------------------------


def _prepare(
    case: Case, providers: Sequence[Provider], cfg: RunConfig, results: dict[str, Result], nbytes: int
) -> tuple[list[Provider], dict[str, Call]]:
    """Skip what cannot run; build each remaining provider's call (torch.compile compiles here)."""
    active: list[Provider] = []
    for p in providers:
        reason = p.unavailable(cfg.device) or p.unsupported(case)
        if reason:
            results[p.name] = Result(case, p.name, p.label, SKIPPED, reason, bytes=nbytes)
        else:
            active.append(p)
    calls: dict[str, Call] = {}
    for p in active:
        try:
            with p.context():
                calls[p.name] = p.make_call(case)
        except Exception as exc:  # noqa: BLE001 - reported per provider
            results[p.name] = Result(case, p.name, p.label, ERROR, _short(exc), bytes=nbytes)
    return [p for p in active if p.name in calls], calls


def check_case(case: Case, providers: Sequence[Provider], cfg: RunConfig) -> tuple[dict[str, Result], dict[str, Call]]:
    """Correctness only (step 2 of the module doc): a Result per provider with status ok, FAILED, error or
    skipped (never timed), and the built call of each provider that passed."""
    results: dict[str, Result] = {}
    nbytes = bytes_model.bytes_moved(case)
    active, calls = _prepare(case, providers, cfg, results, nbytes)
    checks: dict[str, tuple[float, float, tuple[int, ...]]] = {}
    survivors = _check(case, active, calls, cfg, results, checks, nbytes) if active else []
    for p in survivors:
        results[p.name] = Result(case, p.name, p.label, OK, bytes=nbytes)
    for name, (err, tol, shape) in checks.items():
        results[name].check_err, results[name].check_tol, results[name].check_shape = err, tol, shape
    return results, {p.name: calls[p.name] for p in survivors}


def input_sets(case: Case, cfg: RunConfig) -> list[Inputs]:
    """The timing inputs: one set, or several copies to rotate through when one set fits in the cache."""
    spec = case.spec
    grad = case.mode != "inference"
    first = spec.build(case, cfg.device, seed=cfg.seed + 1, requires_grad=grad)
    set_bytes = sum(_nbytes(v) for k, v in first.items() if k != "case")
    k = rotation_count(set_bytes, cache_bytes(cfg.device), budget_bytes=cfg.rotate_budget_bytes)
    return [first] + [spec.build(case, cfg.device, seed=cfg.seed + 1 + i, requires_grad=grad) for i in range(1, k)]


def run_case(case: Case, providers: Sequence[Provider], cfg: RunConfig) -> list[Result]:
    """Check and time ``case`` for every provider; one Result per provider, in ``providers`` order."""
    results: dict[str, Result] = {}
    nbytes = bytes_model.bytes_moved(case)
    active, calls = _prepare(case, providers, cfg, results, nbytes)

    checks: dict[str, tuple[float, float, tuple[int, ...]]] = {}
    if cfg.check and active:
        active = _check(case, active, calls, cfg, results, checks, nbytes)

    if active:
        _time(case, active, calls, cfg, results, nbytes)
    for name, (err, tol, shape) in checks.items():
        r = results.get(name)
        if r is not None:
            r.check_err, r.check_tol, r.check_shape = err, tol, shape

    base = results.get(BASELINE)
    for r in results.values():
        if r.status == OK and r.timing is not None:
            r.gbps = nbytes / r.timing.median / 1e9
            if cfg.copy_gbps:
                r.pct_copy = 100.0 * r.gbps / cfg.copy_gbps
            if base is not None and base.status == OK and base.timing is not None:
                r.speedup = base.timing.median / r.timing.median
                r.speedup_rounds = round_speedups(base.round_medians, r.round_medians)
    return [results[p.name] for p in providers]


def _check(
    case: Case, active: list[Provider], calls: dict[str, Call], cfg: RunConfig, results: dict[str, Result],
    checks: dict[str, tuple[float, float, tuple[int, ...]]], nbytes: int,
) -> list[Provider]:
    """Correctness of each active provider against the float64 torch-eager reference; returns survivors."""
    ccase = case.scaled_down(cfg.check_numel)
    grad = case.mode != "inference"
    spec = case.spec
    inputs = spec.build(ccase, cfg.device, seed=cfg.seed, requires_grad=grad)
    ref64 = collect(ccase, lambda t: spec.call(TorchOps, t), cast_inputs(inputs, torch.float64, grad))
    # torch eager at the case's dtype: the error budget other providers are held to
    baseline: dict[str, float] | None = None
    torch_dtypes: dict[str, torch.dtype] | None = None
    try:
        eager = collect(ccase, lambda t: spec.call(TorchOps, t), clone_inputs(inputs, grad))
        baseline = {k: scaled_error(eager.get(k), r) for k, r in ref64.items()}
        torch_dtypes = {k: v.dtype for k, v in eager.items()}
        del eager
    except Exception:  # noqa: BLE001 - torch itself cannot run this case; the torch provider reports it
        pass
    atol = CHECK_ATOL[case.dtype]
    survivors = []
    for p in active:
        try:
            with p.context():
                outs = collect(ccase, calls[p.name], clone_inputs(inputs, grad))
        except Exception as exc:  # noqa: BLE001 - reported per provider
            status = SKIPPED if _is_unsupported(exc) else ERROR
            results[p.name] = Result(case, p.name, p.label, status, _short(exc), bytes=nbytes)
            if status == ERROR and _debug():
                traceback.print_exc()
            continue
        passed, err, tol, why = compare(outs, ref64, baseline, torch_dtypes, atol, spec.check_slack)
        checks[p.name] = (err, tol, ccase.shape)
        if passed:
            survivors.append(p)
        else:
            results[p.name] = Result(case, p.name, p.label, FAILED, f"wrong result: {why}", bytes=nbytes)
    return survivors


def _time(
    case: Case, active: list[Provider], calls: dict[str, Call], cfg: RunConfig, results: dict[str, Result],
    nbytes: int,
) -> None:
    sets = input_sets(case, cfg)
    k = len(sets)
    fns: dict[str, list[Callable[[], Any]]] = {}
    reps: dict[str, int] = {}
    samples: dict[str, list[float]] = {}
    round_medians: dict[str, list[float]] = {}
    for p in active:
        try:
            with p.context():
                fns[p.name] = [mode_fn(case, calls[p.name], _own_state(case, t)) for t in sets]
                est = cfg.timer.warmup(fns[p.name])
            reps[p.name] = cfg.timer.reps_for(est)
            samples[p.name] = []
            round_medians[p.name] = []
        except Exception as exc:  # noqa: BLE001
            status = SKIPPED if _is_unsupported(exc) else ERROR
            results[p.name] = Result(case, p.name, p.label, status, _short(exc), bytes=nbytes)
            fns.pop(p.name, None)
    rounds = max(1, cfg.rounds)
    for r in range(rounds):
        for p in active:
            if p.name not in fns:
                continue
            n = max(1, reps[p.name] // rounds + (1 if r < reps[p.name] % rounds else 0))
            try:
                with p.context():
                    got = cfg.timer.samples(fns[p.name], n)
                samples[p.name].extend(got)
                round_medians[p.name].append(statistics.median(got))
            except Exception as exc:  # noqa: BLE001
                results[p.name] = Result(case, p.name, p.label, ERROR, _short(exc), bytes=nbytes)
                fns.pop(p.name, None)
    for p in active:
        if p.name not in fns:
            continue
        res = Result(case, p.name, p.label, OK, bytes=nbytes, timing=summarize(samples[p.name]),
                     round_medians=round_medians[p.name])
        if k > 1:
            res.detail = f"inputs rotated over {k} copies"
        if cfg.memory:
            with p.context():
                res.peak_mem = peak_extra_memory(fns[p.name][0], cfg.device)
        results[p.name] = res
    del fns, sets


def round_speedups(base: list[float] | None, mine: list[float] | None) -> tuple[float, float] | None:
    """Lowest and highest baseline / provider ratio of per-round medians (rounds both have), or None.

    The spread says how far the headline ratio (of the medians over all rounds) moves with the machine's slow
    and fast phases: a case under 1.0x whose rounds reach above 1.0 is at parity within this run's noise."""
    if not base or not mine:
        return None
    ratios = [b / m for b, m in zip(base, mine, strict=False) if m > 0]
    return (min(ratios), max(ratios)) if ratios else None


def _own_state(case: Case, t: Inputs) -> Inputs:
    """``t`` with private copies of the buffers the op mutates (BatchNorm running stats): the activations are
    shared by every provider, but one provider's in-place update must not invalidate another's saved graph."""
    if not case.spec.state:
        return t
    return {**t, **{name: t[name].clone() for name in case.spec.state}}


def _nbytes(v: Any) -> int:
    if isinstance(v, Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (list, tuple)):
        return sum(_nbytes(x) for x in v)
    return 0


def _debug() -> bool:
    return os.environ.get("FUSEDNORM_BENCH_DEBUG", "0") == "1"
