"""The public API: counts, invariants, equivalences, determinism, errors.

Runs on every backend usable here; test_agreement.py compares each backend
with the reference in detail (non-finite inputs included).
"""

import itertools

import pytest
import torch

import pgs_kernels
import python_ref as R
from conftest import BACKENDS, DEVICE, INTERPRETED, assert_valid_selection
from pgs_kernels import pgs_counts, pgs_select



def _x(B=2, C=3, H=32, W=48, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, W, generator=g).to(DEVICE, dtype)


@pytest.mark.parametrize(
    "L,mask_ratio,candidate_ratio,expect",
    [
        (196, 0.5, 0.05, (98, 98, 10)),
        (196, 0.3, 0.05, (137, 59, 10)),
        (196, 0.0, 0.0, (196, 0, 0)),
        (1, 0.99, 1.0, (1, 0, 1)),
        (256, 0.75, 0.05, (64, 192, 13)),
        (10, 0.95, 0.5, (1, 9, 5)),
    ],
)
def test_counts(L, mask_ratio, candidate_ratio, expect):
    assert pgs_counts(L, mask_ratio, candidate_ratio) == expect


def _count_grid():
    """(backend, mask_ratio, candidate_ratio): the whole grid for every backend
    but the interpreter, which gets its corners and middle (the agreement
    table runs it on some twenty other pairs, the extremes among them)."""
    for backend, mr, cr in itertools.product(BACKENDS, (0.0, 0.3, 0.5, 0.75, 0.95), (0.0, 0.05, 0.5, 1.0)):
        if backend == "triton" and INTERPRETED and (mr not in (0.0, 0.5, 0.95) or cr == 0.5):
            continue
        yield backend, mr, cr


