"""The native C++ CPU kernel (``pgs_kernels._C``) against the fp64 reference.

The comparison is conftest.assert_matches_reference (python_ref/compare.py):
scores within 1e-4, selections identical on every row decided by more than
that, the invariants on every output, NaN/Inf inputs included. Beyond the
contract's numerical range the kernel is held to the fp32 reference's outcome.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pgs_kernels
import python_ref
from conftest import assert_matches_reference, assert_valid_selection, patch_tokens, smooth_images
from python_ref.compare import decided_rows
from python_ref.pgs import patchify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4

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


# --------------------------------------------------------------------------- helpers


def run_native(images, tokens, noise, **kw):
    return pgs_kernels.pgs_select(images, tokens, noise=noise, return_scores=True, backend="native", **kw)


def run_reference(images, tokens, noise, **kw):
    """fp64 reference on the same values, upcast."""
    t = None if tokens is None else tokens.double()
    return python_ref.pgs_select(images.double(), t, noise=noise, return_scores=True, **kw)


def compare(images, tokens, noise, min_stable=0.0, **kw):
    """Native against the fp64 reference (conftest.assert_matches_reference)."""
    return assert_matches_reference("native", images, tokens, noise, min_decided=min_stable, **kw)


def rand_noise(B, L, seed):
    return torch.rand(B, L, generator=torch.Generator().manual_seed(seed + 7))


# --------------------------------------------------------------------------- agreement

# (seed, B, C, H, W, P, dtype, layout, token mode, options)
CASES = [
    (0, 4, 3, 64, 64, 8, torch.float32, "contiguous", None, {}),
    (1, 3, 3, 56, 84, 14, torch.float32, "channels_last", "fp32", dict(token_weight=0.5)),
    (2, 5, 1, 48, 80, 16, torch.float32, "slice", None, dict(use_ot=False)),
    (3, 2, 3, 64, 96, 32, torch.float32, "contiguous", "fp32", dict(token_weight=1.0, candidate_ratio=0.25)),
    (4, 4, 3, 64, 64, 16, torch.bfloat16, "contiguous", "bf16", dict(token_weight=0.3)),
    (5, 4, 3, 64, 64, 16, torch.float16, "channels_last", "fp16", dict(token_weight=0.7, use_ot=False)),
    (6, 3, 1, 112, 56, 14, torch.bfloat16, "slice", None, dict(candidate_ratio=0.0)),
    (7, 4, 3, 96, 64, 8, torch.float32, "contiguous", "strided", dict(token_weight=0.5, edge_weight=0.0)),
    (8, 3, 3, 64, 64, 16, torch.float32, "contiguous", "dslice", dict(token_weight=0.5, mask_ratio=0.0)),
    (9, 4, 3, 64, 64, 16, torch.float32, "slice", None, dict(mask_ratio=0.9, candidate_ratio=0.3)),
    (10, 2, 3, 64, 64, 16, torch.float32, "contiguous", None, dict(sim_threshold=0.1, edge_weight=5.0)),
    (11, 3, 3, 64, 64, 16, torch.float16, "contiguous", "fp32", dict(token_weight=0.5, ot_reg=0.2, ot_iters=5)),
    (12, 2, 3, 32, 32, 8, torch.float32, "contiguous", None, dict(candidate_ratio=1.0, mask_ratio=0.3)),
    (13, 3, 3, 64, 64, 16, torch.float32, "contiguous", "fp32", dict(use_ot=False, candidate_ratio=0.0, edge_weight=0.0)),
    (14, 6, 3, 48, 48, 16, torch.float32, "channels_last", None, dict(mask_ratio=0.3, sim_threshold=0.2)),
    # Small eps: Z spans more than fp32's exp range, so the log-domain loop runs
    # instead of the scaling form; D = 37 exercises the token tail.
    (15, 3, 3, 64, 64, 16, torch.float32, "contiguous", "odd", dict(token_weight=0.5, ot_reg=0.01)),
    (16, 2, 3, 64, 64, 8, torch.float32, "contiguous", None, dict(ot_reg=0.005, ot_iters=30, candidate_ratio=0.2)),
]


def make_inputs(seed, B, C, H, W, P, dtype, layout, token_mode):
    if layout == "slice":  # a view with a row offset and a column stride of 2
        big = smooth_images(B, C, H + 3, 2 * W, seed, dtype)
        images = big[:, :, 2 : 2 + H, ::2]
        assert not images.is_contiguous()
    else:
        images = smooth_images(B, C, H, W, seed, dtype)
        if layout == "channels_last":
            images = images.contiguous(memory_format=torch.channels_last)
    L = (H // P) * (W // P)
    D = 48
    tokens = None
    if token_mode is not None:
        base = patch_tokens(images, P, D, seed)
        if token_mode == "fp32":
            tokens = base
        elif token_mode == "bf16":
            tokens = base.to(torch.bfloat16)
        elif token_mode == "fp16":
            tokens = base.to(torch.float16)
        elif token_mode == "strided":  # stride(2) != 1
            tokens = base.transpose(1, 2).contiguous().transpose(1, 2)
        elif token_mode == "odd":  # D not a multiple of any vector width
            tokens = base[:, :, :37].contiguous()
        elif token_mode == "dslice":  # unit stride along D, a row stride larger than D
            tokens = torch.cat([base, torch.randn(B, L, 5)], dim=2)[:, :, :D]
    return images, tokens, rand_noise(B, L, seed)


@needs_native
@pytest.mark.parametrize("case", CASES, ids=[f"case{c[0]}" for c in CASES])
def test_matches_reference(case):
    seed, B, C, H, W, P, dtype, layout, token_mode, opts = case
    images, tokens, noise = make_inputs(seed, B, C, H, W, P, dtype, layout, token_mode)
    compare(images, tokens, noise, patch_size=P, min_stable=0.5, **opts)


@needs_native
@pytest.mark.parametrize("opts", [
    dict(),
    dict(token_weight=0.5),
    dict(token_weight=0.5, use_ot=False, mask_ratio=0.3),
    dict(edge_weight=0.0, candidate_ratio=0.1),
])
def test_matches_reference_on_photos(photos, opts):
    tokens = patch_tokens(photos, 16, 768, seed=3) if opts.get("token_weight", 0) > 0 else None
    noise = rand_noise(photos.shape[0], 196, seed=11)
    compare(photos, tokens, noise, min_stable=0.6, **opts)


@needs_native
def test_photos_low_precision(photos):
    tokens = patch_tokens(photos, 16, 256, seed=4)
    noise = rand_noise(photos.shape[0], 196, seed=12)
    for dt in (torch.bfloat16, torch.float16):
        compare(photos.to(dt), tokens.to(dt), noise, token_weight=0.4, min_stable=0.6)


@needs_native
def test_disabled_terms_ignore_their_input():
    """token_weight 0 ignores tokens, 1 ignores pixels, edge_weight 0 ignores the edge."""
    images, tokens, noise = make_inputs(0, 3, 3, 64, 64, 16, torch.float32, "contiguous", "fp32")
    bad_tokens = torch.full_like(tokens, float("nan"))
    a = run_native(images, None, noise, token_weight=0.0)
    b = run_native(images, bad_tokens, noise, token_weight=0.0)
    assert torch.equal(a.keep_idx, b.keep_idx) and torch.equal(a.redundancy, b.redundancy)

    bad_images = images.clone()
    bad_images[:, :, 5, 7] = float("nan")
    c = run_native(images, tokens, noise, token_weight=1.0, edge_weight=0.0)
    d = run_native(bad_images, tokens, noise, token_weight=1.0, edge_weight=0.0)
    assert torch.equal(c.keep_idx, d.keep_idx) and torch.equal(c.candidates, d.candidates)
    assert torch.equal(c.redundancy, d.redundancy)


@needs_native
def test_constant_patches_have_zero_similarity():
    images = torch.zeros(2, 3, 64, 64)
    images[:, :, :32] = 0.3  # constant patches, not all equal to 0
    images[1, :, 32:] = torch.randn(3, 32, 64)
    noise = rand_noise(2, 16, 0)
    nat = run_native(images, None, noise, candidate_ratio=0.25, use_ot=False)
    ref = run_reference(images, None, noise, candidate_ratio=0.25, use_ot=False)
    # Image 0 is constant per patch, so every similarity to its candidates is exactly 0.
    assert torch.equal(nat.redundancy[0], torch.zeros(16))
    torch.testing.assert_close(nat.redundancy.double(), ref.redundancy, atol=TOL, rtol=0)


# --------------------------------------------------------------------------- special inputs


@needs_native
@pytest.mark.parametrize("what", ["nan_pixel", "inf_pixel", "nan_image", "ninf_image", "nan_tokens",
                                  "inf_tokens", "nan_noise", "inf_noise", "everything"])
def test_non_finite_inputs_give_valid_selections(what):
    B, P, H, W = 4, 16, 64, 64
    L = 16
    images, tokens, noise = make_inputs(1, B, 3, H, W, P, torch.float32, "contiguous", "fp32")
    clean = (images, tokens, noise)
    images, tokens, noise = images.clone(), tokens.clone(), noise.clone()
    touched = {
        "nan_pixel": [0], "inf_pixel": [1, 2], "nan_image": [0], "ninf_image": [3], "nan_tokens": [0, 1],
        "inf_tokens": [2], "nan_noise": [0, 1], "inf_noise": [0, 1], "everything": [0, 1, 2, 3],
    }[what]
    if what == "nan_pixel":
        images[0, 1, 10, 20] = float("nan")
    elif what == "inf_pixel":
        images[1, 0, 33, 3] = float("inf")
        images[2, 2, 0, 0] = -float("inf")
    elif what == "nan_image":
        images[0] = float("nan")
    elif what == "ninf_image":
        images[3] = -float("inf")
    elif what == "nan_tokens":
        tokens[0, 3] = float("nan")
        tokens[1] = float("nan")
    elif what == "inf_tokens":
        tokens[2, 5, 0] = float("inf")
    elif what == "nan_noise":
        noise[0, :5] = float("nan")
        noise[1] = float("nan")
    elif what == "inf_noise":
        noise[0, 2] = float("inf")
        noise[1, 3] = -float("inf")
    elif what == "everything":
        images[:] = float("nan")
        tokens[:] = float("nan")
        noise[:] = float("nan")
    untouched = [b for b in range(B) if b not in touched]
    for mr, cr, ot in ((0.5, 0.05, True), (0.3, 0.25, False), (0.75, 0.0, True), (0.0, 1.0, True)):
        K, _, k = pgs_kernels.pgs_counts(L, mr, cr)
        for tw in (0.0, 0.5, 1.0):
            kw = dict(mask_ratio=mr, candidate_ratio=cr, use_ot=ot, token_weight=tw)
            sel = run_native(images, tokens, noise, **kw)
            assert_valid_selection(sel, B, L, K)
            assert sel.candidates.shape == (B, k)
            # Images are independent: the other rows give their clean answer.
            ok = run_native(*clean, **kw)
            for a, b in zip(sel, ok):
                assert torch.equal(a[untouched], b[untouched])


@needs_native
def test_nan_edge_row_matches_reference():
    """A NaN image turns its whole edge row NaN (torch.amin/amax propagate NaN),
    so its keys are all +inf and the candidates are the first k indices."""
    images, _, noise = make_inputs(2, 2, 3, 64, 64, 16, torch.float32, "contiguous", None)
    images = images.clone()
    images[0, 0, 4, 4] = float("nan")
    nat = run_native(images, None, noise, candidate_ratio=0.25)
    ref = run_reference(images, None, noise, candidate_ratio=0.25)
    assert torch.isnan(nat.edge[0]).all() and torch.isnan(ref.edge[0]).all()
    assert torch.equal(nat.candidates[0], ref.candidates[0])
    assert torch.equal(nat.candidates[0], torch.arange(4))


@needs_native
def test_empty_batch_and_extreme_counts():
    images = torch.randn(0, 3, 32, 32)
    sel = run_native(images, None, torch.rand(0, 4))
    assert_valid_selection(sel, 0, 4, 2)
    assert sel.edge.shape == (0, 4) and sel.candidates.shape == (0, 1)

    images, _, noise = make_inputs(3, 3, 3, 32, 48, 16, torch.float32, "contiguous", None)
    L = 6
    for mr, cr in ((0.0, 0.0), (0.0, 1.0), (0.99, 1.0), (0.99, 0.0), (0.5, 0.5)):
        compare(images, None, noise, mask_ratio=mr, candidate_ratio=cr)
    one = run_native(images[:, :, :16, :16], None, noise[:, :1], candidate_ratio=1.0)  # L = 1
    assert_valid_selection(one, 3, 1, 1)
    assert (one.edge == 0).all() and (one.candidates == 0).all()
    del L


# --------------------------------------------------------------------------- numerical range

FP32_MAX = torch.finfo(torch.float32).max


def run_reference_fp32(images, tokens, noise, **kw):
    return python_ref.pgs_select(images, tokens, noise=noise, return_scores=True, dtype=torch.float32, **kw)


def clear_of_fp32_overflow(x, margin=1.25):
    """No value of ``x`` (fp64) within ``margin`` of fp32's largest, where two
    fp32 evaluations that round differently could disagree on overflow."""
    x = x.abs()
    return bool(((x < FP32_MAX / margin) | (x > FP32_MAX * margin) | torch.isnan(x)).all())


def signed_images(B, C, H, W, P, scale, seed):
    """Pixels of +-scale, independent: every Sobel term is at most 8 scale and
    every patch's centered squared norm close to C P^2 scale^2, so which of
    them overflow fp32 is clear-cut. Patch 1 repeats patch 0 (similarity 1)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(0, 2, (B, C, H, W), generator=g) * 2 - 1).float() * scale
    x[:, :, :P, P : 2 * P] = x[:, :, :P, :P]
    return x


