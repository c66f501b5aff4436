"""Every backend usable here against the fp64 reference: one table of cases,
one input generator (conftest.make_inputs), one comparison rule
(conftest.assert_matches_reference, i.e. python_ref/compare.py).

The backends are conftest.BACKENDS: the native C++ kernel (CPU, where it is
built), the Triton kernel (compiled on CUDA; on CPU through its interpreter,
which is slow: the cases stay small) and the reference backend itself (fp32
against fp64). Beside the table: the photos, the layouts, the disabled terms,
constant patches, non-finite inputs and the numerical range of the contract
(docs/algorithm.md), each once for every backend.

What belongs to one backend only lives in test_native.py and test_triton.py.
"""

import itertools
import math
import zlib

import pytest
import torch

import pgs_kernels
import python_ref
from conftest import (BACKENDS, DEVICE, INTERPRETED, assert_matches_reference, assert_valid_selection, make_inputs,
                      patch_tokens)
from pgs_kernels import pgs_counts
from python_ref.compare import compare_with_reference, decided_rows

TOL = 1e-4
FP32_MAX = torch.finfo(torch.float32).max


def run(backend, images, tokens, noise, **kw):
    return pgs_kernels.pgs_select(images, tokens, noise=noise, backend=backend, return_scores=True, **kw)


# --------------------------------------------------------------------------- the table

