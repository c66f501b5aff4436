"""The GPU scripts without a GPU: the smoke check's sections run on the CPU
through the Triton interpreter (``--dry-run``; the kernel sweep's dry run is
in test_kernel_sweep.py), and without CUDA the smoke check, the sweep and the
suite stop with a clear message."""

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_gpu_scripts_say_they_need_cuda(tmp_path):
    """Without CUDA the GPU smoke check, the sweep and the suite stop with a clear message and
    a non-zero exit, no traceback and no files."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHON=sys.executable)
    for cmd in ([sys.executable, "-m", "bench.gpu_smoke", "--out", str(tmp_path)],
                [sys.executable, "-m", "bench.kernel_sweep", "--out", str(tmp_path)],
                ["bash", "bench/gpu_suite.sh", "--out", str(tmp_path)]):
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (cmd, proc.stdout, proc.stderr)
        assert "needs a CUDA device" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())


def test_gpu_suite_parts_and_help():
    """The suite's parts, in their order (smoke, sweep, tests, memcheck, micro,
    train), each documented in the comment block that ``--help`` prints and
    accepted on the command line; the sweep has its own time limit."""
    import os
    import re
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parts = ["smoke", "sweep", "tests", "memcheck", "micro", "train"]
    script = open(os.path.join(root, "bench", "gpu_suite.sh")).read()
    assert f"PARTS=({' '.join(parts)})" in script
    assert f"smoke|sweep|tests|memcheck|micro|train) PARTS+=" in script
    proc = subprocess.run(["bash", "bench/gpu_suite.sh", "--help"], cwd=root, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    documented = re.findall(r"^#   (\w+) +python|^#   (\w+) +the|^#   (\w+) +compute", proc.stdout, flags=re.M)
    assert ["".join(d) for d in documented] == parts, proc.stdout
    assert "bench.kernel_sweep" in proc.stdout and "SWEEP_TIMEOUT" in proc.stdout
    assert re.search(r"sweep\) LIMIT=\$\{SWEEP_TIMEOUT:-300\} run_part sweep", script)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_gpu_suite_takes_the_sweep_part(tmp_path):
    """``sweep`` is a part the suite knows: without CUDA it gets as far as the CUDA check."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(["bash", "bench/gpu_suite.sh", "--out", str(tmp_path), "smoke", "sweep"], cwd=root,
                          env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr and "unknown argument" not in proc.stderr


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


def test_trainer_speed_dry_run(tmp_path):
    """The trainer timing of the suite's train part, on the CPU at toy sizes:
    two variants, a few steps, samples/s from the trainer's log; where
    open_clip_train does not import, a message and a JSON saying so, exit 0."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "trainer.json"
    cmd = [sys.executable, "-m", "bench.trainer_speed", "--device", "cpu", "--model", "ViT-S-32", "--image-size", "64",
           "--batch-size", "2", "--steps", "2", "--warmup", "1", "--variants", "none,pgs", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "trainer_speed" and doc["device"] == "cpu" and doc["commit"]
    try:
        import open_clip_train.main  # noqa: F401
    except Exception:  # the default environment has no open_clip
        assert "skipped" in doc and "open_clip_train does not import" in proc.stdout
        return
    rows = doc["variants"]
    assert set(rows) == {"none", "pgs"} and all(r["samples_per_s"] > 0 and r["steps_measured"] == 1
                                                for r in rows.values())
    assert rows["pgs"]["tokens_train"] == "1 + 2" and rows["pgs"]["tokens_all"] == "1 + 4"
    assert doc["ratios"]["pgs/none"] > 0
