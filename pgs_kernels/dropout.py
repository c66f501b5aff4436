"""``PGSPatchDropout``: PGS masking as a layer of a ViT's token sequence."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor, nn

from .api import pgs_select
from .backends import check_backend_name
from .contract import check_params

__all__ = ["PGSPatchDropout"]

# The pgs_select arguments the layer forwards; tokens, noise and scores are its own business.
_PGS_KWARGS = ("candidate_ratio", "sim_threshold", "edge_weight", "use_ot", "ot_reg", "ot_iters", "validate")


class PGSPatchDropout(nn.Module):
    r"""Drop the patch tokens PGS selects, keep the prefix tokens first and the rest in order.

    Place it after the positional embedding. In training mode, given ``x``
    ``(B, n + L, D)`` (``n = num_prefix_tokens`` prefix tokens first: CLS,
    register tokens; then the ``L = (H/P)(W/P)`` patch tokens in row-major
    order) and the ``images`` ``(B, C, H, W)`` it came from, it returns
    ``(B, n + K, D)``: ``x[:, :n]`` then ``x[:, n:]`` gathered at
    ``pgs_select(images, x[:, n:].detach(), ...).keep_idx``, with
    ``K = max(1, int(L (1 - mask_ratio)))``. Gradients flow to the kept
    tokens (a gather); the selection itself is not differentiated. In eval
    mode, or with ``mask_ratio = 0``, it is the identity.

    The token similarity weight ``α = token_weight`` follows the published
    schedule ``α = epoch / epochs`` with :meth:`set_epoch`; it is saved in
    ``state_dict()`` (buffer ``token_weight_state``), so a resumed run resumes
    the schedule, unless ``save_schedule=False`` (what :func:`pgs_kernels.use_pgs`
    uses, so that a model's checkpoint keys stay as they were). The remaining
    keyword arguments are those of :func:`pgs_kernels.pgs_select`
    (``candidate_ratio``, ``sim_threshold``, ``edge_weight``, ``use_ot``,
    ``ot_reg``, ``ot_iters``, ``validate``), checked here, in the constructor.
    """

    def __init__(self, mask_ratio: float = 0.5, patch_size: int = 16, token_weight: float = 0.0,
                 backend: str = "auto", *, num_prefix_tokens: int = 1, save_schedule: bool = True,
                 **pgs_kwargs):
        super().__init__()
        for name in pgs_kwargs:
            if name in ("tokens", "noise", "return_scores", "images", "generator"):
                raise TypeError(f"PGSPatchDropout takes no {name}: the layer passes its own to pgs_select")
            if name not in _PGS_KWARGS:
                raise TypeError(f"PGSPatchDropout got an unexpected keyword argument {name!r} "
                                f"(pgs_select options it takes: {', '.join(_PGS_KWARGS)})")
        p = check_params(mask_ratio=mask_ratio, patch_size=patch_size, token_weight=token_weight, **pgs_kwargs)
        self.mask_ratio = p["mask_ratio"]
        self.patch_size = p["patch_size"]
        self.backend = check_backend_name(backend)
        self.pgs_kwargs = {name: p[name] for name in pgs_kwargs}
        if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, numbers.Integral) \
                or num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
        self.num_prefix_tokens = int(num_prefix_tokens)
        if not isinstance(save_schedule, bool):
            raise TypeError(f"save_schedule must be a bool, got {type(save_schedule).__name__}")
        # A float for the host, and the same value in a CPU tensor for the
        # kernel: torch.compile guards on a float it passes to the operator
        # (a recompile per epoch), never on a tensor's value, and a CPU read is
        # no GPU sync. A plain attribute, not a buffer, so that .to(device)
        # leaves it on the CPU. Where asked, also a buffer, so that the
        # schedule is saved with the model.
        self._token_weight = p["token_weight"]
        self._token_weight_cpu = torch.tensor(self._token_weight, dtype=torch.float64)
        if save_schedule:
            self.register_buffer("token_weight_state", torch.tensor(self._token_weight, dtype=torch.float64))
        self.last_selection = None  # the most recent PGSSelection, for logging

    @property
    def token_weight(self) -> float:
        return self._token_weight

    @token_weight.setter
    def token_weight(self, value: float) -> None:
        self._token_weight = check_params(token_weight=float(value))["token_weight"]
        self._token_weight_cpu.fill_(self._token_weight)
        if hasattr(self, "token_weight_state"):
            self.token_weight_state.fill_(self._token_weight)

    def set_epoch(self, epoch: float, epochs: float) -> None:
        """The published schedule: ``token_weight = epoch / epochs``, clamped to ``[0, 1]``."""
        for name, v in (("epoch", epoch), ("epochs", epochs)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {epochs}")
        self.token_weight = min(1.0, max(0.0, float(epoch) / float(epochs)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "token_weight_state" in state_dict:  # loading is not the hot path: a sync is fine
            self._token_weight = float(self.token_weight_state)
            self._token_weight_cpu.fill_(self._token_weight)

    def extra_repr(self) -> str:
        prefix = f", num_prefix_tokens={self.num_prefix_tokens}" if self.num_prefix_tokens != 1 else ""
        return (f"mask_ratio={self.mask_ratio}, patch_size={self.patch_size}, "
                f"token_weight={self.token_weight}, backend={self.backend!r}{prefix}")

    def _check_inputs(self, x, images) -> None:
        n = self.num_prefix_tokens
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"x must be a (B, {n} + L, D) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(
                f"images must be a (B, C, H, W) tensor, got {getattr(images, 'shape', type(images).__name__)}")
        B, _, H, W = images.shape
        if images.shape[0] != x.shape[0]:
            raise ValueError(f"images must hold the batch of x: x has B={x.shape[0]}, images has B={B}")
        P = self.patch_size
        if H % P or W % P:
            raise ValueError(f"images: H={H}, W={W} is not divisible by patch_size={P}")
        L = (H // P) * (W // P)
        if x.shape[1] != n + L:
            prefix = "CLS" if n == 1 else f"{n} prefix tokens"
            hint = " (no CLS token?)" if (n == 1 and x.shape[1] == L) else ""
            raise ValueError(
                f"x must hold {prefix} then the L={L} patch tokens of {H}x{W} images at patch_size={P}, i.e. "
                f"{n} + L = {n + L} tokens, got {x.shape[1]}{hint}; is patch_size the ViT's patch size?")

    def forward(self, x: Tensor, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        self._check_inputs(x, images)
        if not self.training or self.mask_ratio == 0.0:
            return x
        n = self.num_prefix_tokens
        patches = x[:, n:]
        # The tokens go in whatever the weight: the kernel reads the weight and
        # skips them at 0, so that no branch here depends on the schedule.
        sel = pgs_select(
            images,
            patches.detach(),
            generator=generator,
            patch_size=self.patch_size,
            mask_ratio=self.mask_ratio,
            token_weight=self._token_weight_cpu,
            backend=self.backend,
            **self.pgs_kwargs,
        )
        self.last_selection = sel
        idx = sel.keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return torch.cat([x[:, :n], torch.gather(patches, 1, idx)], dim=1)
