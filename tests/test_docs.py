"""docs/benchmarks.md is what bench/render_docs.py renders from bench/results/."""

import json
import os
import shutil

from bench import render_docs

RESULT_FILES = [n for n in sorted(os.listdir(render_docs.RESULTS)) if n.endswith((".json", ".png"))]

PYTEST_SUMMARY = {  # the keys bench/pytest_log.py writes
    "device": "cpu", "torch": "2.9.1", "triton": "3.5.1", "commit": "0123456789abcdef", "status": "pytest exit 1",
    "complete": True, "exitstatus": 1, "tests": 512, "passed": 498, "failed": 1, "error": 0, "skipped": 13,
    "xfailed": 0, "xpassed": 0,
    "failed_tests": [{"nodeid": "tests/test_native.py::test_dtype_names", "outcome": "failed",
                      "message": "Traceback ...\nTypeError: expected float32, got garbage"}],
    "unfinished": [], "seconds": 301.5, "slowest": [],
}


def copy_results(dest):
    dest.mkdir(exist_ok=True)
    for name in RESULT_FILES:
        shutil.copy(os.path.join(render_docs.RESULTS, name), dest / name)
    return dest


def test_committed_page_is_what_the_results_render():
    with open(render_docs.PAGE) as f:
        committed = f.read()
    assert committed == render_docs.render(), "docs/benchmarks.md is stale: run python -m bench.render_docs"


def test_check_fails_on_a_stale_page(tmp_path, capsys):
    results = copy_results(tmp_path / "results")
    page = tmp_path / "docs" / "benchmarks.md"
    assert render_docs.main(["--results", str(results), "--out", str(page)]) == 0
    assert render_docs.main(["--check", "--results", str(results), "--out", str(page)]) == 0
    page.write_text(page.read_text().replace("115,457", "115,458"))
    capsys.readouterr()
    assert render_docs.main(["--check", "--results", str(results), "--out", str(page)]) == 1
    diff = capsys.readouterr()
    assert any(ln.startswith("-") and "115,458" in ln for ln in diff.out.splitlines())
    assert any(ln.startswith("+") and "115,457" in ln for ln in diff.out.splitlines())
    assert "is stale" in diff.err


def test_no_results_renders_every_section(tmp_path):
    page = render_docs.render(str(tmp_path), str(tmp_path / "benchmarks.md"))
    for title, _ in render_docs.SECTIONS:
        assert f"## {title}" in page
    assert page.count("No results yet") == len(render_docs.SECTIONS)
    assert "|" not in page  # no table without data


def test_a_tested_pair_renders_its_row(tmp_path):
    (tmp_path / "tests-torch-2.9.1.json").write_text(json.dumps(PYTEST_SUMMARY))
    page = render_docs.render(str(tmp_path), str(tmp_path / "benchmarks.md"))
    assert "| 2.9.1 | 3.5.1 | cpu | 498 | 1 | 0 | 13 | 0 | 0 | complete (pytest exit 1) | 0123456 |" in page
    assert "`tests/test_native.py::test_dtype_names` (failed): TypeError: expected float32, got garbage" in page
    assert "0 of 1 pairs ran to the end with no failure" in page


def test_a_changed_number_changes_the_page(tmp_path):
    results = copy_results(tmp_path / "results")
    out = str(tmp_path / "benchmarks.md")
    before = render_docs.render(str(results), out)
    doc = json.loads((results / "fuzz-cpu.json").read_text())
    doc["counts"]["native"]["near_tie"] = 4321
    (results / "fuzz-cpu.json").write_text(json.dumps(doc))
    doc = json.loads((results / "native-cpu.json").read_text())
    doc["rows"][0]["median_ms"] = 99.94
    (results / "native-cpu.json").write_text(json.dumps(doc))
    after = render_docs.render(str(results), out)
    assert after != before
    assert "native **0 mismatches**, 4,321 near-ties" in after
    assert "| 1 | 99.9 |" in after and "| 1 | 99.9 |" not in before


# --------------------------------------------------------------------------- the README


def _readme() -> str:
    with open(os.path.join(render_docs.ROOT, "README.md")) as f:
        return f.read()


def test_readme_results_quote_the_rendered_page():
    """Every figure the README's Results section quotes is on docs/benchmarks.md,
    which is rendered from the JSON: the README cannot drift from the data."""
    import re

    text = _readme()
    results = text[text.index("## Results"):text.index("## Layout")]
    with open(render_docs.PAGE) as f:
        page = f.read()
    figures = re.findall(r"(?<![\w.])\d[\d,]*\.\d+|(?<![\w.])\d{1,3}(?:,\d{3})+", results)
    assert len(figures) >= 15, figures
    missing = [x for x in figures if x not in page]
    assert not missing, f"README figures not on docs/benchmarks.md: {missing}"
    for anchor in re.findall(r"docs/benchmarks\.md#([\w-]+)", text):
        heading = [ln for ln in page.splitlines() if ln.startswith("## ")
                   and re.sub(r"[^\w\- ]", "", ln[3:].strip().lower()).replace(" ", "-") == anchor]
        assert heading, f"README links to #{anchor}, which docs/benchmarks.md has no heading for"


def test_readme_vit_example_runs_as_pasted():
    """The README's own-ViT example, verbatim: the layer keeps CLS and K of the
    patches in training and follows the schedule."""
    import re

    block = [b for b in re.findall(r"```python\n(.*?)```", _readme(), flags=re.S) if "class TinyViT" in b]
    assert len(block) == 1
    scope = {}
    exec(compile(block[0], "README.md", "exec"), scope)
    assert tuple(scope["out"].shape) == (8, 9, 64)
    assert scope["model"].patch_dropout.token_weight == 0.3
