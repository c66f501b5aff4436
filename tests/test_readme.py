"""The README's commands stay true: CI runs the README's set-up + tests line."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bash_blocks():
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command():
    setup_and_tests = _bash_blocks()[0].strip()
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert setup_and_tests in ci_lines


def test_main_job_is_the_demo_module():
    main_job = _bash_blocks()[1].strip()
    assert main_job.endswith("python -m pgs_kernels.demo")
    assert (ROOT / "pgs_kernels" / "demo.py").exists()
