"""use_pgs on Hugging Face transformers' CLIP and SigLIP: what reaches the
vision encoder in training, eval unchanged bit for bit, gradients,
torch.compile, checkpoints, copies, DataParallel replicas, and a clear error
for any other transformers model.

The models are built from small configs, with no weights (no network). The
tests skip where transformers does not import (the default environment has
none); with ``PGS_TEST_INTEGRATIONS=1`` (set in the users'-stack CI
environment) a missing transformers is a failure.
"""

import copy
import io
import os
import pickle
import subprocess
import sys

import pytest
import torch

import pgs_kernels
from conftest import assert_pgs_keeps_state_dict, expected_pgs_tokens
from pgs_kernels import PGSPatchDropout, remove_pgs, set_pgs_epoch, use_pgs

try:
    import transformers
    from transformers import (CLIPConfig, CLIPForImageClassification, CLIPModel, CLIPTextConfig, CLIPTextModel,
                              CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModel,
                              CLIPVisionModelWithProjection, SiglipConfig, SiglipForImageClassification,
                              SiglipModel, SiglipTextConfig, SiglipTextModel, SiglipVisionConfig, SiglipVisionModel,
                              VisionTextDualEncoderModel, ViTConfig, ViTModel)
except Exception as exc:  # noqa: BLE001 - whatever keeps it from importing
    transformers = exc

if isinstance(transformers, Exception):
    if os.environ.get("PGS_TEST_INTEGRATIONS") == "1":
        raise AssertionError(f"PGS_TEST_INTEGRATIONS=1 but transformers does not import: {transformers!r}")
    pytest.skip(f"transformers does not import here ({transformers!r}); pip install 'pgs-kernels[transformers]'",
                allow_module_level=True)


# --------------------------------------------------------------------------- models

SIZE = (64, 64)
P = 16


def _vision(cls, **kw):
    args = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=64,
                patch_size=P)
    args.update(kw)
    return cls(**args)


def _text(cls):
    return cls(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100,
               max_position_embeddings=16)


def _clip_config():
    return CLIPConfig(text_config=_text(CLIPTextConfig).to_dict(), vision_config=_vision(CLIPVisionConfig).to_dict(),
                      projection_dim=32)


def _siglip_config():
    text = _text(SiglipTextConfig)
    text.projection_size = 64  # SigLIP compares the text head's output with the pooled image tokens directly
    return SiglipConfig(text_config=text.to_dict(),
                        vision_config=_vision(SiglipVisionConfig).to_dict())


def _pooled(out):
    # transformers 5 returns the output object from get_image_features, 4.x the tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _dual():
    return VisionTextDualEncoderModel(vision_model=CLIPVisionModel(_vision(CLIPVisionConfig)),
                                      text_model=CLIPTextModel(_text(CLIPTextConfig)))


# name: (factory, prefix tokens, the image features, from pixel_values and keyword arguments)
MODELS = {
    "CLIPModel": (lambda: CLIPModel(_clip_config()), 1,
                  lambda m, x, **kw: _pooled(m.get_image_features(pixel_values=x, **kw))),
    "CLIPVisionModel": (lambda: CLIPVisionModel(_vision(CLIPVisionConfig)), 1,
                        lambda m, x, **kw: m(pixel_values=x, **kw).pooler_output),
    "CLIPVisionModelWithProjection": (lambda: CLIPVisionModelWithProjection(_vision(CLIPVisionConfig)), 1,
                                      lambda m, x, **kw: m(pixel_values=x, **kw).image_embeds),
    "CLIPForImageClassification": (lambda: CLIPForImageClassification(
        CLIPConfig(vision_config=_vision(CLIPVisionConfig).to_dict(), num_labels=3)), 1,
        lambda m, x, **kw: m(pixel_values=x, **kw).logits),
    "SiglipModel": (lambda: SiglipModel(_siglip_config()), 0,
                    lambda m, x, **kw: _pooled(m.get_image_features(pixel_values=x, **kw))),
    "SiglipVisionModel": (lambda: SiglipVisionModel(_vision(SiglipVisionConfig)), 0,
                          lambda m, x, **kw: m(pixel_values=x, **kw).pooler_output),
    "SiglipForImageClassification": (lambda: SiglipForImageClassification(
        SiglipConfig(vision_config=_vision(SiglipVisionConfig).to_dict(), num_labels=3)), 0,
        lambda m, x, **kw: m(pixel_values=x, **kw).logits),
    "VisionTextDualEncoderModel": (_dual, 1, lambda m, x, **kw: _pooled(m.get_image_features(pixel_values=x))),
}
_PRISTINE = {}


