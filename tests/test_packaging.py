"""Packaging cannot ship a broken kernel: the sdist holds every file the
native build reads, a wheel built from it carries a ``_C`` that loads, a
failed compile fails the build with the compiler's errors, and only a
missing compiler, a missing torch or ``PGS_NO_NATIVE=1`` installs without
``_C``, which the import-time warning then explains.

The sdist is built through setuptools' PEP 517 hook, as ``python -m build
--sdist --no-isolation`` does (pypa ``build`` is not a test dependency); the
wheel with ``pip wheel --no-build-isolation --no-deps``, against the torch
already installed."""

import glob
import importlib.machinery
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Build products, caches and results of a working checkout (hidden folders such
# as .venv and .git included): never part of a source tree to package.
_PRODUCTS = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", "*.so", "*.o", "_build_info.json",
                                   "demo_out", "results", "data")


def not_source(folder, names):
    return {n for n in names if n.startswith(".")} | _PRODUCTS(folder, names)
# What the build reads besides csrc/ (setup.py, its configuration, the readme and license it packages).
BUILD_INPUTS = ["setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE"]


# The source tree a build starts from: what it reads and the packages it installs
# (not tests/, bench/ or anything a working checkout accumulates: bench/out/
# may hold whole virtual environments).
PROJECT = BUILD_INPUTS + ["csrc", "pgs_kernels", "python_ref"]


def copy_project(dst, csrc=None):
    """The project's sources in ``dst``; ``csrc``: the csrc/ files to copy (default all)."""
    os.makedirs(dst, exist_ok=True)
    for name in PROJECT:
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dst, name), ignore=not_source)
        else:
            shutil.copy(src, os.path.join(dst, name))
    if csrc is not None:
        shutil.rmtree(os.path.join(dst, "csrc"))
        os.makedirs(os.path.join(dst, "csrc"))
        for name in csrc:
            shutil.copy(os.path.join(ROOT, "csrc", name), os.path.join(dst, "csrc", name))
    return str(dst)


def build_env(**changes):
    env = {k: v for k, v in os.environ.items() if k not in ("PGS_NO_NATIVE", "CXX")}
    env.update(changes)
    return env


def run(cmd, cwd, env=None, timeout=300):
    return subprocess.run(cmd, cwd=cwd, env=env or build_env(), capture_output=True, text=True, timeout=timeout)


def build_sdist(src, dist_dir, env=None):
    res = run([sys.executable, "-c", f"import setuptools.build_meta as b; print(b.build_sdist({str(dist_dir)!r}))"],
              src, env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return os.path.join(dist_dir, res.stdout.strip().splitlines()[-1])


def sdist_files(path):
    """The sdist's files, relative to its top folder."""
    with tarfile.open(path) as tar:
        return {n.split("/", 1)[1] for n in tar.getnames() if "/" in n and not tar.getmember(n).isdir()}


def local_includes(path):
    with open(path) as f:
        return re.findall(r'^\s*#\s*include\s+"([^"]+)"', f.read(), flags=re.M)


@pytest.mark.parametrize("no_native", [False, True], ids=["default", "PGS_NO_NATIVE"])
def test_sdist_holds_every_file_the_build_reads(tmp_path, no_native):
    """Whatever machine makes the sdist (PGS_NO_NATIVE=1 there drops the
    extension from setup.py): every csrc/ file and every header it includes."""
    src = copy_project(tmp_path / "src")
    env = build_env(PGS_NO_NATIVE="1") if no_native else None
    files = sdist_files(build_sdist(src, tmp_path / "dist", env))
    csrc = sorted("csrc/" + os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "csrc", "*")))
    assert {"csrc/pgs.h", "csrc/simd.h"} <= set(csrc)
    missing = [f for f in BUILD_INPUTS + csrc if f not in files]
    assert not missing, f"the sdist lacks {missing}"
    for f in csrc:
        for inc in local_includes(os.path.join(ROOT, f)):
            assert f"csrc/{inc}" in files, f"{f} includes {inc}, which the sdist lacks"
    modules = [os.path.relpath(p, ROOT) for pkg in ("pgs_kernels", "python_ref")
               for p in glob.glob(os.path.join(ROOT, pkg, "*.py"))]
    assert set(modules) <= files
    # The Triton launch settings table, which the launcher reads at run time.
    assert "pgs_kernels/triton_tuning.json" in files


