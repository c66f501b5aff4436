"""The README's commands, examples and links stay true: CI runs the README's
set-up + tests line, its Python compiles (the first example runs), and every
link or image in README.md and docs/*.md points at a file of this
repository."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(lang, path=ROOT / "README.md"):
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S)


def _block(lang, marker):
    """The one README block of ``lang`` that holds ``marker``."""
    found = [b for b in _blocks(lang) if marker in b]
    assert len(found) == 1, f"README: {len(found)} {lang} blocks hold {marker!r}"
    return found[0]


def test_ci_runs_the_readme_test_command():
    setup_and_tests = _block("bash", "pip install -r requirements.txt").strip()
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert setup_and_tests in ci_lines


def test_main_job_is_the_demo_module():
    main_job = _block("bash", "pgs_kernels.demo").strip()
    assert main_job.endswith("python -m pgs_kernels.demo")
    assert (ROOT / "pgs_kernels" / "demo.py").exists()


def test_api_example_runs_as_pasted():
    """The README's pgs_select example, verbatim, on whatever device is here."""
    scope = {}
    exec(compile(_block("python", "sel = pgs_kernels.pgs_select("), "README.md", "exec"), scope)
    assert tuple(scope["sel"].keep_idx.shape) == (8, 98) and tuple(scope["kept"].shape) == (8, 98, 768)


def test_python_examples_compile():
    """Every Python block of the README and the docs is Python (the open_clip
    and timm ones run in test_integrations.py where those are installed)."""
    blocks = [(p, code) for p in DOCS for code in _blocks("python", p)]
    assert len(blocks) >= 4
    for path, code in blocks:
        # The layer example elides its constructor's parameters, "(self, ...)".
        compile(code.replace("(self, ...)", "(self, *args)"), str(path.relative_to(ROOT)), "exec")


def _links(text):
    """Targets of Markdown links and images, reference definitions and HTML src/href."""
    found = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    found += re.findall(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", text, flags=re.M)
    found += re.findall(r"<(?:img|a|source)\b[^>]*\b(?:src|href)=\"([^\"]+)\"", text)
    return found


def test_links_and_images_point_at_files_of_the_repository():
    """Every relative link and image of README.md and docs/*.md names a file or
    folder that exists, inside this repository: nothing from a neighbouring
    folder (../shared) or a planning file (SPEC.md), which a clone lacks. The
    README links the algorithm's page."""
    checked = 0
    for path in DOCS:
        text = path.read_text()
        assert "../shared" not in text and "SPEC.md" not in text, path.name
        for target in _links(text):
            if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor of the same page
            file = (path.parent / target.split("#")[0]).resolve()
            assert file.is_relative_to(ROOT), f"{path.name}: {target} leaves the repository"
            assert file.exists(), f"{path.name}: {target} does not exist"
            checked += 1
    assert checked >= 3
    assert "docs/algorithm.md" in _links((ROOT / "README.md").read_text())
