r"""``use_pgs``: PGS masking in an open_clip, timm or transformers ViT, in one call.

open_clip (``VisionTransformer.patch_dropout``) and timm
(``VisionTransformer.patch_drop``, ``Eva.patch_drop``) call their
patch-dropout slot with the token sequence alone, after the positional
embedding; PGS also needs the images those tokens came from. For these,
:func:`use_pgs` changes the tower in place, and nothing else:

* the slot holds a :class:`PGSDropoutSlot` (no parameters, no buffers, so
  ``state_dict`` keys do not change). What the slot held before (an
  identity, nothing for timm's Eva, or the patch dropout the model was
  built with, which use_pgs names in a warning) is kept on the slot, for
  :func:`remove_pgs` to put back;
* a forward pre-hook on the patch embedding (open_clip's ``conv1``, timm's
  ``patch_embed``), whose input *is* the images, hands them to the slot. The
  hook finds the slot as the patch embedding's child ``pgs_slot`` (the same
  object under a second name), never through a reference of its own, so
  that a copy, a pickle or an ``nn.DataParallel`` replica feeds its own slot;
* the tower's ``forward_intermediates`` is shadowed by an instance attribute
  that refuses a spatial (NCHW) map while tokens are dropped.

In training mode the transformer then sees the ``n`` prefix tokens (CLS,
DeiT's distillation token, registers: ``num_prefix_tokens``) followed by the
patch tokens at ``pgs_select(images, ...).keep_idx``, with the model's own
patch size and the options given here; timm's Eva also gets the kept
indices, so that its rotary position embeddings follow the kept patches. In
eval mode the slot returns its input: the model's output is the one it gave
before the call, bit for bit.

Hugging Face transformers' CLIP and SigLIP towers have no such slot: there
the PGS layer is a child ``pgs`` of the vision embeddings, and a forward hook
on the embeddings (input ``pixel_values``, output the token sequence) puts
its selection in place of the sequence in training (the section at the end
of this file).

No library is imported here: a model is recognised by the classes it
is an instance of, which are loaded already when such a model exists.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from typing import Optional, Tuple

from torch import Tensor, nn

from .dropout import PGSPatchDropout

__all__ = ["use_pgs", "remove_pgs", "set_pgs_epoch", "PGSDropoutSlot", "OPTIONS"]

#: The ``pgs_select`` options :func:`use_pgs` takes (plus ``backend``).
OPTIONS = ("mask_ratio", "candidate_ratio", "sim_threshold", "token_weight", "edge_weight", "use_ot", "ot_reg",
           "ot_iters")

_SUPPORTED = ("open_clip's CLIP, CustomTextCLIP, VisionTransformer or TimmModel (an image tower), "
              "or timm's VisionTransformer (DeiT distilled included) or Eva, "
              "or a Hugging Face transformers CLIP or SigLIP model")


class PGSDropoutSlot(PGSPatchDropout):
    r""":class:`PGSPatchDropout` for a patch-dropout slot that is called with
    the tokens alone: ``forward(x)`` with ``x`` ``(B, n + L, D)``.

    The images come from the hook :func:`use_pgs` puts on the model's patch
    embedding, for the forward pass under way; they are released as soon as
    the slot has used them. The schedule of ``token_weight`` is not saved in
    ``state_dict`` (call :func:`set_pgs_epoch` every epoch, a resumed run
    included), so the model's checkpoint keys are those it had.

    ``return_indices=True`` is the form of timm's ``Eva`` slot
    (``PatchDropoutWithIndices``): it returns ``(tokens, keep_idx)`` in
    training and ``(x, None)`` otherwise, so that Eva gathers its rotary
    position embeddings at the kept patches.
    """

    def __init__(self, patch_size: int, num_prefix_tokens: int, return_indices: bool = False, **options):
        super().__init__(patch_size=patch_size, num_prefix_tokens=num_prefix_tokens, save_schedule=False,
                         **options)
        self.return_indices = bool(return_indices)
        self._images: Optional[Tensor] = None
        # What use_pgs took out of the slot, for remove_pgs to put back. A
        # tuple, so that nn.Module does not register it as a child: it would
        # then be trained, listed and replicated as part of the model.
        self._replaced: tuple = ()

    def forward(self, x: Tensor):  # type: ignore[override]
        images, self._images = self._images, None
        if not self.training or self.mask_ratio == 0.0:
            return (x, None) if self.return_indices else x
        if images is None:
            raise RuntimeError(
                "PGSDropoutSlot: no images reached the patch-dropout slot in this forward pass; the images are "
                "taken from the input of the model's patch embedding, which use_pgs hooks. Was the slot "
                "called without running the patch embedding first, or moved to another model?")
        out = super().forward(x, images)
        return (out, self.last_selection.keep_idx) if self.return_indices else out


_SLOT_CHILD = "pgs_slot"  # the slot's second name, under the hooked patch embedding


def _hand_images_to_slot(module, args):
    """Forward pre-hook of the patch embedding, whose input is the images.

    It finds the slot through the module it is called on (the slot is also
    its child ``pgs_slot``, without parameters or buffers), not through a
    reference of its own: nn.DataParallel's replicas share the hook, and
    ``replicate`` maps each replica's child to that replica's slot."""
    slot = module._modules.get(_SLOT_CHILD)
    if slot is not None and slot.training and args:
        slot._images = args[0]


class _SpatialIntermediatesGuard:
    """Stands in for the tower's ``forward_intermediates`` (an instance
    attribute, which remove_pgs deletes). In training, with tokens dropped,
    a spatial (NCHW) map cannot be built from the kept tokens: the libraries
    would lay K tokens onto the full grid (timm) or fail in a reshape
    (open_clip). That is refused here; NLC output passes (the kept tokens)."""

    def __init__(self, tower: nn.Module, slot_name: str):
        self.tower = tower
        self.slot_name = slot_name

    def __call__(self, *args, **kwargs):
        method = type(self.tower).forward_intermediates
        slot = getattr(self.tower, self.slot_name, None)
        if isinstance(slot, PGSDropoutSlot) and slot.training and slot.mask_ratio > 0:
            call = inspect.signature(method).bind(self.tower, *args, **kwargs)
            call.apply_defaults()
            if call.arguments.get("output_fmt") != "NLC":
                raise RuntimeError(
                    f"use_pgs: forward_intermediates(output_fmt={call.arguments.get('output_fmt')!r}) in training "
                    f"mode: PGS drops a share {slot.mask_ratio:g} of the patch tokens, so there is no full grid to "
                    "make a spatial map of. Call it in eval mode (model.eval()), ask for output_fmt='NLC' (the "
                    "kept tokens, in the order of the slot's last_selection.keep_idx), or remove_pgs(model) first")
        return method(self.tower, *args, **kwargs)


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


def _qualname(obj) -> str:
    """The module-qualified class name: a bare ``VisionTransformer`` could be any of three libraries'."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _square_patch_conv(conv, what: str) -> int:
    """The patch size of a patch-embedding convolution that cuts the image into
    non-overlapping square patches; anything else cannot be matched to PGS's grid."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"use_pgs: {what} is {_qualname(conv)}, not the Conv2d patch embedding of a plain ViT")
    kh, kw = conv.kernel_size
    if (kh, kw) != tuple(conv.stride) or kh != kw or tuple(conv.padding) != (0, 0) \
            or tuple(conv.dilation) != (1, 1):
        raise TypeError(
            f"use_pgs: {what} has kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding}: "
            "overlapping or non-square patches; PGS needs square, non-overlapping ones (kernel = stride, no "
            "padding)")
    return kh


def _open_clip_vit(visual) -> Tuple[nn.Module, str, int, int]:
    """(tower, slot attribute, patch size, prefix tokens) of an open_clip ViT tower."""
    base = _library_class("open_clip.transformer", "VisionTransformer")
    if not _same_method(visual, base, "_embeds"):
        raise TypeError(f"use_pgs: {_qualname(visual)} overrides _embeds, where open_clip's VisionTransformer "
                        "builds its token sequence: token code use_pgs does not know")
    P = _square_patch_conv(visual.conv1, f"{_qualname(visual)}'s conv1")
    _check_slot(visual, "patch_dropout", nn.Identity, _library_class("open_clip.transformer", "PatchDropout"))
    # open_clip's tower always puts its one class token first.
    return visual, "patch_dropout", P, 1


# The timm classes whose token code use_pgs knows, a subclass before its base,
# each with the patch-dropout class it builds (Eva's returns the kept indices,
# for its rotary embeddings) and what its slot holds without patch dropout.
_TIMM_TOWERS = (
    ("timm.models.deit", "VisionTransformerDistilled", "PatchDropout", nn.Identity),
    ("timm.models.vision_transformer", "VisionTransformer", "PatchDropout", nn.Identity),
    ("timm.models.eva", "Eva", "PatchDropoutWithIndices", type(None)),
)


def _timm_base(obj):
    """(known timm class obj is an instance of, its dropout class name, empty slot type), or None."""
    for module, name, dropout, empty in _TIMM_TOWERS:
        if _isinstance(obj, module, name):
            return _library_class(module, name), dropout, empty
    return None


def _timm_vit(vit, base, dropout: str, empty) -> Tuple[nn.Module, str, int, int]:
    """(model, slot attribute, patch size, prefix tokens) of a timm ViT or Eva."""
    if not _same_method(vit, base, "forward_features", "_pos_embed", "forward_intermediates"):
        raise TypeError(f"use_pgs: {_qualname(vit)} overrides how timm's {base.__name__} builds its token "
                        "sequence (forward_features, _pos_embed or forward_intermediates): token code use_pgs "
                        "does not know")
    embed_cls = _library_class("timm.layers.patch_embed", "PatchEmbed")
    pe = vit.patch_embed
    if embed_cls is None or type(pe) is not embed_cls:
        raise TypeError(f"use_pgs: {_qualname(vit)} embeds its patches with {_qualname(pe)}, not timm's "
                        "PatchEmbed: a hybrid or otherwise changed patch embedding, whose tokens do not map to "
                        "image patches")
    P = _square_patch_conv(pe.proj, f"{_qualname(vit)}'s patch_embed.proj")
    _check_slot(vit, "patch_drop", empty, _library_class("timm.layers.patch_dropout", dropout))
    return vit, "patch_drop", P, int(vit.num_prefix_tokens)


def _check_slot(tower, name: str, empty, dropout_class) -> None:
    known = (empty, PGSDropoutSlot) + ((dropout_class,) if dropout_class is not None else ())
    slot = getattr(tower, name)
    if type(slot) not in known:
        raise TypeError(f"use_pgs: {_qualname(tower)}'s {name} is {_qualname(slot)}; use_pgs replaces only the "
                        "library's own patch dropout (or an empty slot)")


def _find_tower(model) -> Tuple[nn.Module, nn.Module, str, int, int]:
    """(module to hook, tower, slot attribute, patch size, prefix tokens)."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or hasattr(model, "_orig_mod"):
        raise TypeError("use_pgs: call it on the model itself, before wrapping it in DistributedDataParallel, "
                        "DataParallel or torch.compile")
    if not isinstance(model, nn.Module):
        raise TypeError(f"use_pgs: model must be {_SUPPORTED}, got {_qualname(model)}")
    tower = model
    if _isinstance(model, "open_clip.timm_model", "TimmModel"):
        tower = model.trunk  # open_clip's wrapper of a timm trunk, passed alone
    elif not _isinstance(model, "open_clip.transformer", "VisionTransformer") and _timm_base(model) is None:
        visual = getattr(model, "visual", None)
        if not isinstance(visual, nn.Module) or not type(model).__module__.startswith("open_clip"):
            raise TypeError(f"use_pgs: model must be {_SUPPORTED}; got {_qualname(model)}, whose token code "
                            "use_pgs does not know")
        tower = visual
        if _isinstance(visual, "open_clip.timm_model", "TimmModel"):
            tower = visual.trunk  # an open_clip model with a timm trunk
    if _isinstance(tower, "open_clip.transformer", "VisionTransformer"):
        vit, slot, P, n = _open_clip_vit(tower)
        return vit.conv1, vit, slot, P, n
    known = _timm_base(tower)
    if known is not None:
        vit, slot, P, n = _timm_vit(tower, *known)
        return vit.patch_embed, vit, slot, P, n
    raise TypeError(f"use_pgs: the image tower is {_qualname(tower)}, not a ViT whose token code use_pgs knows; "
                    f"PGS selects the patch tokens of a Vision Transformer ({_SUPPORTED})")


