"""``PGSPatchDropout``: PGS masking as a layer of a ViT's token sequence."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .api import pgs_select

__all__ = ["PGSPatchDropout"]


class PGSPatchDropout(nn.Module):
    """Drop the patch tokens PGS selects, keep CLS first and the rest in order.

    Place it after the positional embedding. In training mode, given ``x``
    ``(B, 1 + L, D)`` (CLS first) and the ``images`` ``(B, C, H, W)`` it came
    from, it returns ``(B, 1 + K, D)``: ``x[:, :1]`` then ``x[:, 1:]`` gathered at
    ``pgs_select(images, x[:, 1:].detach(), ...).keep_idx``. Gradients flow to
    the kept tokens (a gather); the selection itself is not differentiated. In
    eval mode, or with ``mask_ratio = 0``, it is the identity.

    ``token_weight`` is a plain attribute so a training loop can follow the
    published schedule ``α = epoch / epochs`` with :meth:`set_epoch`.
    The remaining keyword arguments are those of :func:`pgs_kernels.pgs_select`.
    """

    def __init__(self, mask_ratio: float = 0.5, patch_size: int = 16, token_weight: float = 0.0,
                 backend: str = "auto", **pgs_kwargs):
        super().__init__()
        if "tokens" in pgs_kwargs or "noise" in pgs_kwargs or "return_scores" in pgs_kwargs:
            raise TypeError("PGSPatchDropout takes no tokens/noise/return_scores; pass them to pgs_select")
        self.mask_ratio = float(mask_ratio)
        self.patch_size = int(patch_size)
        self.token_weight = float(token_weight)
        self.backend = backend
        self.pgs_kwargs = pgs_kwargs
        self.last_selection = None  # the most recent PGSSelection, for logging

    def set_epoch(self, epoch: float, epochs: float) -> None:
        """The published schedule: ``token_weight = epoch / epochs`` (clamped to [0, 1])."""
        self.token_weight = min(1.0, max(0.0, float(epoch) / float(epochs)))

    def extra_repr(self) -> str:
        return (f"mask_ratio={self.mask_ratio}, patch_size={self.patch_size}, "
                f"token_weight={self.token_weight}, backend={self.backend!r}")

    def forward(self, x: Tensor, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"x must be a (B, 1 + L, D) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        if not self.training or self.mask_ratio == 0.0:
            return x
        patches = x[:, 1:]
        sel = pgs_select(
            images,
            patches.detach() if self.token_weight > 0 else None,
            generator=generator,
            patch_size=self.patch_size,
            mask_ratio=self.mask_ratio,
            token_weight=self.token_weight,
            backend=self.backend,
            **self.pgs_kwargs,
        )
        self.last_selection = sel
        idx = sel.keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return torch.cat([x[:, :1], torch.gather(patches, 1, idx)], dim=1)
