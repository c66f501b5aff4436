"""Property tests: the invariants hold over shapes, ratios and options."""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgs_kernels
from pgs_kernels import pgs_counts
from conftest import DEVICE, assert_valid_selection

BACKENDS = pgs_kernels.available_backends(DEVICE)
# Triton under the interpreter is too slow for many examples; it has its own tests.
FAST_BACKENDS = [b for b in BACKENDS if not (b == "triton" and DEVICE == "cpu")]
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


@settings(max_examples=40, deadline=None)
@given(L=st.integers(1, 2048), mask_ratio=st.floats(0.0, 0.999), candidate_ratio=st.floats(0.0, 1.0))
def test_counts_in_range(L, mask_ratio, candidate_ratio):
    K, M, k = pgs_counts(L, mask_ratio, candidate_ratio)
    assert 1 <= K <= L and K + M == L and 0 <= k <= L
    assert K == max(1, int(L * (1 - mask_ratio)))
