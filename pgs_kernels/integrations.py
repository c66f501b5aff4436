r"""``use_pgs``: PGS masking in an open_clip or timm ViT, in one call.

open_clip (``VisionTransformer.patch_dropout``) and timm
(``VisionTransformer.patch_drop``) call their patch-dropout slot with the
token sequence alone, after the positional embedding; PGS also needs the
images those tokens came from. :func:`use_pgs` therefore changes two things
in place and nothing else:

* the slot holds a :class:`PGSDropoutSlot` (no parameters, no buffers, so
  ``state_dict`` keys do not change);
* a forward pre-hook on the patch embedding (open_clip's ``conv1``, timm's
  ``patch_embed``), whose input *is* the images, hands them to the slot.

In training mode the transformer then sees the ``n`` prefix tokens (CLS,
timm's register tokens: ``num_prefix_tokens``) followed by the patch tokens
at ``pgs_select(images, ...).keep_idx``, with the model's own patch size and
the options given here. In eval mode the slot returns its input: the model's
output is the one it gave before the call, bit for bit.

Neither library is imported here: a model is recognised by the classes it
is an instance of, which are loaded already when such a model exists.
"""

from __future__ import annotations

import sys
from typing import Optional, Tuple

from torch import Tensor, nn

from .dropout import PGSPatchDropout

__all__ = ["use_pgs", "remove_pgs", "set_pgs_epoch", "PGSDropoutSlot", "OPTIONS"]

#: The ``pgs_select`` options :func:`use_pgs` takes (plus ``backend``).
OPTIONS = ("mask_ratio", "candidate_ratio", "sim_threshold", "token_weight", "edge_weight", "use_ot", "ot_reg",
           "ot_iters")

_SUPPORTED = ("open_clip's CLIP, CustomTextCLIP or VisionTransformer (a ViT image tower), "
              "or timm's VisionTransformer")


class PGSDropoutSlot(PGSPatchDropout):
    r""":class:`PGSPatchDropout` for a patch-dropout slot that is called with
    the tokens alone: ``forward(x)`` with ``x`` ``(B, n + L, D)``.

    The images come from the hook :func:`use_pgs` puts on the model's patch
    embedding, for the forward pass under way; they are released as soon as
    the slot has used them. The schedule of ``token_weight`` is not saved in
    ``state_dict`` (call :func:`set_pgs_epoch` every epoch, a resumed run
    included), so the model's checkpoint keys are those it had.
    """

    def __init__(self, patch_size: int, num_prefix_tokens: int, **options):
        super().__init__(patch_size=patch_size, num_prefix_tokens=num_prefix_tokens, save_schedule=False,
                         **options)
        self._images: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        images, self._images = self._images, None
        if not self.training or self.mask_ratio == 0.0:
            return x
        if images is None:
            raise RuntimeError(
                "PGSDropoutSlot: no images reached the patch-dropout slot in this forward pass; the images are "
                "taken from the input of the model's patch embedding, which use_pgs hooks. Was the slot "
                "called without running the patch embedding first, or moved to another model?")
        return super().forward(x, images)


class _HandImagesToSlot:
    """Forward pre-hook of the patch embedding: its input is the images."""

    def __init__(self, slot: PGSDropoutSlot):
        self.slot = slot

    def __call__(self, module, args):
        if self.slot.training and args:
            self.slot._images = args[0]


# --------------------------------------------------------------------------- recognising a model


def _library_class(module: str, name: str):
    """The class ``module.name`` if that module is loaded (else None): an
    instance of it exists only once its library has been imported."""
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def _isinstance(obj, module: str, name: str) -> bool:
    cls = _library_class(module, name)
    return cls is not None and isinstance(obj, cls)


def _same_method(obj, base, *names) -> bool:
    return all(getattr(type(obj), n, None) is getattr(base, n, None) for n in names)