# --------------------------------------------------------------------------- the calls


def use_pgs(model: nn.Module, *, backend: str = "auto", **options) -> nn.Module:
    r"""Make ``model``'s image tower drop the patches PGS selects, in place; returns ``model``.

    ``model``, one of:

    * open_clip's ``CLIP``, ``CustomTextCLIP`` (or any open_clip model with a
      ``visual`` tower), or a tower alone: ``VisionTransformer``, or
      ``TimmModel`` (a timm trunk: the SigLIP, EVA02-* and PE-Core-* models);
    * timm's ``VisionTransformer`` (registers, no class token, DeiT-3,
      DINOv2, SigLIP, ``dynamic_img_size``), ``VisionTransformerDistilled``
      (DeiT distilled: class and distillation tokens first) or ``Eva``
      (EVA-02, PE: the kept indices go to its rotary position embeddings,
      as with timm's own patch dropout);
    * Hugging Face transformers' ``CLIPModel``, ``CLIPVisionModel``,
      ``CLIPVisionModelWithProjection``, ``CLIPForImageClassification``,
      ``SiglipModel``, ``SiglipVisionModel``, ``SiglipForImageClassification``,
      or a ``VisionTextDualEncoderModel`` whose ``vision_model`` is a
      ``CLIPVisionModel`` or ``SiglipVisionModel`` (there the PGS layer is
      ``embeddings.pgs`` of the vision tower, applied by a forward hook on the
      embeddings; ``interpolate_pos_encoding=True`` works).

    ``options`` are :func:`pgs_kernels.pgs_select`'s: ``mask_ratio`` (default
    0.5), ``candidate_ratio``, ``sim_threshold``, ``token_weight``,
    ``edge_weight``, ``use_ot``, ``ot_reg``, ``ot_iters``; ``backend`` as
    there. The patch size and the number of prefix tokens are the model's own.

    In training mode, for images ``(B, C, H, W)`` with ``L = (H/P)(W/P)``
    patches, the tokens that reach the transformer blocks are the prefix
    tokens, then the patch tokens at ``pgs_select(images, tokens, **options)
    .keep_idx`` (``tokens``: the detached patch tokens after the positional
    embedding); ``K = max(1, int(L (1 - mask_ratio)))`` of them. In eval
    mode the model's output is the one it gave before, bit for bit, and
    ``state_dict`` keys do not change.

    The slot's former content: a patch dropout the model was built with
    (open_clip ``force_patch_dropout``, timm ``patch_drop_rate``) is
    replaced, with a ``UserWarning`` that names it; :func:`remove_pgs` puts
    that very object back. Calling ``use_pgs`` again replaces the options
    (and warns of nothing: the slot is its own); ``remove_pgs`` still
    restores what the first call took out.

    ``forward_intermediates`` (open_clip and timm towers): in eval mode, or
    with ``mask_ratio=0``, the library's own. In training mode, with patches
    dropped, ``output_fmt='NLC'`` returns the kept patch tokens (``K`` of
    them, in the order of the slot's ``last_selection.keep_idx``; the prefix
    tokens apart, as the library splits them), and a spatial map
    (``'NCHW'``, the libraries' default) is a ``RuntimeError``: there is no
    full grid to lay the kept tokens on.

    Wrappers: call it on the model itself, then wrap. A model already wrapped
    (``DistributedDataParallel``, ``nn.DataParallel``, or what
    ``torch.compile`` returns) is a ``TypeError``: pass ``wrapper.module`` or
    ``compiled._orig_mod`` instead. Under ``DistributedDataParallel`` each
    rank, under ``nn.DataParallel`` each replica, selects for its own images.
    ``torch.compile(fullgraph=True)`` compiles one graph for the whole
    schedule. With open_clip, compile ``model.encode_image`` (or the training
    step): ``torch.compile(model).encode_image`` is the eager method.

    The published schedule of ``token_weight`` (``epoch / epochs``) is
    :func:`set_pgs_epoch`, once per epoch.

    Raises:
        TypeError: at the call, for a model it cannot serve, naming its
            module-qualified class and why: not a ViT (a ResNet, a
            torchvision or other library's model), a hybrid or changed patch
            embedding, overlapping or non-square patches, a subclass with its
            own token code, a foreign layer in the patch-dropout slot, a
            wrapped model; or a bad option.
        ValueError: an option out of range (named). At call time, images
            that do not fit the patch grid are a ``ValueError`` naming
            ``images``.
    """
    if _is_hf_model(model):  # Hugging Face transformers: the section at the end of this file
        return _hf_use_pgs(model, backend=backend, **options)
    for name in options:
        if name not in OPTIONS:
            raise TypeError(f"use_pgs got an unexpected keyword argument {name!r} (options: {', '.join(OPTIONS)}, "
                            "backend)")
    hooked, tower, slot_name, P, n = _find_tower(model)
    slot = PGSDropoutSlot(patch_size=P, num_prefix_tokens=n, backend=backend,
                          return_indices=_isinstance(tower, "timm.models.eva", "Eva"), **options)
    current = getattr(tower, slot_name)
    if isinstance(current, PGSDropoutSlot):
        slot._replaced = current._replaced  # called again: remove_pgs restores what the first call took out
    else:
        slot._replaced = (current,)
        if current is not None and not isinstance(current, nn.Identity):
            prob = getattr(current, "prob", None)
            warnings.warn(
                f"use_pgs replaces the patch dropout the model was built with ({_qualname(current)}"
                f"{'' if prob is None else f', prob={prob}'}, in {_qualname(tower)}.{slot_name}): in training PGS "
                "now drops the patches (mask_ratio sets how many); remove_pgs(model) puts that layer back",
                UserWarning, stacklevel=2)
    _detach(hooked, tower)  # an earlier call's
    slot.train(tower.training)
    setattr(tower, slot_name, slot)
    hooked.add_module(_SLOT_CHILD, slot)  # where the hook finds it (see _hand_images_to_slot)
    hooked.register_forward_pre_hook(_hand_images_to_slot)
    if hasattr(type(tower), "forward_intermediates"):
        tower.forward_intermediates = _SpatialIntermediatesGuard(tower, slot_name)
    return model


