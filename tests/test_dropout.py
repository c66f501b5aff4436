"""PGSPatchDropout: the drop-in layer for a ViT's token sequence."""

import pytest
import torch

import pgs_kernels
from conftest import DEVICE
from pgs_kernels import PGSPatchDropout, pgs_select

BACKENDS = pgs_kernels.available_backends(DEVICE)


def _inputs(B=3, L_side=4, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, 8 * L_side, 8 * L_side, generator=g).to(DEVICE)
    x = torch.randn(B, 1 + L_side * L_side, D, generator=g).to(DEVICE).requires_grad_(True)
    return images, x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("token_weight", [0.0, 0.5])
def test_shapes_cls_first_and_kept_tokens(backend, token_weight):
    images, x = _inputs()
    layer = PGSPatchDropout(mask_ratio=0.5, patch_size=8, token_weight=token_weight, backend=backend).train()
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    y = layer(x, images, generator=gen)
    assert y.shape == (3, 1 + 8, 16)
    assert torch.equal(y[:, 0], x[:, 0])
    sel = layer.last_selection
    assert torch.equal(y[:, 1:], torch.gather(x[:, 1:], 1, sel.keep_idx[..., None].expand(-1, -1, 16)))
    # the layer's selection is pgs_select's on the detached patch tokens
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    tokens = x[:, 1:].detach() if token_weight > 0 else None
    ref = pgs_select(images, tokens, generator=gen, patch_size=8, token_weight=token_weight, backend=backend)
    assert torch.equal(ref.keep_idx, sel.keep_idx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_reaches_kept_tokens_only(backend):
    images, x = _inputs()
    layer = PGSPatchDropout(mask_ratio=0.5, patch_size=8, token_weight=0.5, backend=backend).train()
    y = layer(x, images)
    y.sum().backward()
    grad = x.grad
    assert (grad[:, 0] == 1).all()
    kept = torch.zeros(3, 16, dtype=torch.bool, device=DEVICE)
    kept.scatter_(1, layer.last_selection.keep_idx, True)
    assert (grad[:, 1:][kept] == 1).all()
    assert (grad[:, 1:][~kept] == 0).all()


def test_eval_and_zero_ratio_are_identity():
    images, x = _inputs()
    layer = PGSPatchDropout(mask_ratio=0.5, patch_size=8).eval()
    assert layer(x, images) is x
    assert PGSPatchDropout(mask_ratio=0.0, patch_size=8).train()(x, images) is x


def test_set_epoch_follows_published_schedule():
    layer = PGSPatchDropout()
    layer.set_epoch(8, 32)
    assert layer.token_weight == 0.25
    layer.set_epoch(40, 32)
    assert layer.token_weight == 1.0
    assert "token_weight=1.0" in repr(layer)


def test_bad_arguments():
    images, x = _inputs()
    with pytest.raises(ValueError, match="x"):
        PGSPatchDropout(patch_size=8).train()(x[0], images)
    with pytest.raises(ValueError, match="images"):
        PGSPatchDropout(patch_size=16).train()(x, images[:, :, :30])  # 30 % 16 != 0
    with pytest.raises(TypeError, match="noise"):
        PGSPatchDropout(noise=torch.rand(3, 16))
