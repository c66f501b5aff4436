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


# --- the layer cannot silently go wrong: every mismatch is an error naming its argument


def test_wrong_patch_size_for_the_vit_names_x():
    # A ViT with patch 14 on 224² images has 1 + 256 tokens; patch_size=16 would mean 196.
    layer = PGSPatchDropout(patch_size=16).train()
    x = torch.randn(2, 257, 8)
    images = torch.randn(2, 3, 224, 224)
    with pytest.raises(ValueError, match=r"x must hold CLS then the L=196 patch tokens.*got 257"):
        layer(x, images)
    layer.set_epoch(1, 32)  # with token similarity on, the error is still about x
    with pytest.raises(ValueError, match=r"^x must hold"):
        layer(x, images)


def test_missing_cls_names_x():
    images, x = _inputs()
    with pytest.raises(ValueError, match=r"x must hold CLS.*no CLS token"):
        PGSPatchDropout(patch_size=8).train()(x[:, 1:], images)


def test_batch_mismatch_names_images():
    images, x = _inputs()
    with pytest.raises(ValueError, match=r"images must hold the batch of x"):
        PGSPatchDropout(patch_size=8).train()(x, images[:2])


def test_mismatches_are_caught_in_eval_mode_too():
    images, x = _inputs()
    with pytest.raises(ValueError, match="x must hold"):
        PGSPatchDropout(patch_size=16).eval()(x, images)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(mask_ratio=1.5), ValueError, "mask_ratio"),
        (dict(mask_ratio="half"), TypeError, "mask_ratio"),
        (dict(patch_size=0), ValueError, "patch_size"),
        (dict(token_weight=2.0), ValueError, "token_weight"),
        (dict(backend="gpu"), ValueError, "backend"),
        (dict(foo=1), TypeError, "foo"),
        (dict(tokens=None), TypeError, "tokens"),
        (dict(candidate_ratio=-0.5), ValueError, "candidate_ratio"),
        (dict(ot_reg=1e-9), ValueError, "ot_reg"),
        (dict(use_ot=1), TypeError, "use_ot"),
    ],
)
def test_constructor_checks_its_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PGSPatchDropout(**kwargs)


@pytest.mark.parametrize("epoch,epochs,match", [(3, 0, "epochs"), (3, -2, "epochs"), (float("nan"), 32, "epoch"),
                                                (1, float("inf"), "epochs"), ("1", 32, "epoch")])
def test_set_epoch_rejects_what_has_no_schedule(epoch, epochs, match):
    with pytest.raises(ValueError, match=match):
        PGSPatchDropout().set_epoch(epoch, epochs)


def test_schedule_is_saved_and_restored_with_the_model():
    a = torch.nn.Sequential(PGSPatchDropout(patch_size=8))
    a[0].set_epoch(12, 32)
    state = a.state_dict()
    assert float(state["0.token_weight_state"]) == 12 / 32
    b = torch.nn.Sequential(PGSPatchDropout(patch_size=8))
    b.load_state_dict(state)
    assert b[0].token_weight == 12 / 32
    images, x = _inputs()
    b[0].train()(x, images)
    assert b[0].last_selection is not None


def test_a_schedule_under_torch_compile_neither_breaks_nor_recompiles():
    """set_epoch between compiled training steps, 12 epochs (past dynamo's
    recompile limit), fullgraph=True: the same selection as eager every epoch,
    and no compile after the first step."""
    from torch._dynamo.testing import CompileCounterWithBackend

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Conv2d(3, 16, 8, stride=8)
            self.drop = PGSPatchDropout(mask_ratio=0.5, patch_size=8, backend="auto")

        def forward(self, images):
            x = self.embed(images).flatten(2).transpose(1, 2)
            x = torch.cat([x.mean(1, keepdim=True), x], 1)
            return self.drop(x, images).square().sum(-1)

    model = Tiny().to(DEVICE).train()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    images = _inputs()[0]
    seen = []
    for epoch in range(12):
        model.drop.set_epoch(epoch, 12)
        torch.manual_seed(epoch)
        out = compiled(images)
        out.sum().backward()
        torch.manual_seed(epoch)
        torch.testing.assert_close(out, model(images))
        seen.append(counter.frame_count)
    assert seen[-1] == seen[0], f"compiled frames per epoch: {seen}"


def test_token_weight_tensor_in_pgs_select_checks():
    images, x = _inputs()
    tokens = x[:, 1:].detach()
    with pytest.raises(ValueError, match="token_weight given as a tensor must be a 0-dim"):
        pgs_select(images, tokens, patch_size=8, token_weight=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="token_weight given as a tensor must be a 0-dim"):
        pgs_select(images, tokens, patch_size=8, token_weight=torch.tensor(1))
    with pytest.raises(ValueError, match="needs tokens"):
        pgs_select(images, None, patch_size=8, token_weight=torch.tensor(0.5))
    with pytest.raises(ValueError, match="token_weight must be in"):
        pgs_select(images, tokens, patch_size=8, token_weight=torch.tensor(-0.5))
    for backend in BACKENDS:
        gen = torch.Generator(device=DEVICE).manual_seed(2)
        got = pgs_select(images, tokens, generator=gen, patch_size=8, token_weight=torch.tensor(0.5),
                         backend=backend)
        gen = torch.Generator(device=DEVICE).manual_seed(2)
        want = pgs_select(images, tokens, generator=gen, patch_size=8, token_weight=0.5, backend=backend)
        assert torch.equal(got.keep_idx, want.keep_idx), backend