def remove_pgs(model: nn.Module) -> nn.Module:
    """Undo :func:`use_pgs` in place; returns ``model``. The slot gets back
    the very object the first ``use_pgs`` call took out of it (an identity,
    nothing for timm's Eva, or the patch dropout the model was built with,
    set to the model's current train/eval mode); the hook, the slot's second
    name and the ``forward_intermediates`` guard go. For a model without PGS
    it changes nothing."""
    if _is_hf_model(model):  # Hugging Face transformers: the PGS layer and the hook go from the embeddings
        return _hf_remove_pgs(model)
    hooked, tower, slot_name, _, _ = _find_tower(model)
    _detach(hooked, tower)
    slot = getattr(tower, slot_name)
    if isinstance(slot, PGSDropoutSlot):
        original = slot._replaced[0] if slot._replaced else nn.Identity()
        if original is None:
            delattr(tower, slot_name)  # timm's Eva keeps None as a plain attribute, not a child
        else:
            original.train(tower.training)  # it missed the train()/eval() calls made while it was out
        setattr(tower, slot_name, original)
    return model


def _detach(hooked: nn.Module, tower: nn.Module) -> None:
    """Take out the hook, the slot's second name and the forward_intermediates guard."""
    for key, hook in list(hooked._forward_pre_hooks.items()):
        if hook is _hand_images_to_slot:
            del hooked._forward_pre_hooks[key]
    if isinstance(hooked._modules.get(_SLOT_CHILD), PGSDropoutSlot):
        del hooked._modules[_SLOT_CHILD]
    if isinstance(tower.__dict__.get("forward_intermediates"), _SpatialIntermediatesGuard):
        del tower.__dict__["forward_intermediates"]