def make(name):
    """A fresh copy of the named model, and its prefix-token count and feature function."""
    factory, n, features = MODELS[name]
    if name not in _PRISTINE:
        torch.manual_seed(0)
        _PRISTINE[name] = factory()
    return copy.deepcopy(_PRISTINE[name]), n, features


def tower(model):
    """The module that runs embeddings -> encoder."""
    while not hasattr(model, "embeddings"):
        model = model.vision_model
    return model


def images_for(size=SIZE, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, *size, generator=g)
    # Structure at a coarse scale, so that PGS has background and objects to tell apart.
    x += 2 * torch.nn.functional.interpolate(torch.randn(B, 3, 4, 4, generator=g), size=size, mode="bilinear")
    return x


def watch(model):
    """Record what the PGS layer gets (sequence, images, the RNG state it starts
    from) and what the first encoder layer gets."""
    seen = {}
    t = tower(model)

    def before_pgs(mod, args):
        seen["x"], seen["images"], seen["rng"] = args[0].detach().clone(), args[1], torch.get_rng_state()

    def before_encoder(mod, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen["encoder_in"] = hidden.detach().clone()

    handles = [t.embeddings.pgs.register_forward_pre_hook(before_pgs),
               t.encoder.layers[0].register_forward_pre_hook(before_encoder, with_kwargs=True)]
    return seen, handles


def expected_tokens(seen, n, **options):
    """The prefix tokens, then the patch tokens pgs_select keeps for the same
    images, options and noise (the RNG state the PGS layer started from)."""
    return expected_pgs_tokens(seen["x"], seen["images"], seen["rng"], P, n, **options)


def check_contract(model, seen, images, n, options, size=SIZE, **embed_kw):
    """The encoder got the prefix tokens, then the pgs_select selection of the
    embeddings' own output for these very images."""
    t = tower(model)
    assert seen["images"] is images
    with torch.no_grad():  # the embeddings' output, without the hook
        own = t.embeddings.forward(images, **embed_kw)
    assert torch.equal(seen["x"], own)
    want, sel = expected_tokens(seen, n, **options)
    L = (size[0] // P) * (size[1] // P)
    K = pgs_kernels.pgs_counts(L, options.get("mask_ratio", 0.5), 0.05)[0]
    assert want.shape[1] == n + K
    if hasattr(t, "pre_layrnorm"):  # CLIP: a LayerNorm between the embeddings and the encoder
        with torch.no_grad():
            want = t.pre_layrnorm(want)
    assert seen["encoder_in"].shape[1] == n + K
    assert torch.equal(seen["encoder_in"], want)
    assert torch.equal(t.embeddings.pgs.last_selection.keep_idx, sel.keep_idx)


# --------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("options", [dict(mask_ratio=0.5), dict(mask_ratio=0.75, token_weight=0.5, ot_iters=5)],
                         ids=["default", "tokens"])
def test_train_mode_keeps_prefix_then_the_pgs_selection(name, options):
    model, n, features = make(name)
    use_pgs(model, **options)
    layer = tower(model).embeddings.pgs
    assert type(layer) is PGSPatchDropout and layer.patch_size == P and layer.num_prefix_tokens == n
    model.train()
    images = images_for()
    seen, _ = watch(model)
    out = features(model, images)
    assert torch.isfinite(out).all()
    check_contract(model, seen, images, n, options)


@pytest.mark.parametrize("name", list(MODELS))
def test_eval_output_is_bit_identical(name):
    model, n, features = make(name)
    images = images_for()
    model.eval()
    with torch.no_grad():
        before = features(model, images)
        use_pgs(model, mask_ratio=0.5, token_weight=0.5)
        after = features(model, images)
    assert torch.equal(before, after)


@pytest.mark.parametrize("name", ["CLIPVisionModel", "SiglipVisionModel"])
def test_hidden_states_and_pooling_take_the_shorter_sequence(name):
    model, n, _ = make(name)
    use_pgs(model, mask_ratio=0.5).train()
    out = model(pixel_values=images_for(), output_hidden_states=True, output_attentions=True)
    K = pgs_kernels.pgs_counts(16, 0.5, 0.05)[0]
    assert out.last_hidden_state.shape == (2, n + K, 64)
    assert len(out.hidden_states) == 3 and all(h.shape == (2, n + K, 64) for h in out.hidden_states)
    assert all(a.shape[-2:] == (n + K, n + K) for a in out.attentions)
    assert out.pooler_output.shape == (2, 64) and torch.isfinite(out.pooler_output).all()


@pytest.mark.parametrize("name", ["CLIPVisionModel", "SiglipVisionModel"])
def test_interpolate_pos_encoding_at_a_non_square_size(name):
    model, n, _ = make(name)
    options = dict(mask_ratio=0.5, token_weight=0.5)
    use_pgs(model, **options).train()
    images = images_for((64, 96))
    seen, _ = watch(model)
    model(pixel_values=images, interpolate_pos_encoding=True)
    check_contract(model, seen, images, n, options, size=(64, 96), interpolate_pos_encoding=True)


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipVisionModel"])
def test_bf16_autocast(name):
    model, n, features = make(name)
    options = dict(mask_ratio=0.5, token_weight=0.5)
    use_pgs(model, **options).train()
    images = images_for()
    seen, _ = watch(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = features(model, images)
        check_contract(model, seen, images, n, options)
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_weights(dtype):
    model, n, _ = make("CLIPVisionModel")
    options = dict(mask_ratio=0.5, token_weight=0.5)
    model = use_pgs(model.to(dtype), **options).train()
    images = images_for()  # float32 pixel_values: the embeddings cast them for the convolution
    seen, _ = watch(model)
    out = model(pixel_values=images)
    assert out.last_hidden_state.dtype == dtype and seen["x"].dtype == dtype
    check_contract(model, seen, images, n, options)


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipModel", "VisionTextDualEncoderModel"])
def test_contrastive_loss_gradients_reach_the_patch_embedding(name):
    model, n, _ = make(name)
    use_pgs(model, mask_ratio=0.5).train()
    seen, _ = watch(model)
    ids = torch.randint(0, 100, (2, 8))
    out = model(input_ids=ids, pixel_values=images_for(), return_loss=True)
    assert seen["encoder_in"].shape[1] == n + pgs_kernels.pgs_counts(16, 0.5, 0.05)[0]
    out.loss.backward()
    g = tower(model).embeddings.patch_embedding.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("name", ["CLIPVisionModel", "SiglipModel"])
def test_compiled_training_step_matches_eager(name):
    from torch._dynamo.testing import CompileCounterWithBackend

    model, n, _ = make(name)
    use_pgs(model, mask_ratio=0.5, token_weight=0.5).train()
    kw = dict(pixel_values=images_for())
    if name == "SiglipModel":
        kw.update(input_ids=torch.randint(0, 100, (2, 8)), return_loss=True)
    pick = (lambda o: o.loss) if name == "SiglipModel" else (lambda o: o.pooler_output)
    torch.manual_seed(3)
    eager = pick(model(**kw))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    torch.manual_seed(3)
    out = pick(compiled(**kw))
    assert counter.frame_count >= 1  # it compiled, in one graph
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert tower(model).embeddings.patch_embedding.weight.grad is not None
    set_pgs_epoch(compiled, 4, 8)
    assert tower(model).embeddings.pgs.token_weight == 0.5


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipVisionModel"])
def test_state_dict_keys_unchanged_and_checkpoints_load_both_ways(name):
    model, *_ = make(name)
    plain, *_ = make(name)
    assert_pgs_keeps_state_dict(model, plain)


@pytest.mark.parametrize("name", ["CLIPVisionModel", "SiglipModel"])
def test_deepcopy_and_pickle_keep_pgs(name):
    model, n, features = make(name)
    use_pgs(model, mask_ratio=0.5).train()
    images = images_for()
    torch.manual_seed(1)
    want = features(model, images)
    tower(model).embeddings.pgs.last_selection = None
    buf = io.BytesIO()
    torch.save(model, buf)
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model)),
              torch.load(io.BytesIO(buf.getvalue()), weights_only=False)]
    for other in copies:
        layer = tower(other).embeddings.pgs
        assert isinstance(layer, PGSPatchDropout)
        torch.manual_seed(1)
        assert torch.equal(features(other, images), want)
        # the copy's hook runs the copy's layer, not the original's
        assert tower(model).embeddings.pgs.last_selection is None
        assert layer.last_selection is not None


