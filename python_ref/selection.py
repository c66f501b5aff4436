"""What every implementation of PGS selection shares: the output type, the
counts, and the argument checks of SPEC.md ("Inputs", "Counts", "Errors").

Keeping these in one module is what makes "the same answer" meaningful: the
reference, the Triton kernel and the native kernel all take ``K``, ``M`` and
``k`` from :func:`pgs_counts` and reject bad input with the same messages.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["PGSSelection", "pgs_counts", "check_pgs_args", "IMAGE_DTYPES"]

#: Input dtypes the op accepts for ``images``; the reference also takes float64.
IMAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class PGSSelection(NamedTuple):
    """Result of a PGS selection over a batch of ``B`` images of ``L`` patches.

    keep_idx:   ``(B, K)`` int64, the kept patches, ascending in each row.
    mask:       ``(B, L)`` bool, ``True`` where the patch is dropped
                (exactly ``M = L - K`` per row; the complement of ``keep_idx``).
    edge:       ``(B, L)`` normalized edge energy ``ê`` (``return_scores`` only).
    candidates: ``(B, k)`` int64, the generated candidates in rank order
                (``return_scores`` only).
    redundancy: ``(B, L)`` redundancy ``r`` (``return_scores`` only).
    """

    keep_idx: Tensor
    mask: Tensor
    edge: Optional[Tensor] = None
    candidates: Optional[Tensor] = None
    redundancy: Optional[Tensor] = None


def pgs_counts(num_patches: int, mask_ratio: float, candidate_ratio: float):
    """Return ``(K, M, k)`` for ``L = num_patches`` patches.

    ``K = max(1, int(L (1 - mask_ratio)))`` patches are kept,
    ``M = L - K`` dropped, and ``k = L - int(L (1 - candidate_ratio))``
    candidates generated. Plain Python floats, so every backend agrees and no
    device value is ever read on the host.
    """
    L = int(num_patches)
    K = max(1, int(L * (1.0 - float(mask_ratio))))
    k = L - int(L * (1.0 - float(candidate_ratio)))
    return K, L - K, k


def _real(name: str, value, lo=None, hi=None, lo_open=False, hi_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{name} must not be NaN")
    lo_bad = lo is not None and (v <= lo if lo_open else v < lo)
    hi_bad = hi is not None and (v >= hi if hi_open else v > hi)
    if lo_bad or hi_bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ValueError(f"{name} must be in {rng}, got {value}")
    return v


def _int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if int(value) < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return int(value)


def check_pgs_args(
    images,
    tokens,
    noise,
    *,
    patch_size,
    mask_ratio,
    candidate_ratio,
    sim_threshold,
    token_weight,
    edge_weight,
    ot_reg,
    ot_iters,
    validate: bool = False,
    allow_float64: bool = False,
):
    """Check every argument of ``pgs_select`` before any work is done.

    Raises ``TypeError`` for a wrong type or dtype and ``ValueError`` for a
    wrong shape, device or range; each message names the argument, what was
    expected and what was given. Returns ``(B, C, H, W, gh, gw, L)``.

    Nothing here reads device memory unless ``validate`` is true (that check
    for non-finite values costs one device-to-host sync).
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(
            f"images must have shape (B, C, H, W), got {images.dim()} dims {tuple(images.shape)}"
        )
    allowed = IMAGE_DTYPES + ((torch.float64,) if allow_float64 else ())
    if images.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"images must be one of {names}, got {str(images.dtype).replace('torch.', '')}")
    P = _int("patch_size", patch_size, 1)
    B, C, H, W = images.shape
    if C < 1:
        raise ValueError(f"images must have at least one channel, got C={C}")
    if H % P != 0:
        raise ValueError(f"images: H={H} is not divisible by patch_size={P}")
    if W % P != 0:
        raise ValueError(f"images: W={W} is not divisible by patch_size={P}")
    gh, gw = H // P, W // P
    L = gh * gw
    if L < 1:
        raise ValueError(f"images: H={H}, W={W} hold no {P}x{P} patch")

    _real("mask_ratio", mask_ratio, 0.0, 1.0, hi_open=True)
    _real("candidate_ratio", candidate_ratio, 0.0, 1.0)
    _real("sim_threshold", sim_threshold)
    tw = _real("token_weight", token_weight, 0.0, 1.0)
    _real("edge_weight", edge_weight, 0.0)
    if not math.isfinite(float(edge_weight)):
        raise ValueError(f"edge_weight must be finite, got {edge_weight}")
    _real("ot_reg", ot_reg, 0.0, lo_open=True)
    if not math.isfinite(float(ot_reg)):
        raise ValueError(f"ot_reg must be finite, got {ot_reg}")
    _int("ot_iters", ot_iters, 1)

    if tokens is not None:
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor or None, got {type(tokens).__name__}")
        if not tokens.is_floating_point():
            raise TypeError(f"tokens must be floating point, got {str(tokens.dtype).replace('torch.', '')}")
        if tokens.dim() != 3 or tokens.shape[0] != B or tokens.shape[1] != L or tokens.shape[2] < 1:
            raise ValueError(
                f"tokens must have shape (B, L, D) = ({B}, {L}, D>=1) for images of shape "
                f"{tuple(images.shape)} and patch_size={P}, got {tuple(tokens.shape)}"
            )
        if tokens.device != images.device:
            raise ValueError(f"tokens must be on images' device {images.device}, got {tokens.device}")
    elif tw > 0:
        raise ValueError(f"token_weight={token_weight} > 0 needs tokens, got tokens=None")

    if noise is not None:
        if not isinstance(noise, Tensor):
            raise TypeError(f"noise must be a torch.Tensor or None, got {type(noise).__name__}")
        if not noise.is_floating_point():
            raise TypeError(f"noise must be floating point, got {str(noise.dtype).replace('torch.', '')}")
        if tuple(noise.shape) != (B, L):
            raise ValueError(f"noise must have shape (B, L) = ({B}, {L}), got {tuple(noise.shape)}")
        if noise.device != images.device:
            raise ValueError(f"noise must be on images' device {images.device}, got {noise.device}")

    if validate:
        for name, t in (("images", images), ("tokens", tokens), ("noise", noise)):
            if t is not None and t.numel() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf (validate=True)")
    return B, C, H, W, gh, gw, L


def draw_noise(B: int, L: int, device, generator=None) -> Tensor:
    """The step's randomness ``u ~ U[0, 1)``, shape ``(B, L)``, fp32."""
    return torch.rand((B, L), device=device, dtype=torch.float32, generator=generator)