def set_pgs_epoch(model: nn.Module, epoch: float, epochs: float) -> None:
    """The published token-weight schedule, once per epoch: ``token_weight =
    epoch / epochs`` (clamped to ``[0, 1]``) in every PGS layer of ``model``
    (a ``DistributedDataParallel`` or compiled wrapper included)."""
    layers = [m for m in model.modules() if isinstance(m, PGSPatchDropout)]
    if not layers:
        raise ValueError("model has no PGS layer: call pgs_kernels.use_pgs(model) first")
    for layer in layers:
        layer.set_epoch(epoch, epochs)


# --------------------------------------------------------------------------- Hugging Face transformers
#
# transformers' CLIP and SigLIP vision towers have no patch-dropout slot: their
# forward is ``embeddings(pixel_values)`` -> (CLIP: ``pre_layrnorm``) -> encoder
# -> pooling (CLIP: token 0 after ``post_layernorm``; SigLIP: an attention-pooling
# head over all tokens, or none), with no attention mask on the image side, so
# fewer tokens pass through unchanged code. use_pgs therefore registers the PGS
# layer as a child of the vision embeddings (``embeddings.pgs``: a
# PGSPatchDropout without buffers, so ``state_dict`` keys stay) and a forward
# hook on the embeddings, whose input is ``pixel_values`` and whose output is the
# ``(B, n + L, D)`` sequence after the position embedding; in training the hook
# returns the PGS layer's output instead. The hook is a plain function that finds
# the layer through the module it is called on, so a copy, a pickle or a
# DataParallel replica uses its own layer. transformers is never imported here.