def test_a_replica_uses_its_own_layer():
    """nn.DataParallel's replicas share the embeddings' hook dict: the hook must
    run the layer of the replica it is called on (a CPU stand-in for the GPU test)."""
    model, n, _ = make("CLIPVisionModel")
    use_pgs(model, mask_ratio=0.5).train()
    embeddings = tower(model).embeddings
    replica = embeddings._replicate_for_data_parallel()  # what replicate() does, less the device copies
    replica._parameters = dict(embeddings._parameters)
    replica._modules["pgs"] = copy.deepcopy(embeddings.pgs)
    out = replica(images_for())
    assert out.shape[1] == n + pgs_kernels.pgs_counts(16, 0.5, 0.05)[0]
    assert replica.pgs.last_selection is not None and embeddings.pgs.last_selection is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_data_parallel():
    model, n, _ = make("CLIPVisionModel")
    model = use_pgs(model, mask_ratio=0.5).cuda().train()
    dp = torch.nn.DataParallel(model)
    B = 2 * max(1, torch.cuda.device_count())
    out = dp(pixel_values=images_for(B=B).cuda())
    assert out.last_hidden_state.shape[:2] == (B, n + pgs_kernels.pgs_counts(16, 0.5, 0.05)[0])
    out.pooler_output.square().mean().backward()
    assert torch.isfinite(tower(model).embeddings.patch_embedding.weight.grad).all()


