"""The GPU scripts without a GPU: the smoke check's sections run on the CPU
through the Triton interpreter (``--dry-run``), and without CUDA both the
smoke check and the suite stop with a clear message."""

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_gpu_scripts_say_they_need_cuda(tmp_path):
    """Without CUDA the GPU smoke check and suite stop with a clear message and
    a non-zero exit, no traceback and no files."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHON=sys.executable)
    for cmd in ([sys.executable, "-m", "bench.gpu_smoke", "--out", str(tmp_path)],
                ["bash", "bench/gpu_suite.sh", "--out", str(tmp_path)]):
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (cmd, proc.stdout, proc.stderr)
        assert "needs a CUDA device" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())


def test_gpu_smoke_dry_run(tmp_path):
    """The GPU smoke check, every section, on the CPU through the interpreter at
    toy sizes: a bug in the script costs CI half a minute, not a GPU run."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_smoke", "--dry-run", "--out", str(tmp_path)],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu-smoke-dry-run.json").read_text())
    assert doc["dry_run"] and doc["ok"] and not doc["failures"]
    assert set(doc["sections"]) == {"compile", "agreement", "checks", "timing"}
    agreement = doc["sections"]["agreement"]
    assert "photos" in agreement and all(d["decided_rows"] > 0 for d in agreement.values())
    assert all(doc["sections"]["checks"]["invariants"].values())