# id: (B, C, H, W, P, images dtype, layout, token mode, options). make_inputs
# adds a nearly constant quarter and a constant patch to every image.
CASES = {
    "p8": (3, 3, 32, 48, 8, "fp32", "contiguous", None, {}),
    "p8-tokens": (3, 3, 32, 48, 8, "fp32", "contiguous", "fp32", dict(token_weight=0.5)),
    "p14-tokens": (2, 3, 28, 42, 14, "fp32", "contiguous", "fp32", dict(token_weight=0.5)),
    "p14-channels-last-tokens": (2, 3, 42, 56, 14, "fp32", "channels_last", "fp32", dict(token_weight=0.5)),
    "p14-c2-tokens": (2, 2, 42, 56, 14, "fp32", "contiguous", "fp32", dict(token_weight=0.5, candidate_ratio=0.3)),
    "p14-tall-no-ot": (2, 3, 56, 28, 14, "fp32", "contiguous", None, dict(use_ot=False, candidate_ratio=0.2)),
    "p14-c1-no-edge": (2, 1, 56, 28, 14, "fp32", "contiguous", "fp32", dict(token_weight=0.3, edge_weight=0.0)),
    "p16-c1-tall-tokens": (2, 1, 48, 32, 16, "fp32", "contiguous", "fp32", dict(token_weight=0.5, mask_ratio=0.3)),
    "p16-c1-slice-no-ot": (3, 1, 48, 80, 16, "fp32", "slice", None, dict(use_ot=False)),
    "p16-channels-last": (4, 3, 48, 48, 16, "fp32", "channels_last", None, dict(mask_ratio=0.3, sim_threshold=0.2)),
    "p32-bf16-tokens": (1, 3, 64, 96, 32, "fp32", "contiguous", "bf16",
                        dict(token_weight=0.5, candidate_ratio=0.5, mask_ratio=0.25)),
    "p32-tokens-only": (2, 3, 64, 96, 32, "fp32", "contiguous", "fp32", dict(token_weight=1.0, candidate_ratio=0.25)),
    "bf16-p8": (4, 3, 32, 32, 8, "bf16", "contiguous", "bf16", dict(token_weight=0.3, candidate_ratio=0.1)),
    "bf16-p16": (2, 3, 64, 64, 16, "bf16", "contiguous", "bf16", dict(token_weight=0.3)),
    "bf16-p14-slice-no-candidates": (2, 1, 56, 42, 14, "bf16", "slice", None, dict(candidate_ratio=0.0)),
    "bf16-drop-75-ot-reg-0.2": (1, 3, 64, 32, 16, "bf16", "contiguous", None,
                                dict(mask_ratio=0.75, ot_reg=0.2, ot_iters=5)),
    "fp16-c1-tokens-only": (2, 1, 32, 32, 16, "fp16", "contiguous", "fp16",
                            dict(token_weight=1.0, candidate_ratio=0.25)),
    "fp16-channels-last-no-ot": (2, 3, 48, 48, 8, "fp16", "channels_last", "fp16",
                                 dict(token_weight=0.7, use_ot=False, sim_threshold=0.2, candidate_ratio=0.15)),
    "fp16-fp32-tokens-ot-reg-0.2": (2, 3, 32, 64, 16, "fp16", "contiguous", "fp32",
                                    dict(token_weight=0.5, ot_reg=0.2, ot_iters=5)),
    # Image and token dtypes crossed: the token dot products of every precision.
    **{f"{i}-{t}-tokens": (2, 3, 32, 48, 8, i, "contiguous", t, dict(token_weight=0.5, candidate_ratio=0.1))
       for i, t in itertools.product(("bf16", "fp16"), ("bf16", "fp16", "fp64"))},
    "wide-tokens": (2, 3, 32, 32, 8, "fp32", "contiguous", "wide", dict(token_weight=0.6, candidate_ratio=0.1)),
    "strided-tokens-no-edge": (2, 3, 64, 48, 8, "fp32", "contiguous", "strided",
                               dict(token_weight=0.4, edge_weight=0.0, sim_threshold=0.2)),
    "slice-strided-tokens": (2, 3, 40, 56, 8, "fp32", "slice", "strided", dict(token_weight=0.5, candidate_ratio=0.1)),
    "dslice-tokens-keep-all": (2, 3, 64, 64, 16, "fp32", "contiguous", "dslice",
                               dict(token_weight=0.5, mask_ratio=0.0, candidate_ratio=0.1)),
    "slice-drop-90": (3, 3, 64, 64, 16, "fp32", "slice", None, dict(mask_ratio=0.9, candidate_ratio=0.3)),
    "c2-edge-weight-5": (2, 2, 32, 32, 8, "fp32", "contiguous", None,
                         dict(edge_weight=5.0, sim_threshold=0.1, ot_reg=0.2, ot_iters=5)),
    "no-candidates": (2, 3, 32, 48, 8, "fp32", "contiguous", None, dict(candidate_ratio=0.0)),
    # Tokens given but weighted 0: random masking, whatever the tokens.
    "no-candidates-no-edge-no-ot": (2, 3, 32, 48, 8, "fp32", "contiguous", "fp32",
                                    dict(candidate_ratio=0.0, edge_weight=0.0, use_ot=False)),
    "non-square-no-edge-no-ot": (2, 3, 40, 24, 8, "fp32", "contiguous", None,
                                 dict(edge_weight=0.0, use_ot=False, candidate_ratio=0.1)),
    "all-candidates": (2, 3, 32, 32, 8, "fp32", "contiguous", None, dict(candidate_ratio=1.0, mask_ratio=0.3)),
    "all-candidates-drop-90": (2, 3, 32, 48, 8, "fp32", "contiguous", None, dict(candidate_ratio=1.0, mask_ratio=0.9)),
    "fewer-dropped-than-candidates": (2, 3, 32, 48, 8, "fp32", "contiguous", None,
                                      dict(candidate_ratio=0.5, mask_ratio=0.2)),
    # Small ot_reg: Z spans more than fp32's exp range, so the log-domain
    # Sinkhorn runs instead of the scaling form; D = 37 exercises the token tail.
    "odd-D-log-domain": (2, 3, 64, 64, 16, "fp32", "contiguous", "odd", dict(token_weight=0.5, ot_reg=0.01)),
    "log-domain-30-iters": (2, 3, 64, 64, 8, "fp32", "contiguous", None,
                            dict(ot_reg=0.005, ot_iters=30, candidate_ratio=0.2)),
    "single-patch": (2, 4, 16, 16, 16, "fp32", "contiguous", None, dict(candidate_ratio=1.0, mask_ratio=0.0)),
    # Wider than one strip of columns in the Triton kernel's pass 1.
    "wide-strip": (1, 3, 32, 512, 16, "fp32", "contiguous", "fp32", dict(token_weight=0.5)),
    # Six patches, the counts at their extremes: keep all or one, no or all candidates.
    **{f"L6-mask-{mr}-candidates-{cr}": (3, 3, 32, 48, 16, "fp32", "contiguous", None,
                                         dict(mask_ratio=mr, candidate_ratio=cr))
       for mr, cr in ((0.0, 0.0), (0.0, 1.0), (0.99, 1.0), (0.99, 0.0), (0.5, 0.5))},
}