def test_calling_again_replaces_the_options_and_the_hook():
    model, n, _ = make("SiglipVisionModel")
    use_pgs(model, mask_ratio=0.5)
    use_pgs(model, mask_ratio=0.25)
    embeddings = tower(model).embeddings
    assert embeddings.pgs.mask_ratio == 0.25 and len(embeddings._forward_hooks) == 1
    model.train()
    seen, _ = watch(model)
    model(pixel_values=images_for())
    assert seen["encoder_in"].shape[1] == n + pgs_kernels.pgs_counts(16, 0.25, 0.05)[0]


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipVisionModel"])
def test_remove_pgs_restores_the_model(name):
    model, n, features = make(name)
    pristine, *_ = make(name)
    use_pgs(model, mask_ratio=0.5).train()
    remove_pgs(model)
    remove_pgs(model)  # a model without PGS: nothing changes
    embeddings = tower(model).embeddings
    assert list(embeddings._modules) == list(tower(pristine).embeddings._modules)
    assert not embeddings._forward_hooks and not embeddings._forward_hooks_with_kwargs
    assert repr(model) == repr(pristine)
    pristine.train()
    images = images_for()
    assert torch.equal(features(model, images), features(pristine, images))
    with pytest.raises(ValueError, match="use_pgs"):
        set_pgs_epoch(model, 1, 2)


def test_set_pgs_epoch_follows_the_published_schedule():
    model, *_ = make("CLIPModel")
    use_pgs(model)
    set_pgs_epoch(model, 8, 32)
    assert tower(model).embeddings.pgs.token_weight == 0.25
    set_pgs_epoch(model, 40, 32)
    assert tower(model).embeddings.pgs.token_weight == 1.0


