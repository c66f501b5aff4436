"""``pgs_select``: the public entry point. The function it computes, step
by step with its symbols, is docs/algorithm.md."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import check_backend_name, resolve_backend
from .contract import PGSSelection, check_call, with_noise

__all__ = ["pgs_select"]


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
    backend: str = "auto",
) -> PGSSelection:
    r"""Choose which patches of each image a ViT keeps (CLIP-PGS masking).

    For ``L = (H/P)(W/P)`` patches it keeps ``K = max(1, int(L (1 - mask_ratio)))``
    and drops ``M = L - K``. Per image it scores each patch's edge energy,
    generates the ``k = L - int(L (1 - candidate_ratio))`` lowest-keyed
    patches (noise plus edge prior) as mask candidates, measures how similar
    every patch is to them (pixels, and tokens when ``token_weight > 0``),
    normalizes that with optimal transport into a redundancy ``r``, and drops
    the candidates first, then the patches with ``r > sim_threshold``, then the
    rest, each by key. docs/algorithm.md is the exact function, with the
    formulas and symbols the code uses.

    Args:
        images: ``(B, C, H, W)`` float16/bfloat16/float32 normalized pixels, any strides.
        tokens: ``(B, L, D)`` patch features (no CLS) or ``None``. Their shape,
            dtype and device are checked whenever they are given; their values
            are read only when ``token_weight > 0``.
        noise: ``(B, L)`` uniform noise ``u`` in ``[0, 1)``; drawn with ``torch.rand`` from
            ``generator`` (on ``images``' device) when ``None``.
        patch_size: ``P``; ``H`` and ``W`` must be multiples of it.
        mask_ratio: in ``[0, 1)``, the fraction dropped.
        candidate_ratio: in ``[0, 1]``, the fraction generated as candidates.
        sim_threshold: ``θ``; a patch with redundancy ``r_j > θ`` is dropped before others.
        token_weight: ``α`` in ``[0, 1]``, weight of token similarity against pixel similarity;
            or a 0-dim floating CPU tensor holding ``α`` (a schedule's weight, as
            :class:`~pgs_kernels.PGSPatchDropout` keeps it), read and checked when the kernel
            runs, so that ``torch.compile`` does not recompile when it changes. Then ``tokens``
            are required, and skipped where the value is 0.
        edge_weight: ``w_e >= 0`` (at most the fp32 maximum), strength of the edge prior.
        use_ot: normalize the similarities with log-domain Sinkhorn (else ``r = max_i S_ij``).
        ot_reg: ``ε >= 1e-4``, entropic regularization of the transport (below it fp32
            Sinkhorn cannot hold the plan to the contract's accuracy).
        ot_iters: ``T >= 1`` Sinkhorn iterations (fixed count, no early exit).
        return_scores: also return ``edge``, ``candidates`` and ``redundancy``.
        validate: reject non-finite ``images``/``tokens``/``noise`` (costs a host sync).
        backend: ``"auto"`` (Triton on CUDA, native on CPU, else reference),
            ``"reference"``, ``"triton"`` or ``"native"``; see
            :func:`pgs_kernels.available_backends`.

    Returns:
        :class:`PGSSelection` with ``keep_idx`` ``(B, K)`` ascending and ``mask`` ``(B, L)``
        (``True`` = dropped), plus the scores when asked. NaN/Inf inputs still give
        ``K`` distinct sorted indices per row.

    Raises:
        TypeError / ValueError naming the argument, before any work is done.
    """
    check_backend_name(backend)
    call = check_call(
        images, tokens, noise, generator,
        patch_size=patch_size, mask_ratio=mask_ratio, candidate_ratio=candidate_ratio,
        sim_threshold=sim_threshold, token_weight=token_weight, edge_weight=edge_weight,
        use_ot=use_ot, ot_reg=ot_reg, ot_iters=ot_iters, validate=validate,
    )
    impl = resolve_backend(backend, images.device)
    call = with_noise(call, generator)
    call = call._replace(noise=call.noise.to(torch.float32))
    # The contract is fp32 math: inside a bf16 autocast region the reference's
    # matmuls would otherwise run in bf16 and move patches across the cut.
    with torch.autocast(images.device.type, enabled=False):
        keep_idx, mask, edge, cand, r = impl.run(call)
    if not return_scores:
        return PGSSelection(keep_idx, mask)
    return PGSSelection(keep_idx, mask, edge, cand, r)