def case_inputs(case):
    """``(images, tokens, noise, options)`` of a table case, ``patch_size`` in the options."""
    B, C, H, W, P, dtype, layout, tokens, opts = CASES[case]
    seed = zlib.crc32(case.encode()) % 10_000  # stable whatever the table's order
    return (*make_inputs(seed, B, C, H, W, P, dtype, layout, tokens), dict(opts, patch_size=P))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(backend, case):
    """Scores within 1e-4 of fp64, selections equal on every decided row (at
    least half of them), invariants everywhere."""
    images, tokens, noise, opts = case_inputs(case)
    if backend == "triton" and INTERPRETED:
        # The interpreter's cost is per image: the case's first image (two
        # for a sliced batch, whose offsets are the point).
        n = 2 if CASES[case][6] == "slice" else 1
        images, noise = images[:n], noise[:n]
        tokens = None if tokens is None else tokens[:n]
    got = assert_matches_reference(backend, images, tokens, noise, **opts)
    assert got.candidates.is_contiguous()
    if got.edge.shape[1] == 1:  # one patch: nothing to normalize, it is the only candidate
        assert (got.edge == 0).all() and (got.candidates == 0).all()


# --------------------------------------------------------------------------- photos


def _photo_batch(backend, photos, options):
    """The photos at full size (224x224, P = 16); the interpreter gets two
    area-resized to 48x64 (P = 8), and one at full size with the defaults."""
    if backend == "triton" and INTERPRETED:
        small = torch.nn.functional.interpolate(photos[:2], size=(48, 64), mode="area")
        return [(small, 8)] + ([(photos[:1], 16)] if options == "default" else [])
    return [(photos, 16)]


