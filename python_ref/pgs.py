r"""The pure-PyTorch reference of PGS selection (docs/algorithm.md).

Each of the five steps is one small function whose docstring carries the
formula with the symbols the code uses, so that a reader can check the code
line by line against the contract. Everything is vectorized over the batch
and runs on any device; the arithmetic is done in ``dtype`` (float64 by
default: this module is the oracle the kernels are tested against).

Symbols: ``B`` images, ``C`` channels, ``P`` patch size, grid ``gh x gw``,
``L = gh gw`` patches, ``K`` kept, ``M = L - K`` dropped, ``k`` candidates,
``u`` noise, ``ê`` edge energy, ``S`` similarity, ``ε`` transport
regularization, ``T`` Sinkhorn iterations, ``r`` redundancy, ``θ`` threshold.

Zero weights remove their term (rather than multiplying it by zero), so that
a disabled input cannot bring NaN into the answer: ``edge_weight = 0`` gives
``key = u`` even for a NaN image, ``token_weight = 0`` ignores ``tokens`` and
``token_weight = 1`` ignores the pixels. Every backend does the same.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pgs_kernels.contract import PGSSelection, prepare_call

__all__ = [
    "pgs_select",
    "pgs_select_core",
    "edge_energy",
    "patch_sobel_energy",
    "generate_candidates",
    "candidate_similarity",
    "sinkhorn_plan",
    "redundancy",
    "select_patches",
    "patchify",
]

EPS = 1e-6  # the guard against division by zero, in norms and min-max


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``(B, C, H, W) -> (B, L, C P^2)``; patch ``j`` is row ``j // gw``, column
    ``j % gw``; inside a vector the order is (channel, row, column)."""
    B, C, H, W = images.shape
    P = patch_size
    gh, gw = H // P, W // P
    x = images.reshape(B, C, gh, P, gw, P).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, gh * gw, C * P * P)


