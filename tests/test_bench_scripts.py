"""The benchmark scripts on tiny cases: each runs, writes the JSON it
documents (environment and load block included) and its figure, keeps to
its time limit, and asks for a CUDA device with a message, not a traceback.
Nothing here asserts a time."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from bench import common, micro, native_speed, plot, published_fixture, retention
from bench.clip import quality, throughput, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_KEYS = {"benchmark", "device", "device_name", "torch", "triton", "commit", "load"}
LOAD_KEYS = {"before", "after", "cpus", "threads", "others_cores_before", "others_cores_during", "busy", "warning"}
TINY_MICRO = ["--device", "cpu", "--threads", "1", "--batches", "1", "2", "--configs", "32/16", "--dtypes", "fp32"]


def check_env(doc, benchmark):
    assert ENV_KEYS <= set(doc), sorted(ENV_KEYS - set(doc))
    assert doc["benchmark"] == benchmark and doc["device"] == "cpu"
    assert set(doc["load"]) == LOAD_KEYS
    assert doc["load"]["busy"] == (doc["load"]["warning"] is not None)


def test_load_record_measures_other_processes():
    rec = common.LoadRecord(threads=1, quiet=True, sample_s=0.05)
    block = rec.finish()
    assert set(block) == LOAD_KEYS and block["threads"] == 1 and block["cpus"] == os.cpu_count()
    if os.path.exists("/proc/stat"):
        assert 0.0 <= block["others_cores_before"] <= 1.5 * block["cpus"]


def test_micro_tiny(tmp_path):
    out = tmp_path / "micro.json"
    assert micro.main(TINY_MICRO + ["--impls", "python_ref_fp32", "random", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    check_env(doc, "micro")
    assert doc["fused_backend"] in ("native", "reference")
    impls = {r["impl"] for r in doc["rows"]}
    assert impls == {micro.FUSED, "python_ref_fp32", "random"}
    assert {r["batch"] for r in doc["rows"]} == {1, 2} and {r["tokens"] for r in doc["rows"]} == {False, True}
    assert (tmp_path / "micro.png").stat().st_size > 0


def test_micro_preset_reports_its_targets(tmp_path):
    out = tmp_path / "preset.json"
    micro.main(["--device", "cpu", "--threads", "1", "--preset", "vit-b16", "--batches", "1", "--impls",
                "python_ref_fp32", "--no-plot", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["settings"]["preset"] == "vit-b16"
    assert {(r["height"], r["patch_size"], r["dtype"], r["tokens_dtype"]) for r in doc["rows"]} == {
        (224, 16, "fp32", "bf16")}
    assert doc["targets"]["targets"] == {"python_ref_fp32": 10.0, "python_ref_compiled": 3.0}
    entry = doc["ratios"]["1"]
    assert entry["python_ref_fp32"] > 0 and isinstance(entry["python_ref_fp32_target_met"], bool)


def test_micro_skips_what_does_not_fit_the_time_limit(tmp_path):
    out = tmp_path / "late.json"
    t0 = time.monotonic()
    micro.main(TINY_MICRO + ["--time-limit", "0.5", "--no-plot", "--out", str(out)])
    assert time.monotonic() - t0 < 30
    doc = json.loads(out.read_text())
    assert doc["rows"] == [] and doc["skipped"]
    assert {s["skipped"] for s in doc["skipped"]} == {"time limit"}


def test_micro_cuts_a_measurement_short_at_the_time_limit(tmp_path, monkeypatch):
    def slow_impls(device, names, compile_ok):
        return {micro.FUSED: ("auto", lambda *a: time.sleep(30))}

    monkeypatch.setattr(micro, "make_impls", slow_impls)
    out = tmp_path / "cut.json"
    t0 = time.monotonic()
    assert micro.main(TINY_MICRO + ["--time-limit", "3", "--no-plot", "--out", str(out)]) == 0
    assert time.monotonic() - t0 < 10
    doc = json.loads(out.read_text())
    assert "time limit" in doc["stopped"] and doc["rows"] == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a CUDA device")
@pytest.mark.parametrize("entry", [micro.main, throughput.main, train.main, quality.main],
                         ids=["micro", "throughput", "train", "quality"])
def test_cuda_without_a_device_is_a_message(entry, capsys):
    with pytest.raises(SystemExit) as exc:
        entry(["--device", "cuda"])
    assert exc.value.code not in (0, None)
    assert "needs a CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("entry", [micro.main, native_speed.main, retention.main, throughput.main, quality.main],
                         ids=["micro", "native_speed", "retention", "throughput", "quality"])
def test_help_says_where_results_go(entry, capsys):
    with pytest.raises(SystemExit) as exc:
        entry(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "bench/results/" in text and "--out" in text and "overwrit" in text


def test_native_speed_runs_as_a_file():
    env = dict(os.environ, COLUMNS="200")  # argparse wraps the help at the terminal's width
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "native_speed.py"), "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "bench/results/native-cpu.json" in res.stdout


def test_retention_tiny(tmp_path):
    out = tmp_path / "ret.json"
    assert retention.main(["--scenes", "3", "--batch", "3", "--photo-seeds", "1", "--ratios", "0.5",
                           "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    check_env(doc, "retention")
    assert set(doc["synthetic"]["results"]["0.5"]) == set(retention.METHODS)
    figs = doc["figures"]
    assert figs["photos"]["names"] == list(retention.FIGURE_PHOTOS)
    assert len(figs["scenes"]["dropped"]["pgs"]) == len(figs["scenes"]["seeds"])
    assert all(len(d) == 98 for d in figs["photos"]["dropped"]["pgs"])
    assert (tmp_path / "ret.png").exists() and (tmp_path / "ret-scenes.png").exists()
    first = (tmp_path / "ret.png").read_bytes()
    (tmp_path / "ret.png").unlink()
    assert retention.main(["--plot-only", "--out", str(out)]) == 0
    assert (tmp_path / "ret.png").read_bytes() == first


def test_plot_imports_no_study():
    """bench.plot only draws what it is handed: it imports no benchmark
    (the retention study renders its images and passes them to image_grid)."""
    import ast

    with open(plot.__file__) as f:
        tree = ast.parse(f.read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m.startswith(("bench", "pgs_kernels", "python_ref"))} == {"bench.common"}


def test_published_fixture_builds_its_inputs():
    """The inputs --fixture and --compare build (no official checkout needed
    for these): the fixture's image bank is the committed fixture's images,
    under the names it records, and the first comparison batch."""
    import numpy as np

    names, bank = published_fixture.fixture_bank()
    with np.load(published_fixture.FIXTURE) as z:
        assert names == json.loads(str(z["meta_json"]))["image_names"]
        assert bank.shape == z["images_u8"].shape and bank.dtype == np.uint8
        assert [n for n, a, b in zip(names, bank, z["images_u8"]) if not np.array_equal(a, b)] == []
    kind, B, x, mask_ratio, token_weight, seed = next(published_fixture.compare_batches(4, [0]))
    assert (kind, B, tuple(x.shape), x.dtype) == ("photos", 1, (1, 3, 224, 224), torch.float32)


def test_published_fixture_reads_its_inputs_from_the_stored_file(tmp_path, monkeypatch, capsys):
    """--fixture feeds the published code the images stored in the fixture
    file (altered here, so that no generator could make them) and stores them
    again; only where there is no file is a new bank generated, same names."""
    import numpy as np

    pf = published_fixture
    with np.load(pf.FIXTURE) as z:
        arrays = {k: z[k] for k in z.files}
    stored = arrays["images_u8"]
    arrays["images_u8"] = (255 - stored).astype(np.uint8)
    fixture = tmp_path / "published_official.npz"
    np.savez_compressed(fixture, **arrays)
    names, bank = pf.fixture_bank(str(fixture))
    assert np.array_equal(bank, arrays["images_u8"])

    fed = []

    def fake_official(cls, images, tokens, *, seed, mask_ratio, token_weight):
        fed.append(images)
        B, k = images.shape[0], pf.L - int(pf.L * (1 - pf.CANDIDATE_RATIO))
        return {"u": torch.rand(B, pf.L), "u2": torch.rand(B, pf.L), "b": torch.zeros(B, pf.L),
                "S": torch.zeros(B, pf.L, pf.L), "sk_divisions": 0, "cand": torch.zeros(B, k, dtype=torch.long),
                "similar": torch.zeros(B, pf.L, dtype=torch.bool), "Kp": 98,
                "keep": torch.zeros(B, 98, dtype=torch.long), "attn": None}

    monkeypatch.setattr(pf, "run_official", fake_official)
    monkeypatch.setattr(pf, "FIXTURE", str(fixture))
    monkeypatch.setattr(pf, "DATA", str(tmp_path))
    pf.write_fixture(None, str(tmp_path))
    assert "images stored in" in capsys.readouterr().out
    with np.load(fixture) as z:
        assert np.array_equal(z["images_u8"], arrays["images_u8"])
        meta = json.loads(str(z["meta_json"]))
    assert meta["image_names"] == names and "e2b3e3be23e2e4377c1be1954c9557d72eb5a413" in meta["images_from"]
    first = pf.fixture_cases(len(names))[0][0]
    assert torch.equal(fed[0], pf.clip_normalize(torch.from_numpy(arrays["images_u8"][first])))

    new_names, new_bank = pf.fixture_bank(str(tmp_path / "absent.npz"))
    assert [n.split(":")[:2] for n in new_names] == [n.split(":")[:2] for n in names]
    assert new_bank.shape == stored.shape and new_bank.dtype == np.uint8
    arrays["meta_json"] = np.array(json.dumps({**meta, "image_names": names[1:] + names[:1]}))
    np.savez_compressed(fixture, **arrays)
    with pytest.raises(SystemExit, match="delete the file"):
        pf.fixture_bank(str(fixture))


def test_throughput_tiny(tmp_path):
    out = tmp_path / "train.json"
    rep = throughput.run(throughput.parse_args(["--device", "cpu", "--batch-size", "4", "--steps", "2",
                                                "--repeats", "1", "--warmup", "1", "--modes", "none,random,pgs",
                                                "--threads", "1", "--out", str(out)]))
    doc = json.loads(out.read_text())
    check_env(doc, "train_throughput")
    assert [r["mode"] for r in doc["rows"]] == ["none", "random", "pgs"] == [r["mode"] for r in rep["rows"]]
    assert {r["mode"]: r["tokens"] for r in doc["rows"]} == {"none": 65, "random": 33, "pgs": 33}


def test_plot_draws_known_files_and_skips_others(tmp_path, capsys):
    out = tmp_path / "micro-x.json"
    micro.main(TINY_MICRO + ["--tokens", "off", "--impls", "random", "--no-plot", "--out", str(out)])
    other = tmp_path / "kernel-x.json"
    other.write_text(json.dumps({"rows": []}))
    assert plot.main([str(out), str(other)]) == 0
    text = capsys.readouterr().out
    assert "micro-x.png" in text and f"skipped {other}" in text
    assert (tmp_path / "micro-x.png").stat().st_size > 0


def test_quality_tiny(tmp_path):
    out = tmp_path / "quality.json"
    assert quality.main(["--steps", "3", "--seeds", "1", "--modes", "none,random,pgs", "--ratios", "0.75",
                         "--batch-size", "8", "--warmup", "1", "--eval-scenes", "16", "--zero-shot-scenes", "16",
                         "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    check_env(doc, "train_quality")
    assert [(r["mode"], r["mask_ratio"], r["seed"]) for r in doc["rows"]] == [
        ("none", 0.0, 0), ("random", 0.75, 0), ("pgs", 0.75, 0)]
    for r in doc["rows"]:
        assert r["steps"] == 3 and r["images_per_s"] > 0 and r["wall_s"] > 0 and r["cpu_s"] > 0
        for k in ("zero_shot_acc", "i2t_r1", "t2i_r1"):
            assert 0.0 <= r[k] <= 1.0
    assert "zero_shot_acc_masked" in doc["rows"][1] and "zero_shot_acc_masked" not in doc["rows"][0]
    assert {(s["mode"], s["mask_ratio"]) for s in doc["summary"]} == {("none", 0.0), ("random", 0.75), ("pgs", 0.75)}
    assert (tmp_path / "quality.png").stat().st_size > 0


def test_quality_equal_compute_tiny(tmp_path):
    """The equal-compute arm in a few steps: one FLOP budget, more steps for
    the masked runs, within it, and the paired differences per seed."""
    out = tmp_path / "equal.json"
    assert quality.main(["--equal-compute", "--steps", "4", "--seeds", "1", "--modes", "none,random,pgs",
                         "--ratios", "0.5", "0.75", "--unmasked-shares", "0", "0.25", "--batch-size", "8",
                         "--warmup", "2", "--eval-scenes", "16", "--zero-shot-scenes", "16", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    check_env(doc, "train_quality_equal_compute")
    assert doc["seeds"] == [0]
    f = {(x["mode"], x["mask_ratio"]): x for x in doc["flops_per_step"]}
    assert f[("pgs", 0.5)]["flops"] == f[("random", 0.5)]["flops"] < f[("none", 0.0)]["flops"]
    assert doc["budget"]["flops"] == 4 * f[("none", 0.0)]["flops"]
    plan = {(e["mode"], e["mask_ratio"], e["unmasked_share"]): e for e in doc["plan"]}
    assert set(plan) == {("none", 0.0, None)} | {(m, 0.5, s) for m in ("random", "pgs") for s in (0.0, 0.25)} | {
        (m, 0.75, 0.1) for m in ("random", "pgs")}
    assert plan[("none", 0.0, None)]["steps"] == 4
    for (mode, ratio, share), e in plan.items():
        assert e["flops"] <= doc["budget"]["flops"]
        if mode != "none":
            assert e["steps"] > 4 and e["unmasked_steps"] == int(share * e["steps"] + 0.5)
    assert plan[("pgs", 0.75, 0.1)]["steps"] > plan[("pgs", 0.5, 0.0)]["steps"] >= plan[("pgs", 0.5, 0.25)]["steps"]
    assert len(doc["rows"]) == len(plan) == len(doc["summary"])
    assert {r["steps"] for r in doc["rows"] if r["mode"] == "pgs"} == {plan[k]["steps"] for k in plan if k[0] == "pgs"}
    paired = {(d["against"], d["mask_ratio"], d["unmasked_share"], d["metric"]): d for d in doc["paired"]}
    assert len(paired) == 2 * 3 * 3
    d = paired[("random", 0.5, 0.25, "zero_shot_acc")]
    rows = {(r["mode"], r["unmasked_share"]): r for r in doc["rows"] if r["mask_ratio"] == 0.5}
    assert d["per_seed"] == [rows[("pgs", 0.25)]["zero_shot_acc"] - rows[("random", 0.25)]["zero_shot_acc"]]
    assert d["positive"] + d["negative"] <= 1 and d["seeds"] == [0]
    assert (tmp_path / "equal.png").stat().st_size > 0
    from bench import render_docs

    page = render_docs.quality_equal_compute({"_dir": ".", render_docs.EQUAL_NAME: doc})
    assert "### Paired differences" in page and "| PGS − random | 0.5 | 25 % |" in page
    assert "**PGS against no masking**" in page and "**In short**" in page


def test_quality_scores_count_shared_captions_as_hits():
    from bench.clip.quality import retrieval_r1

    img = torch.eye(3)
    txt = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    # images 0 and 1 share a caption: swapping their texts still hits
    assert retrieval_r1(img, txt, ["a", "a", "b"]) == {"i2t_r1": 1.0, "t2i_r1": 1.0}
    assert retrieval_r1(img, txt, ["a", "c", "b"]) == pytest.approx({"i2t_r1": 1 / 3, "t2i_r1": 1 / 3})


def test_outputs_go_to_an_untracked_folder_unless_refreshed(monkeypatch):
    from bench import common

    monkeypatch.setattr(common, "_refresh", False)  # --refresh below sets it for the process
    p = common.argument_parser("doc")
    p.add_argument("--out", default=common.result_path("a.json"))
    assert p.parse_args([]).out == os.path.join(ROOT, "bench", "out", "a.json")
    assert p.parse_args(["--out", "/tmp/x.json", "--refresh"]).out == "/tmp/x.json"
    assert p.parse_args(["--refresh"]).out == os.path.join(ROOT, "bench", "results", "a.json")
    assert common.result_path("b.json") == os.path.join(ROOT, "bench", "results", "b.json")
    ignored = subprocess.run(["git", "check-ignore", "-q", "bench/out/a.json"], cwd=ROOT, capture_output=True)
    if ignored.returncode == 128:  # not a git checkout (a copy of the tree): the rule is .gitignore's line
        assert "/bench/out/" in open(os.path.join(ROOT, ".gitignore")).read().split()
    else:
        assert ignored.returncode == 0, "bench/out/ must be ignored by git"


def test_git_commit_is_unknown_without_git(tmp_path):
    """Results record commit "unknown" where git is missing, instead of crashing before they are written."""
    env = dict(os.environ, PATH=str(tmp_path))  # an empty folder: no git on PATH
    res = subprocess.run([sys.executable, "-c", "from bench.common import git_commit; print(git_commit())"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "unknown"


TESTS_CUT_SHORT = '''
import time
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")

def test_passes():
    pass

def test_fails():
    assert 1 == 2, "one is not two"

def test_skips():
    pytest.skip("not here")

def test_errors(broken):
    pass

def test_hangs():
    time.sleep(120)
'''


def test_pytest_log_keeps_the_results_of_a_run_cut_short(tmp_path):
    """The GPU suite's tests part: each outcome is on disk as its test ends, and
    the summary comes from whatever is there when a time limit kills the run,
    naming the test it cut (and commit "unknown" where git is missing)."""
    (tmp_path / "test_cut.py").write_text(TESTS_CUT_SHORT)
    log = tmp_path / "log.jsonl"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench.pytest_log",
                             f"--log-jsonl={log}", "test_cut.py"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while "test_hangs" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline and proc.poll() is None, "pytest did not reach test_hangs"
            time.sleep(0.2)
        proc.terminate()  # as `timeout` does
        proc.wait(timeout=30)
    finally:
        proc.kill()
    out = tmp_path / "summary.json"
    res = subprocess.run([sys.executable, "-m", "bench.pytest_log", str(log), "--out", str(out),
                          "--status", "timed out after 480s"], cwd=ROOT, env=dict(os.environ, PATH=str(tmp_path)),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    assert not doc["complete"] and doc["status"] == "timed out after 480s" and doc["commit"] == "unknown"
    assert (doc["tests"], doc["passed"], doc["failed"], doc["skipped"], doc["error"]) == (4, 1, 1, 1, 1)
    assert doc["unfinished"] == ["test_cut.py::test_hangs"]
    failed = {f["nodeid"]: f for f in doc["failed_tests"]}
    assert "one is not two" in failed["test_cut.py::test_fails"]["message"]
    assert failed["test_cut.py::test_errors"]["outcome"] == "error"
    assert "fixture broke" in failed["test_cut.py::test_errors"]["message"]
