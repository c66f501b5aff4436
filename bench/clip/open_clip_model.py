"""open_clip's CLIP behind the trainer's model interface, masked through
``pgs_kernels.use_pgs``: what a user of open_clip would run.

    python -m bench.clip.throughput --model open_clip:ViT-B-16 --batch-size 8
    python -m bench.clip.train --model open_clip:ViT-B-16 --mask pgs --steps 20

The model is ``open_clip.create_model(arch)`` with random weights (nothing is
downloaded). Masking modes, switched in place on one model:

* ``none``           the slot is an identity (open_clip's default);
* ``random``         open_clip's own ``PatchDropout(mask_ratio)``, FLIP;
* ``pgs``            ``use_pgs(model, mask_ratio=..., backend="auto")``;
* ``pgs-reference``  the same with ``backend="reference"``.

The published baseline needs an attention mask in every block, which
open_clip's tower does not take, so it is not offered here.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch.nn.functional as F
from torch import Tensor, nn

from pgs_kernels import remove_pgs, set_pgs_epoch, use_pgs

PREFIX = "open_clip:"
MASK_MODES = ("none", "random", "pgs", "pgs-reference")


def is_open_clip_name(name: str) -> bool:
    return name.startswith(PREFIX)


class OpenCLIPVisual:
    """The trainer's view of open_clip's image tower: ``set_mask``,
    ``set_epoch``, ``timer`` (times the patch-dropout slot),
    ``last_num_tokens`` (tokens that left the slot) and ``__call__(images)``."""

    def __init__(self, tower: nn.Module, mask: str, mask_ratio: float, pgs_kwargs: dict):
        self.tower = tower
        self.pgs_kwargs = pgs_kwargs
        self.token_weight = 0.0
        self.timer = None
        self.last_num_tokens = None
        self.mask_ratio = float(mask_ratio)
        self.set_mask(mask, mask_ratio)

    def set_mask(self, mask: str, mask_ratio=None) -> None:
        from open_clip.transformer import PatchDropout

        if mask not in MASK_MODES:
            raise ValueError(f"mask must be one of {MASK_MODES} for an open_clip model, got {mask!r} "
                             "(the published baseline needs an attention mask open_clip's tower does not take)")
        if mask_ratio is not None:
            self.mask_ratio = float(mask_ratio)
        self.mask = mask
        remove_pgs(self.tower)
        self.tower.patch_dropout = nn.Identity()  # a fresh slot: the timing hooks below go on it once
        if mask == "random" and self.mask_ratio > 0:
            self.tower.patch_dropout = PatchDropout(self.mask_ratio)
        elif mask in ("pgs", "pgs-reference"):
            use_pgs(self.tower, mask_ratio=self.mask_ratio, token_weight=self.token_weight,
                    backend="reference" if mask == "pgs-reference" else "auto", **self.pgs_kwargs)
        # The slot is a new module in every mode: time it where it is.
        self.tower.patch_dropout.register_forward_pre_hook(self._slot_starts)
        self.tower.patch_dropout.register_forward_hook(self._slot_ends)

    def _slot_starts(self, module, args):
        if self.timer is not None:
            self.timer.start()

    def _slot_ends(self, module, args, out):
        if self.timer is not None:
            self.timer.stop()
        self.last_num_tokens = out.shape[1]

    def set_epoch(self, epoch: float, epochs: float) -> None:
        """The published schedule ``token_weight = epoch / epochs``."""
        self.token_weight = min(1.0, max(0.0, float(epoch) / float(epochs)))
        if self.mask in ("pgs", "pgs-reference"):
            set_pgs_epoch(self.tower, epoch, epochs)

    def train(self, mode: bool = True):
        self.tower.train(mode)
        return self

    def __call__(self, images: Tensor) -> Tensor:
        return self.tower(images)


class OpenCLIP(nn.Module):
    """``open_clip.create_model(arch)`` with the trainer's interface: ``cfg``
    (image size, context length, vocabulary), ``visual``, ``logit_scale``,
    ``encode_image``/``encode_text`` (normalized fp32) and ``forward(images,
    text) -> (image features, text features, temperature)``."""

    def __init__(self, arch: str, mask: str = "none", mask_ratio: float = 0.5, **pgs_kwargs):
        super().__init__()
        import open_clip

        self.arch = arch
        self.inner = open_clip.create_model(arch)
        v = self.inner.visual
        self.cfg = SimpleNamespace(image_size=v.image_size[0], patch_size=v.patch_size[0],
                                   context_length=self.inner.context_length, vocab_size=self.inner.vocab_size,
                                   name=PREFIX + arch)
        # A plain attribute: the tower is registered once, under inner.
        object.__setattr__(self, "visual", OpenCLIPVisual(v, mask, mask_ratio, pgs_kwargs))

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.inner.logit_scale

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.inner.set_grad_checkpointing(enabled)

    def encode_image(self, images: Tensor) -> Tensor:
        return F.normalize(self.inner.encode_image(images).float(), dim=-1)

    def encode_text(self, text: Tensor) -> Tensor:
        return F.normalize(self.inner.encode_text(text).float(), dim=-1)

    def forward(self, images: Tensor, text: Tensor):
        return self.encode_image(images), self.encode_text(text), self.logit_scale.exp().clamp(max=100.0)


def build_open_clip(name: str, mask: str = "none", mask_ratio: float = 0.5, grad_checkpointing: bool = False,
                    **pgs_kwargs) -> OpenCLIP:
    model = OpenCLIP(name[len(PREFIX):], mask, mask_ratio, **pgs_kwargs)
    model.set_grad_checkpointing(grad_checkpointing)
    return model


def config_dict(model: OpenCLIP) -> dict:
    return dict(vars(model.cfg))
