r"""Baselines: the published PGS algorithm and FLIP-style random masking.

``published_pgs`` is the selection of the CLIP-PGS authors' open_clip fork
(class ``PatchDropout_PGS``), re-implemented step by step so that it keeps
the same patches as that code for the same inputs and noise draws. It is
here to be measured against (cost, and what it keeps), not to be used. Each
step is one function below; ``published_pgs`` chains them.

Symbols: ``B`` images, ``C`` channels, ``P`` patch size, grid ``gh x gw``,
``L = gh gw`` patches, ``z_j`` standardized pixel vector of patch ``j``,
``b`` edge prior, ``S`` similarity (``L x L``), ``u`` and ``u'`` the two
noise draws, ``k`` candidates, ``θ`` similarity threshold, ``K'`` kept.

Which patches it keeps hinges on rounding, so the steps reproduce the
published arithmetic operation for operation, not just its formulas:

* the pixel vectors are in ``(p, q, c)`` order (row in patch, column in
  patch, channel); ``mean(z_j)`` is zero up to rounding, so ``b`` is made of
  the rounding noise of those sums and the order decides it. That noise
  also follows the SIMD width of the machine's reductions (AVX2 and AVX-512
  hosts give different ``b``, hence different candidates) and the batch
  shape;
* Sinkhorn-Knopp takes both sums at the top of an iteration and divides by
  the second with its value from before the first division. So it does not
  converge to a doubly stochastic matrix (it runs all 50 iterations on real
  images), and where column sums of ``S`` are near zero it amplifies the
  rounding of ``S`` (a relative change of 1e-7 moves entries by up to
  thousands): the similar set is machine-dependent as well;
* candidates and kept patches are ordered by the default (unstable)
  ``torch.argsort``; ties are broken the way that sort breaks them on the
  device it runs on. Every non-similar patch has the key 0, so when there
  are more of them than ``K'`` (often) the kept set is a fixed pattern of
  the sort, not a random one.

Where it departs from the contract (docs/algorithm.md): ``b`` is rounding noise, and
the ``1e6`` factor on it makes the candidates follow that noise, not ``u``;
it works on the full ``L x L`` similarity with a Sinkhorn that reads a
device value every iteration (a host sync) and can divide by sums near
zero; the number of kept patches depends on the whole batch (another host
sync), so the output width ``K'`` varies from call to call; and it returns
an attention mask over the kept tokens.

Where this port departs from the published code, none of which changes the
selection for float32 inputs: it computes in float32 whatever the input
dtype (float64 for float64 images; the published code computes in the input
dtype); it takes any ``patch_size`` and rectangular grids (the published
code patchifies with 16 and needs a square grid); ``keep_idx`` is ascending
(the published code keeps its sort order; the attention mask here follows
``keep_idx``); ``K'`` is at least 1 (the published count can reach 0).

``random_masking`` drops the ``M`` patches of lowest noise, i.e. exactly
``pgs_select(candidate_ratio=0, edge_weight=0)``; it is the cost floor of any
masking.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pgs_kernels.contract import PGSSelection, check_call, draw_noise, prepare_call, with_noise

__all__ = [
    "published_pgs",
    "random_masking",
    "patchify_pqc",
    "standardize_patches",
    "published_edge_prior",
    "cosine_similarity",
    "published_similarity",
    "sinkhorn_knopp_division",
    "published_candidates",
    "similar_set",
    "published_keep_count",
    "published_keep_order",
    "published_attn_mask",
]

EPS = 1e-6  # the published guard in norms, standard deviations and min-max
SK_EPS = 1e-3  # the published Sinkhorn tolerance and divisor guard
EDGE_SCALE = 1e6  # the published weight of the edge prior against the noise
MASK_VALUE = -1e12  # the published attention bias per (similar patch, candidate) pair

_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
_SOBEL_Y = ((-1.0, -2.0, -1.0), (0.0, 0.0, 0.0), (1.0, 2.0, 1.0))


def patchify_pqc(images: Tensor, patch_size: int) -> Tensor:
    r"""``(B, C, H, W) -> (B, L, P^2 C)``, contiguous; patch ``j`` is row
    ``j // gw``, column ``j % gw``; inside a vector element
    ``(p P + q) C + c`` is pixel ``(row P + p, col P + q)`` of channel ``c``.

    The element order and the contiguous layout fix how the reductions of the
    next steps round.
    """
    B, C, H, W = images.shape
    P = patch_size
    gh, gw = H // P, W // P
    x = images.reshape(B, C, gh, P, gw, P).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, gh * gw, P * P * C)


def standardize_patches(v: Tensor) -> Tensor:
    r"""``z_j = (v_j - mean(v_j)) / (std(v_j) + 1e-6)`` over the last dim,
    ``std`` unbiased (``n - 1``)."""
    mean = v.mean(dim=-1, keepdim=True)
    std = v.std(dim=-1, keepdim=True)
    return (v - mean) / (std + EPS)


def published_edge_prior(z: Tensor, gh: int, gw: int) -> Tensor:
    r"""The edge prior ``b`` ``(B, L)`` from standardized patches ``z``.

    ``g`` = the ``gh x gw`` grid of ``mean(z_j)``; ``Gx = sobel_x * g``,
    ``Gy = sobel_y * g`` (cross-correlation, zero padding, one convolution
    each); ``m = sqrt(Gx^2 + Gy^2)``; per image
    ``b_j = (m_j - min m) / (max m - min m + 1e-6)``.

    ``mean(z_j)`` is zero in exact arithmetic, so ``b`` is the spatial
    pattern of its rounding error; the range ``max m - min m`` is of the
    order of the ``1e-6`` guard, so ``max b`` stays well below 1.
    """
    B, L, _ = z.shape
    g = z.mean(dim=-1, keepdim=True).reshape(B, gh, gw, 1).permute(0, 3, 1, 2)
    sx = torch.tensor(_SOBEL_X, dtype=z.dtype, device=z.device)[None, None]
    sy = torch.tensor(_SOBEL_Y, dtype=z.dtype, device=z.device)[None, None]
    gx = F.conv2d(g, sx, padding=1)
    gy = F.conv2d(g, sy, padding=1)
    m = torch.sqrt(gx ** 2 + gy ** 2).reshape(B, L)
    lo = m.amin(dim=1, keepdim=True)
    hi = m.amax(dim=1, keepdim=True)
    return (m - lo) / (hi - lo + EPS)


def cosine_similarity(a: Tensor) -> Tensor:
    r"""``(B, L, D) -> (B, L, L)``: ``<â_i, â_j>`` with ``â = a / (‖a‖ + 1e-6)``."""
    a = a / (a.norm(dim=-1, keepdim=True) + EPS)
    return torch.bmm(a, a.transpose(1, 2))


def published_similarity(z: Tensor, tokens: Optional[Tensor], token_weight: float) -> Tensor:
    r"""``S = w · cos(t_i, t_j) + (1 - w) · cos(z_i, z_j)`` over all ``L x L``
    pairs, ``w = token_weight`` (the published schedule is ``epoch / 32``).

    With ``w = 0`` the token term is not evaluated (the published code
    multiplies it by zero, which only differs for non-finite tokens).
    """
    s_pix = cosine_similarity(z)
    w = float(token_weight)
    if w == 0.0:
        return s_pix
    return cosine_similarity(tokens.to(z.dtype)) * w + s_pix * (1.0 - w)


def sinkhorn_knopp_division(S: Tensor, max_iters: int = 50, eps: float = SK_EPS, *,
                            return_iters: bool = False):
    r"""Division-based Sinkhorn-Knopp on ``(B, L, L)`` as published: ``SK(S)``.

    ``Q = S``; up to ``max_iters`` times:

    * ``c = Σ_i Q_ij`` (``(B, 1, L)``) and ``r = Σ_j Q_ij`` (``(B, L, 1)``),
      both from the current ``Q``;
    * stop if ``|c - 1| <= eps + 1e-5`` and ``|r - 1| <= eps + 1e-5``
      everywhere in the batch (``torch.allclose``, a host sync);
    * ``Q <- Q / (c + eps)``, then ``Q <- Q / (r + eps)`` with ``r`` from
      before the first division.

    The stop test is on the whole batch, so how many iterations an image gets
    depends on the others. With ``return_iters`` returns ``(Q, divisions)``.
    """
    Q = S
    done = 0
    for _ in range(max_iters):
        c = Q.sum(dim=1, keepdim=True)
        r = Q.sum(dim=2, keepdim=True)
        if torch.allclose(c, torch.ones_like(c), atol=eps) and torch.allclose(r, torch.ones_like(r), atol=eps):
            break
        Q = Q / (c + eps)
        Q = Q / (r + eps)
        done += 1
    return (Q, done) if return_iters else Q


def published_candidates(b: Tensor, noise: Tensor, k: int) -> Tensor:
    r"""Candidates ``(B, k)``: the last ``k`` of ``argsort(u + 1e6 · b)``
    (ascending, the default unstable sort), in that order.

    ``1e6 · b`` outweighs ``u < 1`` (and in fp32 rounds it to a multiple of
    up to ``1/16``), so the candidates are the ``k`` patches of largest
    ``b`` whatever ``u``, unless ``b`` values differ by less than ``1e-6``.
    """
    L = b.shape[1]
    order = torch.argsort(noise + b * EDGE_SCALE, dim=1)
    return order[:, L - k:]


def similar_set(S: Tensor, candidates: Tensor, sim_threshold: float) -> Tensor:
    r"""``similar_j = ∃ i ∈ candidates: S_ij > θ`` ``(B, L)`` bool (rows of
    ``S``; no candidates, nothing similar)."""
    B, k = candidates.shape
    L = S.shape[2]
    rows = torch.gather(S, 1, candidates[..., None].expand(B, k, L))
    return (rows > sim_threshold).any(dim=1)


def published_keep_count(similar: Tensor, b: Tensor, K: int) -> int:
    r"""``K' = min(K, L - min_b |similar_b| + int(min_b Σ_j b_bj))``, at least 1.

    One count for the whole batch, read on the host (a sync). ``K`` is
    ``int(L (1 - mask_ratio))`` (:func:`pgs_counts`); ``Σ_j b_j`` is summed
    in ``b``'s dtype.
    """
    B, L = similar.shape
    if B == 0:
        return max(1, min(L, K))
    n_similar_min = int(similar.to(b.dtype).sum(dim=1).min().item())
    b_sum_min = int(b.sum(dim=1).min().item())
    return max(1, min(K, L - n_similar_min + b_sum_min))


def published_keep_order(similar: Tensor, keep_noise: Tensor, keep_count: int) -> Tensor:
    r"""The kept patches ``(B, K')`` in the published order: the first ``K'``
    of ``argsort(exp(u') · similar)`` (default unstable sort).

    Non-similar patches (key 0) come first, in the sort's tie order; similar
    ones follow in the random order of ``u'``.
    """
    key = torch.exp(keep_noise) * similar.to(keep_noise.dtype)
    return torch.argsort(key, dim=-1)[:, :keep_count]


def published_attn_mask(S: Tensor, candidates: Tensor, sim_threshold: float, keep_idx: Tensor) -> Tensor:
    r"""``(B, 1 + K', 1 + K')`` additive mask over CLS and the kept patches
    ``keep_idx`` (in that order), in ``S``'s dtype.

    ``s_j = Σ_i [S_ij > θ] · (-1e12)`` over the candidates ``i``, summed in
    float32 (``s = 0`` for CLS); entry ``(a, b) = s_a + s_b``: ``-1e12`` or
    less where either token is a similar patch, 0 elsewhere. (The published
    vision tower passes on ``mask == 0`` cast to float, a ``+1`` bias where
    neither token is similar, which masks nothing.)
    """
    B, k = candidates.shape
    L = S.shape[2]
    rows = torch.gather(S, 1, candidates[..., None].expand(B, k, L))
    s = ((rows > sim_threshold).to(torch.float32) * MASK_VALUE).sum(dim=1).to(S.dtype)
    s = torch.cat([torch.zeros(B, 1, dtype=S.dtype, device=S.device), torch.gather(s, 1, keep_idx)], dim=1)
    return s[:, :, None] + s[:, None, :]


@torch.no_grad()
def published_pgs(
    images: Tensor,
    tokens: Optional[Tensor] = None,
    *,
    noise: Optional[Tensor] = None,
    keep_noise: Optional[Tensor] = None,
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

    ``mask_ratio``, ``candidate_ratio`` and ``sim_threshold`` are the
    published ``min_mask_ratio``, patch-dropout probability and
    ``target_mask_ratio``; ``token_weight`` is its ``epoch / 32``.

    1. ``z = standardize(patchify_pqc(images))`` (:func:`standardize_patches`);
    2. ``b`` = :func:`published_edge_prior` of ``z``;
    3. ``S`` = :func:`published_similarity`; with ``use_ot``,
       ``S <- S + SK(S)`` (:func:`sinkhorn_knopp_division`, ``sk_iters``);
    4. candidates = :func:`published_candidates` of ``b`` and the first draw
       ``u = noise``;
    5. similar = :func:`similar_set`;
    6. ``K'`` = :func:`published_keep_count`;
    7. kept = :func:`published_keep_order` with the second draw
       ``u' = keep_noise``.

    Missing draws come from ``generator`` (the global generator by default),
    ``u`` before ``u'``, each ``torch.rand(B, L)`` in float32, as the
    published code draws them, so after the same ``torch.manual_seed`` both
    see the same noise.

    Returns a :class:`PGSSelection` whose ``keep_idx`` is ``(B, K')``
    ascending; with ``return_scores`` its ``edge`` is ``b``, ``candidates``
    the candidates and ``redundancy`` the similar set as float. With
    ``return_attn_mask`` returns ``(selection, attn_mask)``, the mask of
    :func:`published_attn_mask` in ``keep_idx`` order.
    """
    call = check_call(
        images, tokens, noise, generator, allow_float64=True,
        patch_size=patch_size, mask_ratio=mask_ratio, candidate_ratio=candidate_ratio,
        sim_threshold=sim_threshold, token_weight=token_weight,
    )
    B, _, H, W = images.shape
    P, K, k = call.patch_size, call.num_keep, call.num_candidates
    gh, gw = H // P, W // P
    L = gh * gw
    if keep_noise is not None:
        if not isinstance(keep_noise, Tensor):
            raise TypeError(f"keep_noise must be a torch.Tensor or None, got {type(keep_noise).__name__}")
        if tuple(keep_noise.shape) != (B, L) or not keep_noise.is_floating_point():
            raise ValueError(f"keep_noise must be a floating (B, L) = ({B}, {L}) tensor, "
                             f"got {keep_noise.dtype} {tuple(keep_noise.shape)}")
        if keep_noise.device != images.device:
            raise ValueError(f"keep_noise must be on {images.device}, got {keep_noise.device}")
    dev = images.device
    # u before u', as the published code draws them.
    noise = with_noise(call, generator).noise
    if keep_noise is None:
        keep_noise = draw_noise(B, L, dev, generator)
    tokens = call.tokens
    dt = torch.float32 if images.dtype != torch.float64 else torch.float64

    z = standardize_patches(patchify_pqc(images.to(dt), patch_size))
    b = published_edge_prior(z, gh, gw)
    S = published_similarity(z, tokens, token_weight)
    if use_ot:
        S = S + sinkhorn_knopp_division(S, sk_iters)

    cand = published_candidates(b, noise, k)
    similar = similar_set(S, cand, sim_threshold)
    K_pub = published_keep_count(similar, b, K)
    keep_idx = torch.sort(published_keep_order(similar, keep_noise, K_pub), dim=1).values
    mask = torch.ones(B, L, dtype=torch.bool, device=dev)
    mask.scatter_(1, keep_idx, False)

    sel = PGSSelection(keep_idx, mask)
    if return_scores:
        sel = PGSSelection(keep_idx, mask, b, cand, similar.to(dt))
    if not return_attn_mask:
        return sel
    return sel, published_attn_mask(S, cand, sim_threshold, keep_idx)


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
