"""Build entry: compiles ``csrc/`` into the ``pgs_kernels._C`` extension.

Metadata lives in pyproject.toml. The extension is built against the torch
already installed (install with ``--no-build-isolation``).

    pip install --no-build-isolation --no-deps -e .   # editable, builds _C in place
    python setup.py build_ext --inplace                 # rebuild _C only

What happens to ``_C``:

* it compiles: installed;
* the compile fails: the install fails, with the compiler's errors;
* there is no C++ compiler, torch is not importable at build time, or
  ``PGS_NO_NATIVE=1`` (skip on purpose): installed without it, one line says
  so, and CPU tensors use the pure-PyTorch reference.

Either way ``pgs_kernels/_build_info.json`` records the outcome, which the
import-time warning quotes when ``_C`` does not load.
"""

import glob
import json
import os
import shlex
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = "_build_info.json"  # in the pgs_kernels package; read by pgs_kernels/op.py


def _say(msg):
    print(f"pgs-kernels: {msg}", file=sys.stderr, flush=True)


def _torch_version():
    try:
        import torch

        return torch.__version__
    except ImportError:
        return None


def write_build_info(package_dirs, built, reason=""):
    """Record in each of ``package_dirs`` whether ``_C`` was built, and if
    not, why, so that the warning at import can say more than the ImportError."""
    info = {"native": "built" if built else "skipped", "reason": reason, "torch": _torch_version()}
    for d in package_dirs:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, BUILD_INFO), "w") as f:
            json.dump(info, f, indent=1)
            f.write("\n")


def _skip_reason():
    """Why ``_C`` is not built at all, known before any build step; None to build it."""
    if os.environ.get("PGS_NO_NATIVE") == "1":
        return "PGS_NO_NATIVE=1 was set at build time"
    try:
        import torch.utils.cpp_extension  # noqa: F401
    except ImportError as exc:
        return (f"torch was not importable at build time ({type(exc).__name__}: {exc}); "
                "install torch first and build with --no-build-isolation")
    return None


class BuildPyRecordingSkip(build_py):
    """build_py that records why ``_C`` is skipped, where no build_ext will run."""

    def run(self):
        super().run()
        if SKIP_REASON is None:
            return
        # An editable install imports the package from the source tree.
        where = self.get_package_dir("pgs_kernels")
        if not self.editable_mode:
            where = os.path.join(self.build_lib, "pgs_kernels")
        write_build_info([where], built=False, reason=SKIP_REASON)


def _first_word(cmd):
    words = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    return words[0] if words else ""


def native_extensions():
    if SKIP_REASON is not None:
        return [], {"build_py": BuildPyRecordingSkip}

    from torch.utils.cpp_extension import BuildExtension, CppExtension, get_cxx_compiler

    # Relative paths: setuptools rejects absolute source paths in some modes.
    sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    headers = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.h")))
    # -O3 and no -ffast-math: the kernel relies on NaN/Inf semantics. Without
    # errno and traps, gcc vectorizes sqrt and the min/max selects; contraction
    # lets the x86-64-v3 clones use FMA (ISO C++ mode turns it off by default).
    # No -std flag: torch's BuildExtension adds the standard its headers need.
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast"]
    ext = CppExtension(
        "pgs_kernels._C",
        sources,
        # depends: a header change rebuilds, and setuptools puts them in the sdist.
        depends=headers,
        extra_compile_args={"cxx": flags},
        # The same libgomp soname torch loads, so torch.set_num_threads
        # governs at::parallel_for here too.
        extra_link_args=["-fopenmp"],
    )

    class NativeBuildExt(BuildExtension):
        """Build ``_C``; without a C++ compiler, install without it and say
        so. Any other failure (a compile error, a link error) fails the build."""

        def build_extensions(self):
            missing = [tool for tool in self._tools() if not shutil.which(tool)]
            if missing:
                self._outcome = (False, f"no C++ compiler: {', '.join(missing)} not found")
                _say(f"{self._outcome[1]}; installing without the native CPU kernel, CPU tensors will use the "
                     "pure-PyTorch reference. To build it, install g++ or clang++ (or set CXX) and reinstall.")
                # Nothing was built: the --inplace / editable copy step must not look for it.
                self.extensions = []
                return
            try:
                super().build_extensions()
            except Exception:
                _say("the native CPU kernel failed to build (the compiler's errors are above). Fix them, or "
                     "install without it on purpose with PGS_NO_NATIVE=1.")
                raise
            self._outcome = (True, "")

        def _tools(self):
            """The compiler and linker this build runs: torch's ninja build
            compiles with $CXX (default c++); setuptools links (and compiles,
            without ninja) with the compiler sysconfig and $CXX/$LDCXXSHARED name."""
            cc = self.compiler
            compile_cmd = getattr(cc, "compiler_so_cxx", None) or cc.compiler_so
            if self.use_ninja:
                compile_cmd = get_cxx_compiler()
            link_cmd = getattr(cc, "linker_so_cxx", None) or cc.linker_so
            return sorted({_first_word(compile_cmd), _first_word(link_cmd)} - {""})

        def run(self):
            self._outcome = None
            super().run()
            if self._outcome is None:  # nothing to build
                return
            where = [os.path.join(self.build_lib, "pgs_kernels")]
            if self.inplace:  # --inplace and editable installs import from the source tree
                where.append(self.get_finalized_command("build_py").get_package_dir("pgs_kernels"))
            write_build_info(where, *self._outcome)

    cmdclass = {"build_ext": NativeBuildExt.with_options(no_python_abi_suffix=False)}
    return [ext], cmdclass


SKIP_REASON = _skip_reason()
if SKIP_REASON is not None:
    _say(f"not building the native CPU kernel: {SKIP_REASON}; CPU tensors will use the pure-PyTorch reference")
ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
