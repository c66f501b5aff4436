"""Each step of python_ref against an independent computation of docs/algorithm.md."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

import python_ref as R
from pgs_kernels import pgs_counts
from conftest import assert_valid_selection


def _images(seed, B=2, C=3, H=32, W=48, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, W, generator=g, dtype=dtype)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("P,C", [(8, 3), (16, 1), (8, 1)])
def test_edge_energy_matches_scipy_sobel(seed, P, C):
    x = _images(seed, B=2, C=C, H=32, W=48)
    edge = R.edge_energy(x, P)
    for b in range(x.shape[0]):
        Y = x[b].mean(0).numpy()
        # scipy's axis=1 derivative is Gx, smoothed along axis 0, as in docs/algorithm.md.
        gx = ndimage.sobel(Y, axis=1, mode="nearest")
        gy = ndimage.sobel(Y, axis=0, mode="nearest")
        G = np.hypot(gx, gy)
        gh, gw = Y.shape[0] // P, Y.shape[1] // P
        e = G.reshape(gh, P, gw, P).mean(axis=(1, 3)).reshape(-1)
        e_hat = (e - e.min()) / (e.max() - e.min() + 1e-6)
        np.testing.assert_allclose(edge[b].numpy(), e_hat, atol=1e-10)


def test_edge_energy_is_zero_on_constant_and_locates_a_step():
    x = torch.zeros(1, 1, 32, 32, dtype=torch.float64)
    assert torch.equal(R.edge_energy(x, 8), torch.zeros(1, 16, dtype=torch.float64))
    x[..., 16:] = 1.0  # a vertical step between grid columns 1 and 2
    e = R.edge_energy(x, 8).reshape(4, 4)
    assert (e[:, 1] > 0.99).all() and (e[:, 2] > 0.99).all()
    assert (e[:, 0] == 0).all() and (e[:, 3] == 0).all()


def test_candidates_follow_key_then_index():
    noise = torch.tensor([[0.5, 0.1, 0.1, 0.9, float("nan"), 0.0]], dtype=torch.float64)
    edge = torch.zeros_like(noise)
    key, order, cand = R.generate_candidates(noise, edge, 1.0, 3)
    assert cand.tolist() == [[5, 1, 2]]  # the tie 1/2 is broken by index
    assert math.isinf(key[0, 4]) and order[0, -1] == 4  # NaN counts as +inf
    key, _, cand = R.generate_candidates(noise, torch.tensor([[0, 1, 0, 0, 0, 0.0]]), 0.5, 2)
    assert cand.tolist() == [[5, 2]]  # the edge prior pushed patch 1 back


def test_zero_edge_weight_ignores_nan_edges():
    noise = torch.rand(1, 6, dtype=torch.float64)
    edge = torch.full_like(noise, float("nan"))
    key, _, _ = R.generate_candidates(noise, edge, 0.0, 2)
    assert torch.equal(key, noise)


def test_similarity_against_loops():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, 24, generator=g, dtype=torch.float64)
    t = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    cand = torch.tensor([[4, 0], [1, 5]])
    alpha = 0.3
    S = R.candidate_similarity(x, t, cand, 8, alpha)
    for b in range(2):
        vecs = [x[b, :, (j // 3) * 8:(j // 3) * 8 + 8, (j % 3) * 8:(j % 3) * 8 + 8].reshape(-1) for j in range(6)]
        for ii, i in enumerate(cand[b].tolist()):
            for j in range(6):
                pi, pj = vecs[i] - vecs[i].mean(), vecs[j] - vecs[j].mean()
                sp = (pi / (pi.norm() + 1e-6)) @ (pj / (pj.norm() + 1e-6))
                st = (t[b, i] / (t[b, i].norm() + 1e-6)) @ (t[b, j] / (t[b, j].norm() + 1e-6))
                assert S[b, ii, j].item() == pytest.approx(((1 - alpha) * sp + alpha * st).item(), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k,L", [(1, 12), (3, 12), (10, 196)])
def test_sinkhorn_marginals(seed, k, L):
    g = torch.Generator().manual_seed(seed)
    S = torch.rand(2, k, L, generator=g, dtype=torch.float64) * 2 - 1
    plan, f, gpot = R.sinkhorn_plan(S, 0.1, 1000)
    # after the last g update the columns are exact, the rows converge
    torch.testing.assert_close(plan.sum(1), torch.full((2, L), 1 / L, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(plan.sum(2), torch.full((2, k), 1 / k, dtype=torch.float64), atol=1e-6, rtol=1e-4)


def test_sinkhorn_matches_plain_exp_sinkhorn():
    g = torch.Generator().manual_seed(7)
    S = torch.rand(3, 4, 20, generator=g, dtype=torch.float64) * 2 - 1
    eps, T = 0.5, 20  # moderate ε: exp(S/ε) is safe in plain arithmetic
    plan, _, _ = R.sinkhorn_plan(S, eps, T)
    Kmat = torch.exp(S / eps)
    a, b = torch.full((3, 4), 1 / 4, dtype=torch.float64), torch.full((3, 20), 1 / 20, dtype=torch.float64)
    v = torch.ones(3, 20, dtype=torch.float64)
    for _ in range(T):
        u = a / torch.einsum("bij,bj->bi", Kmat, v)
        v = b / torch.einsum("bij,bi->bj", Kmat, u)
    plain = u[:, :, None] * Kmat * v[:, None, :]
    torch.testing.assert_close(plan, plain, atol=1e-12, rtol=1e-9)


def test_redundancy_without_ot_is_max_similarity():
    S = torch.randn(2, 3, 10, dtype=torch.float64)
    torch.testing.assert_close(R.redundancy(S, 10, False, 0.05, 20), S.max(1).values)
    r0 = R.redundancy(S[:, :0], 10, True, 0.05, 20)
    assert torch.isneginf(r0).all()


def test_redundancy_with_ot_formula():
    S = torch.randn(2, 3, 10, dtype=torch.float64).clamp(-1, 1)
    plan, _, _ = R.sinkhorn_plan(S, 0.05, 20)
    expect = 10 * (plan * S).sum(1)
    torch.testing.assert_close(R.redundancy(S, 10, True, 0.05, 20), expect)


def test_select_patches_order_tier_key_index():
    key = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.3, 0.7]], dtype=torch.float64)
    cand = torch.tensor([[0]])  # tier 0 even though its key is the largest
    r = torch.tensor([[0.0, 0.0, 0.9, 0.0, float("nan"), 0.6]], dtype=torch.float64)
    # tiers: [0, 2, 1, 2, 2, 1]; order: 0 | 2(0.5) 5(0.7) | 1(0.1) 3(0.3) 4(0.3) ...
    keep, mask = R.select_patches(key, cand, r, 0.5, 2)
    assert mask.tolist() == [[True, True, True, False, False, True]]
    assert keep.tolist() == [[3, 4]]


def test_end_to_end_on_photos_keeps_more_edge_than_random(photos):
    from conftest import assert_valid_selection as check

    x = photos.double()
    gen = torch.Generator().manual_seed(0)
    kept_pgs, kept_rnd = [], []
    for seed in range(4):
        noise = torch.rand(x.shape[0], 196, generator=gen, dtype=torch.float64)
        pgs = R.pgs_select(x, noise=noise, return_scores=True)
        rnd = R.random_masking(x, noise=noise)
        check(pgs, x.shape[0], 196, 98)
        e = R.edge_energy(x, 16)
        kept_pgs.append(((~pgs.mask) * e).sum(1) / e.sum(1))
        kept_rnd.append(((~rnd.mask) * e).sum(1) / e.sum(1))
    pgs_mean = torch.stack(kept_pgs).mean()
    rnd_mean = torch.stack(kept_rnd).mean()
    assert pgs_mean > rnd_mean, (pgs_mean, rnd_mean)


def test_float32_and_float64_agree_on_photos(photos):
    x = photos[:2]
    noise = torch.rand(2, 196, generator=torch.Generator().manual_seed(1))
    a = R.pgs_select(x, noise=noise, return_scores=True, dtype=torch.float64)
    b = R.pgs_select(x, noise=noise, return_scores=True, dtype=torch.float32)
    torch.testing.assert_close(a.edge.float(), b.edge, atol=1e-5, rtol=0)
    assert torch.equal(a.candidates, b.candidates)
    torch.testing.assert_close(a.redundancy.float(), b.redundancy, atol=1e-4, rtol=0)


def test_published_baseline_shapes_and_attention_mask():
    x = _images(0, B=3, C=3, H=32, W=32, dtype=torch.float32)
    sel, attn = R.published_pgs(x, patch_size=8, return_attn_mask=True, return_scores=True)
    B, Kp = sel.keep_idx.shape
    assert_valid_selection(sel, 3, 16, Kp)
    assert Kp <= pgs_counts(16, 0.5, 0.05)[0]
    assert attn.shape == (3, Kp + 1, Kp + 1)
    similar_kept = torch.gather(sel.redundancy.bool(), 1, sel.keep_idx)
    assert ((attn[:, 1:, 1:] < -1e11) == (similar_kept[:, :, None] | similar_kept[:, None, :])).all()
    assert (attn[:, 0, 0] == 0).all()


def test_sinkhorn_knopp_division_divides_by_sums_taken_first():
    # As published: both sums come from the matrix before either division
    # (so it does not make a positive matrix doubly stochastic).
    S = torch.rand(2, 6, 6, dtype=torch.float64) + 0.1
    c, r = S.sum(1, keepdim=True), S.sum(2, keepdim=True)
    assert torch.equal(R.sinkhorn_knopp_division(S, 1, 1e-3), S / (c + 1e-3) / (r + 1e-3))
