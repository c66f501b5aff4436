"""The README's main job, ``python -m pgs_kernels.demo``, runs and draws its figure."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_and_writes_its_figure(tmp_path):
    # As a user runs it: no Triton interpreter (it would time the interpreter).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "pgs_kernels.demo", "--out", str(tmp_path), "--synthetic", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "PGS selection on 5 images" in out and "keep 98, 10 candidates" in out
    assert "pgs_select backend=reference" in out and "random_masking" in out
    # timings say how many threads ran them and how busy the machine was
    assert "1 CPU thread(s); load average" in out and "load average" in out.split("random_masking")[1]
    mean = [ln for ln in out.splitlines() if ln.startswith("mean")][0].split()
    assert float(mean[1]) > float(mean[2])  # PGS keeps more edge energy than random masking
    assert (tmp_path / "pgs_demo.png").stat().st_size > 10_000


@pytest.mark.parametrize("module, named", [("numpy", "numpy"), ("matplotlib", "matplotlib"),
                                           ("skimage", "scikit-image"), ("scipy", "scipy")])
def test_demo_without_its_extra_names_it(tmp_path, module, named):
    """Run as a user without the [demo] extra would: a message naming the
    extra and what is missing, no traceback, no figure. ``sys.modules[name] =
    None`` makes the module's import fail as if it were not installed (scipy:
    scikit-image needs it to load the photos)."""
    code = (f"import runpy, sys; sys.modules[{module!r}] = None; "
            f"sys.argv = ['pgs_kernels.demo', '--out', {str(tmp_path)!r}]; "
            "runpy.run_module('pgs_kernels.demo', run_name='__main__', alter_sys=True)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "the demo needs the [demo] extra" in proc.stderr and "pip install 'pgs-kernels[demo]'" in proc.stderr
    assert f"missing here: {named}." in proc.stderr
    assert not any(tmp_path.iterdir())