def test_images_that_do_not_fit_the_grid_name_images():
    model, *_ = make("CLIPVisionModel")
    use_pgs(model).train()
    images = torch.randn(2, 3, 72, 64)
    with pytest.raises(ValueError, match=r"images: H=72, W=64 is not divisible by patch_size=16"):
        model(pixel_values=images, interpolate_pos_encoding=True)
    model.eval()
    model(pixel_values=images, interpolate_pos_encoding=True)  # eval: the model as it was


@pytest.mark.parametrize("kwargs,exc,match", [(dict(mask_ratio=1.0), ValueError, "mask_ratio"),
                                              (dict(patch_size=16), TypeError, "patch_size"),
                                              (dict(backend="gpu"), ValueError, "backend")])
def test_bad_options_are_named(kwargs, exc, match):
    model, *_ = make("SiglipVisionModel")
    with pytest.raises(exc, match=match):
        use_pgs(model, **kwargs)
    assert not hasattr(tower(model).embeddings, "pgs")


# --------------------------------------------------------------------------- what it cannot serve


class _OwnForward(CLIPVisionModel):
    def forward(self, pixel_values=None, **kwargs):
        return super().forward(pixel_values, **kwargs)


def _overlapping():
    model = CLIPVisionModel(_vision(CLIPVisionConfig))
    model.embeddings.patch_embedding = torch.nn.Conv2d(3, 64, kernel_size=16, stride=8, bias=False)
    return model


def _changed_embeddings():
    model = SiglipVisionModel(_vision(SiglipVisionConfig))
    model.embeddings.__class__ = type("MyEmbeddings", (type(model.embeddings),), {})
    return model


def _llava():
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                       intermediate_size=64, vocab_size=128)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=_vision(CLIPVisionConfig), text_config=text,
                                                     image_token_index=127))


REFUSED = {
    "CLIPTextModel": (lambda: CLIPTextModel(_text(CLIPTextConfig)), "no image tower"),
    "CLIPTextModelWithProjection": (lambda: CLIPTextModelWithProjection(_text(CLIPTextConfig)), "no image tower"),
    "SiglipTextModel": (lambda: SiglipTextModel(_text(SiglipTextConfig)), "no image tower"),
    "ViTModel": (lambda: ViTModel(_vision(ViTConfig)), "not CLIP's or SigLIP's"),
    "a subclass with its own forward": (lambda: _OwnForward(_vision(CLIPVisionConfig)), "its own forward"),
    "overlapping patches": (_overlapping, "non-overlapping"),
    "changed embeddings": (_changed_embeddings, "MyEmbeddings, not transformers' SiglipVisionEmbeddings"),
    "LLaVA": (_llava, r"holds a CLIP or SigLIP vision tower \(model.vision_tower\)"),
    "dual encoder with a ViT": (lambda: VisionTextDualEncoderModel(
        vision_model=ViTModel(_vision(ViTConfig)), text_model=CLIPTextModel(_text(CLIPTextConfig))),
        r"VisionTextDualEncoderModel's vision_model: transformers\.models\.vit\.modeling_vit\.ViTModel"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_models_it_cannot_serve_are_a_type_error_naming_the_class(name):
    factory, why = REFUSED[name]
    model = factory()
    before = repr(model)
    cls = type(model)
    with pytest.raises(TypeError, match=why) as info:
        use_pgs(model)
    assert f"{cls.__module__}.{cls.__qualname__}" in str(info.value)
    with pytest.raises(TypeError, match=why):
        remove_pgs(model)
    assert repr(model) == before


def test_import_pgs_kernels_does_not_import_transformers():
    code = ("import sys, pgs_kernels, pgs_kernels.integrations\n"
            "bad = sorted(m for m in sys.modules if m == 'transformers' or m.startswith('transformers.'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_compiled_model_is_refused():
    model, *_ = make("CLIPVisionModel")
    with pytest.raises(TypeError, match="before wrapping"):
        use_pgs(torch.compile(model))
