"""Build script: the Python package plus the optional native extension ``fusednorm._C``.

The extension is compiled from ``csrc/`` with ``torch.utils.cpp_extension`` (ninja, ``MAX_JOBS`` parallel
jobs): the CPU kernels always (plus AVX2 and AVX-512 BF16 copies on x86-64 with GCC, chosen at run time), the
CUDA kernels when torch was built with CUDA (``torch.version.cuda``) and nvcc is found (``CUDA_HOME``), for
the architectures in ``TORCH_CUDA_ARCH_LIST``. Environment switches:

- ``FUSEDNORM_NO_EXTENSION=1``: skip the native build entirely (fusednorm then runs on Triton and the
  reference backend, and ``fusednorm.available_backends()["native"]`` says why).
- ``FUSEDNORM_NO_CUDA=1``: build only the CPU kernels even when CUDA is available.
- ``FUSEDNORM_NO_AVX2=1``: do not build the AVX2 and AVX-512 copies of the CPU kernels.
- ``FUSEDNORM_NO_AVX512=1``: do not build the AVX-512 BF16 copy (it needs GCC 10 or newer; older GCC skips
  it by itself).
- ``FUSEDNORM_DEBUG=1``: ``-O0 -g`` instead of ``-O3``.

Because the extension compiles against the installed torch, install with
``pip install --no-build-isolation .`` (or ``-e .``).
"""

from __future__ import annotations

import glob
import os
import platform
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _log(msg: str) -> None:
    print(f"fusednorm setup: {msg}", file=sys.stderr)


def _rel(paths: list[str]) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _gcc_major(compiler: str) -> int:
    """The major version of GCC `compiler` (0 if it cannot be run): AVX512-BF16 code needs GCC 10."""
    try:
        out = subprocess.run([compiler, "-dumpversion"], capture_output=True, text=True, timeout=30).stdout
        return int(out.strip().split(".")[0])
    except (OSError, ValueError, subprocess.SubprocessError):
        return 0


def _native_extension():
    if _flag("FUSEDNORM_NO_EXTENSION"):
        _log("FUSEDNORM_NO_EXTENSION=1: skipping the native extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:  # torch not importable in this build environment (e.g. build isolation)
        _log(f"torch is not importable ({exc}); skipping the native extension (use --no-build-isolation)")
        return [], {}

    sources = _rel(
        glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    )
    if not sources:
        return [], {}
    debug = _flag("FUSEDNORM_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -g0: Python's default flags add -g, which doubles compile time and .so size for no use here.
    # -fopenmp: at::parallel_for is a header template that expands to `#pragma omp parallel` (ATen's parallel
    # backend is OpenMP); without the flag the pragma is silently dropped and every kernel runs on one thread.
    # The resulting NEEDED libgomp.so.1 resolves to the copy torch has already loaded (same soname), so
    # torch.set_num_threads governs our kernels too. (-Wno-unknown-pragmas: ATen headers use `#pragma unroll`.)
    # -ffp-contract=off: GCC's default (fast) fuses a*b - c into one FMA wherever it likes, e.g. g - (g' * c)
    # where g and g' are the same rounded product: the result then carries the product's rounding error
    # instead of cancelling exactly. Kernels ask for FMA explicitly (at::vec::fmadd) where they want it.
    cxx = [*opt, "-fopenmp", "-ffp-contract=off", "-fvisibility=hidden", "-Wno-unknown-pragmas", "-Wno-psabi"]
    cxx += [] if debug else ["-g0"]
    link = ["-fopenmp"]
    macros: list[tuple[str, str | None]] = []

    is_x86 = platform.machine().lower() in ("x86_64", "amd64", "i686")
    compiler = os.environ.get("CXX", "c++")
    gcc_like = "clang" not in os.path.basename(compiler)
    if is_x86 and gcc_like and not _flag("FUSEDNORM_NO_AVX2"):
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "isa", "*_avx2.cpp")))
        macros.append(("FUSEDNORM_HAVE_AVX2", "1"))
        if _gcc_major(compiler) >= 10 and not _flag("FUSEDNORM_NO_AVX512"):
            sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "isa", "*_avx512bf16.cpp")))
            macros.append(("FUSEDNORM_HAVE_AVX512BF16", "1"))

    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    with_cuda = (
        bool(cuda_sources)
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and not _flag("FUSEDNORM_NO_CUDA")
    )
    if with_cuda:
        macros.append(("FUSEDNORM_WITH_CUDA", "1"))
        _log(
            f"building CPU + CUDA kernels (CUDA {torch.version.cuda}, nvcc from {cpp_extension.CUDA_HOME}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<torch default>')})"
        )
        ext = cpp_extension.CUDAExtension(
            "fusednorm._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=macros,
            extra_compile_args={
                "cxx": cxx,
                "nvcc": [*opt, "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-warn-spills"],
            },
            extra_link_args=link,
        )
    else:
        why = (
            "no csrc/cuda sources"
            if not cuda_sources
            else "FUSEDNORM_NO_CUDA=1"
            if _flag("FUSEDNORM_NO_CUDA")
            else "torch has no CUDA"
            if torch.version.cuda is None
            else "nvcc not found (set CUDA_HOME)"
        )
        _log(f"building CPU kernels only ({why})")
        ext = cpp_extension.CppExtension(
            "fusednorm._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _native_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
