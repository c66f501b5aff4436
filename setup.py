"""Build entry: compiles ``csrc/`` into the ``pgs_kernels._C`` extension.

Metadata lives in pyproject.toml. The extension is built against the torch
already installed (install with ``--no-build-isolation``); where torch or a
C++ compiler is missing, or the compile fails, the package is installed
without it and falls back to the reference on CPU with one warning.

    pip install --no-build-isolation --no-deps -e .   # editable, builds _C in place
    python setup.py build_ext --inplace                 # rebuild _C only

``PGS_NO_NATIVE=1`` skips the extension on purpose.
"""

import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    print(f"pgs-kernels: {msg}", file=sys.stderr, flush=True)


def native_extensions():
    # Relative paths: setuptools rejects absolute source paths in some modes.
    sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    if not sources or os.environ.get("PGS_NO_NATIVE") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        _say("torch is not importable at build time; installing without the native CPU kernel")
        return [], {}

    # -O3 and no -ffast-math: the kernel relies on NaN/Inf semantics. Without
    # errno and traps, gcc vectorizes sqrt and the min/max selects; contraction
    # lets the x86-64-v3 clones use FMA (ISO C++ mode turns it off by default).
    # No -std flag: torch's BuildExtension adds the standard its headers need.
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast"]
    ext = CppExtension(
        "pgs_kernels._C",
        sources,
        extra_compile_args={"cxx": flags},
        # The same libgomp soname torch loads, so torch.set_num_threads
        # governs at::parallel_for here too.
        extra_link_args=["-fopenmp"],
    )

    class OptionalBuildExtension(BuildExtension):
        """Build ``_C`` if possible; on any failure install without it (one line
        says why) so that the package still imports and uses the reference."""

        def build_extensions(self):
            self._pgs_failed = []
            try:
                super().build_extensions()
            except Exception as exc:  # no compiler, ABI check, ninja failure...
                self._pgs_give_up(list(self.extensions), exc)
            # Failed extensions leave the list, so the editable install and
            # --inplace copy step do not look for files that were never built.
            self.extensions = [e for e in self.extensions if e not in self._pgs_failed]

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                self._pgs_give_up([ext], exc)

        def _pgs_give_up(self, exts, exc):
            self._pgs_failed.extend(e for e in exts if e not in self._pgs_failed)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            _say(f"could not build the native CPU kernel ({type(exc).__name__}: {first}); "
                 "installing without it, CPU tensors will use the pure-PyTorch reference")

    return [ext], {"build_ext": OptionalBuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
