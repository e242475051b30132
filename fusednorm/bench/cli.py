"""``fusednorm-bench`` command line.

    fusednorm-bench                                   # default suite on this machine's device, a table
    fusednorm-bench --preset llm --csv out.csv --json out.json --plot out.png
    fusednorm-bench --op layer_norm --shape 4096x4096 --dtype bf16 --mode fwd+bwd --provider native torch
    fusednorm-bench --list                            # cases and provider availability, nothing run
    fusednorm-bench --kernels                         # register/spill report of the shipped Triton kernels

Exit status: 0 when every measured provider computed the right answer, 1 when one was FAILED (wrong result),
2 on bad arguments.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
import warnings
from collections.abc import Sequence

import torch

from fusednorm.bench import presets
from fusednorm.bench.cases import DTYPES, LAYOUTS, OP_GROUPS, OPS, Case, canonical_mode, expand_ops, parse_shape


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusednorm-bench",
        description="Benchmark fusednorm's normalization kernels against torch and installed peers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="ops: " + ", ".join([*OPS, *OP_GROUPS]) + "\ndtypes: " + ", ".join(DTYPES)
        + "\nmodes: forward (fwd), backward (bwd), forward+backward (fwd+bwd), inference (infer)"
        + "\nproviders: triton, native, torch, torch_compile, liger, apex, flash_attn, quack, reference, all",
    )
    sel = p.add_argument_group("what to run")
    sel.add_argument("--preset", default="default", choices=presets.preset_names(),
                     help="named case list (default: 'default', sized for this machine's device)")
    sel.add_argument("--op", nargs="+", metavar="OP", help="ops to run (filters the preset, or with --shape "
                     "builds cases); 'batch_norm' means batch_norm_train and batch_norm_eval")
    sel.add_argument("--shape", nargs="+", metavar="SHAPE", help="input shapes like 4096x1024 (rows) or "
                     "8x256x56x56 (maps); replaces the preset's shapes")
    sel.add_argument("--dtype", nargs="+", choices=list(DTYPES), metavar="DTYPE",
                     help="fp32, fp16, bf16, mixed (bf16 input, fp32 params)")
    sel.add_argument("--mode", nargs="+", metavar="MODE", help="forward, backward, forward+backward, inference")
    sel.add_argument("--layout", nargs="+", choices=list(LAYOUTS), metavar="LAYOUT",
                     help="contiguous or channels_last (maps only)")
    sel.add_argument("--groups", type=int, default=32, help="GroupNorm num_groups for --shape cases (32)")
    sel.add_argument("--provider", nargs="+", metavar="NAME", help="providers to measure (default: all "
                     "available contenders; torch eager is always added as the baseline)")
    sel.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:1")
    meth = p.add_argument_group("method")
    meth.add_argument("--warmup-ms", type=float, default=None, help="warm-up per provider and case (25 ms)")
    meth.add_argument("--rep-ms", type=float, default=None,
                      help="sampled time per provider and case (100 ms)")
    meth.add_argument(
        "--rounds", type=int, default=8,
        help="interleaved sampling rounds across providers (8: a shared VM's slow phases last from tens of ms to "
        "seconds, and fine interleaving spreads them over every provider)",
    )
    meth.add_argument("--no-check", action="store_true", help="skip the correctness check (not recommended)")
    meth.add_argument("--check-numel", type=int, default=None,
                      help="largest input checked in full; bigger cases are checked with fewer rows/batch")
    meth.add_argument("--no-memory", action="store_true", help="do not measure peak extra memory")
    meth.add_argument("--seed", type=int, default=0)
    meth.add_argument("--threads", type=int, default=None,
                      help="torch CPU threads (default: torch's choice; 1 gives steadier numbers on a busy machine)")
    meth.add_argument("--system-malloc", action="store_true",
                      help="CPU: leave glibc's defaults, so large outputs are page-faulted in again on every call "
                           "(by default freed memory is kept for reuse, like the CUDA caching allocator)")
    out = p.add_argument_group("output")
    out.add_argument("--csv", metavar="PATH", help="write one row per (case, provider)")
    out.add_argument("--json", metavar="PATH", help="write results plus environment (device, versions, commit)")
    out.add_argument("--md", metavar="PATH", help="write the table as Markdown")
    out.add_argument("--plot", metavar="PATH", help="write a PNG of GB/s (or speedup) vs size per provider")
    out.add_argument("--plot-metric", choices=("gbps", "speedup"), default="gbps")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    out.add_argument("--list", action="store_true", help="list the selected cases and providers; run nothing")
    out.add_argument("--kernels", action="store_true", help="print the Triton kernels' compile report and exit")
    out.add_argument("--archs", default="80,90", help="GPU archs for --kernels (default 80,90)")
    out.add_argument("--family", nargs="+", metavar="NAME",
                     help="with --kernels: only these kernel files (e.g. layer_norm group_norm)")
    return p


def select_cases(args: argparse.Namespace, device: torch.device) -> list[Case]:
    """The cases the arguments ask for (see ``--help``); raises ValueError when none match."""
    ops = expand_ops(args.op) if args.op else None
    modes = [canonical_mode(m) for m in args.mode] if args.mode else None
    if args.shape:
        shapes = [parse_shape(s) for s in args.shape]
        cases: list[Case] = []
        for shape in shapes:
            shape_ops = ops or (["layer_norm"] if len(shape) == 2 else ["group_norm"])
            for op, dtype, mode, layout in itertools.product(
                shape_ops, args.dtype or ["fp32"], modes or ["forward"], args.layout or ["contiguous"]
            ):
                cases.append(Case(op, shape, dtype, mode, layout, args.groups))
        return cases
    cases = presets.preset(args.preset, device)
    if ops:
        cases = [c for c in cases if c.op in ops]
    if args.dtype:
        cases = [c for c in cases if c.dtype in args.dtype]
    if modes:
        cases = [c for c in cases if c.mode in modes]
    if args.layout:
        cases = [c for c in cases if c.layout in args.layout]
    if not cases:
        raise ValueError(f"no case of preset {args.preset!r} matches the filters; pass --shape to build one")
    return cases


def select_providers(args: argparse.Namespace) -> list:
    from fusednorm.bench.providers import BASELINE, PROVIDERS, get_providers

    chosen = get_providers(args.provider)
    if PROVIDERS[BASELINE] not in chosen:  # speedups need the baseline in the same run
        chosen.append(PROVIDERS[BASELINE])
    return chosen


def _kernels(args: argparse.Namespace) -> int:
    from fusednorm.bench.report import print_kernels

    try:
        archs = tuple(int(a) for a in args.archs.replace(" ", "").split(",") if a)
    except ValueError:
        print(f"fusednorm-bench: bad --archs {args.archs!r}; expected e.g. 80,90", file=sys.stderr)
        return 2
    try:
        from fusednorm.backends.triton.codegen import compile_report
    except ImportError as exc:
        print(
            "fusednorm-bench --kernels: the Triton compile report is not available in this build "
            f"(fusednorm.backends.triton.codegen.compile_report could not be imported: {exc}).",
            file=sys.stderr,
        )
        return 1
    kwargs = {"families": tuple(args.family)} if args.family else {}
    rows = compile_report(archs=archs, **kwargs)
    print_kernels(rows)
    return 0 if rows and all(r.get("ok") and not r.get("spill_bytes") and not r.get("spills") for r in rows) else 1


def _print_list(cases: Sequence[Case], providers: Sequence, device: torch.device) -> None:
    from fusednorm.bench.report import wide_console

    console = wide_console()
    console.print(f"{len(cases)} cases on {device.type}:", style="bold")
    for c in cases:
        console.print(f"  {c.label}", highlight=False)
    console.print("providers:", style="bold")
    for p in providers:
        why = p.unavailable(device)
        console.print(f"  {p.name:14s} {p.label}: " + ("available" if why is None else f"skipped: {why}"),
                      highlight=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fusednorm-bench`` / ``python -m fusednorm.bench``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.kernels:
        return _kernels(args)
    try:
        from fusednorm.bench.timing import resolve_device

        device = resolve_device(args.device)
        cases = select_cases(args, device)
        providers = select_providers(args)
    except ValueError as exc:
        parser.print_usage(sys.stderr)
        print(f"fusednorm-bench: error: {exc}", file=sys.stderr)
        return 2
    if args.list:
        _print_list(cases, providers, device)
        return 0
    return run(args, cases, providers, device)


def run(args: argparse.Namespace, cases: Sequence[Case], providers: Sequence, device: torch.device) -> int:
    """Measure ``cases`` x ``providers``, print the report, write the requested files."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fusednorm.bench import report
    from fusednorm.bench.runner import FAILED, RunConfig, run_case
    from fusednorm.bench.timing import Timer, cache_bytes, copy_bandwidth, keep_freed_cpu_memory, warm_up_device

    # torch warns once per mixed-dtype call that it cannot use its fused path; that is the case being measured
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
    console = report.wide_console()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    cpu = device.type == "cpu"
    allocator = None
    if cpu:
        allocator = "system default (large blocks unmapped on free)"
        if not args.system_malloc:
            allocator = keep_freed_cpu_memory() or allocator
    timer = Timer(
        device,
        warmup_ms=args.warmup_ms if args.warmup_ms is not None else 25.0,
        rep_ms=args.rep_ms if args.rep_ms is not None else 100.0,
    )
    warm_up_device(device)
    copy_gbps, copy_bytes = copy_bandwidth(device, timer)
    cfg = RunConfig(
        device=device, timer=timer, copy_gbps=copy_gbps, check=not args.no_check,
        check_numel=args.check_numel or (2**22 if cpu else 2**26), memory=not args.no_memory,
        rounds=args.rounds, seed=args.seed, rotate_budget_bytes=2**30 if cpu else 4 * 2**30,
    )
    results = []
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[case]}"), console=console, disable=args.quiet, transient=True,
    ) as progress:
        task = progress.add_task("benchmarking", total=len(cases), case="")
        # a log (CI, a file) gets one line per case instead of a live bar
        log_lines = not args.quiet and not console.is_terminal
        for i, case in enumerate(cases):
            progress.update(task, case=case.label)
            if log_lines:
                print(f"[{i + 1}/{len(cases)} {time.perf_counter() - t_start:6.0f} s] {case.label}",
                      file=sys.stderr, flush=True)
            results.extend(run_case(case, providers, cfg))
            progress.advance(task)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    env = report.environment(device, copy_gbps, copy_bytes, large_bytes=2 * cache_bytes(device))
    env["cpu_allocator"] = allocator
    env["wall_s"] = round(time.perf_counter() - t_start, 1)
    report.print_report(results, env, console)
    if args.csv:
        report.write_csv(args.csv, results, env)
    if args.json:
        report.write_json(args.json, results, env)
    if args.md:
        report.write_markdown(args.md, results, env)
    if args.plot and not report.write_plot(args.plot, results, env, args.plot_metric):
        console.print("no timed result to plot; --plot file not written", style="yellow")
    console.print(f"{len(cases)} cases, wall time {env['wall_s']:.0f} s", style="dim", highlight=False)
    n_failed = sum(1 for r in results if r.status == FAILED)
    if n_failed:
        console.print(f"{n_failed} provider result(s) FAILED the correctness check", style="bold red")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
