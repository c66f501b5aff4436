"""The launch-settings sweep and its table, without a GPU: the sweep's dry run
(the same script on the CPU through the Triton interpreter, toy sizes) writes
its files in the documented form, a candidate whose outputs disagree with the
reference never wins, ``--merge`` makes a table ``lookup`` reads back, and
the committed table parses."""

import json
import math
import os
import subprocess
import sys

import pytest

from pgs_kernels import triton_tuning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The dry run's call whose DEFAULT candidate gets corrupted outputs.
CORRUPTED = "32x48-8-bf16x32"
RECORD_KEYS = {"candidate", "config", "key", "settings", "status", "error", "problems", "median_us", "p20_us",
               "p80_us", "seconds"}


def _sweep(out, *extra, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself
    env.pop(triton_tuning.ENV, None)
    proc = subprocess.run([sys.executable, "-m", "bench.kernel_sweep", "--dry-run", "--out", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run, DEFAULT's outputs corrupted on one call (redundancy off by
    10x the tolerance)."""
    out = tmp_path_factory.mktemp("sweep")
    proc = _sweep(out, "--test-corrupt", f"0:{CORRUPTED}", "--budget-s", "1000")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture
def table_env(tmp_path, monkeypatch):
    """``PGS_TRITON_TUNING`` at a temporary file; the parsed tables forgotten before and after."""
    path = tmp_path / "table.json"
    monkeypatch.setenv(triton_tuning.ENV, str(path))
    triton_tuning.clear_cache()
    yield path
    triton_tuning.clear_cache()


def test_dry_run_writes_every_file_in_its_form(dry_run):
    from bench import kernel_sweep

    doc = json.loads((dry_run / "sweep-dry-run.json").read_text())
    assert doc["dry_run"] and doc["finished"] and doc["ok"] and not doc["no_winner"]
    assert doc["benchmark"] == "kernel_sweep" and doc["commit"] and doc["arch"] == kernel_sweep.DRY_ARCH
    assert doc["default"] == triton_tuning.DEFAULT and doc["candidates"][0] == triton_tuning.DEFAULT
    names = [c["name"] for c in kernel_sweep.DRY_CONFIGS]
    assert [c["name"] for c in doc["configs"]] == names
    for c in doc["configs"]:
        ref = c["reference"]
        assert ref["photos"] > 0 and ref["decided_rows"] >= ref["rows"] * kernel_sweep.MIN_DECIDED
    # every (candidate, call) ran: checked, then timed when correct
    assert len(doc["records"]) == len(doc["candidates"]) * len(names) and not doc["not_run"]
    for r in doc["records"]:
        assert RECORD_KEYS <= set(r), r
        assert r["settings"] == doc["candidates"][r["candidate"]]
        if r["status"] == "ok":
            assert not r["problems"] and r["p20_us"] <= r["median_us"] <= r["p80_us"]
            assert r["edge_err"] <= 1e-4 and r["redundancy_err"] <= 1e-4 and r["decided_rows"] > 0
        else:
            assert r["median_us"] is None
    assert set(doc["winners"]) == set(names)

    # one JSON line per event, the first and last the run's start and end
    events = [json.loads(line) for line in (dry_run / "sweep-dry-run.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "end"
    assert sum(e["event"] == "candidate" for e in events) == len(doc["records"])
    assert sum(e["event"] == "reference" for e in events) == len(names)

    # the winners in the table's format, one entry per call
    table = triton_tuning.load_table(str(dry_run / "triton-tuning-dry-run.json"))
    assert len(table) == len(names)
    raw = json.loads((dry_run / "triton-tuning-dry-run.json").read_text())
    for e in raw["entries"]:
        prov = e["provenance"]
        assert prov["dry_run"] and prov["batch"] == kernel_sweep.DRY_BATCH and prov["median_us"] > 0
        assert {"device_name", "torch", "triton", "commit", "date", "default_us", "default"} <= set(prov)
        assert set(e["settings"]) == set(triton_tuning.DEFAULT)


def test_a_wrong_candidate_cannot_win(dry_run):
    """DEFAULT's outputs on one call were corrupted: there it is incorrect,
    never timed, and the other candidate wins; elsewhere it stays eligible."""
    doc = json.loads((dry_run / "sweep-dry-run.json").read_text())
    bad = [r for r in doc["records"] if r["candidate"] == 0 and r["config"] == CORRUPTED]
    assert len(bad) == 1 and bad[0]["status"] == "incorrect" and bad[0]["median_us"] is None
    assert any("redundancy" in p for p in bad[0]["problems"]), bad[0]["problems"]
    assert doc["winners"][CORRUPTED]["candidate"] != 0
    assert doc["winners"][CORRUPTED]["default_us"] is None
    others = [r for r in doc["records"] if r["config"] != CORRUPTED]
    assert all(r["status"] == "ok" for r in others), [(r["config"], r["problems"], r["error"]) for r in others]


def test_merge_makes_a_table_lookup_reads(dry_run, table_env):
    from bench import kernel_sweep

    winners = dry_run / "triton-tuning-dry-run.json"
    assert kernel_sweep.main(["--merge", str(winners), "--table", str(table_env)]) == 0
    doc = json.loads(winners.read_text())
    by_key = lambda e: (e["arch"], e["grid"], e["token_width"])  # noqa: E731
    assert json.loads(table_env.read_text())["entries"] == sorted(doc["entries"], key=by_key)
    for e in doc["entries"]:
        got = triton_tuning.lookup(e["arch"], tuple(e["grid"]), e["token_width"])
        assert got == e["settings"]
    # the corrupted call's entry is the other candidate's settings
    (cfg,) = [c for c in kernel_sweep.DRY_CONFIGS if c["name"] == CORRUPTED]
    arch, grid, width = kernel_sweep.config_key(cfg, kernel_sweep.DRY_ARCH)
    assert triton_tuning.lookup(arch, grid, width) != triton_tuning.DEFAULT

    # a second merge replaces the entry of the same key and keeps the others
    e0 = dict(doc["entries"][0], settings=dict(doc["entries"][0]["settings"], num_warps=16))
    newer = table_env.parent / "newer.json"
    newer.write_text(json.dumps(dict(format=triton_tuning.FORMAT, entries=[e0])))
    assert kernel_sweep.main(["--merge", str(newer)]) == 0  # PGS_TRITON_TUNING: the table written
    triton_tuning.clear_cache()
    assert triton_tuning.lookup(e0["arch"], e0["grid"], e0["token_width"])["num_warps"] == 16
    assert len(triton_tuning.load_table()) == len(doc["entries"])
    assert table_env.read_text() == kernel_sweep.dumps_table(json.loads(table_env.read_text()))


def test_a_dry_run_never_goes_into_the_committed_table(dry_run, tmp_path, monkeypatch):
    from bench import kernel_sweep

    committed = tmp_path / "committed.json"
    committed.write_text('{"format": 1, "entries": []}\n')
    monkeypatch.setattr(triton_tuning, "TABLE_PATH", str(committed))
    monkeypatch.delenv(triton_tuning.ENV, raising=False)
    assert kernel_sweep.merge([str(dry_run / "triton-tuning-dry-run.json")]) == 2
    assert committed.read_text() == '{"format": 1, "entries": []}\n'


def test_dry_run_out_of_budget_still_writes_its_files(tmp_path):
    """No time for a single candidate: nothing runs, every pair is listed as
    not run, the files are there, and without winners the exit status is 1."""
    proc = _sweep(tmp_path, "--budget-s", "0", "--workers", "0", timeout=200)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "sweep-dry-run.json").read_text())
    assert doc["budget_exhausted"] and not doc["records"] and len(doc["not_run"]) == 2 * 3
    assert not doc["ok"] and len(doc["no_winner"]) == 3
    assert json.loads((tmp_path / "triton-tuning-dry-run.json").read_text())["entries"] == []
    assert json.loads((tmp_path / "sweep-dry-run.jsonl").read_text().splitlines()[-1])["event"] == "end"


def _rec(i, name, settings, status="ok", us=None, confirm=()):
    return dict(candidate=i, config=name, key=("sm_90", (14, 14), 0), settings=settings, status=status,
                median_us=us, confirm_us=list(confirm))


def test_choose_winners():
    """Only correct, timed records win; the fastest, or DEFAULT when that is
    within the minimum gain; a weak check or no correct record: no winner."""
    from bench.kernel_sweep import choose_winners

    d = dict(triton_tuning.DEFAULT)
    a, b = dict(d, num_warps=4), dict(d, num_warps=16)
    cfgs = [dict(name=n) for n in ("x", "y", "z", "w")]
    recs = [
        _rec(0, "x", d, us=100.0), _rec(1, "x", a, "incorrect", us=10.0), _rec(2, "x", b, us=90.0, confirm=[95, 200]),
        _rec(0, "y", d, us=100.0), _rec(2, "y", b, us=99.5),
        _rec(0, "z", d, "failed"), _rec(1, "z", a, "incorrect", us=1.0),
        _rec(0, "w", d, us=50.0),
    ]
    w = choose_winners(recs, cfgs, d, min_gain=0.01, weak={"w": "too few decided rows"})
    assert set(w) == {"x", "y"}
    assert w["x"]["record"]["candidate"] == 2 and w["x"]["final_us"] == 95.0 and w["x"]["default_us"] == 100.0
    assert w["y"]["record"]["candidate"] == 0 and "DEFAULT kept" in w["y"]["why"]
    assert choose_winners(recs, cfgs, d, min_gain=0.0)["y"]["record"]["candidate"] == 2


def test_candidates_cover_the_space_most_promising_first():
    cands = list(triton_tuning.candidates())
    n = math.prod(len(v) for v in triton_tuning.SPACE.values())
    assert cands[0] == triton_tuning.DEFAULT and len(cands) == n
    assert len({json.dumps(c, sort_keys=True) for c in cands}) == n
    dist = [sum(c[k] != triton_tuning.DEFAULT[k] for k in triton_tuning.SPACE) for c in cands]
    assert dist == sorted(dist)
    for c in cands:
        assert set(c) == set(triton_tuning.DEFAULT)
        assert all(c[k] in v for k, v in triton_tuning.SPACE.items())
    # a value added to the space is tried; DEFAULT comes first even outside the space
    space = dict(triton_tuning.SPACE, num_warps=(2,))
    more = list(triton_tuning.candidates(space))
    assert more[0] == triton_tuning.DEFAULT and all(c["num_warps"] == 2 for c in more[1:])


def test_lookup(table_env):
    d = triton_tuning.DEFAULT
    # no table file: DEFAULT, a fresh dict each call
    got = triton_tuning.lookup("sm_90", (14, 14), 0)
    assert got == d and got is not d
    got["num_warps"] = 1
    assert triton_tuning.lookup("sm_90", (14, 14), 0) == d and d["num_warps"] != 1
    # an entry: over DEFAULT (a missing setting takes its default, an unknown one is dropped)
    table_env.write_text(json.dumps(dict(format=1, entries=[
        dict(arch="sm_90", grid=[14, 14], token_width=768, settings=dict(num_warps=4, gone=3))])))
    triton_tuning.clear_cache()
    assert triton_tuning.lookup("sm_90", [14, 14], 768) == dict(d, num_warps=4)
    for key in [("sm_90", (14, 14), 0), ("sm_90", (24, 24), 768), ("sm_86", (14, 14), 768)]:
        assert triton_tuning.lookup(*key) == d
    # an architecture with its own offline best (ARCH_DEFAULTS), for its entries too
    assert triton_tuning.lookup("sm_80", (14, 14), 768) == dict(d, **triton_tuning.ARCH_DEFAULTS["sm_80"])
    table_env.write_text(json.dumps(dict(format=1, entries=[
        dict(arch="sm_80", grid=[14, 14], token_width=768, settings=dict(num_warps=4))])))
    triton_tuning.clear_cache()
    assert triton_tuning.lookup("sm_80", (14, 14), 768) == dict(d, **triton_tuning.ARCH_DEFAULTS["sm_80"],
                                                                num_warps=4)
    # a table that does not parse: a warning, and DEFAULT everywhere
    table_env.write_text("{not json")
    triton_tuning.clear_cache()
    with pytest.warns(RuntimeWarning, match="tuning table does not parse"):
        assert triton_tuning.lookup("sm_90", (14, 14), 768) == d
    table_env.write_text(json.dumps(dict(format=1, entries=[dict(arch="sm_90", grid=[14, 14], token_width=0,
                                                                 settings={})] * 2)))
    with pytest.raises(ValueError, match="two entries"):
        triton_tuning.load_table(str(table_env))


def test_the_committed_table_parses():
    from bench.kernel_sweep import dumps_table

    assert triton_tuning.TABLE_PATH.endswith(os.path.join("pgs_kernels", "triton_tuning.json"))
    table = triton_tuning.load_table(triton_tuning.TABLE_PATH)
    with open(triton_tuning.TABLE_PATH) as f:
        text = f.read()
    doc = json.loads(text)
    assert text == dumps_table(doc), "write it with bench.kernel_sweep --merge"
    for (arch, grid, width), settings in table.items():
        assert arch.startswith("sm_") and arch[3:].isdigit() and width >= 0 and min(grid) > 0
        assert set(settings) <= set(triton_tuning.DEFAULT)
    for e in doc["entries"]:
        assert not e.get("provenance", {}).get("dry_run")
        assert {"device_name", "torch", "triton", "commit", "median_us", "default_us"} <= set(e["provenance"])


def test_the_launch_plan_takes_the_settings():
    """The sweep's candidates reach the launches as they are."""
    import torch

    from bench import kernel_sweep

    cfg = kernel_sweep.DRY_CONFIGS[1]
    L, _, _ = kernel_sweep._counts(cfg)
    images = torch.zeros(2, 3, cfg["H"], cfg["W"])
    tokens = torch.zeros(2, L, cfg["D"], dtype=torch.bfloat16)
    for setting in kernel_sweep.dry_candidates(triton_tuning.DEFAULT):
        _, launches = kernel_sweep.plan(cfg, images, tokens, torch.rand(2, L), setting, compiled=False)
        assert launches and all({k: meta[k] for k in setting} == setting for *_, meta in launches)
