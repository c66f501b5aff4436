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


def test_api_example_runs_as_pasted():
    """The README's first Python example, verbatim, on whatever device is here."""
    example = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)[0]
    scope = {}
    exec(compile(example, "README.md", "exec"), scope)
    assert tuple(scope["sel"].keep_idx.shape) == (8, 98) and tuple(scope["kept"].shape) == (8, 98, 768)


def test_readme_speaks_of_the_project_only():
    text = (ROOT / "README.md").read_text()
    assert "../shared" not in text and "SPEC.md" not in text
    assert (ROOT / "docs" / "algorithm.md").exists() and "docs/algorithm.md" in text
