"""The fused Triton kernel against the fp64 reference.

Without CUDA the kernel runs in the Triton interpreter on CPU tensors
(conftest sets ``TRITON_INTERPRET=1``), so the shapes here are small; the
CUDA-only tests (torch.compile, CUDA graphs, opcheck, the ViT-B/16 size) skip.

Comparison rule: conftest.assert_matches_reference (python_ref/compare.py):
``edge`` and ``redundancy`` within 1e-4, candidates and selections exactly on
the rows decided by more than that (at least half of them), and the
selection invariants on every row, non-finite inputs included.
"""

import math

import pytest
import torch

import pgs_kernels
import python_ref
from conftest import DEVICE, assert_matches_reference, assert_valid_selection
from pgs_kernels import pgs_counts, triton_pgs
from python_ref.compare import compare_with_reference

pytestmark = pytest.mark.skipif(
    "triton" not in pgs_kernels.available_backends(DEVICE),
    reason="Triton is not usable here (needs CUDA or TRITON_INTERPRET=1)",
)
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TOL = 1e-4


def _inputs(seed, B, C, H, W, P, D=24, dtype=torch.float32, tok_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    L = (H // P) * (W // P)
    images = torch.randn(B, C, H, W, generator=g)
    # Some structure: smooth regions and constant patches, as in photos.
    images[:, :, : H // 2, : W // 2] = images[:, :, : H // 2, : W // 2].mean() + 0.01 * images[:, :, : H // 2, : W // 2]
    if H >= 2 * P and W >= 2 * P:
        images[:, :, H - P :, W - P :] = 0.7
    tokens = torch.randn(B, L, D, generator=g)
    noise = torch.rand(B, L, generator=g)
    return images.to(dtype).to(DEVICE), tokens.to(tok_dtype).to(DEVICE), noise.to(DEVICE)


def _check(images, tokens, noise, *, finite=True, **kw):
    """The kernel against the fp64 reference (invariants only for non-finite
    inputs); returns the kernel's result."""
    if finite:
        got = assert_matches_reference("triton", images, tokens, noise, **kw)
    else:
        B, _, H, W = images.shape
        P = kw.get("patch_size", 16)
        L = (H // P) * (W // P)
        K, _, _ = pgs_counts(L, kw.get("mask_ratio", 0.5), kw.get("candidate_ratio", 0.05))
        got = pgs_kernels.pgs_select(images, tokens, noise=noise, backend="triton", return_scores=True, **kw)
        assert_valid_selection(got, B, L, K)
    assert got.candidates.is_contiguous()
    return got


# (seed, B, C, H, W, P, kwargs)
CASES = [
    (0, 2, 3, 32, 48, 8, {}),
    (1, 3, 3, 32, 48, 8, dict(token_weight=0.5)),
    (2, 2, 1, 48, 32, 16, dict(token_weight=0.5, mask_ratio=0.3)),
    (3, 2, 3, 64, 32, 16, dict(token_weight=1.0, candidate_ratio=0.25)),
    (4, 2, 3, 28, 42, 14, dict(candidate_ratio=0.2, use_ot=False)),
    (5, 2, 1, 56, 28, 14, dict(token_weight=0.3, edge_weight=0.0)),
    (6, 1, 3, 64, 96, 32, dict(candidate_ratio=0.5, mask_ratio=0.25)),
    (7, 2, 3, 32, 48, 8, dict(candidate_ratio=0.0)),
    (8, 2, 3, 32, 48, 8, dict(candidate_ratio=0.0, edge_weight=0.0)),
    (9, 2, 3, 32, 48, 8, dict(mask_ratio=0.0, candidate_ratio=0.1)),
    (10, 2, 3, 32, 48, 8, dict(candidate_ratio=1.0, mask_ratio=0.9)),
    (11, 2, 3, 32, 48, 8, dict(candidate_ratio=0.5, mask_ratio=0.2)),  # M < k
    (12, 2, 3, 40, 24, 8, dict(edge_weight=0.0, use_ot=False, candidate_ratio=0.1)),
    (13, 2, 2, 32, 32, 8, dict(edge_weight=3.0, sim_threshold=0.1, ot_reg=0.2, ot_iters=5)),
    (14, 1, 4, 16, 16, 16, dict(mask_ratio=0.0)),  # a single patch
    (15, 2, 3, 48, 48, 8, dict(token_weight=0.7, use_ot=False, sim_threshold=0.2, candidate_ratio=0.15)),
    (16, 1, 3, 32, 512, 16, dict(token_weight=0.5)),  # wider than one strip of columns in pass 1
    (17, 2, 2, 42, 56, 14, dict(token_weight=0.5, candidate_ratio=0.3)),  # P not a power of two, tokens
]


@pytest.mark.parametrize("seed,B,C,H,W,P,kw", CASES, ids=[f"case{c[0]}" for c in CASES])
def test_random_matches_reference(seed, B, C, H, W, P, kw):
    images, tokens, noise = _inputs(seed, B, C, H, W, P)
    _check(images, tokens, noise, patch_size=P, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tok_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_inputs(dtype, tok_dtype):
    images, tokens, noise = _inputs(20, 2, 3, 32, 48, 8, dtype=dtype, tok_dtype=tok_dtype)
    _check(images, tokens, noise, patch_size=8, token_weight=0.5, candidate_ratio=0.1)


def test_wide_tokens():
    images, tokens, noise = _inputs(21, 2, 3, 32, 32, 8, D=200)
    _check(images, tokens, noise, patch_size=8, token_weight=0.6, candidate_ratio=0.1)


def test_non_contiguous_inputs():
    """Channels-last and sliced inputs give the contiguous result: bit for bit
    in the interpreter (same arithmetic), within the tolerance on a GPU (other
    strides compile to other code and sum in another order), with selections
    equal on the stable rows."""
    images, tokens, noise = _inputs(22, 2, 3, 40, 56, 8)
    kw = dict(patch_size=8, token_weight=0.5, candidate_ratio=0.1)
    ref_sel = _check(images, tokens, noise, **kw)
    cl = images.to(memory_format=torch.channels_last)
    big = torch.zeros(3, 5, 48, 64, device=DEVICE)
    big[1:, 1:4, 3:43, 5:61] = images
    sliced = big[1:, 1:4, 3:43, 5:61]
    tok_t = tokens.transpose(1, 2).contiguous().transpose(1, 2)
    noise_t = noise.t().contiguous().t()
    assert not sliced.is_contiguous() and not tok_t.is_contiguous() and not noise_t.is_contiguous()
    K, _, _ = pgs_counts(35, 0.5, 0.1)
    for im, tk, nz in ((cl, tokens, noise), (sliced, tok_t, noise_t)):
        got = pgs_kernels.pgs_select(im, tk, noise=nz, backend="triton", return_scores=True, **kw)
        if not images.is_cuda:
            for a, b in zip(got, ref_sel):
                assert torch.equal(a, b)
            continue
        res = compare_with_reference(got, ref_sel, noise, edge_weight=1.0, num_keep=K, sim_threshold=0.5, tol=TOL)
        assert not res.problems, res.problems


# ---- the numerical range of the contract (docs/algorithm.md) -----------------------------


def _no_constant_regions(seed, B, C, H, W, P, D=24):
    g = torch.Generator().manual_seed(seed)
    L = (H // P) * (W // P)
    return (torch.randn(B, C, H, W, generator=g).to(DEVICE), torch.randn(B, L, D, generator=g).to(DEVICE),
            torch.rand(B, L, generator=g).to(DEVICE))


@pytest.mark.parametrize("scale", [1e-15, 1e15])
def test_pixel_magnitudes_in_range(scale):
    """Finite pixels up to 1e15 in magnitude agree with the fp64 reference."""
    images, tokens, noise = _inputs(40, 2, 3, 32, 48, 8)
    _check(images * scale, tokens, noise, patch_size=8, token_weight=0.5, candidate_ratio=0.1)
    _check(images * scale, None, noise, patch_size=8, candidate_ratio=0.1)


@pytest.mark.parametrize("norm", [1e-15, 1e15])
def test_token_norms_in_range(norm):
    images, tokens, noise = _inputs(41, 2, 3, 32, 48, 8)
    tokens = tokens / tokens.norm(dim=2, keepdim=True) * norm
    _check(images, tokens, noise, patch_size=8, token_weight=0.5, candidate_ratio=0.1)
    _check(images, tokens, noise, patch_size=8, token_weight=1.0, candidate_ratio=0.1, edge_weight=0.0)


def _like_fp32_reference(images, tokens, noise, **kw):
    """Past the fp32 range the kernel fails as the fp32 reference does: NaN
    edges where it has them, a vector whose squared norm overflows counting
    as a zero vector (zero similarity), the same selections."""
    got = pgs_kernels.pgs_select(images, tokens, noise=noise, backend="triton", return_scores=True, **kw)
    ref = python_ref.pgs_select(images, tokens if kw.get("token_weight", 0) > 0 else None, noise=noise,
                                return_scores=True, dtype=torch.float32, **kw)
    B, _, H, W = images.shape
    L = (H // kw["patch_size"]) * (W // kw["patch_size"])
    K, _, _ = pgs_counts(L, 0.5, kw.get("candidate_ratio", 0.05))
    assert_valid_selection(got, B, L, K)
    assert torch.equal(torch.isnan(got.edge), torch.isnan(ref.edge))
    torch.testing.assert_close(got.edge.nan_to_num(0), ref.edge.nan_to_num(0), atol=TOL, rtol=0)
    assert torch.equal(got.candidates, ref.candidates)
    torch.testing.assert_close(got.redundancy, ref.redundancy, atol=TOL, rtol=0, equal_nan=True)
    assert torch.equal(got.keep_idx, ref.keep_idx)
    return got


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_pixels_past_fp32_fail_like_the_fp32_reference():
    images, tokens, noise = _no_constant_regions(42, 2, 3, 32, 48, 8)
    got = _like_fp32_reference(images * 1e19, tokens, noise, patch_size=8, candidate_ratio=0.1)
    # Sobel overflows: every edge NaN, the candidates in index order; every
    # pixel vector's norm overflows: zero similarity, zero redundancy.
    assert torch.isnan(got.edge).all()
    assert torch.equal(got.candidates.cpu(), torch.arange(got.candidates.shape[1]).expand_as(got.candidates))
    assert (got.redundancy == 0).all()
    _like_fp32_reference(images * 1e19, tokens, noise, patch_size=8, candidate_ratio=0.1, token_weight=0.5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_tokens_past_fp32_fail_like_the_fp32_reference():
    images, tokens, noise = _no_constant_regions(43, 2, 3, 32, 48, 8)
    big = tokens / tokens.norm(dim=2, keepdim=True) * 1e20
    got = _like_fp32_reference(images, big, noise, patch_size=8, candidate_ratio=0.1, token_weight=1.0,
                               edge_weight=0.0)
    assert (got.redundancy == 0).all()  # zero vectors, not inf / inf
    _like_fp32_reference(images, big, noise, patch_size=8, candidate_ratio=0.1, token_weight=0.5)
    one_inf = tokens.clone()
    one_inf[0, 3, 5] = math.inf  # an Inf element: NaN similarity for that token, as t / inf gives
    _like_fp32_reference(images, one_inf, noise, patch_size=8, candidate_ratio=0.1, token_weight=0.5)


@pytest.mark.parametrize("value", [0.7, 1.0 / 3.0, -1e15])
def test_constant_patches_have_zero_similarity(value):
    """A constant patch (whose value does not average exactly in fp32) has a
    zero centred vector: zero similarity to every candidate, so its redundancy
    is exactly 0, as in the fp64 reference."""
    images, tokens, noise = _inputs(44, 2, 3, 32, 48, 8)
    images[:, :, 8:24, 16:32] = value  # patches 8, 9, 14 and 15 of the 4 x 6 grid
    for kw in (dict(), dict(use_ot=False), dict(candidate_ratio=0.3)):
        got = _check(images, None, noise, patch_size=8, **kw)
        assert (got.redundancy[:, [8, 9, 14, 15]] == 0).all()


@pytest.mark.parametrize("ot_reg,ot_iters", [(1e-4, 1000), (1e-4, 1), (1e-3, 200), (0.02, 1000), (1.0, 1000)])
def test_ot_reg_and_iters_range(ot_reg, ot_iters):
    """ot_reg in [1e-4, 1] with up to 1000 steps: the scaling form where fp32
    holds it, the log domain where it does not, both agree with fp64."""
    images, tokens, noise = _inputs(45, 2, 3, 32, 48, 8)
    _check(images, tokens, noise, patch_size=8, token_weight=0.5, candidate_ratio=0.2, ot_reg=ot_reg,
           ot_iters=ot_iters)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("what", ["images_nan", "images_inf", "tokens_nan", "tokens_inf", "noise_nan"])
@pytest.mark.parametrize("use_ot", [True, False])
def test_non_finite_inputs_give_valid_selections(what, use_ot):
    images, tokens, noise = _inputs(23, 3, 3, 32, 48, 8)
    name, kind = what.split("_")
    t = {"images": images, "tokens": tokens, "noise": noise}[name]
    val = math.nan if kind == "nan" else math.inf
    t.view(-1)[:: max(1, t.numel() // 7)] = val
    t[0] = val  # one row entirely non-finite
    for ew in (1.0, 0.0):
        got = _check(images, tokens, noise, finite=False, patch_size=8, token_weight=0.5,
                     candidate_ratio=0.1, edge_weight=ew, use_ot=use_ot)
        c = got.candidates.cpu()
        assert ((c >= 0) & (c < 24)).all()
        assert all(len(set(row.tolist())) == c.shape[1] for row in c)


def test_disabled_inputs_cannot_bring_nan():
    # token_weight = 0 ignores NaN tokens; token_weight = 1 ignores NaN pixels for S.
    images, tokens, noise = _inputs(24, 2, 3, 32, 48, 8)
    bad = torch.full_like(tokens, math.nan)
    a = pgs_kernels.pgs_select(images, bad, noise=noise, patch_size=8, token_weight=0.0,
                               candidate_ratio=0.1, backend="triton", return_scores=True)
    b = pgs_kernels.pgs_select(images, None, noise=noise, patch_size=8, token_weight=0.0,
                               candidate_ratio=0.1, backend="triton", return_scores=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    bad_img = images.clone()
    bad_img[:, :, 0, 0] = math.nan
    c = pgs_kernels.pgs_select(bad_img, tokens, noise=noise, patch_size=8, token_weight=1.0,
                               candidate_ratio=0.1, edge_weight=0.0, backend="triton", return_scores=True)
    assert torch.isfinite(c.redundancy).all()
    _check(images, tokens, noise, patch_size=8, token_weight=1.0, candidate_ratio=0.1, edge_weight=0.0)


def test_multi_block_candidates(monkeypatch):
    # Force S through scratch in several candidate blocks (the large-k path).
    monkeypatch.setattr(triton_pgs, "_S_TILE", 16)
    images, tokens, noise = _inputs(25, 2, 3, 48, 48, 8)
    for use_ot in (True, False):
        _check(images, tokens, noise, patch_size=8, token_weight=0.4, candidate_ratio=0.6,
               mask_ratio=0.7, use_ot=use_ot)


def test_similarity_in_several_blocks(monkeypatch):
    # Small similarity tiles: S comes in blocks of 16 patches, gathered into one
    # register tile for Sinkhorn (or streamed, with the S tile small too).
    monkeypatch.setattr(triton_pgs, "_SIM_TILE", 256)
    images, tokens, noise = _inputs(27, 2, 3, 32, 48, 8)
    for kw in (dict(token_weight=0.5), dict(), dict(use_ot=False, token_weight=0.3)):
        _check(images, tokens, noise, patch_size=8, candidate_ratio=0.2, **kw)
    monkeypatch.setattr(triton_pgs, "_S_TILE", 256)
    _check(images, tokens, noise, patch_size=8, candidate_ratio=0.2, token_weight=0.5)


def test_batch_stride_loop(monkeypatch):
    # A tiny scratch budget: one program walks the whole batch.
    monkeypatch.setattr(triton_pgs, "_SCRATCH_BUDGET", 1)
    images, tokens, noise = _inputs(26, 3, 3, 32, 48, 8)
    _check(images, tokens, noise, patch_size=8, token_weight=0.5, candidate_ratio=0.1)


def test_photos(photos):
    imgs = torch.nn.functional.interpolate(photos, size=(64, 96), mode="area").to(DEVICE)
    B, L = imgs.shape[0], 8 * 12
    noise = torch.rand(B, L, generator=torch.Generator().manual_seed(27)).to(DEVICE)
    for kw in (dict(), dict(use_ot=False, candidate_ratio=0.1), dict(mask_ratio=0.3, edge_weight=2.0)):
        _check(imgs, None, noise, patch_size=8, **kw)


def test_photo_full_size(photos):
    imgs = photos[:1].to(DEVICE)
    noise = torch.rand(1, 196, generator=torch.Generator().manual_seed(28)).to(DEVICE)
    _check(imgs, None, noise, patch_size=16)


def test_empty_batch():
    images = torch.zeros(0, 3, 32, 48, device=DEVICE)
    got = pgs_kernels.pgs_select(images, patch_size=8, backend="triton", return_scores=True)
    K, M, k = pgs_counts(24, 0.5, 0.05)
    assert_valid_selection(got, 0, 24, K)
    assert tuple(got.edge.shape) == (0, 24) and tuple(got.candidates.shape) == (0, k)


def test_too_many_patches():
    images = torch.zeros(1, 1, 8 * 33, 8 * 32, device=DEVICE)
    with pytest.raises(ValueError, match="images"):
        pgs_kernels.pgs_select(images, patch_size=8, backend="triton")


def test_op_arguments_order_matches_reference():
    images, tokens, noise = _inputs(29, 2, 3, 32, 48, 8)
    args = (images, tokens, noise, 8, 12, 3, 0.5, 0.5, 1.0, True, 0.05, 20)
    out = triton_pgs.pgs_select_triton(*args)
    ref = python_ref.pgs.pgs_select_core(*args, torch.float64)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]) and torch.equal(out[3], ref[3])


# ---- CUDA only -------------------------------------------------------------------------


def _cuda_args(B=8, H=64, W=96, P=16, D=32):
    images, tokens, noise = _inputs(30, B, 3, H, W, P, D=D, tok_dtype=torch.bfloat16)
    return images.cuda(), tokens.cuda(), noise.cuda()


@cuda_only
def test_torch_compile_fullgraph():
    images, tokens, noise = _cuda_args()

    def f(x, t, u):
        sel = pgs_kernels.pgs_select(x, t, noise=u, patch_size=16, token_weight=0.5)
        return torch.gather(t, 1, sel.keep_idx[..., None].expand(-1, -1, t.shape[2]))

    eager = f(images, tokens, noise)
    compiled = torch.compile(f, fullgraph=True)(images, tokens, noise)
    assert torch.equal(eager, compiled)


@cuda_only
def test_cuda_graph_replay():
    images, tokens, noise = _cuda_args()
    static = [images.clone(), tokens.clone(), noise.clone()]

    def step():
        return pgs_kernels.pgs_select(*static[:2], noise=static[2], patch_size=16, token_weight=0.5,
                                      return_scores=True, backend="triton")

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    new = _inputs(31, 8, 3, 64, 96, 16, D=32, tok_dtype=torch.bfloat16)
    for dst, src in zip(static, new):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for a, b in zip(out, eager):
        assert torch.equal(a, b)


@cuda_only
def test_vit_b16_size():
    g = torch.Generator(device="cuda").manual_seed(32)
    images = torch.randn(256, 3, 224, 224, device="cuda", generator=g)
    tokens = torch.randn(256, 196, 768, device="cuda", generator=g).bfloat16()
    noise = torch.rand(256, 196, device="cuda", generator=g)
    _check(images, tokens, noise, patch_size=16, token_weight=0.5)