@pytest.mark.parametrize("backend,mask_ratio,candidate_ratio", list(_count_grid()))
def test_invariants_and_counts(backend, mask_ratio, candidate_ratio):
    B = 1 if (backend == "triton" and INTERPRETED) else 3  # the interpreter's cost is per image
    x = _x(B=B, H=32, W=40)
    L = (32 // 8) * (40 // 8)
    K, M, k = pgs_counts(L, mask_ratio, candidate_ratio)
    sel = pgs_select(x, patch_size=8, mask_ratio=mask_ratio, candidate_ratio=candidate_ratio,
                     return_scores=True, backend=backend)
    assert_valid_selection(sel, B, L, K)
    assert sel.candidates.shape == (B, k) and sel.candidates.dtype == torch.int64
    assert sel.edge.shape == (B, L) and sel.redundancy.shape == (B, L)
    # Candidates are dropped first: min(M, k) of them are always in the mask.
    dropped_cands = torch.gather(sel.mask, 1, sel.candidates[:, : min(M, k)])
    assert dropped_cands.all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_only_when_asked(backend):
    sel = pgs_select(_x(), patch_size=16, backend=backend)
    assert sel.edge is None and sel.candidates is None and sel.redundancy is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_candidates_no_edge_is_random_masking(backend):
    x = _x(B=4, H=32, W=32)
    noise = torch.rand(4, 16, device=DEVICE)
    sel = pgs_select(x, noise=noise, patch_size=8, candidate_ratio=0.0, edge_weight=0.0, backend=backend)
    rnd = R.random_masking(x, noise=noise, patch_size=8)
    assert torch.equal(sel.mask, rnd.mask) and torch.equal(sel.keep_idx, rnd.keep_idx)
    # the dropped patches are those of lowest noise
    order = torch.argsort(noise, dim=1)
    assert sel.mask.gather(1, order[:, :8]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_noise_same_answer_and_generator_seed(backend):
    B = 1 if (backend == "triton" and INTERPRETED) else 3  # the interpreter's cost is per image
    x = _x(B=B)
    noise = torch.rand(B, 6, device=DEVICE)
    a = pgs_select(x, noise=noise, backend=backend)
    b = pgs_select(x, noise=noise, backend=backend)
    assert torch.equal(a.keep_idx, b.keep_idx)
    dev = torch.device(DEVICE)
    g1 = torch.Generator(device=dev).manual_seed(123)
    g2 = torch.Generator(device=dev).manual_seed(123)
    c = pgs_select(x, generator=g1, return_scores=True, backend=backend)
    d = pgs_select(x, generator=g2, return_scores=True, backend=backend)
    assert torch.equal(c.keep_idx, d.keep_idx) and torch.equal(c.candidates, d.candidates)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_ratio_zero_drops_nothing(backend):
    sel = pgs_select(_x(), patch_size=8, mask_ratio=0.0, backend=backend)
    assert not sel.mask.any() and sel.keep_idx.shape == (2, 24)
    assert torch.equal(sel.keep_idx, torch.arange(24, device=DEVICE).expand(2, 24))


@pytest.mark.parametrize("backend", BACKENDS)
def test_validate_rejects_nonfinite(backend):
    x = _x()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="images"):
        pgs_select(x, patch_size=16, validate=True, backend=backend)
    t = torch.randn(2, 6, 4, device=DEVICE)
    t[1, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="tokens"):
        pgs_select(_x(), t, token_weight=0.5, patch_size=16, validate=True, backend=backend)
    n = torch.rand(2, 6, device=DEVICE)
    n[0, 0] = float("nan")
    with pytest.raises(ValueError, match="noise"):
        pgs_select(_x(), noise=n, patch_size=16, validate=True, backend=backend)
    pgs_select(_x(), patch_size=16, validate=True, backend=backend)  # finite input passes


def test_half_inputs_accepted_and_match_upcast():
    x = _x(B=2, H=32, W=32)
    noise = torch.rand(2, 16, device=DEVICE)
    for dt in (torch.float16, torch.bfloat16):
        xl = x.to(dt)
        a = pgs_select(xl, noise=noise, patch_size=8, return_scores=True, backend="reference")
        b = R.pgs_select(xl.float(), noise=noise, patch_size=8, return_scores=True)
        torch.testing.assert_close(a.edge, b.edge.float(), atol=1e-5, rtol=0)


def test_reference_backend_matches_python_ref_float32():
    x = _x(B=3, H=48, W=32)
    noise = torch.rand(3, 24, device=DEVICE)
    t = torch.randn(3, 24, 16, device=DEVICE)
    a = pgs_select(x, t, noise=noise, patch_size=8, token_weight=0.3, return_scores=True, backend="reference")
    b = R.pgs_select(x, t, noise=noise, patch_size=8, token_weight=0.3, return_scores=True, dtype=torch.float32)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# --- errors: each names the argument --------------------------------------------

def _err(exc, match, *args, **kw):
    kw.setdefault("patch_size", 16)
    with pytest.raises(exc, match=match):
        pgs_select(*args, **kw)


def test_errors_images():
    _err(TypeError, "images", [[1.0]])
    _err(ValueError, "images", torch.randn(3, 32, 32))
    _err(TypeError, "images", torch.zeros(1, 3, 32, 32, dtype=torch.int64))
    _err(TypeError, "images", torch.zeros(1, 3, 32, 32, dtype=torch.float64))
    _err(ValueError, r"H=33 is not divisible by patch_size=16", torch.randn(1, 3, 33, 32))
    _err(ValueError, r"W=40 is not divisible by patch_size=16", torch.randn(1, 3, 32, 40))
    _err(ValueError, "images", torch.randn(1, 0, 32, 32))
    _err(ValueError, "images", torch.randn(1, 3, 0, 32))


def test_errors_patch_size():
    x = torch.randn(1, 3, 32, 32)
    _err(TypeError, "patch_size", x, patch_size=16.0)
    _err(TypeError, "patch_size", x, patch_size=True)
    _err(ValueError, "patch_size", x, patch_size=0)


@pytest.mark.parametrize(
    "name,value,exc",
    [
        ("mask_ratio", 1.0, ValueError), ("mask_ratio", -0.1, ValueError), ("mask_ratio", "0.5", TypeError),
        ("mask_ratio", float("nan"), ValueError),
        ("candidate_ratio", 1.5, ValueError), ("candidate_ratio", -0.01, ValueError),
        ("candidate_ratio", None, TypeError),
        ("sim_threshold", float("nan"), ValueError), ("sim_threshold", "x", TypeError),
        ("token_weight", 1.5, ValueError), ("token_weight", -0.5, ValueError),
        ("edge_weight", -1.0, ValueError), ("edge_weight", float("inf"), ValueError),
        ("ot_reg", 0.0, ValueError), ("ot_reg", -1.0, ValueError), ("ot_reg", float("inf"), ValueError),
        ("ot_iters", 0, ValueError), ("ot_iters", 2.5, TypeError), ("ot_iters", True, TypeError),
        ("use_ot", 1, TypeError),
        ("backend", "cuda", ValueError), ("backend", 3, TypeError),
    ],
)
def test_errors_ranges(name, value, exc):
    _err(exc, name, torch.randn(1, 3, 32, 32), **{name: value})


def test_errors_tokens():
    x = torch.randn(2, 3, 32, 32)
    _err(ValueError, "token_weight", x, token_weight=0.5)
    _err(TypeError, "tokens", x, "tokens", token_weight=0.5)
    _err(TypeError, "tokens", x, torch.zeros(2, 4, 8, dtype=torch.int32), token_weight=0.5)
    _err(ValueError, "tokens", x, torch.randn(2, 5, 8), token_weight=0.5)
    _err(ValueError, "tokens", x, torch.randn(3, 4, 8), token_weight=0.5)
    _err(ValueError, "tokens", x, torch.randn(2, 4), token_weight=0.5)
    _err(ValueError, "tokens", x, torch.randn(2, 4, 0), token_weight=0.5)
    _err(ValueError, "tokens", x, torch.randn(2, 4, 8, device="meta"), token_weight=0.5)


def test_errors_noise():
    x = torch.randn(2, 3, 32, 32)
    _err(TypeError, "noise", x, noise=[0.1] * 8)
    _err(TypeError, "noise", x, noise=torch.zeros(2, 4, dtype=torch.int64))
    _err(ValueError, "noise", x, noise=torch.rand(2, 5))
    _err(ValueError, "noise", x, noise=torch.rand(2, 4, device="meta"))


def test_unavailable_backend_is_a_clear_error():
    missing = [b for b in ("triton", "native") if b not in pgs_kernels.available_backends("cpu")]
    for b in missing:
        with pytest.raises(ValueError, match="backend"):
            pgs_select(torch.randn(1, 3, 32, 32), backend=b)


def test_reference_accepts_float64_and_checks_dtype():
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    R.pgs_select(x)
    with pytest.raises(TypeError, match="dtype"):
        R.pgs_select(x, dtype=torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    """B = 0: empty outputs of the right shapes and dtypes, no launch, no error."""
    sel = pgs_select(torch.randn(0, 3, 32, 48, device=DEVICE), patch_size=8, backend=backend, return_scores=True)
    K, _, k = pgs_counts(24, 0.5, 0.05)
    assert_valid_selection(sel, 0, 24, K)
    assert tuple(sel.edge.shape) == (0, 24) and tuple(sel.redundancy.shape) == (0, 24)
    assert tuple(sel.candidates.shape) == (0, k) and sel.candidates.dtype == torch.int64


def test_autocast_does_not_lower_the_math():
    x = _x(B=2, H=64, W=64)
    t = torch.randn(2, 16, 32, device=DEVICE)
    noise = torch.rand(2, 16, device=DEVICE)
    kw = dict(noise=noise, patch_size=16, token_weight=0.5, return_scores=True, backend="reference")
    plain = pgs_select(x, t, **kw)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        auto = pgs_select(x, t, **kw)
    assert torch.equal(plain.redundancy, auto.redundancy) and torch.equal(plain.mask, auto.mask)


def test_import_pgs_kernels_imports_no_optional_library():
    """The reference and the integrations' libraries load only when used."""
    import subprocess
    import sys

    code = ("import sys, pgs_kernels; bad = {'open_clip', 'timm', 'torchvision', 'python_ref'} & set(sys.modules); "
            "assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
