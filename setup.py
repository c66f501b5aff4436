"""Build entry: compiles ``csrc/`` into the ``pgs_kernels._C`` extension.

Metadata lives in pyproject.toml. The extension is built against the torch
already installed (install with ``--no-build-isolation``); where torch or a
C++ compiler is missing, the package is installed without it and falls back
to the reference on CPU with one warning.
"""

import glob
import os
import sys

from setuptools import setup


def native_extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("PGS_NO_NATIVE") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("pgs-kernels: torch is not importable at build time; skipping the native kernel", file=sys.stderr)
        return [], {}
    flags = ["-O3", "-std=c++17", "-fopenmp"]
    ext = CppExtension(
        "pgs_kernels._C",
        sources,
        extra_compile_args={"cxx": flags},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
