"""Offline code generation check: compile every shipped Triton kernel configuration for real GPUs.

No GPU is needed: ``triton.compile`` with an explicit ``GPUTarget`` runs the full pipeline down to a cubin, and
``ptxas -v`` (the same ptxas Triton uses for that arch) reports registers, stack frame and spill bytes.
Each kernel file of the Triton backend contributes ``kernel_configs()``: every (kernel, constexpr config,
num_warps) its launcher can choose. Pointer and integer arguments are compiled with the 16-divisibility hint
that Triton's runtime specialization gives aligned tensors and sizes (the common, vectorized case).

Run ``python -m fusednorm.backends.triton.codegen [--arch 80 90] [--json]`` or ``fusednorm-bench --kernels``.
Compilation must not happen under ``TRITON_INTERPRET=1`` (kernels are then interpreter objects), so when the
interpreter is on in this process the work is done in a child process.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

DEFAULT_ARCHS = (80, 90)


def _families() -> list[str]:
    import fusednorm.backends.triton as pkg

    names = [m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name not in ("codegen", "welford")]
    return sorted(names)


@functools.cache
def family_configs(family: str) -> tuple[tuple[str, object, dict, dict, int], ...]:
    """The (name, jit fn, signature, constexprs, num_warps) tuples of one kernel file's kernel_configs()."""
    module = importlib.import_module(f"fusednorm.backends.triton.{family}")
    return tuple(module.kernel_configs()) if hasattr(module, "kernel_configs") else ()


def collect_configs() -> list[tuple[str, object, dict, dict, int]]:
    """All (name, jit fn, signature, constexprs, num_warps) tuples from every kernel file's kernel_configs()."""
    return [cfg for family in _families() for cfg in family_configs(family)]


def _ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    """Registers, stack frame and spill bytes that ptxas reports for ``ptx`` on ``sm_<arch>``."""
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    arch_flag = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas, f"-arch={arch_flag}", "-v", str(src), "-o", str(Path(tmp) / "kernel.o")],
                              capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text.strip().splitlines()[-1] if text.strip() else proc.returncode}")
    regs = re.search(r"Used (\d+) registers", text)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or frame is None:
        raise RuntimeError(f"cannot parse ptxas -v output: {text!r}")
    stack, stores, loads = (int(v) for v in frame.groups())
    return {"registers": int(regs.group(1)), "stack": stack, "spill_bytes": stores + loads}


def _compile_one(family: str, index: int, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    name, fn, signature, constexprs, num_warps = family_configs(family)[index]
    row = {"kernel": name.split(" ", 1)[0], "config": name.split(" ", 1)[1] if " " in name else "",
           "arch": f"sm_{arch}", "num_warps": num_warps, "registers": None, "spills": None,
           "spill_bytes": None, "stack_bytes": None, "shared_bytes": None, "ok": False, "error": ""}
    try:
        arg_names = fn.arg_names
        attrs = {(arg_names.index(k),): [["tt.divisibility", 16]]
                 for k, v in signature.items() if v.startswith("*") or v in ("i32", "i64")}
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        usage = _ptxas_report(compiled.asm["ptx"], arch)
        spilled = usage["spill_bytes"]
        row.update(registers=usage["registers"], spill_bytes=spilled, stack_bytes=usage["stack"], spills=spilled > 0,
                   shared_bytes=int(compiled.metadata.shared), ok=spilled == 0)
        if spilled:
            row["error"] = f"{spilled} bytes of register spill stores+loads"
    except Exception as exc:  # noqa: BLE001 - report every failure as a row, never abort the whole report
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return row


def _compile_all(archs: tuple[int, ...], jobs: int, families: tuple[str, ...]) -> list[dict]:
    work = [(family, i, a) for family in families for i in range(len(family_configs(family))) for a in archs]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        return list(pool.map(_compile_one, *zip(*work, strict=True)))


def compile_report(
    archs: tuple[int, ...] = DEFAULT_ARCHS, jobs: int | None = None, families: tuple[str, ...] | None = None
) -> list[dict]:
    """Compile every kernel configuration for each ``arch`` (80, 90, ...) and return one dict per compile.

    ``families`` limits it to some kernel files (e.g. ``("layer_norm",)``); default: all of them.

    Keys: kernel, config, arch, num_warps, registers, spills (bool), spill_bytes, stack_bytes, shared_bytes,
    ok (compiled without spills), error.
    """
    jobs = jobs or max(1, os.cpu_count() or 1)
    families = tuple(families) if families else tuple(_families())
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        cmd = [sys.executable, "-m", "fusednorm.backends.triton.codegen", "--json", "--jobs", str(jobs),
               "--arch", *map(str, archs), "--family", *families]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode not in (0, 1):
            raise RuntimeError(f"codegen subprocess failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return json.loads(proc.stdout)
    return _compile_all(tuple(archs), jobs, families)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS))
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--family", nargs="+", default=None, help="kernel files to compile (default: all)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    rows = compile_report(tuple(args.arch), args.jobs, tuple(args.family) if args.family else None)
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            status = "ok" if r["ok"] else f"FAIL {r['error']}"
            print(f"{r['arch']} {r['kernel']:<22} {r['config']:<48} warps={r['num_warps']:<2} "
                  f"regs={r['registers']} spill={r['spill_bytes']} stack={r['stack_bytes']} "
                  f"smem={r['shared_bytes']} {status}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