PHOTO_OPTIONS = {
    "default": dict(),
    "drop-75-edge-2": dict(mask_ratio=0.75, edge_weight=2.0),
    "drop-30-edge-2": dict(mask_ratio=0.3, edge_weight=2.0),
    "no-ot": dict(use_ot=False, candidate_ratio=0.1),
    "no-edge": dict(edge_weight=0.0, candidate_ratio=0.1),
    "tokens": dict(token_weight=0.5),
    "tokens-no-ot": dict(token_weight=0.5, use_ot=False, mask_ratio=0.3),
    "bf16-tokens": dict(token_weight=0.4, dtype=torch.bfloat16),
    "fp16-tokens": dict(token_weight=0.4, dtype=torch.float16),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", list(PHOTO_OPTIONS))
def test_photos_match_reference(backend, options, photos):
    """Real photos (scikit-image samples): flat skies, textures and edges, at
    CLIP's size; tokens are a projection of the pixels (D = 768, or 256 in
    low precision)."""
    opts = dict(PHOTO_OPTIONS[options])
    dtype = opts.pop("dtype", torch.float32)
    for images, P in _photo_batch(backend, photos, options):
        B, _, H, W = images.shape
        L = (H // P) * (W // P)
        tokens = None
        if opts.get("token_weight", 0) > 0:
            tokens = patch_tokens(images, P, 768 if dtype == torch.float32 else 256, seed=3).to(dtype)
        noise = torch.rand(B, L, generator=torch.Generator().manual_seed(11))
        assert_matches_reference(backend, images.to(dtype).to(DEVICE), None if tokens is None else tokens.to(DEVICE),
                                 noise.to(DEVICE), patch_size=P, min_decided=0.6, **opts)


# --------------------------------------------------------------------------- layouts and disabled terms


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_does_not_change_the_answer(backend):
    """Channels-last and sliced images, strided tokens and transposed noise
    (the same values) give the contiguous result: bit for bit from the
    kernels on the CPU (native, the interpreter), within the tolerance on a
    GPU (other strides compile to other code and sum in another order) and
    from the reference (its matrix products follow the strides), with
    selections equal on the decided rows."""
    args = (5, 2, 3, 40, 56, 8)
    kw = dict(patch_size=8, token_weight=0.5, candidate_ratio=0.1)
    images, tokens, noise = make_inputs(*args, tokens="fp32")
    base = run(backend, images, tokens, noise, **kw)
    K, _, _ = pgs_counts(35, 0.5, 0.1)
    for layout, token_mode in (("channels_last", "dslice"), ("slice", "strided")):
        im, tk, nz = make_inputs(*args, layout=layout, tokens=token_mode)
        assert not (im.is_contiguous() and tk.is_contiguous() and nz.is_contiguous())
        got = run(backend, im, tk, nz, **kw)
        if DEVICE == "cpu" and backend != "reference":
            for a, b in zip(got, base):
                assert torch.equal(a, b), (layout, token_mode)
        else:
            res = compare_with_reference(got, base, noise, edge_weight=1.0, num_keep=K, sim_threshold=0.5, tol=TOL)
            assert not res.problems, res.problems


@pytest.mark.parametrize("backend", BACKENDS)
def test_disabled_terms_ignore_their_input(backend):
    """token_weight 0 ignores the tokens, 1 ignores the pixels for S, and
    edge_weight 0 ignores the edge: NaN in a disabled input changes nothing."""
    images, tokens, noise = make_inputs(24, 3, 3, 32, 48, 8, tokens="fp32")
    kw = dict(patch_size=8, candidate_ratio=0.1)
    a = run(backend, images, None, noise, token_weight=0.0, **kw)
    b = run(backend, images, torch.full_like(tokens, math.nan), noise, token_weight=0.0, **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)

    bad_images = images.clone()
    bad_images[:, :, 5, 7] = math.nan
    c = run(backend, images, tokens, noise, token_weight=1.0, edge_weight=0.0, **kw)
    d = run(backend, bad_images, tokens, noise, token_weight=1.0, edge_weight=0.0, **kw)
    assert torch.equal(c.keep_idx, d.keep_idx) and torch.equal(c.candidates, d.candidates)
    assert torch.equal(c.redundancy, d.redundancy) and torch.isfinite(d.redundancy).all()
    assert_matches_reference(backend, images, tokens, noise, token_weight=1.0, edge_weight=0.0, **kw)


# --------------------------------------------------------------------------- constant patches


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C,P", [(1, 16), (3, 8), (3, 14)])
@pytest.mark.parametrize("value", [0.7, 1.0 / 3.0, -1.3, 2.0, 0.1, 0.3, -1e15])
def test_constant_patches_have_zero_similarity(backend, C, P, value):
    """A constant patch (at a value that does not average exactly in fp32)
    has a zero centred vector: zero similarity to every candidate, in fp32
    and fp64, so its redundancy is exactly 0 and the selection is the fp64
    reference's. Half of each image is flat, like a letterbox bar; the
    candidates then come from the noise alone (edge_weight 0), or the edge."""
    g = torch.Generator().manual_seed(1)
    B = 1 if (backend == "triton" and INTERPRETED) else 2  # the interpreter's cost is per image
    x = torch.randn(2, C, 4 * P, 4 * P, generator=g)[:B]
    x[..., : 2 * P] = value
    flat = torch.arange(16) % 4 < 2
    noise = torch.rand(2, 16, generator=g)[:B]
    options = [dict(candidate_ratio=0.25, sim_threshold=0.1, edge_weight=0.0)]
    # The other paths at one geometry: with the edge, without OT, more
    # candidates (in the interpreter for three of the values).
    if (C, P) == (3, 8) and not (backend == "triton" and INTERPRETED and value not in (0.7, 1.0 / 3.0, -1e15)):
        options += [dict(), dict(use_ot=False), dict(use_ot=False, candidate_ratio=0.25), dict(candidate_ratio=0.3)]
    for kw in options:
        exact = python_ref.pgs_select(x.double(), noise=noise, patch_size=P, return_scores=True, **kw)
        flat_candidate = flat[exact.candidates]  # (B, k): which candidates are flat
        for dtype in (torch.float32, torch.float64):
            # A flat patch's column of S is 0, and so is a flat candidate's row.
            S = python_ref.candidate_similarity(x.to(dtype), None, exact.candidates, P, 0.0, dtype)
            assert (S[:, :, flat] == 0).all() and (S[flat_candidate] == 0).all()
        assert flat_candidate.any() or kw.get("candidate_ratio", 0.05) * 16 < 1
        got = assert_matches_reference(backend, x.to(DEVICE), None, noise.to(DEVICE), patch_size=P, min_decided=0.0,
                                       **kw)
        assert (got.redundancy.cpu()[:, flat] == 0).all(), kw
        assert torch.equal(got.keep_idx.cpu(), exact.keep_idx), kw


# --------------------------------------------------------------------------- non-finite inputs

# (mask_ratio, candidate_ratio, use_ot), edge_weight, token_weight
NON_FINITE_OPTIONS = list(itertools.product(
    ((0.5, 0.05, True), (0.3, 0.25, False), (0.75, 0.0, True), (0.0, 1.0, True), (0.5, 0.1, False)),
    (1.0, 0.0), (0.0, 0.5, 1.0)))
# The interpreter is slow (a few tenths of a second an image, twice that
# with pixels and tokens): OT on and off with both edge weights, every token
# weight, no candidates and all of them.
INTERPRETER_NON_FINITE_OPTIONS = [((0.5, 0.1, True), 1.0, 0.5), ((0.5, 0.1, False), 0.0, 0.5),
                                  ((0.75, 0.0, True), 0.0, 0.0), ((0.0, 1.0, False), 1.0, 1.0)]


def _spoil(what, images, tokens, noise):
    """Make image ``b``'s inputs non-finite as ``what`` says; ``b`` is the
    index of ``what`` in NON_FINITE, so that one batch carries every kind."""
    b = NON_FINITE.index(what)
    nan, inf = math.nan, math.inf
    if what == "nan_pixel":
        images[b, 1, 10, 20] = nan
    elif what == "inf_pixels":
        images[b, 0, 17, 3] = inf
        images[b, 2, 0, 0] = -inf
    elif what.endswith("_image"):
        images[b] = {"nan": nan, "inf": inf, "ninf": -inf}[what.split("_")[0]]
    elif what == "nan_token":
        tokens[b, 3] = nan
    elif what == "nan_tokens":
        tokens[b] = nan
    elif what == "inf_token_element":
        tokens[b, 5, 0] = inf
    elif what == "nan_noise":
        noise[b, :5] = nan
    elif what == "nan_noise_row":
        noise[b] = nan
    elif what == "inf_noise":
        noise[b, 2] = inf
        noise[b, 3] = -inf
    elif what.startswith("scattered"):  # every 7th value of the image's pixels, tokens and noise
        val = nan if what.endswith("nan") else inf
        for t in (images, tokens, noise):
            t[b].view(-1)[::7] = val
    else:
        assert what == "everything"
        images[b], tokens[b], noise[b] = nan, nan, nan


NON_FINITE = ["nan_pixel", "inf_pixels", "nan_image", "inf_image", "ninf_image", "nan_token", "nan_tokens",
              "inf_token_element", "nan_noise", "nan_noise_row", "inf_noise", "scattered_nan", "scattered_inf",
              "everything"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_give_valid_selections(backend):
    """NaN and Inf in images, tokens or noise, one kind an image (NON_FINITE)
    and the last two images clean: a valid selection (distinct candidates
    in range, keep_idx and mask consistent) for every option, and the clean
    images give the answer they give in a batch of their own (images are
    independent). One NaN pixel turns its image's whole edge row NaN (torch's
    amin/amax propagate NaN), so the keys are all +inf and the candidates
    the first k indices, as the reference's; a NaN image likewise."""
    clean = make_inputs(1, len(NON_FINITE) + 2, 3, 32, 32, 8, tokens="fp32")
    images, tokens, noise = (t.clone() for t in clean)
    for what in NON_FINITE:
        _spoil(what, images, tokens, noise)
    B, L = images.shape[0], 16
    untouched = [len(NON_FINITE), len(NON_FINITE) + 1]
    nan_rows = [NON_FINITE.index("nan_pixel"), NON_FINITE.index("nan_image")]
    options = INTERPRETER_NON_FINITE_OPTIONS if (backend == "triton" and INTERPRETED) else NON_FINITE_OPTIONS
    for (mr, cr, ot), ew, tw in options:
        K, _, k = pgs_counts(L, mr, cr)
        kw = dict(patch_size=8, mask_ratio=mr, candidate_ratio=cr, use_ot=ot, edge_weight=ew, token_weight=tw)
        sel = run(backend, images, tokens, noise, **kw)
        assert_valid_selection(sel, B, L, K)
        c = sel.candidates.cpu()
        assert c.shape == (B, k) and ((c >= 0) & (c < L)).all()
        for b, row in enumerate(c.tolist()):
            assert len(set(row)) == k, (NON_FINITE[b], kw)
        for a, b in zip(sel, run(backend, *(t[untouched] for t in clean), **kw)):
            assert torch.equal(a[untouched], b), kw
        if ew > 0:
            ref = python_ref.pgs_select(images.double(), noise=noise, return_scores=True,
                                        **{n: v for n, v in kw.items() if n != "token_weight"})
            assert torch.isnan(sel.edge[nan_rows]).all() and torch.isnan(ref.edge[nan_rows]).all()
            assert torch.equal(c[nan_rows], torch.arange(k).expand(2, k))
            assert torch.equal(c[nan_rows], ref.candidates[nan_rows])


# --------------------------------------------------------------------------- the numerical range


def _channels(backend, C):
    """Many channels cost the interpreter time in proportion: 8 stand for 64
    there (C P^2 = 512 at P = 8, still clear past fp32's squared-norm range at
    1e18)."""
    return min(C, 8) if (backend == "triton" and INTERPRETED) else C


MAGNITUDES = {  # what is scaled, by how much, and the channels
    "pixels-1e15": ("pixels", 1e15, 3), "pixels-1e15-C64": ("pixels", 1e15, 64), "pixels-1e-15": ("pixels", 1e-15, 3),
    "tokens-1e15": ("tokens", 1e15, 3), "tokens-1e-15": ("tokens", 1e-15, 3),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", list(MAGNITUDES))
def test_magnitudes_within_range_match_reference(backend, what):
    """Pixels and token norms from 1e-15 to 1e15 (the contract's range) agree
    with the fp64 reference: pixels alone, with tokens of the same norm and
    with tokens of norm ~1; tokens with pixels and alone."""
    kind, scale, C = MAGNITUDES[what]
    C = _channels(backend, C)
    images, tokens, noise = make_inputs(40 + C, 2, C, 32, 32, 8, tokens="fp32")
    kw = dict(patch_size=8, candidate_ratio=0.25)
    unit = tokens / tokens.norm(dim=2, keepdim=True)
    if kind == "pixels":
        images = images * scale
        assert_matches_reference(backend, images, None, noise, **kw)
        assert_matches_reference(backend, images, unit * scale, noise, token_weight=0.5, **kw)
        assert_matches_reference(backend, images, unit, noise, token_weight=0.5, **kw)
    else:
        assert_matches_reference(backend, images, unit * scale, noise, token_weight=0.5, **kw)
        assert_matches_reference(backend, images, unit * scale, noise, token_weight=1.0, edge_weight=0.0, **kw)


def _clear_of_fp32_overflow(x, margin=1.25):
    """No value of ``x`` (fp64) within ``margin`` of fp32's largest, where two
    fp32 evaluations that round differently could disagree on overflow."""
    x = x.abs()
    return bool(((x < FP32_MAX / margin) | (x > FP32_MAX * margin) | torch.isnan(x)).all())


def _signed_images(B, C, H, W, P, scale, seed):
    """Pixels of +-scale, independent: every Sobel term is at most 8 scale and
    every patch's centered squared norm close to C P^2 scale^2, so which of
    them overflow fp32 is clear-cut. Patch 1 repeats patch 0 (similarity 1)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(0, 2, (B, C, H, W), generator=g) * 2 - 1).float() * scale
    x[:, :, :P, P : 2 * P] = x[:, :, :P, :P]
    return x


def assert_fails_like_the_fp32_reference(backend, images, tokens, noise, **kw):
    """Past the contract's range a backend is held to the fp32 reference's
    outcome: the invariants always, NaN where the reference has NaN, scores
    where both are finite, a NaN edge row's candidates in index order, the
    candidates equal to the reference's, and the selection too on every row
    decided by more than the tolerance (a NaN edge row is decided unless an
    r sits on θ: equal keys go by index)."""
    B, _, H, W = images.shape
    P = kw["patch_size"]
    L = (H // P) * (W // P)
    K, _, k = pgs_counts(L, kw.get("mask_ratio", 0.5), kw.get("candidate_ratio", 0.05))
    got = run(backend, images.to(DEVICE), None if tokens is None else tokens.to(DEVICE), noise.to(DEVICE), **kw)
    got = type(got)(*(t.cpu() for t in got))
    t32 = tokens.float() if (tokens is not None and kw.get("token_weight", 0) > 0) else None
    ref = python_ref.pgs_select(images.float(), t32, noise=noise, return_scores=True, dtype=torch.float32, **kw)
    assert_valid_selection(got, B, L, K)
    assert torch.equal(torch.isnan(got.edge), torch.isnan(ref.edge))
    finite = torch.isfinite(ref.edge)
    torch.testing.assert_close(got.edge[finite], ref.edge[finite], atol=TOL, rtol=0)
    nan_rows = torch.isnan(ref.edge).all(dim=1)
    assert torch.equal(got.candidates[nan_rows], torch.arange(k).expand(int(nan_rows.sum()), k))
    assert torch.equal(got.candidates, ref.candidates)
    assert torch.equal(torch.isnan(got.redundancy), torch.isnan(ref.redundancy))
    torch.testing.assert_close(got.redundancy, ref.redundancy, atol=TOL, rtol=0, equal_nan=True)
    stable = decided_rows(ref, noise, kw.get("edge_weight", 1.0), K, kw.get("sim_threshold", 0.5))
    stable |= nan_rows & ~((ref.redundancy.double() - kw.get("sim_threshold", 0.5)).abs() <= TOL).any(dim=1)
    assert stable.float().mean() >= 0.5, "near-ties: the exact comparison says little"
    assert torch.equal(got.keep_idx[stable], ref.keep_idx[stable]) and torch.equal(got.mask[stable], ref.mask[stable])
    return got


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the overflow is the point
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C,P", [(3, 8), (3, 16), (64, 8)])
@pytest.mark.parametrize("scale", [1e15, 1e18, 1e20, 1e30])
def test_large_pixels_fail_like_the_fp32_reference(backend, C, P, scale):
    """The Sobel runs on the channel mean, as the contract says, so it holds in
    fp32 up to |pixel| ~ 1e18 whatever C; past that every edge is NaN and the
    candidates come in index order. A patch whose squared norm overflows is a
    zero vector (similarity 0, not NaN): at 1e18 none for C P^2 = 192, all for
    768 and 4096 (512 in the interpreter); past that all, so the redundancy
    is 0."""
    C = _channels(backend, C)
    B = 1 if (backend == "triton" and INTERPRETED) else 2  # the interpreter's cost is per image
    images = _signed_images(B, C, 32, 32, P, scale, seed=C + P)
    x = python_ref.patchify(images.double(), P)
    assert _clear_of_fp32_overflow(((x - x.mean(dim=2, keepdim=True)) ** 2).sum(dim=2))
    assert scale > 1e18 or 2 * (8 * scale) ** 2 < FP32_MAX / 1.25  # Gx^2 + Gy^2 for |Y| <= scale
    L = (32 // P) ** 2
    noise = torch.rand(B, L, generator=torch.Generator().manual_seed(C))
    options = [dict(), dict(use_ot=False, sim_threshold=0.2), dict(sim_threshold=-0.5)]
    if backend == "triton" and INTERPRETED:  # the interpreter's cost is per call: OT, both thresholds
        options = [dict(), dict(sim_threshold=-0.5)]
    for kw in options:
        got = assert_fails_like_the_fp32_reference(backend, images, None, noise, patch_size=P, candidate_ratio=0.25,
                                                   **kw)
        if scale <= 1e18:
            assert torch.isfinite(got.edge).all() and torch.isfinite(got.redundancy).all()
        else:
            assert torch.isnan(got.edge).all() and (got.redundancy == 0).all()
        if scale <= 1e18 and C * P * P == 192:
            assert (got.redundancy.abs() > 0).any()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", [1e15, 1e19, 1e21, "mixed", "inf_element", "pixels-1e19", "both-overflow"])
def test_large_tokens_fail_like_the_fp32_reference(backend, norm):
    """Token norms up to ~1.8e19 (fp32's sqrt of its largest) agree with the
    fp32 reference; a token whose squared norm overflows is a zero vector
    (zero similarity, no NaN), and one with an infinite element is NaN, as
    t / (|t| + 1e-6) makes them. θ < 0 makes a zero similarity (tier 1) and
    a NaN one (tier 2) select differently."""
    B = 2 if (backend == "triton" and INTERPRETED) else 3  # the interpreter's cost is per image
    images, tokens, noise = make_inputs(6, B, 3, 32, 32, 8, tokens="fp32", flat=False, device="cpu")
    unit = tokens / tokens.norm(dim=2, keepdim=True)
    if norm == "mixed":  # every other token overflows
        tokens = unit * torch.tensor([1.0, 1e21]).repeat(8)[None, :, None]
    elif norm == "inf_element":
        tokens = unit.clone()
        tokens[1, 5, 3] = math.inf
    elif norm == "pixels-1e19":  # the pixels overflow, tokens of norm 1
        images, tokens = images * 1e19, unit
    elif norm == "both-overflow":
        images, tokens = images * 1e20, unit * 1e25
    else:
        tokens = unit * norm
    options = ((0.5, 0.5), (1.0, 0.5), (0.5, -0.5))
    if backend == "triton" and INTERPRETED:  # both weights, the threshold that tells zero from NaN
        options = options[1:]
    for tw, theta in options:
        got = assert_fails_like_the_fp32_reference(backend, images, tokens, noise, patch_size=8, candidate_ratio=0.25,
                                                   token_weight=tw, sim_threshold=theta)
        if norm == "inf_element":
            others = [b for b in range(B) if b != 1]
            assert torch.isnan(got.redundancy[1]).all() and torch.isfinite(got.redundancy[others]).all()
        elif norm not in ("pixels-1e19", "both-overflow"):
            assert torch.isfinite(got.redundancy).all()
        if norm in (1e21, "both-overflow") and tw == 1.0:
            assert (got.redundancy == 0).all()


# Every backend but the interpreter runs 1, 50, 200 and 1000 Sinkhorn steps
# at each ot_reg, without and with tokens. In the interpreter a step costs:
# with tokens, one step and 1000 steps (one image) at the smallest ot_reg,
# 200 steps (one image) at the others.
OT_REGS = [1e-4, 3e-4, 1e-3, 0.02, 1.0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ot_reg", OT_REGS)
def test_small_ot_reg_matches_reference(backend, ot_reg):
    """ot_reg from the contract's 1e-4 up to 1 with up to 1000 Sinkhorn steps:
    the scaling form where fp32 holds it, the log domain where it does not,
    both within 1e-4 of fp64 (the potentials grow like 1/ot_reg), and the
    redundancy, an average of similarities, inside [-1, 1]."""
    images, tokens, noise = make_inputs(45, 2, 3, 32, 48, 8, tokens="fp32")
    runs = [(n, tw, 2) for n in (1, 50, 200, 1000) for tw in (0.0, 0.5)]
    if backend == "triton" and INTERPRETED:
        runs = [(1, 0.5, 2), (1000, 0.5, 1)] if ot_reg == 1e-4 else [(200, 0.5, 1)]
    for ot_iters, tw, B in runs:
        got = assert_matches_reference(backend, images[:B], tokens[:B], noise[:B], patch_size=8, candidate_ratio=0.2,
                                       token_weight=tw, ot_reg=ot_reg, ot_iters=ot_iters)
        r = got.redundancy[torch.isfinite(got.redundancy)]
        assert (r.abs() <= 1 + 1e-5).all(), (ot_iters, tw)
