"""What only the native C++ CPU kernel (``pgs_kernels._C``) has: its build in
CI, threads, the compiled SIMD variants, the fallback when it is missing, the
private op's memory guards and its benchmark script.

Its agreement with the fp64 reference (every case, photo, layout and the
numerical range) is the shared table's, test_agreement.py, as for every
backend.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pgs_kernels
from conftest import patch_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_native = pytest.mark.skipif(
    not pgs_kernels.NATIVE_AVAILABLE, reason=f"native extension not built ({pgs_kernels.op.NATIVE_ERROR})"
)


def test_native_built_in_ci():
    """CI must build the extension: there a missing build is a failure, not a skip."""
    if pgs_kernels.NATIVE_AVAILABLE:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but pgs_kernels._C did not build/import: {pgs_kernels.op.NATIVE_ERROR}")
    pytest.skip("native extension not built (fails instead when CI is set)")


def run_native(images, tokens, noise, **kw):
    return pgs_kernels.pgs_select(images, tokens, noise=noise, return_scores=True, backend="native", **kw)


@needs_native
def test_thread_count_does_not_change_the_answer(photos):
    """The batch is split over threads (at::parallel_for, a range of images
    each): 1, 2 and 3 threads, even and uneven splits of 15 images, give
    identical outputs. The suite runs single-threaded (conftest); this test
    sets its own counts."""
    tokens = patch_tokens(photos, 16, 128, seed=5)
    images = torch.cat([photos, photos.flip(-1), photos.flip(-2)])
    tokens = torch.cat([tokens, tokens, tokens])
    noise = torch.rand(images.shape[0], 196, generator=torch.Generator().manual_seed(13))
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(run_native(images, tokens, noise, token_weight=0.5))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_aten_cpu_capability_selects_the_variant(capability):
    """ATEN_CPU_CAPABILITY caps the compiled variant (``default``: the
    baseline, 4 floats per vector), which still matches the reference on the
    whole agreement table."""
    code = textwrap.dedent(
        """
        import torch
        import pgs_kernels
        from conftest import assert_matches_reference, make_inputs
        from test_agreement import CASES, case_inputs

        reported = torch.backends.cpu.get_cpu_capability()
        width = pgs_kernels.op._C.simd_width()
        print(reported, width)
        expected = {"AVX512": 16, "AVX2": 8}.get(reported, 4)
        assert width == expected, (reported, width)
        for case in CASES:
            images, tokens, noise, opts = case_inputs(case)
            assert_matches_reference("native", images, tokens, noise, **opts)
        print("ok")
        """
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    reported, width = res.stdout.split()[:2]
    if capability == "default":
        assert (reported, width) == ("DEFAULT", "4")
    assert res.stdout.strip().endswith("ok")


@needs_native
def test_private_native_op_guards_memory_on_a_direct_call():
    """The C++ kernel sits behind pgs_kernels.op.native_kernel (which names the
    argument); called directly, its own checks still stop what would read out
    of bounds, naming the condition."""
    native = torch.ops.pgs_kernels._pgs_select_native
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 4)
    base = dict(tokens=None, patch_size=16, num_keep=2, num_candidates=1, sim_threshold=0.5, token_weight=0.0,
                edge_weight=1.0, use_ot=True, ot_reg=0.05, ot_iters=5)
    native(images, noise=noise, **base)  # well-formed: runs
    bad = [dict(noise=torch.rand(2, 5)), dict(num_keep=5), dict(num_candidates=-1), dict(patch_size=5),
           dict(token_weight=0.5), dict(token_weight=0.5, tokens=torch.randn(2, 3, 8)),
           dict(images=torch.randn(2, 3, 32, 32, dtype=torch.float64))]
    for over in bad:
        kw = dict(base, noise=noise, images=images)
        kw.update(over)
        with pytest.raises(RuntimeError, match="does not hold"):
            native(**kw)


def test_fallback_without_extension():
    """With ``_C`` hidden the package imports, warns exactly once, and the CPU
    op runs on the reference."""
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["pgs_kernels._C"] = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import pgs_kernels
        runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(runtime) == 1, [str(w.message) for w in runtime]
        assert "native CPU kernel" in str(runtime[0].message) and "pure-PyTorch reference" in str(runtime[0].message)
        assert not pgs_kernels.NATIVE_AVAILABLE
        assert "native" not in pgs_kernels.available_backends("cpu")
        import torch
        x = torch.randn(2, 3, 32, 32)
        sel = pgs_kernels.pgs_select(x, mask_ratio=0.5)
        assert sel.keep_idx.shape == (2, 2)
        out = torch.ops.pgs_kernels.pgs_select(x, None, torch.rand(2, 4), 16, 2, 1, 0.5, 0.0, 1.0, True, 0.05, 20)
        assert out[0].shape == (2, 2)
        print("ok")
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().endswith("ok")


@needs_native
def test_native_speed_bench_writes_its_figures(tmp_path):
    """bench/native_speed.py on a tiny case: it runs and its JSON holds every figure the README quotes."""
    out = tmp_path / "native.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "native_speed.py"), "--batch-size", "2", "--size", "32",
           "--token-dim", "8", "--repeats", "2", "--warmup", "1", "--threads", "1", "--no-fp64",
           "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    res = json.loads(out.read_text())
    assert res["cpu_simd"] in ("avx512", "avx2", "baseline")
    assert {"native", "reference-fp32"} <= {r["impl"] for r in res["rows"]}
    for key in ("native_ms_per_image_1_thread", "speedup_vs_fp32_reference_1_threads",
                "best_of_speedup_vs_fp32_reference_1_threads"):
        assert res["summary"][key] > 0


@needs_native
def test_native_speed_bench_measures_the_floor_and_the_steps(tmp_path):
    """bench/native_speed.py on a tiny case, 1 and 2 threads: beside each
    kernel figure (fp32 and bf16 tokens) stands its floor, the read of exactly
    the call's input bytes, with the ratio and bandwidths derived from the
    timed rows, and the kernel's per-step split. No timing is asserted."""
    out = tmp_path / "native.json"
    B, S, P, D = 2, 32, 16, 8
    cmd = [sys.executable, os.path.join(ROOT, "bench", "native_speed.py"), "--batch-size", str(B), "--size",
           str(S), "--patch-size", str(P), "--token-dim", str(D), "--repeats", "2", "--warmup", "1",
           "--threads", "1,2", "--profile-calls", "2", "--no-fp64", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    res = json.loads(out.read_text())
    assert res["targets"]["native_over_floor_max"] == 1.5
    assert {r["impl"] for r in res["rows"]} == {"native", "native-bf16-tokens", "floor", "floor-bf16-tokens",
                                                "reference-fp32"}
    by = {(r["impl"], r["threads"]): r for r in res["rows"]}
    L = (S // P) ** 2
    floors = {(f["tokens_dtype"], f["threads"]): f for f in res["floors"]}
    assert set(floors) == {(dt, n) for dt in ("float32", "bfloat16") for n in (1, 2)}
    for (dt, n), f in floors.items():
        size = 4 if dt == "float32" else 2
        assert f["bytes"] == 4 * B * 3 * S * S + size * B * L * D + 4 * B * L
        kernel, floor = ("native", "floor") if dt == "float32" else ("native-bf16-tokens", "floor-bf16-tokens")
        assert f["kernel_ms"] == by[(kernel, n)]["median_ms"] and f["floor_ms"] == by[(floor, n)]["median_ms"]
        assert f["floor_ms"] > 0 and f["kernel_ms"] > 0
        assert f["ratio"] == pytest.approx(f["kernel_ms"] / f["floor_ms"])
        assert f["floor_gbps"] == pytest.approx(f["bytes"] / f["floor_ms"] / 1e6)
        # the same call with its inputs in cache, scaled to the batch
        assert f["cached_ms"] > 0 and f["cached_over_floor"] == pytest.approx(f["cached_ms"] / f["floor_ms"])
        assert f["kernel_gbps"] == pytest.approx(f["bytes"] / f["kernel_ms"] / 1e6)
        assert res["summary"][f"native_over_floor_{dt}_tokens_{n}_threads"] == f["ratio"]
    steps = {(e["tokens_dtype"], e["threads"]): e["steps"] for e in res["steps"]}
    assert set(steps) == set(floors)
    for split in steps.values():
        assert list(split) == ["convert", "edge", "stats", "order", "similarity_pixels", "similarity_tokens",
                               "sinkhorn", "select"]
        assert all(v["ms"] >= 0 for v in split.values())
        assert sum(v["share"] for v in split.values()) == pytest.approx(1.0)
        assert split["edge"]["ms"] > 0 and split["similarity_pixels"]["ms"] > 0
        assert split["similarity_tokens"]["gflops_per_thread"] > 0


@needs_native
def test_read_floor_reads_every_byte():
    """The floor's read (csrc/read.cpp) sums every byte of every input as
    64-bit words, so its result is that sum (mod 2^64) whatever the split over
    threads: nothing is skipped or read twice."""
    g = torch.Generator().manual_seed(3)
    # Sizes not multiples of 8 bytes or of a chunk, so tails and chunk seams count.
    xs = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in (3, 200_003, 64 * 1024 * 3 + 5)]
    xs.append(torch.randn(7, 5, generator=g).to(torch.bfloat16))
    def expected():
        total = 0
        for x in xs:
            raw = x.contiguous().view(torch.uint8).numpy().tobytes()
            whole = len(raw) // 8 * 8
            total += sum(int.from_bytes(raw[i:i + 8], "little") for i in range(0, whole, 8))
            total += sum(raw[whole:])
        total %= 1 << 64
        return total - (1 << 64) if total >= 1 << 63 else total
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert torch.ops.pgs_kernels_bench.read_bytes(xs).item() == expected()
    finally:
        torch.set_num_threads(before)


@needs_native
def test_bf16_tokens_read_in_place_match_their_fp32_widening(photos):
    """bf16 tokens are read where they lie and widened in registers; the
    answer is bit for bit the one for the same tokens widened to fp32 first."""
    tokens = patch_tokens(photos, 16, 72, seed=9).to(torch.bfloat16)
    noise = torch.rand(photos.shape[0], 196, generator=torch.Generator().manual_seed(4))
    for tw in (0.5, 1.0):
        a = run_native(photos, tokens, noise, token_weight=tw)
        b = run_native(photos, tokens.float(), noise, token_weight=tw)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