def _square_patch_conv(conv, what: str) -> int:
    """The patch size of a patch-embedding convolution that cuts the image into
    non-overlapping square patches; anything else cannot be matched to PGS's grid."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"use_pgs: {what} is {type(conv).__name__}, not the Conv2d patch embedding of a plain ViT")
    kh, kw = conv.kernel_size
    if (kh, kw) != tuple(conv.stride) or kh != kw or tuple(conv.padding) != (0, 0) \
            or tuple(conv.dilation) != (1, 1):
        raise ValueError(
            f"use_pgs: {what} has kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding}: "
            "PGS needs square, non-overlapping patches (kernel = stride, no padding)")
    return kh


def _open_clip_vit(visual) -> Tuple[nn.Module, str, int, int]:
    """(tower, slot attribute, patch size, prefix tokens) of an open_clip ViT tower."""
    base = _library_class("open_clip.transformer", "VisionTransformer")
    if not _same_method(visual, base, "_embeds"):
        raise TypeError(f"use_pgs: {type(visual).__name__} changes how open_clip's VisionTransformer embeds "
                        "its patches (_embeds): a ViT variant use_pgs does not know")
    P = _square_patch_conv(visual.conv1, "the tower's conv1")
    _check_slot(visual.patch_dropout, "patch_dropout",
                (_library_class("open_clip.transformer", "PatchDropout"),))
    # open_clip's tower always puts its one class token first.
    return visual, "patch_dropout", P, 1


def _timm_vit(vit) -> Tuple[nn.Module, str, int, int]:
    """(model, slot attribute, patch size, prefix tokens) of a timm VisionTransformer."""
    base = _library_class("timm.models.vision_transformer", "VisionTransformer")
    if not _same_method(vit, base, "forward_features", "_pos_embed", "forward_intermediates"):
        raise TypeError(f"use_pgs: {type(vit).__name__} changes how timm's VisionTransformer builds its token "
                        "sequence (forward_features / _pos_embed): a ViT variant use_pgs does not know")
    embed_cls = _library_class("timm.layers.patch_embed", "PatchEmbed")
    pe = vit.patch_embed
    if embed_cls is None or type(pe) is not embed_cls:
        raise TypeError(f"use_pgs: the model's patch_embed is {type(pe).__name__}, not timm's PatchEmbed "
                        "(a hybrid or otherwise changed patch embedding: its tokens do not map to image patches)")
    P = _square_patch_conv(pe.proj, "patch_embed.proj")
    _check_slot(vit.patch_drop, "patch_drop", (_library_class("timm.layers.patch_dropout", "PatchDropout"),))
    return vit, "patch_drop", P, int(vit.num_prefix_tokens)


def _check_slot(slot, name: str, dropout_classes) -> None:
    known = (nn.Identity, PGSDropoutSlot) + tuple(c for c in dropout_classes if c is not None)
    if type(slot) not in known:
        raise TypeError(f"use_pgs: the model's {name} is {type(slot).__name__}; use_pgs replaces only the "
                        "library's own patch dropout (or an identity)")


def _find_tower(model) -> Tuple[nn.Module, nn.Module, str, int, int]:
    """(module to hook, tower, slot attribute, patch size, prefix tokens)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        raise TypeError("use_pgs: call it on the model itself, before wrapping it in DistributedDataParallel "
                        "or torch.compile")
    if not isinstance(model, nn.Module):
        raise TypeError(f"use_pgs: model must be {_SUPPORTED}, got {type(model).__name__}")
    tower = model
    if not _isinstance(model, "open_clip.transformer", "VisionTransformer") and \
            not _isinstance(model, "timm.models.vision_transformer", "VisionTransformer"):
        visual = getattr(model, "visual", None)
        if not isinstance(visual, nn.Module) or not type(model).__module__.startswith("open_clip"):
            raise TypeError(f"use_pgs: model must be {_SUPPORTED}, got {type(model).__name__}")
        tower = visual
        if _isinstance(visual, "open_clip.timm_model", "TimmModel"):
            tower = visual.trunk  # an open_clip model with a timm trunk
    if _isinstance(tower, "open_clip.transformer", "VisionTransformer"):
        vit, slot, P, n = _open_clip_vit(tower)
        return vit.conv1, vit, slot, P, n
    if _isinstance(tower, "timm.models.vision_transformer", "VisionTransformer"):
        vit, slot, P, n = _timm_vit(tower)
        return vit.patch_embed, vit, slot, P, n
    what = type(tower).__name__
    raise TypeError(f"use_pgs: the image tower is {what}, not a ViT; PGS selects the patch tokens of a Vision "
                    f"Transformer ({_SUPPORTED})")