def patch_sobel_energy(images: Tensor, patch_size: int, dtype=torch.float64) -> Tensor:
    r"""Step 1a: mean Sobel magnitude ``e_j`` of each patch (before min-max).

    ``Y`` = channel mean of ``images``; with a replicated border,

    .. math::
        G_x(y,x) &= [Y(y-1,x+1) + 2Y(y,x+1) + Y(y+1,x+1)] - [Y(y-1,x-1) + 2Y(y,x-1) + Y(y+1,x-1)] \\
        G_y(y,x) &= [Y(y+1,x-1) + 2Y(y+1,x) + Y(y+1,x+1)] - [Y(y-1,x-1) + 2Y(y-1,x) + Y(y-1,x+1)] \\
        G &= \sqrt{G_x^2 + G_y^2}, \qquad e_j = \operatorname{mean}_{(y,x) \in j} G(y,x)

    Returns ``e`` of shape ``(B, L)`` in ``dtype``.
    """
    B, C, H, W = images.shape
    P = patch_size
    Y = images.to(dtype).mean(dim=1, keepdim=True)
    Yp = F.pad(Y, (1, 1, 1, 1), mode="replicate")[:, 0]  # (B, H+2, W+2)

    def at(dy: int, dx: int) -> Tensor:  # Y(y+dy, x+dx) for every pixel
        return Yp[:, 1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    G = torch.sqrt(gx * gx + gy * gy)
    return G.reshape(B, H // P, P, W // P, P).mean(dim=(2, 4)).reshape(B, (H // P) * (W // P))


def edge_energy(images: Tensor, patch_size: int, dtype=torch.float64) -> Tensor:
    r"""Step 1: per-patch Sobel energy (:func:`patch_sobel_energy`), min-max
    normalized per image:

    .. math::
        ê_j = (e_j - \min_l e_l) / (\max_l e_l - \min_l e_l + 10^{-6})

    Returns ``ê`` of shape ``(B, L)`` in ``dtype``.
    """
    e = patch_sobel_energy(images, patch_size, dtype)
    lo = e.amin(dim=1, keepdim=True)
    hi = e.amax(dim=1, keepdim=True)
    return (e - lo) / (hi - lo + EPS)


def generate_candidates(noise: Tensor, edge: Tensor, edge_weight: float, num_candidates: int):
    r"""Step 2: the ``k`` candidates.

    ``key_j = u_j + w_e ê_j`` (``key = u`` when ``w_e = 0``); a NaN key counts
    as ``+inf``. The candidates are the first ``k`` patches in the order
    ``(key_j, j)``, returned in that (rank) order.

    Returns ``(key, order, candidates)``: ``key`` ``(B, L)`` with NaN already
    replaced, ``order`` ``(B, L)`` the full ranking, ``candidates`` ``(B, k)``.
    """
    key = noise.to(edge.dtype)
    if edge_weight != 0:
        key = key + edge_weight * edge
    key = torch.nan_to_num(key, nan=math.inf, posinf=math.inf, neginf=-math.inf)
    # A stable sort breaks ties by position, i.e. by patch index j.
    order = torch.sort(key, dim=1, stable=True).indices
    return key, order, order[:, :num_candidates]


def candidate_similarity(
    images: Tensor,
    tokens: Optional[Tensor],
    candidates: Tensor,
    patch_size: int,
    token_weight: float,
    dtype=torch.float64,
) -> Tensor:
    r"""Step 3: similarity of each candidate ``i`` to every patch ``j``.

    .. math::
        \tilde x_j = x_j - \operatorname{mean}(x_j), \quad
        \hat p_j = \tilde x_j / (\lVert \tilde x_j \rVert_2 + 10^{-6}), \quad
        \hat t_j = t_j / (\lVert t_j \rVert_2 + 10^{-6}) \\
        S_{ij} = (1 - α) \langle \hat p_i, \hat p_j \rangle + α \langle \hat t_i, \hat t_j \rangle

    ``x_j`` is patch ``j``'s ``C P^2`` pixel vector, ``t_j`` its token.
    Returns ``S`` of shape ``(B, k, L)`` in ``dtype``.
    """
    alpha = float(token_weight)
    B = images.shape[0]
    k = candidates.shape[1]

    def cosine_to_candidates(v: Tensor) -> Tensor:
        vc = torch.gather(v, 1, candidates[..., None].expand(B, k, v.shape[2]))
        return torch.bmm(vc, v.transpose(1, 2))

    S = None
    if alpha < 1:
        x = patchify(images.to(dtype), patch_size)
        # x - mean(x) of a constant patch is not exactly zero in floating point,
        # and normalizing would blow the residue up to a unit vector. Shifting by
        # one of the patch's own values first makes a constant patch exactly zero.
        x = x - x[:, :, :1]
        x = x - x.mean(dim=2, keepdim=True)
        p = x / (torch.linalg.vector_norm(x, dim=2, keepdim=True) + EPS)
        S = (1 - alpha) * cosine_to_candidates(p)
    if alpha > 0:
        t = tokens.to(dtype)
        t = t / (torch.linalg.vector_norm(t, dim=2, keepdim=True) + EPS)
        St = alpha * cosine_to_candidates(t)
        S = St if S is None else S + St
    return S


def sinkhorn_plan(S: Tensor, ot_reg: float, ot_iters: int):
    r"""Step 4a: log-domain Sinkhorn between uniform masses.

    Candidate mass ``a_i = 1/k``, patch mass ``b_j = 1/L``, kernel
    ``exp(S_ij / ε)``. From ``g = 0``, ``T`` times:

    .. math::
        f_i &= \log a_i - \operatorname{logsumexp}_j (S_{ij}/ε + g_j) \\
        g_j &= \log b_j - \operatorname{logsumexp}_i (S_{ij}/ε + f_i)

    Returns the plan ``Π_ij = exp(S_ij/ε + f_i + g_j)`` ``(B, k, L)`` and the
    potentials ``f`` ``(B, k)``, ``g`` ``(B, L)``.
    """
    B, k, L = S.shape
    Z = S / ot_reg
    log_a = -math.log(k)
    log_b = -math.log(L)
    g = torch.zeros(B, L, dtype=S.dtype, device=S.device)
    f = torch.zeros(B, k, dtype=S.dtype, device=S.device)
    for _ in range(ot_iters):
        f = log_a - torch.logsumexp(Z + g[:, None, :], dim=2)
        g = log_b - torch.logsumexp(Z + f[:, :, None], dim=1)
    plan = torch.exp(Z + f[:, :, None] + g[:, None, :])
    return plan, f, g


def redundancy(S: Tensor, num_patches: int, use_ot: bool, ot_reg: float, ot_iters: int) -> Tensor:
    r"""Step 4: redundancy of each patch with respect to the candidates.

    With OT, ``r_j = L Σ_i Π_ij S_ij`` (the similarity to the candidates that
    patch ``j`` is transported to); without, ``r_j = max_i S_ij``; with no
    candidates (``k = 0``), ``r_j = -inf``. Returns ``(B, L)``.

    After the last ``g`` update each column of ``L Π`` sums to one, so

    .. math::
        r_j = \frac{\sum_i Π_{ij} S_{ij}}{\sum_i Π_{ij}}
            = \sum_i \operatorname{softmax}_i(S_{ij}/ε + f_i)\, S_{ij}

    exactly: ``g_j`` cancels. That is how it is evaluated here and in every
    backend. In fp32 the literal form carries the rounding of
    ``S/ε + f + g`` (terms of size ``1/ε`` that cancel) into ``r`` (3e-4 off at
    ``ε = 1.6e-4``); the normalized average is accurate to ~1e-6 there and
    lies in ``[min_i S_ij, max_i S_ij]`` by construction. The iteration runs in
    fp64 whatever ``S``'s dtype.
    """
    B, k, L = S.shape
    if k == 0:
        return torch.full((B, L), -math.inf, dtype=S.dtype, device=S.device)
    if not use_ot:
        return S.amax(dim=1)
    # The potentials grow like 1/ε and fp32 lets them drift over hundreds of
    # iterations (2.6e-4 at ε = 3e-4, T = 1000): they are kept in fp64.
    S64 = S.double()
    _, f, _ = sinkhorn_plan(S64, ot_reg, ot_iters)
    w = torch.softmax(S64 / ot_reg + f[:, :, None], dim=1)
    return (w * S64).sum(dim=1).to(S.dtype)


def select_patches(key: Tensor, candidates: Tensor, r: Tensor, sim_threshold: float, num_keep: int):
    r"""Step 5: drop the first ``M`` patches in the order ``(tier_j, key_j, j)``.

    ``tier_j = 0`` for a candidate, ``1`` if ``r_j > θ`` (NaN is not), else ``2``.
    Returns ``(keep_idx (B, K) ascending, mask (B, L) True = dropped)``.
    """
    B, L = key.shape
    M = L - num_keep
    tier = torch.where(r > sim_threshold, 1, 2).to(torch.int64)
    tier.scatter_(1, candidates, 0)
    # Two stable sorts give the lexicographic order: by (key, j), then by tier.
    by_key = torch.sort(key, dim=1, stable=True).indices
    by_tier = torch.sort(torch.gather(tier, 1, by_key), dim=1, stable=True).indices
    drop = torch.gather(by_key, 1, by_tier[:, :M])
    mask = torch.zeros(B, L, dtype=torch.bool, device=key.device)
    mask.scatter_(1, drop, True)
    # Kept patches ascending: a stable sort of the mask puts the False entries
    # first, in index order.
    keep_idx = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices[:, :num_keep]
    return keep_idx.contiguous(), mask


@torch.no_grad()
def pgs_select(
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
    edge_weight: float = 1.0,
    use_ot: bool = True,
    ot_reg: float = 0.05,
    ot_iters: int = 20,
    return_scores: bool = False,
    validate: bool = False,
    dtype: torch.dtype = torch.float64,
) -> PGSSelection:
    """PGS selection, step by step, exactly as docs/algorithm.md defines it.

    ``images`` ``(B, C, H, W)``, ``tokens`` ``(B, L, D)`` or ``None``, ``noise``
    ``(B, L)`` in ``[0, 1)`` or ``None`` (then drawn with ``torch.rand`` from
    ``generator``). Computes in ``dtype``; returns a :class:`PGSSelection`.
    See ``pgs_kernels.pgs_select`` for the meaning of each argument.
    """
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    call = prepare_call(
        images, tokens, noise, generator, allow_float64=True,
        patch_size=patch_size, mask_ratio=mask_ratio, candidate_ratio=candidate_ratio,
        sim_threshold=sim_threshold, token_weight=token_weight, edge_weight=edge_weight,
        use_ot=use_ot, ot_reg=ot_reg, ot_iters=ot_iters, validate=validate,
    )
    keep_idx, mask, edge, cand, r = pgs_select_core(*call, dtype)
    if not return_scores:
        return PGSSelection(keep_idx, mask)
    return PGSSelection(keep_idx, mask, edge, cand, r)


def pgs_select_core(
    images: Tensor,
    tokens: Optional[Tensor],
    noise: Tensor,
    patch_size: int,
    num_keep: int,
    num_candidates: int,
    sim_threshold: float,
    token_weight: float,
    edge_weight: float,
    use_ot: bool,
    ot_reg: float,
    ot_iters: int,
    dtype: torch.dtype = torch.float64,
):
    """The five steps on checked arguments and host-side counts ``K`` and
    ``k``: the same signature as the ``pgs_kernels::pgs_select`` operator.

    Returns ``(keep_idx, mask, edge, candidates, redundancy)``.
    """
    L = noise.shape[1]
    edge = edge_energy(images, patch_size, dtype)
    key, _, cand = generate_candidates(noise, edge, edge_weight, num_candidates)
    S = candidate_similarity(images, tokens, cand, patch_size, token_weight, dtype)
    r = redundancy(S, L, use_ot, ot_reg, ot_iters)
    keep_idx, mask = select_patches(key, cand, r, sim_threshold, num_keep)
    return keep_idx, mask, edge, cand.contiguous(), r
