r"""``pgs_select``: the public entry point, argument checks and backend choice.

The math (SPEC.md, symbols as in ``python_ref.pgs``): for each image,

1. ``ê_j`` = min-max normalized mean Sobel magnitude over patch ``j``;
2. ``key_j = u_j + w_e ê_j``; candidates = the ``k`` smallest ``(key_j, j)``;
3. ``S_ij = (1-α) <p̂_i, p̂_j> + α <t̂_i, t̂_j>`` for candidate ``i``, patch ``j``
   (``p̂`` centered, normalized pixels; ``t̂`` normalized tokens);
4. ``r_j = L Σ_i Π_ij S_ij`` with ``Π`` the ``T``-step log-domain Sinkhorn plan
   between masses ``1/k`` and ``1/L`` for kernel ``exp(S/ε)`` (``use_ot``), or
   ``r_j = max_i S_ij``;
5. drop the first ``M`` patches in the order ``(tier_j, key_j, j)``, tier 0
   for candidates, 1 for ``r_j > θ``, 2 otherwise.
"""

from __future__ import annotations

import os
from typing import List, Optional

import torch
from torch import Tensor

from python_ref.pgs import pgs_select_core
from python_ref.selection import PGSSelection, check_pgs_args, draw_noise, pgs_counts

from . import op as _op

__all__ = ["pgs_select", "available_backends", "BACKENDS"]

BACKENDS = ("auto", "reference", "triton", "native")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device: Optional[torch.device | str] = None) -> List[str]:
    """Backends that can run on ``device`` (default: every backend usable here).

    ``"reference"`` runs anywhere; ``"native"`` on CPU tensors when the C++
    extension is built; ``"triton"`` on CUDA tensors when Triton imports, and on
    CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``).
    """
    dev = None if device is None else torch.device(device).type
    out = ["reference"]
    if _op.NATIVE_AVAILABLE and dev in (None, "cpu"):
        out.append("native")
    if _op.TRITON_AVAILABLE:
        if (dev in (None, "cuda") and torch.cuda.is_available()) or (dev in (None, "cpu") and _interpreting()):
            out.append("triton")
    return out


def _resolve_backend(backend: str, device: torch.device) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    usable = available_backends(device)
    if backend == "auto":
        if device.type == "cuda" and "triton" in usable:
            return "triton"
        if device.type == "cpu" and "native" in usable:
            return "native"
        return "reference"
    if backend not in usable:
        why = {
            "native": f"needs CPU tensors and the built extension ({_op.NATIVE_ERROR or 'built'})",
            "triton": f"needs CUDA tensors (or TRITON_INTERPRET=1 with CPU tensors) and Triton "
                      f"({_op.TRITON_ERROR or 'installed'})",
        }[backend]
        raise ValueError(f"backend={backend!r} is not available for {device.type} tensors: {why}")
    return backend


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
    """Choose which patches of each image a ViT keeps (CLIP-PGS masking).

    Args:
        images: ``(B, C, H, W)`` float16/bfloat16/float32 normalized pixels, any strides.
        tokens: ``(B, L, D)`` patch features (no CLS) or ``None``; used when ``token_weight > 0``.
        noise: ``(B, L)`` uniform noise ``u`` in ``[0, 1)``; drawn with ``torch.rand`` from
            ``generator`` when ``None``.
        patch_size: ``P``; ``H`` and ``W`` must be multiples of it. ``L = (H/P)(W/P)``.
        mask_ratio: fraction dropped; ``K = max(1, int(L (1 - mask_ratio)))`` are kept.
        candidate_ratio: ``k = L - int(L (1 - candidate_ratio))`` candidates.
        sim_threshold: ``θ``; a patch with redundancy ``r_j > θ`` is dropped before others.
        token_weight: ``α`` in ``[0, 1]``, weight of token similarity against pixel similarity.
        edge_weight: ``w_e >= 0``, strength of the edge prior on candidate generation.
        use_ot: normalize the similarities with log-domain Sinkhorn (else ``r = max_i S_ij``).
        ot_reg: ``ε > 0``, entropic regularization of the transport.
        ot_iters: ``T >= 1`` Sinkhorn iterations (fixed count, no early exit).
        return_scores: also return ``edge``, ``candidates`` and ``redundancy``.
        validate: reject non-finite ``images``/``tokens``/``noise`` (costs a host sync).
        backend: ``"auto"`` (Triton on CUDA, native on CPU, else reference),
            ``"reference"``, ``"triton"`` or ``"native"``.

    Returns:
        :class:`PGSSelection` with ``keep_idx`` ``(B, K)`` ascending and ``mask`` ``(B, L)``
        (``True`` = dropped), plus the scores when asked.

    Raises:
        TypeError / ValueError naming the argument, before any work is done.
    """
    B, C, H, W, gh, gw, L = check_pgs_args(
        images, tokens, noise,
        patch_size=patch_size, mask_ratio=mask_ratio, candidate_ratio=candidate_ratio,
        sim_threshold=sim_threshold, token_weight=token_weight, edge_weight=edge_weight,
        ot_reg=ot_reg, ot_iters=ot_iters, validate=validate,
    )
    if not isinstance(use_ot, bool):
        raise TypeError(f"use_ot must be a bool, got {type(use_ot).__name__}")
    which = _resolve_backend(backend, images.device)
    K, M, k = pgs_counts(L, mask_ratio, candidate_ratio)
    if noise is None:
        noise = draw_noise(B, L, images.device, generator)
    # Selection is not differentiable: detaching keeps autograd out of the op.
    images = images.detach()
    noise = noise.detach().to(torch.float32)
    tokens = tokens.detach() if (tokens is not None and float(token_weight) > 0) else None
    args = (images, tokens, noise, int(patch_size), K, k, float(sim_threshold), float(token_weight),
            float(edge_weight), use_ot, float(ot_reg), int(ot_iters))

    # The contract is fp32 math: inside a bf16 autocast region the reference's
    # matmuls would otherwise run in bf16 and move patches across the cut.
    with torch.autocast(images.device.type, enabled=False):
        if which == "reference":
            keep_idx, mask, edge, cand, r = pgs_select_core(*args, torch.float32)
        elif which == "triton" and not images.is_cuda:  # the interpreter, on CPU tensors
            keep_idx, mask, edge, cand, r = _op.pgs_select_triton(*args)
        else:  # the dispatcher picks the native (CPU) or Triton (CUDA) kernel
            keep_idx, mask, edge, cand, r = _op.pgs_select_op(*args)
    if not return_scores:
        return PGSSelection(keep_idx, mask)
    return PGSSelection(keep_idx, mask, edge, cand, r)