# --------------------------------------------------------------------------- the calls


def use_pgs(model: nn.Module, *, backend: str = "auto", **options) -> nn.Module:
    r"""Make ``model``'s image tower drop the patches PGS selects, in place; returns ``model``.

    ``model``: open_clip's ``CLIP``, ``CustomTextCLIP`` (or any open_clip model
    with a ``visual`` tower) or ``VisionTransformer``, or timm's
    ``VisionTransformer`` (an open_clip model with a timm ViT trunk works too).
    ``options`` are :func:`pgs_kernels.pgs_select`'s: ``mask_ratio`` (default
    0.5), ``candidate_ratio``, ``sim_threshold``, ``token_weight``,
    ``edge_weight``, ``use_ot``, ``ot_reg``, ``ot_iters``; ``backend`` as
    there. The patch size and the number of prefix tokens are the model's own.

    In training mode, for images ``(B, C, H, W)`` with ``L = (H/P)(W/P)``
    patches, the tokens that reach the transformer blocks are the prefix
    tokens, then the patch tokens at ``pgs_select(images, tokens, **options)
    .keep_idx`` (``tokens``: the detached patch tokens after the positional
    embedding, read when ``token_weight > 0``); ``K = max(1, int(L (1 -
    mask_ratio)))`` of them. In eval mode the model is unchanged. Calling it
    again replaces the options. Call it before wrapping the model in
    ``DistributedDataParallel`` or ``torch.compile``.

    The published schedule of ``token_weight`` (``epoch / epochs``) is
    :func:`set_pgs_epoch`, once per epoch.

    Raises:
        TypeError: the model is not a ViT, or a ViT variant whose token
            sequence does not map to image patches (hybrid patch embedding,
            changed embedding code, overlapping patches); or a bad option.
        ValueError: an option out of range (named). At call time, images
            that do not fit the patch grid are a ``ValueError`` naming
            ``images``.
    """
    for name in options:
        if name not in OPTIONS:
            raise TypeError(f"use_pgs got an unexpected keyword argument {name!r} (options: {', '.join(OPTIONS)}, "
                            "backend)")
    hooked, tower, slot_name, P, n = _find_tower(model)
    slot = PGSDropoutSlot(patch_size=P, num_prefix_tokens=n, backend=backend, **options)
    _remove_hook(hooked)  # an earlier call's
    slot.train(tower.training)
    setattr(tower, slot_name, slot)
    hooked.register_forward_pre_hook(_HandImagesToSlot(slot))
    return model


def remove_pgs(model: nn.Module) -> nn.Module:
    """Undo :func:`use_pgs` in place: the slot becomes an identity (the
    libraries' own choice without patch dropout) and the hook goes; returns
    ``model``. For a model without PGS it changes nothing."""
    hooked, tower, slot_name, _, _ = _find_tower(model)
    _remove_hook(hooked)
    if isinstance(getattr(tower, slot_name), PGSDropoutSlot):
        setattr(tower, slot_name, nn.Identity())
    return model


def _remove_hook(hooked: nn.Module) -> None:
    for key, hook in list(hooked._forward_pre_hooks.items()):
        if isinstance(hook, _HandImagesToSlot):
            del hooked._forward_pre_hooks[key]


def set_pgs_epoch(model: nn.Module, epoch: float, epochs: float) -> None:
    """The published token-weight schedule, once per epoch: ``token_weight =
    epoch / epochs`` (clamped to ``[0, 1]``) in every PGS layer of ``model``
    (a ``DistributedDataParallel`` or compiled wrapper included)."""
    layers = [m for m in model.modules() if isinstance(m, PGSPatchDropout)]
    if not layers:
        raise ValueError("model has no PGS layer: call pgs_kernels.use_pgs(model) first")
    for layer in layers:
        layer.set_epoch(epoch, epochs)