def test_sdist_leaves_the_tests_out(tmp_path):
    """The tests run from the checkout (conftest, tests/data, bench/): an sdist
    holding tests/test_*.py alone would give a suite that cannot collect."""
    src = copy_project(tmp_path / "src")
    shutil.copytree(os.path.join(ROOT, "tests"), os.path.join(src, "tests"), ignore=not_source)
    files = sdist_files(build_sdist(src, tmp_path / "dist", build_env(PGS_NO_NATIVE="1")))
    assert not [f for f in files if f.startswith("tests/")], sorted(files)


@pytest.mark.slow
def test_wheel_built_from_the_sdist_loads_its_native_kernel(tmp_path):
    """The issue's path: sdist, then a wheel from it in a clean folder (pip
    unpacks it there), installed into a fresh folder: its own ``_C`` loads and
    is the operator's CPU kernel. One full compile, a few minutes."""
    t0 = time.monotonic()
    sdist = build_sdist(copy_project(tmp_path / "src"), tmp_path / "dist")
    res = run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
               "--no-cache-dir", "-w", str(tmp_path / "wheel"), sdist], str(tmp_path), timeout=1800)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
    (wheel,) = glob.glob(str(tmp_path / "wheel" / "*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert [n for n in names if re.fullmatch(r"pgs_kernels/_C\..*\.so", n)], names
        info = json.loads(zf.read("pgs_kernels/_build_info.json"))
        assert info["native"] == "built", info
        target = tmp_path / "site"
        zf.extractall(target)
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(target)!r})
        import torch, pgs_kernels
        from pgs_kernels import op
        assert op.NATIVE_AVAILABLE, op.NATIVE_ERROR
        for mod in (pgs_kernels, op._C):
            assert mod.__file__.startswith({str(target)!r}), mod.__file__
        assert op.KERNELS["cpu"] == "native"
        cpu = [ln for ln in torch._C._dispatch_dump("pgs_kernels::_pgs_select_native").splitlines()
               if ln.startswith("CPU:")]
        assert len(cpu) == 1 and "op.cpp" in cpu[0], cpu
        sel = pgs_kernels.pgs_select(torch.randn(2, 3, 32, 32), mask_ratio=0.5, backend="native")
        assert sel.keep_idx.shape == (2, 2)
        print("ok", op._C.__file__)
        """
    )
    res = run([sys.executable, "-c", code], str(tmp_path), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "pgs_kernels: the native CPU kernel" not in res.stderr, res.stderr
    print(f"sdist -> wheel -> import: {time.monotonic() - t0:.0f} s, wheel {os.path.getsize(wheel) / 1e3:.0f} kB")


def setup_py(src, *args, env=None, prelude=""):
    """``python setup.py ARGS`` in ``src``; ``prelude`` runs first (e.g. to hide torch)."""
    code = (f"import runpy, sys\n{prelude}\nsys.argv = ['setup.py', *{list(args)!r}]\n"
            "runpy.run_path('setup.py', run_name='__main__')")
    return run([sys.executable, "-c", code], src, env)


def built_files(src):
    return [os.path.relpath(p, src) for p in glob.glob(os.path.join(src, "build", "lib*", "pgs_kernels", "*"))]


def build_info(src):
    (path,) = glob.glob(os.path.join(src, "build", "lib*", "pgs_kernels", "_build_info.json"))
    with open(path) as f:
        return json.load(f)


def test_failed_compile_fails_the_build_with_the_compilers_error(tmp_path):
    """A source whose header is missing (the sdist of the issue): the build
    stops, and its output carries the compiler's own message."""
    src = copy_project(tmp_path / "src", csrc=["sinkhorn.cpp"])
    res = setup_py(src, "build_ext", "--inplace")
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert "pgs.h: No such file or directory" in out, out[-3000:]
    assert "the native CPU kernel failed to build" in out and "PGS_NO_NATIVE=1" in out
    assert "installing without" not in out
    assert not glob.glob(os.path.join(src, "pgs_kernels", "_C*"))


