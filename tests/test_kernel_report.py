"""bench.kernel_report on one small configuration: the compile, the SASS
analysis and the row it writes (a GPU is not needed; ptxas is)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_report_row_for_a_small_config(tmp_path):
    pytest.importorskip("triton.backends.nvidia.compiler")
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "bench.kernel_report", "--configs", "64/16:bf16x64",
                           "--archs", "sm_90", "--batch", "32", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and ("not found" in proc.stderr.lower()
                                                           or "No such file" in proc.stderr):
        pytest.skip("no ptxas here")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "64/16:bf16x64" in proc.stdout  # the table
    doc = json.loads(out.read_text())
    assert {"device", "triton", "torch", "commit", "rows"} <= set(doc)
    (row,) = doc["rows"]
    assert row["arch"] == "sm_90" and (row["height"], row["width"], row["patch_size"]) == (64, 64, 16)
    assert row["batch"] == 32 and row["dtype"] == "fp32"
    assert row["tokens_dtype"] == "bf16" and row["token_width"] == 64
    assert row["launches"] == 2  # pixel and token terms in separate kernels
    assert row["num_warps"] in (4, 8, 16)
    assert 16 <= row["regs"] <= 255 and row["spill_bytes"] >= 0 and row["shared_bytes"] >= 0
    assert 1 <= row["ctas_per_sm"] <= 32
    assert row["warps_per_sm"] == row["ctas_per_sm"] * row["num_warps"]
    # A few thousand instructions a thread at least (16 patches, 3 x 256 pixel
    # elements each, 20 Sinkhorn steps), and far from absurd.
    assert 2_000 < row["dyn_instr_per_thread"] < 200_000
    assert sum(row["dyn_instr_by_step"].values()) == pytest.approx(row["dyn_instr_per_thread"], rel=0.01, abs=5)
    # The floors follow their formulas: 132 SMs x 4 schedulers at 1.98 GHz; 4.3 TB/s.
    issue = row["batch"] * row["warp_instr_per_image"] / (132 * 4 * 1.98e3)
    assert row["issue_floor_us"] == pytest.approx(issue, rel=0.01, abs=0.1)
    n_bytes = 32 * (3 * 64 * 64 * 4 + 16 * 4 + 16 * 64 * 2 + 8 * 8 + 16 + 16 * 4 + 1 * 8 + 16 * 4)
    assert row["bandwidth_floor_us"] == pytest.approx(n_bytes / 4.3e6, rel=0.01, abs=0.1)
    # Every SASS loop was tied to a for-loop of the kernel source.
    assert row["sass_loops"] and all(len(loops) > 0 for loops in row["sass_loops"])


def test_sass_loop_analysis_on_a_hand_made_listing():
    """Two nested loops, the inner one unrolled by ptxas four times relative to
    the PTX: the counts follow the trip counts divided by the unroll factor."""
    from bench import kernel_report as kr

    f = os.path.realpath(os.path.join(ROOT, "pgs_kernels", "triton_pgs.py"))
    fors = sorted(kr.for_lines(f))
    outer, inner = fors[0], fors[1]
    sass = "\n".join([
        f'\t//## File "{f}", line 1',
        "        /*0000*/                   MOV R1, R2 ;",
        ".L_x_0:",
        "        /*0010*/                   IADD3 R3, R3, 0x1, RZ ;",
        ".L_x_1:",
        f'\t//## File "{f}", line {inner}',
        "        /*0020*/                   LDG.E R4, desc[UR4][R6.64] ;",
        "        /*0030*/                   LDG.E R5, desc[UR4][R6.64+0x4] ;",
        "        /*0040*/                   LDG.E R7, desc[UR4][R6.64+0x8] ;",
        "        /*0050*/                   LDG.E R8, desc[UR4][R6.64+0xc] ;",
        "        /*0060*/              @P0 BRA `(.L_x_1) ;",
        f'\t//## File "{f}", line {outer}',
        "        /*0070*/              @P1 BRA `(.L_x_0) ;",
        "        /*0080*/                   EXIT ;",
    ])
    ptx = "\n".join([
        f'\t.file\t1 "{f}"',
        "\t.loc\t1 1 1",
        "\tmov.u32 %r1, %r2;",
        "$L__BB0_1:",
        "\tadd.s32 %r3, %r3, 1;",
        "$L__BB0_2:",
        f"\t.loc\t1 {inner} 1",
        "\tld.global.b32 %r4, [%rd6];",
        "\t@%p0 bra $L__BB0_2;",
        f"\t.loc\t1 {outer} 1",
        "\t@%p1 bra $L__BB0_1;",
        "\tret;",
    ])
    instrs, labels = kr.parse_sass(sass)
    pinstrs, plabels = kr.parse_ptx(ptx)
    counts, loops = kr.dynamic_counts(instrs, labels, pinstrs, plabels, {outer: 3, inner: 8}, {1, inner, outer}, f)
    # outer: 3 iterations; inner: 3 x 8 source iterations, 4 a SASS iteration -> 6
    assert sorted(loops) == sorted([(outer, 3.0, 1.0), (inner, 6.0, 4.0)])
    assert counts[0] == 1 and counts[1] == 3 and counts[2] == 6 and counts[-1] == 1


def test_triton_versions_under_this_triton(tmp_path):
    """bench.triton_versions with no folder measures the Triton of this
    environment and writes one JSON with its rows and the targets' verdict."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    import triton

    out = tmp_path / "versions.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.triton_versions", "--configs", "64/16:bf16x64",
                           "--archs", "sm_90", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["device"] == "offline" and {"torch", "commit", "load", "targets"} <= set(doc)
    (v,) = doc["versions"]
    assert v["triton"] == triton.__version__ and not v["errors"]
    (row,) = v["rows"]
    assert row["arch"] == "sm_90" and row["config"] == "64/16:bf16x64"
    assert row["dyn_instr_per_thread"] > 0 and row["issue_floor_us"] > 0
    assert row["targets_met"] == (row["spill_bytes"] == 0 and row["warps_per_sm"] == 16)
    assert v["passed"] == row["targets_met"] and (v["triton"] in doc["passed"]) == v["passed"]
    assert "64/16:bf16x64" in proc.stdout  # the table
