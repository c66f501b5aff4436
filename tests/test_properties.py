"""Property tests: the invariants hold over shapes, ratios and options, and
the counts K, M, k are one decision that every entry point takes."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgs_kernels
import python_ref
from conftest import BACKENDS, DEVICE, INTERPRETED, assert_valid_selection
from pgs_kernels import pgs_counts

# Triton under the interpreter is too slow for many examples; the agreement
# table (test_agreement.py) and the count boundaries below cover it.
FAST_BACKENDS = [b for b in BACKENDS if not (b == "triton" and INTERPRETED)]
# Compiled on CUDA, every new shape or ot_iters is a fresh Triton kernel (0.3-7 s
# to compile), and the GPU suite's tests part has 8 minutes for the whole
# suite: fewer examples there, ot_iters from two values.
MAX_EXAMPLES = 15 if DEVICE == "cuda" else 60
OT_ITERS = st.sampled_from([1, 5]) if DEVICE == "cuda" else st.integers(1, 5)


@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 3),
    C=st.integers(1, 4),
    P=st.sampled_from([2, 4, 8]),
    gh=st.integers(1, 6),
    gw=st.integers(1, 6),
    mask_ratio=st.floats(0.0, 0.99),
    candidate_ratio=st.floats(0.0, 1.0),
    sim_threshold=st.floats(-1.5, 1.5),
    token_weight=st.sampled_from([0.0, 0.3, 1.0]),
    edge_weight=st.sampled_from([0.0, 1.0, 5.0]),
    use_ot=st.booleans(),
    ot_iters=OT_ITERS,
    seed=st.integers(0, 2**16),
    backend=st.sampled_from(FAST_BACKENDS),
    special=st.sampled_from(["none", "nan", "inf", "const"]),
)
def test_invariants_hold(B, C, P, gh, gw, mask_ratio, candidate_ratio, sim_threshold, token_weight,
                         edge_weight, use_ot, ot_iters, seed, backend, special):
    """Whatever the shape, ratios and options: a valid selection with pgs_counts'
    K and k, distinct candidates, and the candidates dropped first."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, gh * P, gw * P, generator=g)
    if special == "nan":
        x[0, 0, 0, 0] = math.nan
    elif special == "inf":
        x[-1] = math.inf
    elif special == "const":
        x[0] = 0.25
    L = gh * gw
    t = torch.randn(B, L, 4, generator=g) if token_weight > 0 else None
    K, M, k = pgs_counts(L, mask_ratio, candidate_ratio)
    sel = pgs_kernels.pgs_select(
        x.to(DEVICE), None if t is None else t.to(DEVICE), patch_size=P, mask_ratio=mask_ratio,
        candidate_ratio=candidate_ratio, sim_threshold=sim_threshold, token_weight=token_weight,
        edge_weight=edge_weight, use_ot=use_ot, ot_iters=ot_iters, return_scores=True, backend=backend,
    )
    assert_valid_selection(sel, B, L, K)
    assert sel.candidates.shape == (B, k)
    cands = sel.candidates.cpu()
    if k:
        assert (torch.sort(cands, 1).values[:, 1:] != torch.sort(cands, 1).values[:, :-1]).all()
        assert sel.mask.cpu().gather(1, cands[:, : min(M, k)]).all()


@settings(max_examples=200, deadline=None)
@given(L=st.integers(1, 4096), mr=st.tuples(st.floats(0.0, 0.999), st.floats(0.0, 0.999)),
       cr=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)))
def test_counts_follow_the_ratios(L, mr, cr):
    """K kept, M dropped and k candidates are ints that partition the L patches,
    keep at least one, move monotonically with their ratio, and stay within
    one patch of the share asked for: L (1 - mask_ratio) kept (at least 1),
    L candidate_ratio candidates."""
    (mr1, mr2), (cr1, cr2) = sorted(mr), sorted(cr)
    K1, M1, k1 = pgs_counts(L, mr1, cr1)
    K2, M2, k2 = pgs_counts(L, mr2, cr2)
    for K, M, k, m, c in ((K1, M1, k1, mr1, cr1), (K2, M2, k2, mr2, cr2)):
        assert all(type(n) is int for n in (K, M, k))
        assert K + M == L and 1 <= K <= L and 0 <= M < L and 0 <= k <= L
        want_keep, want_cand = L * (1 - m), L * c
        slack = 1e-9 * L  # the products are Python floats (docs/algorithm.md)
        assert K <= max(1.0, want_keep + slack) and K > want_keep - 1 - slack
        assert want_cand - slack <= k < want_cand + 1 + slack
    assert K2 <= K1 and k2 >= k1  # more masking keeps fewer, more candidates generate more
    assert pgs_counts(L, 0.0, 0.0) == (L, 0, 0) and pgs_counts(L, 0.0, 1.0)[2] == L


# (L as a grid, mask_ratio, candidate_ratio) where L (1 - ratio) is a hair
# below an integer in Python floats: 10 (1 - 0.8) = 1.9999999999999996, so
# K = 1 and k = 10 - 1 = 9, where exact decimals (or fp32, or rounding) would
# give K = 2 and k = 8. Every entry point must take the same counts.
BOUNDARIES = [((2, 5), 0.8, 0.8), ((4, 5), 0.9, 0.9), ((5, 5), 0.56, 0.68), ((5, 10), 0.34, 0.34)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid,mask_ratio,candidate_ratio", BOUNDARIES)
def test_counts_on_float_boundaries_are_the_same_everywhere(backend, grid, mask_ratio, candidate_ratio):
    """Each backend, the reference, random masking and the training layer keep
    exactly pgs_counts' K and generate its k where the ratio's product sits on
    an integer boundary: no entry point computes its own counts."""
    gh, gw = grid
    L, P = gh * gw, 2
    K, M, k = pgs_counts(L, mask_ratio, candidate_ratio)
    assert K < round(L * (1 - mask_ratio)) and k > round(L * candidate_ratio)  # on the boundary indeed
    g = torch.Generator().manual_seed(L)
    images = torch.randn(1, 3, gh * P, gw * P, generator=g).to(DEVICE)
    kw = dict(patch_size=P, mask_ratio=mask_ratio, candidate_ratio=candidate_ratio)
    sel = pgs_kernels.pgs_select(images, backend=backend, return_scores=True, **kw)
    assert_valid_selection(sel, 1, L, K)
    assert tuple(sel.candidates.shape) == (1, k)
    ref = python_ref.pgs_select(images, return_scores=True, **kw)
    assert tuple(ref.keep_idx.shape) == (1, K) and tuple(ref.candidates.shape) == (1, k)
    assert tuple(python_ref.random_masking(images, patch_size=P, mask_ratio=mask_ratio).keep_idx.shape) == (1, K)
    layer = pgs_kernels.PGSPatchDropout(mask_ratio=mask_ratio, candidate_ratio=candidate_ratio, patch_size=P,
                                        backend=backend).train()
    assert tuple(layer(torch.randn(1, 1 + L, 8, device=DEVICE), images).shape) == (1, 1 + K, 8)