def test_without_a_compiler_it_installs_without_C_and_records_why(tmp_path):
    src = copy_project(tmp_path / "src", csrc=["sinkhorn.cpp"])
    res = setup_py(src, "build", env=build_env(CXX=str(tmp_path / "no-such-c++")))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert f"no C++ compiler: {tmp_path / 'no-such-c++'} not found" in out
    assert "installing without the native CPU kernel" in out
    assert not [f for f in built_files(src) if "_C" in f]
    info = build_info(src)
    assert info["native"] == "skipped" and "no C++ compiler" in info["reason"]


@pytest.mark.parametrize("case", ["PGS_NO_NATIVE", "no torch"])
def test_skipped_on_purpose_or_without_torch_records_why(tmp_path, case):
    src = copy_project(tmp_path / "src", csrc=["sinkhorn.cpp"])
    if case == "PGS_NO_NATIVE":
        res = setup_py(src, "build", env=build_env(PGS_NO_NATIVE="1"))
        expected = "PGS_NO_NATIVE=1"
    else:
        res = setup_py(src, "build", prelude="sys.modules['torch'] = None")
        expected = "torch was not importable at build time"
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert f"not building the native CPU kernel: {expected}" in out
    assert not [f for f in built_files(src) if "_C" in f]
    # The build (a wheel's contents) carries the Triton launch settings table.
    assert any(f.endswith(os.path.join("pgs_kernels", "triton_tuning.json")) for f in built_files(src))
    info = build_info(src)
    assert info["native"] == "skipped" and expected in info["reason"]


def import_warning(pkg_root):
    """The RuntimeWarnings of importing pgs_kernels from ``pkg_root``, in a subprocess."""
    code = textwrap.dedent(
        f"""
        import sys, warnings
        sys.path.insert(0, {str(pkg_root)!r})
        # An editable install's finder hands out its own pgs_kernels._C where this copy has none.
        sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import pgs_kernels
        assert pgs_kernels.__file__.startswith({str(pkg_root)!r}), pgs_kernels.__file__
        assert not pgs_kernels.NATIVE_AVAILABLE
        for w in caught:
            if issubclass(w.category, RuntimeWarning):
                print(w.message)
        """
    )
    res = run([sys.executable, "-c", code], str(pkg_root), timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout.strip()


@pytest.mark.parametrize("record", ["no compiler", "built for another torch", "none"])
def test_import_warning_says_why_C_is_missing(tmp_path, record):
    for pkg in ("pgs_kernels", "python_ref"):
        shutil.copytree(os.path.join(ROOT, pkg), tmp_path / pkg, ignore=not_source)
    info_path = tmp_path / "pgs_kernels" / "_build_info.json"
    if record == "no compiler":
        info_path.write_text(json.dumps({"native": "skipped", "reason": "no C++ compiler: c++ not found",
                                         "torch": "2.13.0"}))
    elif record == "built for another torch":
        info_path.write_text(json.dumps({"native": "built", "reason": "", "torch": "1.0.0"}))
        # A file that is there but does not load, as one built for another torch.
        (tmp_path / "pgs_kernels" / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(b"not a library")
    msg = import_warning(tmp_path)
    assert msg.count("pgs_kernels: the native CPU kernel") == 1, msg
    assert "pure-PyTorch reference" in msg and "pip install --no-build-isolation" in msg
    assert "setup.py build_ext --inplace" in msg
    if record == "no compiler":
        assert "installed without it (no C++ compiler: c++ not found)" in msg
        assert "No module named 'pgs_kernels._C'" in msg
    elif record == "built for another torch":
        assert "was built, against torch 1.0.0, but does not load under torch" in msg
        assert "ImportError" in msg and "_C" in msg
    else:
        assert "no build of it is recorded here" in msg and "No module named 'pgs_kernels._C'" in msg
