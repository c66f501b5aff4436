r"""Baselines: the published PGS algorithm and FLIP-style random masking.

``published_pgs`` re-implements, from the description in SPEC.md ("The
published code, for the baseline port"), what the CLIP-PGS authors' open_clip
fork does per batch. It is here to be measured against (cost, and what it
keeps), not to be used. Where it departs from the contract:

* its edge prior is a Sobel on the per-patch means of *standardized* patch
  vectors, which are zero up to rounding, so ``b`` is rounding noise;
* the ``1e6`` factor on that prior makes the candidate choice follow ``b``'s
  noise rather than the uniform noise;
* it works on the full ``L x L`` similarity, normalizes it by ``S + SK(S)``
  with a division-based Sinkhorn-Knopp that stops early (one host sync per
  iteration) and can divide by sums near zero;
* the number of kept patches depends on the whole batch (another host sync),
  so the output width ``K'`` varies from call to call;
* it returns an attention mask with ``-1e12`` where either token was similar.

``random_masking`` drops the ``M`` patches of lowest noise, i.e. exactly
``pgs_select(candidate_ratio=0, edge_weight=0)``; it is the cost floor of any
masking.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .pgs import patchify
from pgs_kernels.contract import PGSSelection, pgs_counts, prepare_call

__all__ = ["published_pgs", "random_masking", "sinkhorn_knopp_division"]

_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def sinkhorn_knopp_division(S: Tensor, max_iters: int = 50, tol: float = 1e-3, guard: float = 1e-3) -> Tensor:
    """Division-based Sinkhorn-Knopp on ``(B, L, L)`` as published.

    ``Q <- Q / (rowsum(Q) + guard)``, then ``Q <- Q / (colsum(Q) + guard)``, up
    to ``max_iters`` times, stopping once every row and column sum is within
    ``tol`` of 1. The test reads a device value each iteration (a host sync),
    as the published code does.
    """
    Q = S
    for _ in range(max_iters):
        Q = Q / (Q.sum(dim=2, keepdim=True) + guard)
        Q = Q / (Q.sum(dim=1, keepdim=True) + guard)
        row_err = (Q.sum(dim=2) - 1).abs().max()
        col_err = (Q.sum(dim=1) - 1).abs().max()
        if bool(row_err < tol) and bool(col_err < tol):
            break
    return Q


@torch.no_grad()
def published_pgs(
    images: Tensor,
    tokens: Optional[Tensor] = None,
    *,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    patch_size: int = 16,
    mask_ratio: float = 0.5,
    candidate_ratio: float = 0.05,
    sim_threshold: float = 0.5,
    token_weight: float = 0.0,
    use_ot: bool = True,
    sk_iters: int = 50,
    return_scores: bool = False,
    return_attn_mask: bool = False,
):
    """The published CLIP-PGS selection (baseline; see the module docstring).

    Steps, with ``v_j`` patch ``j``'s pixel vector and ``w = token_weight``
    (the published schedule is ``epoch / 32``):

    1. ``z_j = (v_j - mean(v_j)) / (std_unbiased(v_j) + 1e-6)``;
    2. ``b`` = min-max normalized (``+1e-6``) magnitude of a zero-padded 3x3
       Sobel over the ``gh x gw`` grid of ``mean(z_j)``;
    3. ``S = w cos(t_i, t_j) + (1 - w) cos(z_i, z_j)`` over all ``L x L`` pairs,
       with ``cos(a, b) = <a, b> / ((|a| + 1e-6)(|b| + 1e-6))``;
    4. with OT, ``S <- S + SK(S)`` (:func:`sinkhorn_knopp_division`);
    5. candidates: the last ``k`` of ``argsort(u + 1e6 b)``;
    6. similar: ``S_ij > θ`` for some candidate ``i``;
    7. ``K' = min(int(L (1 - mask_ratio)), L - min_b |similar_b| + int(min_b Σ_j b_bj))``,
       clamped to ``[1, L]`` here so that the output is never empty;
    8. keep the first ``K'`` of ``argsort(exp(u') · similar)`` (fresh noise
       ``u'``): non-similar patches first, similar ones at random.

    Returns a :class:`PGSSelection` whose ``keep_idx`` is ``(B, K')``
    ascending; ``redundancy`` (with ``return_scores``) is the similar set as
    float. With ``return_attn_mask`` returns ``(selection, attn_mask)``,
    ``attn_mask`` ``(B, 1 + K', 1 + K')`` with ``-1e12`` where either token is
    a similar patch and 0 elsewhere (CLS is never similar).
    """
    call = prepare_call(
        images, tokens, noise, generator, allow_float64=True,
        patch_size=patch_size, mask_ratio=mask_ratio, candidate_ratio=candidate_ratio,
        sim_threshold=sim_threshold, token_weight=token_weight,
    )
    noise, P, K, k = call.noise, call.patch_size, call.num_keep, call.num_candidates
    B, _, H, W = images.shape
    gh, gw = H // P, W // P
    L = gh * gw
    dev = images.device
    dt = torch.float32 if images.dtype != torch.float64 else torch.float64

    v = patchify(images.to(dt), patch_size)
    z = (v - v.mean(dim=2, keepdim=True)) / (v.std(dim=2, keepdim=True) + 1e-6)

    grid = z.mean(dim=2).reshape(B, 1, gh, gw)
    sx = torch.tensor(_SOBEL_X, dtype=dt, device=dev)
    kernel = torch.stack([sx, sx.t()])[:, None]  # (2, 1, 3, 3): x and y Sobel
    g = F.conv2d(grid, kernel, padding=1)
    mag = torch.sqrt((g * g).sum(dim=1)).reshape(B, L)
    lo, hi = mag.amin(dim=1, keepdim=True), mag.amax(dim=1, keepdim=True)
    b = (mag - lo) / (hi - lo + 1e-6)

    def cos(a: Tensor) -> Tensor:
        a = a / (torch.linalg.vector_norm(a, dim=2, keepdim=True) + 1e-6)
        return torch.bmm(a, a.transpose(1, 2))

    w = float(token_weight)
    S = (1 - w) * cos(z)
    if w > 0:
        S = S + w * cos(tokens.to(dt))
    if use_ot:
        S = S + sinkhorn_knopp_division(S, sk_iters)

    order = torch.argsort(noise.to(dt) + 1e6 * b, dim=1, stable=True)
    cand = order[:, L - k :]
    rows = torch.gather(S, 1, cand[..., None].expand(B, k, L))
    similar = (rows > sim_threshold).any(dim=1)  # (B, L); empty k gives none

    n_similar_min = int(similar.sum(dim=1).min()) if B else 0
    b_sum_min = int(b.sum(dim=1).min()) if B else 0
    K_pub = min(K, L - n_similar_min + b_sum_min)
    K_pub = max(1, min(L, K_pub))

    fresh = torch.rand((B, L), device=dev, dtype=dt, generator=generator)
    rank = torch.argsort(torch.exp(fresh) * similar.to(dt), dim=1, stable=True)
    keep_idx = torch.sort(rank[:, :K_pub], dim=1).values
    mask = torch.ones(B, L, dtype=torch.bool, device=dev)
    mask.scatter_(1, keep_idx, False)

    sel = PGSSelection(keep_idx, mask)
    if return_scores:
        sel = PGSSelection(keep_idx, mask, b, cand, similar.to(dt))
    if not return_attn_mask:
        return sel
    sim_kept = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=dev), torch.gather(similar, 1, keep_idx)], 1)
    either = sim_kept[:, :, None] | sim_kept[:, None, :]
    attn = torch.zeros(B, K_pub + 1, K_pub + 1, dtype=dt, device=dev).masked_fill_(either, -1e12)
    return sel, attn


@torch.no_grad()
def random_masking(
    images: Tensor,
    tokens: Optional[Tensor] = None,
    *,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    patch_size: int = 16,
    mask_ratio: float = 0.5,
    return_scores: bool = False,
) -> PGSSelection:
    """FLIP-style random masking: drop the ``M`` patches of lowest noise ``u``
    (ties by index), keep the other ``K`` in ascending order.

    Equal to ``pgs_select(candidate_ratio=0, edge_weight=0)`` for the same
    ``noise``. ``images`` only give the shape and device; ``tokens`` are
    accepted for a uniform call signature and ignored.
    """
    call = prepare_call(images, tokens, noise, generator, allow_float64=True, patch_size=patch_size,
                        mask_ratio=mask_ratio, candidate_ratio=0.0, edge_weight=0.0)
    noise, K = call.noise, call.num_keep
    B, L = noise.shape
    M = L - K
    order = torch.sort(noise, dim=1, stable=True).indices
    mask = torch.zeros(B, L, dtype=torch.bool, device=images.device)
    mask.scatter_(1, order[:, :M], True)
    keep_idx = torch.sort(order[:, M:], dim=1).values
    if not return_scores:
        return PGSSelection(keep_idx, mask)
    empty = torch.empty(B, 0, dtype=torch.int64, device=images.device)
    return PGSSelection(keep_idx, mask, torch.zeros(B, L, device=images.device), empty,
                        torch.full((B, L), float("-inf"), device=images.device))
