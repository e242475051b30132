"""Reporting: the environment record, the terminal table (rich), CSV, JSON, Markdown and the plot.

Every file output carries the environment (device, CPU model, torch/triton versions, git commit, copy
bandwidth) so a number can always be traced to the machine and the code that produced it.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from fusednorm.bench.providers import BASELINE
from fusednorm.bench.runner import ERROR, FAILED, OK, SKIPPED, Result

# ---- environment ---------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (falls back to ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> tuple[str | None, bool | None]:
    """(HEAD commit, whether tracked files differ from it) of the checkout fusednorm runs from, if any."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        return head or None, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return None, None


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


#: environment variables that change what a run measures (backend choice, CPU kernel copy, streaming stores, threads)
ENV_PREFIXES = ("FUSEDNORM_", "TRITON_", "OMP_", "MKL_", "CUDA_VISIBLE_DEVICES")


def environment(
    device: torch.device, copy_gbps: float | None = None, copy_bytes: int | None = None,
    large_bytes: int | None = None,
) -> dict:
    """Everything needed to interpret the numbers of this run. ``large_bytes``: from how many bytes moved a case
    counts as large in the summary (twice the last-level cache: its data cannot stay cached between calls)."""
    commit, dirty = git_commit()
    env: dict[str, Any] = {
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "fusednorm": _version("fusednorm"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "git_dirty": dirty,
        "load_average": _loadavg(),
        "copy_gbps": copy_gbps,
        "copy_bytes": copy_bytes,
        "command": " ".join(["fusednorm-bench", *sys.argv[1:]]),
        "env_vars": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
        "large_bytes": large_bytes,
    }
    try:
        import fusednorm

        env["backends"] = {k: {"available": v.available, "detail": v.detail}
                           for k, v in fusednorm.available_backends().items()}
    except Exception as exc:  # noqa: BLE001 - the record says why
        env["backends"] = f"unavailable: {type(exc).__name__}: {exc}"
    return env


def wide_console() -> Any:
    """A rich console; when output is not a terminal (a file, a pipe, CI) it is 160 columns wide so the
    table is not squeezed to the 80-column default."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    return console


# ---- formatting ----------------------------------------------------------------------------------------


def fmt_time(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, fmt)


def case_key(r: Result) -> str:
    return r.case.label


def grouped(results: Sequence[Result]) -> OrderedDict[str, list[Result]]:
    """Results grouped by case, in run order."""
    out: OrderedDict[str, list[Result]] = OrderedDict()
    for r in results:
        out.setdefault(case_key(r), []).append(r)
    return out


def skip_summary(results: Sequence[Result]) -> list[tuple[str, str, int]]:
    """(provider label, reason, number of cases) for every skipped combination, most frequent first."""
    counts: OrderedDict[tuple[str, str], int] = OrderedDict()
    for r in results:
        if r.status == SKIPPED:
            counts[(r.label, r.detail)] = counts.get((r.label, r.detail), 0) + 1
    return [(label, why, n) for (label, why), n in counts.items()]


def table_rows(results: Sequence[Result]) -> list[list[str]]:
    """The rows of the terminal/markdown table (skipped results are summarized separately)."""
    rows = []
    for label, group in grouped(results).items():
        first = True
        for r in group:
            if r.status == SKIPPED:
                continue
            t = r.timing
            status = r.status if r.status != OK else "ok"
            rows.append([
                label if first else "",
                r.label,
                fmt_time(t.median) if t else "-",
                f"{100 * t.spread:.0f}%" if t and math.isfinite(t.spread) else "-",
                _num(r.gbps, ".1f"),
                _num(r.pct_copy, ".0f"),
                (_num(r.speedup, ".2f") + "x") if r.speedup is not None else "-",
                fmt_bytes(r.peak_mem) if r.status == OK else "-",
                status,
            ])
            first = False
    return rows


def provider_summaries(results: Sequence[Result], env: dict) -> list[dict[str, Any]]:
    """Per provider other than the baseline, over its timed cases: the geometric-mean speedup over torch eager,
    the cases slower than torch (with the lowest / highest per-round ratio, which shows whether a loss is
    outside this run's noise), and the large cases (``env["large_bytes"]`` or more moved) as % of copy."""
    by_provider: OrderedDict[str, list[Result]] = OrderedDict()
    for r in results:
        if r.status == OK and r.speedup is not None and r.provider != BASELINE:
            by_provider.setdefault(r.label, []).append(r)
    out = []
    large_bytes = env.get("large_bytes")
    for label, rs in by_provider.items():
        large = [r for r in rs if large_bytes and r.bytes >= large_bytes and r.pct_copy is not None]
        out.append({
            "provider": label,
            "cases": len(rs),
            "geomean_speedup": math.exp(sum(math.log(r.speedup) for r in rs) / len(rs)),
            "slower": [
                {"case": r.case.label, "speedup": r.speedup,
                 "round_min": r.speedup_rounds[0] if r.speedup_rounds else None,
                 "round_max": r.speedup_rounds[1] if r.speedup_rounds else None}
                for r in rs if r.speedup < 1.0
            ],
            "large_cases": len(large),
            "large_under_60pct_copy": sum(1 for r in large if r.pct_copy < 60.0),
            "large_pct_copy_min": min((r.pct_copy for r in large), default=None),
            "large_pct_copy_max": max((r.pct_copy for r in large), default=None),
        })
    return out


def summary_lines(results: Sequence[Result], env: dict) -> list[str]:
    """The summary as text lines (terminal and Markdown)."""
    lines = []
    for s in provider_summaries(results, env):
        slower = s["slower"]
        lines.append(f"{s['provider']}: {s['geomean_speedup']:.2f}x geometric mean over torch eager, "
                     f"{s['cases']} cases, {len(slower)} slower than torch")
        # the slower cases of fusednorm's own providers one by one (peers and torch.compile: the count)
        for c in slower if s["provider"].startswith("fusednorm") else ():
            spread = (f" (per round {c['round_min']:.2f}-{c['round_max']:.2f}x)"
                      if c["round_min"] is not None else "")
            lines.append(f"  slower: {c['case']} {c['speedup']:.2f}x{spread}")
        if s["large_cases"]:
            lines.append(f"  large cases ({fmt_bytes(env.get('large_bytes'))}+ moved): {s['large_cases']}, "
                         f"{s['large_pct_copy_min']:.0f}-{s['large_pct_copy_max']:.0f}% of copy bandwidth, "
                         f"{s['large_under_60pct_copy']} under 60%")
    return lines


HEADERS = ["case", "provider", "median", "IQR", "GB/s", "% copy", "vs torch", "peak mem", "check"]


def header_lines(env: dict) -> list[str]:
    commit = env.get("git_commit") or "unknown"
    if env.get("git_dirty"):
        commit += " (+ local changes)"
    lines = [
        f"device: {env['device']} - {env['device_name']}"
        + (f" ({env['cpu_count']} CPUs, {env['torch_threads']} torch threads, load average "
           f"{', '.join(map(str, env.get('load_average') or ['n/a']))} at the end)" if env["device"] == "cpu" else ""),
        f"torch {env['torch']}, triton {env.get('triton') or 'n/a'}, python {env['python']}, commit {commit}",
    ]
    if env.get("cpu_allocator"):
        lines.append(f"CPU allocator: {env['cpu_allocator']}")
    if env.get("env_vars"):
        lines.append("environment: " + ", ".join(f"{k}={v}" for k, v in env["env_vars"].items()))
    if env.get("wall_s") is not None:
        lines.append(f"wall time of the whole run: {env['wall_s']:.0f} s")
    if env.get("copy_gbps"):
        lines.append(
            f"copy bandwidth (same run, {fmt_bytes(env.get('copy_bytes'))} tensor copy, read+write): "
            f"{env['copy_gbps']:.1f} GB/s"
        )
    return lines


def print_report(results: Sequence[Result], env: dict, console: Any = None) -> None:
    """The terminal report: environment header, the results table, failures and skip reasons."""
    from rich.table import Table

    console = console or wide_console()
    for line in header_lines(env):
        console.print(line, highlight=False)
    rows = table_rows(results)
    case_width = min(48, max([len(r[0]) for r in rows] + [4]))
    table = Table(show_lines=False, header_style="bold")
    for h in HEADERS:
        table.add_column(h, justify="left" if h in ("case", "provider", "check") else "right",
                         no_wrap=True, min_width=case_width if h == "case" else None)
    last_case = None
    for row in rows:
        if row[0] and last_case is not None:
            table.add_section()
        last_case = row[0] or last_case
        style = {"FAILED": "bold red", "error": "red"}.get(row[-1])
        table.add_row(*row, style=style)
    console.print(table)
    console.print(
        "median of per-call times after warm-up; IQR = interquartile range / median; GB/s from the byte model "
        "(fusednorm/bench/bytes_model.py); % copy = GB/s / copy bandwidth; vs torch = torch-eager time / "
        "provider time; peak mem = peak bytes allocated by one call (outputs included).",
        style="dim", highlight=False,
    )
    summary = summary_lines(results, env)
    if summary:
        console.print("summary:", style="bold")
        for line in summary:
            console.print("  " + line, highlight=False)
    bad = [r for r in results if r.status in (FAILED, ERROR)]
    for r in bad:
        console.print(f"[{'bold red' if r.status == FAILED else 'red'}]{r.status}[/] {r.case.label} "
                      f"{r.label}: {r.detail}", highlight=False)
    skips = skip_summary(results)
    if skips:
        console.print("not measured:", style="bold")
        for label, why, n in skips:
            console.print(f"  {label}: skipped ({n} case{'s' if n != 1 else ''}): {why}", highlight=False)


# ---- files ---------------------------------------------------------------------------------------------


def write_csv(path: str, results: Sequence[Result], env: dict) -> None:
    """One row per (case, provider) with the environment's key fields repeated on each row."""
    rows = [r.as_dict() for r in results]
    extra = {"device_name": env.get("device_name"), "git_commit": env.get("git_commit"),
             "copy_gbps": env.get("copy_gbps")}
    fields = list(rows[0]) + list(extra) if rows else list(Result.__dataclass_fields__)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({**row, **extra})


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _clean_tree(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _clean_tree(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean_tree(x) for x in v]
    return _clean(v)


def write_json(path: str, results: Sequence[Result], env: dict) -> None:
    """``{"environment": {...}, "summary": [...], "results": [...]}`` (non-finite numbers written as null)."""
    doc = {
        "environment": env,
        "summary": _clean_tree(provider_summaries(results, env)),
        "results": [{k: _clean(v) for k, v in r.as_dict().items()} for r in results],
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def markdown(results: Sequence[Result], env: dict, title: str = "fusednorm-bench results") -> str:
    """The report as a Markdown document (what bench/results/ commits)."""
    out = [f"# {title}", ""]
    out += [f"- {line}" for line in header_lines(env)]
    out += [f"- command: `{env.get('command', 'fusednorm-bench')}`", f"- date: {env.get('timestamp_utc')}", ""]
    summary = summary_lines(results, env)
    if summary:
        out += ["## Summary", ""]
        out += [("  " if line.startswith("  ") else "") + "- " + line.strip() for line in summary]
        out += ["", "## Results", ""]
    out.append("| " + " | ".join(HEADERS) + " |")
    out.append("|" + "|".join("---" if i in (0, 1, 8) else "---:" for i in range(len(HEADERS))) + "|")
    for row in table_rows(results):
        out.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    out.append("")
    out.append("Median of per-call times after warm-up; GB/s from the explicit byte model "
               "(`fusednorm/bench/bytes_model.py`); % copy = GB/s over the copy bandwidth measured in the same "
               "run; vs torch = torch-eager time / provider time; peak mem = peak bytes allocated by one call.")
    bad = [r for r in results if r.status in (FAILED, ERROR)]
    if bad:
        out += ["", "## Failures and errors", ""]
        out += [f"- **{r.status}** {r.case.label} / {r.label}: {r.detail}" for r in bad]
    skips = skip_summary(results)
    if skips:
        out += ["", "## Not measured", ""]
        out += [f"- {label} ({n} case{'s' if n != 1 else ''}): {why}" for label, why, n in skips]
    return "\n".join(out) + "\n"


def write_markdown(path: str, results: Sequence[Result], env: dict) -> None:
    with open(path, "w") as f:
        f.write(markdown(results, env))


def write_plot(path: str, results: Sequence[Result], env: dict, metric: str = "gbps") -> bool:
    """GB/s (or speedup over torch eager) vs problem size: one panel per (op, mode), shapes on the x axis in
    size order, one line per provider (and dtype / layout when the panel mixes them). Returns False (and
    writes nothing) when there is no timed result to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.status == OK and r.timing is not None]
    value = (lambda r: r.gbps) if metric == "gbps" else (lambda r: r.speedup)
    panels: OrderedDict[tuple[str, str], list[Result]] = OrderedDict()
    for r in ok:
        v = value(r)
        if v is not None and math.isfinite(v):
            panels.setdefault((r.case.op, r.case.mode), []).append(r)
    if not panels:
        return False
    providers_seen = list(OrderedDict.fromkeys(r.label for rs in panels.values() for r in rs))
    palette = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3"])
    colors = {label: palette[i % len(palette)] for i, label in enumerate(providers_seen)}
    styles = ["-", "--", ":", "-."]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, ((op, mode), rs) in zip(axes.flat, panels.items(), strict=False):
        shapes = sorted({(r.case.numel, r.case.shape) for r in rs})
        xpos = {shape: i for i, (_, shape) in enumerate(shapes)}
        mixed_dtype = len({r.case.dtype for r in rs}) > 1
        mixed_layout = len({r.case.layout for r in rs}) > 1
        # colour = provider, line style = dtype / layout variant
        lines: OrderedDict[tuple[str, str], list[tuple[int, float]]] = OrderedDict()
        for r in rs:
            variant = (r.case.dtype if mixed_dtype else "")
            variant += (" NHWC" if r.case.layout == "channels_last" else "") if mixed_layout else ""
            lines.setdefault((r.label, variant.strip()), []).append((xpos[r.case.shape], value(r)))
        variants = list(OrderedDict.fromkeys(v for _, v in lines))
        for (label, variant), pts in lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[label],
                    linestyle=styles[variants.index(variant) % len(styles)],
                    label=f"{label} {variant}".strip())
        if metric == "gbps" and env.get("copy_gbps"):
            ax.axhline(env["copy_gbps"], color="gray", linestyle="--", linewidth=0.8, label="copy bandwidth")
        if metric == "speedup":
            ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(["x".join(map(str, s)) for _, s in shapes], fontsize=7, rotation=20, ha="right")
        ax.set_xlim(-0.5, len(shapes) - 0.5)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{op} {mode}" + ("" if mixed_dtype else f" {rs[0].case.dtype}"), fontsize=9)
        ax.set_ylabel("GB/s (byte model)" if metric == "gbps" else "speedup vs torch eager", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    commit = (env.get("git_commit") or "unknown")[:10]
    fig.suptitle(f"fusednorm-bench on {env.get('device_name')} ({env.get('device')}), commit {commit}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---- --kernels -----------------------------------------------------------------------------------------


def print_kernels(rows: Sequence[dict], console: Any = None) -> None:
    """Table of ``compile_report`` rows: kernel, config, arch, warps, registers, spills, shared memory, status.

    ``arch`` may be 80 or ``"sm_80"``; spills may be a byte count (``spill_bytes``) or a flag (``spills``).
    """
    from rich.table import Table

    console = console or wide_console()
    table = Table(header_style="bold")
    for h in ("kernel", "config", "arch", "warps", "registers", "spills", "shared", "status"):
        table.add_column(h, justify="right" if h in ("arch", "warps", "registers", "spills", "shared") else "left")
    n_bad = 0
    for r in rows:
        arch = str(r.get("arch", "?"))
        arch = arch if arch.startswith("sm_") else f"sm_{arch}"
        spill = r.get("spill_bytes")
        spilled = bool(spill) if spill is not None else bool(r.get("spills"))
        spill_text = fmt_bytes(int(spill)) if spill is not None else ("yes" if spilled else "-" if
                                                                       r.get("spills") is None else "no")
        ok = bool(r.get("ok")) and not spilled
        n_bad += not ok
        shared = r.get("shared_bytes")
        table.add_row(
            str(r.get("kernel", "?")), str(r.get("config", "")), arch,
            "-" if r.get("num_warps") is None else str(r.get("num_warps")),
            "-" if r.get("registers") is None else str(r.get("registers")),
            spill_text,
            "-" if shared is None else fmt_bytes(int(shared)),
            "ok" if ok else f"error: {r.get('error') or 'spills'}",
            style=None if ok else "red",
        )
    console.print(table)
    console.print(f"{len(rows)} kernel configurations, {n_bad} with errors or spills", highlight=False)