_HF_LAYER = "pgs"  # the PGS layer's name in the vision embeddings

# (library module, vision-tower classes, their embeddings class, prefix tokens, models holding a tower in
# ``vision_model``). transformers 5 folds the tower into CLIPVisionModel / SiglipVisionModel; 4.x had a
# CLIPVisionTransformer / SiglipVisionTransformer in ``vision_model``.
_HF_FAMILIES = (
    ("transformers.models.clip.modeling_clip", ("CLIPVisionModel", "CLIPVisionTransformer"), "CLIPVisionEmbeddings",
     1, ("CLIPModel", "CLIPVisionModelWithProjection", "CLIPForImageClassification")),
    ("transformers.models.siglip.modeling_siglip", ("SiglipVisionModel", "SiglipVisionTransformer"),
     "SiglipVisionEmbeddings", 0, ("SiglipModel", "SiglipForImageClassification")),
)
# A CLIP trained as in transformers' contrastive-image-text example: any vision and text model, the vision one's
# pooled output projected; served when its vision model is one of the towers above.
_HF_DUAL = ("transformers.models.vision_text_dual_encoder.modeling_vision_text_dual_encoder",
            "VisionTextDualEncoderModel")
_HF_SUPPORTED = ("transformers' CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection, "
                 "CLIPForImageClassification, SiglipModel, SiglipVisionModel, SiglipForImageClassification, or a "
                 "VisionTextDualEncoderModel whose vision_model is a CLIPVisionModel or SiglipVisionModel")