def assert_matches_fp32_reference(images, tokens, noise, **kw):
    """Native against the fp32 reference beyond the contract's range: the
    invariants always, NaN where the reference has NaN, scores where both are
    finite, selections on the rows decided by more than the tolerance."""
    B, _, H, W = images.shape
    P = kw.get("patch_size", 16)
    L = (H // P) * (W // P)
    K, _, k = pgs_kernels.pgs_counts(L, kw.get("mask_ratio", 0.5), kw.get("candidate_ratio", 0.05))
    nat = run_native(images, tokens, noise, **kw)
    ref = run_reference_fp32(images, tokens, noise, **kw)
    assert_valid_selection(nat, B, L, K)
    assert torch.equal(torch.isnan(nat.edge), torch.isnan(ref.edge))
    finite = torch.isfinite(ref.edge)
    torch.testing.assert_close(nat.edge[finite], ref.edge[finite], atol=TOL, rtol=0)
    # A NaN edge row makes every key +inf: candidates in index order.
    nan_rows = torch.isnan(ref.edge).all(dim=1)
    assert torch.equal(nat.candidates[nan_rows], torch.arange(k).expand(int(nan_rows.sum()), k))
    same = (nat.candidates == ref.candidates).all(dim=1)
    assert torch.equal(torch.isnan(nat.redundancy[same]), torch.isnan(ref.redundancy[same]))
    both = same[:, None] & torch.isfinite(ref.redundancy)
    torch.testing.assert_close(nat.redundancy[both], ref.redundancy[both], atol=TOL, rtol=0)
    theta = kw.get("sim_threshold", 0.5)
    stable = decided_rows(ref, noise, kw.get("edge_weight", 1.0), K, theta)
    # Rows of equal keys are decided by index, so they are stable unless r is near θ.
    stable |= nan_rows & ~((ref.redundancy.double() - theta).abs() <= TOL).any(dim=1)
    for name in ("candidates", "keep_idx", "mask"):
        assert torch.equal(getattr(nat, name)[stable], getattr(ref, name)[stable]), name
    return nat, ref


@needs_native
@pytest.mark.parametrize("C, P", [(3, 8), (3, 16), (64, 8)])
@pytest.mark.parametrize("scale", [1e15, 1e18, 1e20])
def test_large_pixels_match_fp32_reference(scale, C, P):
    """The Sobel runs on the channel mean, as the contract says, so it holds in
    fp32 up to |pixel| ~ 1e18 whatever C; past that both give a NaN edge row.
    A patch whose squared norm overflows is a zero vector in both (at 1e18:
    none for C P^2 = 192, all for 768 and 4096)."""
    images = signed_images(3, C, 64, 64, P, scale, seed=C + P)
    x = patchify(images.double(), P)
    sq_norms = ((x - x.mean(dim=2, keepdim=True)) ** 2).sum(dim=2)
    assert clear_of_fp32_overflow(sq_norms)
    sobel_sq_bound = 2 * (8 * scale) ** 2  # Gx^2 + Gy^2 for |Y| <= scale
    assert scale > 1e18 or sobel_sq_bound < FP32_MAX / 1.25
    L = (64 // P) ** 2
    noise = rand_noise(3, L, seed=C)
    for kw in (dict(), dict(use_ot=False, sim_threshold=0.2)):
        nat, ref = assert_matches_fp32_reference(images, None, noise, patch_size=P, candidate_ratio=0.25, **kw)
        if scale <= 1e18:
            assert torch.isfinite(nat.edge).all() and torch.isfinite(nat.redundancy).all()
        else:
            assert torch.isnan(nat.edge).all()
        if scale <= 1e18 and C * P * P == 192:
            assert (nat.redundancy.abs() > 0).any()


@needs_native
@pytest.mark.parametrize("norm", [1e15, 1e19, 1e21, "mixed", "inf_element"])
def test_large_tokens_match_fp32_reference(norm):
    """Token norms up to ~1.8e19 (fp32's sqrt of its largest) agree with the
    fp32 reference; a token whose squared norm overflows is a zero vector
    (zero similarity, no NaN), and one with an infinite element is NaN, as
    t / (|t| + 1e-6) makes them."""
    images, tokens, noise = make_inputs(6, 3, 3, 64, 64, 16, torch.float32, "contiguous", "fp32")
    unit = tokens / tokens.norm(dim=2, keepdim=True)
    if norm == "mixed":  # every other token overflows
        tokens = unit * torch.tensor([1.0, 1e21]).repeat(8)[None, :, None]
    elif norm == "inf_element":
        tokens = unit.clone()
        tokens[1, 5, 3] = float("inf")
    else:
        tokens = unit * norm
    for tw in (0.5, 1.0):
        nat, ref = assert_matches_fp32_reference(images, tokens, noise, candidate_ratio=0.25, token_weight=tw)
        if norm == "inf_element":
            assert torch.isnan(nat.redundancy[1]).all() and torch.isfinite(nat.redundancy[[0, 2]]).all()
        else:
            assert torch.isfinite(nat.redundancy).all()
        if norm == 1e21 and tw == 1.0:
            assert (nat.redundancy == 0).all()


@needs_native
@pytest.mark.parametrize("ot_reg", [1e-4, 3e-4, 1e-3])
def test_small_ot_reg_matches_reference(ot_reg):
    """Down to ot_reg = 1e-4 and up to 1000 iterations the fp32 Sinkhorn stays
    within 1e-4 of the fp64 reference (the potentials grow like 1/ot_reg)."""
    images, tokens, noise = make_inputs(7, 3, 3, 64, 64, 8, torch.float32, "contiguous", "fp32")
    for ot_iters in (1, 200, 1000):
        for tw in (0.0, 0.5):
            compare(images, tokens, noise, patch_size=8, candidate_ratio=0.1, token_weight=tw, ot_reg=ot_reg,
                    ot_iters=ot_iters)


# --------------------------------------------------------------------------- threads, schema, opcheck


@needs_native
def test_thread_count_does_not_change_the_answer(photos):
    tokens = patch_tokens(photos, 16, 128, seed=5)
    images = torch.cat([photos, photos.flip(-1), photos.flip(-2)])
    tokens = torch.cat([tokens, tokens, tokens])
    noise = rand_noise(images.shape[0], 196, seed=13)
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(run_native(images, tokens, noise, token_weight=0.5))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(outs[0], outs[1]):
        assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_aten_cpu_capability_selects_the_variant(capability):
    """ATEN_CPU_CAPABILITY caps the compiled variant (``default``: the
    baseline, 4 floats per vector), which still matches the reference."""
    code = textwrap.dedent(
        """
        import torch
        import pgs_kernels
        from test_native import CASES, compare, make_inputs

        reported = torch.backends.cpu.get_cpu_capability()
        width = pgs_kernels.op._C.simd_width()
        print(reported, width)
        expected = {"AVX512": 16, "AVX2": 8}.get(reported, 4)
        assert width == expected, (reported, width)
        for seed, B, C, H, W, P, dtype, layout, token_mode, opts in CASES:
            images, tokens, noise = make_inputs(seed, B, C, H, W, P, dtype, layout, token_mode)
            compare(images, tokens, noise, patch_size=P, min_stable=0.5, **opts)
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


RAW_ARGS = ["images", "tokens", "noise", "patch_size", "num_keep", "num_candidates", "sim_threshold",
            "token_weight", "edge_weight", "use_ot", "ot_reg", "ot_iters"]


def raw_call(redispatch_cpu=False, **changes):
    """The raw operator on valid arguments (B=2, 32x32, P=16, L=4), some
    changed; redispatch_cpu runs the CPU kernel whatever the devices say."""
    args = dict(zip(RAW_ARGS, (torch.randn(2, 3, 32, 32), None, torch.rand(2, 4), 16, 2, 1, 0.5, 0.0, 1.0,
                               True, 0.05, 20)))
    args.update(changes)
    op = torch.ops.pgs_kernels.pgs_select.default
    if redispatch_cpu:
        return op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args.values())
    return op(*args.values())


# (argument changes, error, pattern of the message: the argument, and what was given)
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


@needs_native
def test_raw_operator_accepts_the_edges_of_every_range():
    L = 4
    for changes in (dict(num_keep=L, num_candidates=L), dict(num_keep=1, num_candidates=0),
                    dict(token_weight=1.0, tokens=torch.randn(2, L, 8, dtype=torch.float64)),
                    dict(noise=torch.rand(2, L, dtype=torch.float64), images=torch.randn(2, 3, 32, 32).half()),
                    dict(images=torch.randn(2, 3, 32, 32).bfloat16(), edge_weight=FP32_MAX),
                    dict(edge_weight=0.0, ot_reg=1e-4, ot_iters=1), dict(sim_threshold=float("inf")),
                    dict(tokens=torch.randn(2, 5, 8)[:, :L], token_weight=0.25)):
        keep, mask, edge, cand, red = raw_call(**changes)
        K = changes.get("num_keep", 2)
        assert keep.shape == (2, K) and mask.shape == (2, L) and int(mask.sum()) == 2 * (L - K)


# --------------------------------------------------------------------------- fallback


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
    assert {r["impl"] for r in res["rows"]} == {"native", "reference-fp32"}
    for key in ("native_ms_per_image_1_thread", "speedup_vs_fp32_reference_1_threads",
                "best_of_speedup_vs_fp32_reference_1_threads"):
        assert res["summary"][key] > 0