def _hf_qualname(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _is_hf_model(model) -> bool:
    """A transformers model (recognised without importing transformers)."""
    base = getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)
    return isinstance(model, nn.Module) and (
        (base is not None and isinstance(model, base)) or type(model).__module__.startswith("transformers."))


def _hf_classes(module: str, names) -> tuple:
    lib = sys.modules.get(module)
    return tuple(c for c in (getattr(lib, n, None) for n in names) if c is not None) if lib is not None else ()


def _hf_patch_size(conv, what: str) -> int:
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"use_pgs: {what} is {_hf_qualname(conv)}, not the Conv2d patch embedding of a plain ViT")
    kh, kw = conv.kernel_size
    no_padding = conv.padding == "valid" or (not isinstance(conv.padding, str) and tuple(conv.padding) == (0, 0))
    if (kh, kw) != tuple(conv.stride) or kh != kw or not no_padding or tuple(conv.dilation) != (1, 1):
        raise TypeError(
            f"use_pgs: {what} has kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding!r}: "
            "PGS needs square, non-overlapping patches (kernel = stride, no padding)")
    return kh


def _hf_refuse(model, why: str):
    return TypeError(f"use_pgs: {_hf_qualname(model)} {why}; use_pgs serves {_HF_SUPPORTED}")


def _hf_find(model) -> Tuple[nn.Module, int, int]:
    """(vision embeddings, patch size, prefix tokens) of a transformers CLIP or SigLIP model."""
    if isinstance(model, _hf_classes(_HF_DUAL[0], _HF_DUAL[1:])):
        try:
            return _hf_find(model.vision_model)
        except TypeError as exc:
            raise TypeError(f"use_pgs: {_hf_qualname(model)}'s vision_model: "
                            f"{str(exc).removeprefix('use_pgs: ')}") from None
    for module, tower_names, embeddings_name, n, wrapper_names in _HF_FAMILIES:
        towers = _hf_classes(module, tower_names)
        wrappers = _hf_classes(module, wrapper_names)
        if not isinstance(model, towers + wrappers):
            continue
        tower = model
        while not isinstance(getattr(tower, "embeddings", None), nn.Module):  # down to the module that embeds
            tower = getattr(tower, "vision_model", None)
            if not isinstance(tower, nn.Module):
                raise _hf_refuse(model, "has no vision embeddings where transformers puts them")
        if not any(type(tower).forward is t.forward for t in towers):
            raise _hf_refuse(model, f"has a vision tower {_hf_qualname(tower)} with its own forward: a token "
                                    "sequence use_pgs does not know")
        embeddings = tower.embeddings
        expected = _hf_classes(module, (embeddings_name,))
        if not expected or type(embeddings) is not expected[0]:
            raise _hf_refuse(model, f"embeds its patches with {_hf_qualname(embeddings)}, not transformers' "
                                    f"{embeddings_name} (changed embedding code: its tokens may not map to image "
                                    "patches)")
        P = _hf_patch_size(embeddings.patch_embedding, f"{_hf_qualname(model)}'s patch_embedding")
        return embeddings, P, n
    # Not a model use_pgs knows: say why.
    inner = [name for name, m in model.named_modules()
             if any(type(m).__name__ == e and type(m).__module__ == mod for mod, _, e, _, _ in _HF_FAMILIES)]
    if inner:
        tower = inner[0][:-len(".embeddings")] if inner[0].endswith(".embeddings") else inner[0]
        raise _hf_refuse(model, f"holds a CLIP or SigLIP vision tower ({tower}) but reads its tokens with its own "
                                "code, which may not take fewer of them; pass the tower itself if it may")
    if getattr(model, "main_input_name", None) != "pixel_values":
        raise _hf_refuse(model, "has no image tower (not a vision model): PGS selects image patches")
    raise _hf_refuse(model, "is a vision model whose patch embedding is not CLIP's or SigLIP's: use_pgs does not "
                            "know how its tokens map to image patches")


def _hf_pgs_hook(module, args, kwargs, output):
    """Forward hook of the vision embeddings: ``pixel_values`` in, the token
    sequence out; in training the PGS layer's selection replaces it."""
    layer = module._modules.get(_HF_LAYER)
    if layer is None or not layer.training:
        return None
    images = args[0] if args else kwargs.get("pixel_values")
    if images is None:
        raise RuntimeError("use_pgs: the vision embeddings were called without pixel_values")
    return layer(output, images)


def _hf_detach(embeddings: nn.Module) -> None:
    for key, hook in list(embeddings._forward_hooks.items()):
        if hook is _hf_pgs_hook:
            del embeddings._forward_hooks[key]
            embeddings._forward_hooks_with_kwargs.pop(key, None)
            embeddings._forward_hooks_always_called.pop(key, None)
    if isinstance(embeddings._modules.get(_HF_LAYER), PGSPatchDropout):
        del embeddings._modules[_HF_LAYER]


def _hf_use_pgs(model: nn.Module, *, backend: str = "auto", **options) -> nn.Module:
    for name in options:
        if name not in OPTIONS:
            raise TypeError(f"use_pgs got an unexpected keyword argument {name!r} (options: {', '.join(OPTIONS)}, "
                            "backend)")
    embeddings, P, n = _hf_find(model)
    layer = PGSPatchDropout(patch_size=P, num_prefix_tokens=n, backend=backend, save_schedule=False, **options)
    if _HF_LAYER in embeddings.__dict__ or (
            _HF_LAYER in embeddings._modules and not isinstance(embeddings._modules[_HF_LAYER], PGSPatchDropout)):
        raise TypeError(f"use_pgs: {_hf_qualname(embeddings)} already has an attribute {_HF_LAYER!r}")
    _hf_detach(embeddings)  # an earlier call's
    layer.train(embeddings.training)
    embeddings.add_module(_HF_LAYER, layer)
    embeddings.register_forward_hook(_hf_pgs_hook, with_kwargs=True)
    return model


def _hf_remove_pgs(model: nn.Module) -> nn.Module:
    embeddings, _, _ = _hf_find(model)
    _hf_detach(embeddings)
    return model
