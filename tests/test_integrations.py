"""use_pgs on open_clip and timm ViTs: what reaches the transformer in
training, eval unchanged bit for bit, gradients, torch.compile, checkpoints,
copies, DDP and DataParallel, a configured patch dropout, forward_intermediates,
and a clear error for anything it cannot serve.

open_clip and timm import only beside a CUDA build of torch (torchvision's
wheel needs one), so these tests run in the second CI environment
(requirements-cuda.txt, on the CPU) and skip elsewhere; with
``PGS_TEST_INTEGRATIONS=1`` (set there) a missing library is a failure.
"""

import copy
import importlib
import io
import os
import pickle
import warnings

import pytest
import torch

import pgs_kernels
from conftest import assert_pgs_keeps_state_dict, expected_pgs_tokens
from pgs_kernels import PGSDropoutSlot, pgs_select, remove_pgs, set_pgs_epoch, use_pgs


def _import(name):
    try:
        return __import__(name)
    except Exception as exc:  # torchvision beside a CPU-only torch raises RuntimeError, not ImportError
        return exc


open_clip = _import("open_clip")
timm = _import("timm")
HAVE_OPEN_CLIP = not isinstance(open_clip, Exception)
HAVE_TIMM = not isinstance(timm, Exception)
needs_open_clip = pytest.mark.skipif(not HAVE_OPEN_CLIP, reason=f"open_clip does not import: {open_clip!r}")
needs_timm = pytest.mark.skipif(not HAVE_TIMM, reason=f"timm does not import: {timm!r}")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu_suite.sh runs it)")


if os.environ.get("PGS_TEST_INTEGRATIONS") == "1":
    # The CI environment of the users' stack: the adapter tests must run there, not skip.
    assert HAVE_OPEN_CLIP and HAVE_TIMM, f"PGS_TEST_INTEGRATIONS=1 but open_clip: {open_clip!r}, timm: {timm!r}"
elif not (HAVE_OPEN_CLIP or HAVE_TIMM):
    pytest.skip(f"neither open_clip ({open_clip!r}) nor timm ({timm!r}) imports here; requirements-cuda.txt "
                "has both", allow_module_level=True)


# --------------------------------------------------------------------------- models
# Each factory: (model, path of the tower that holds the slot, slot attribute,
# module right after the slot, patch size, prefix tokens, image size).


def _oc_small(patch=16, size=64, **vision_kw):
    vision = dict(image_size=size, patch_size=patch, width=64, layers=2, head_width=32, mlp_ratio=2.0, **vision_kw)
    text = dict(context_length=16, vocab_size=100, width=64, heads=2, layers=1)
    return open_clip.model.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text)


def _oc(model):
    return model, "visual", "patch_dropout", "ln_pre"


def _timm_small(**kw):
    args = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=0)
    args.update(kw)
    return timm.models.vision_transformer.VisionTransformer(**args)


def _deit_distilled_small(**kw):
    args = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    args.update(kw)
    return timm.models.deit.VisionTransformerDistilled(**args)


def _eva_small(**kw):
    """EVA-02's layout (rotary position embeddings, SwiGLU), tiny."""
    args = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=0,
                use_rot_pos_emb=True, ref_feat_shape=(4, 4), swiglu_mlp=True, scale_mlp=True)
    args.update(kw)
    return timm.models.eva.Eva(**args)


def _pe_small(**kw):
    """PE-Core's layout (rope attention, pre-norm, attention pooling), tiny, with two registers."""
    args = dict(global_pool="map", attn_type="rope", use_pre_transformer_norm=True, rope_grid_offset=1.0,
                rope_grid_indexing="xy", attn_pool_num_heads=2, num_reg_tokens=2, swiglu_mlp=False,
                scale_mlp=False)
    args.update(kw)
    return _eva_small(**args)


def _timm(model):
    return model, "", "patch_drop", "norm_pre"


FACTORIES = {
    "open_clip ViT-B-16": (needs_open_clip, lambda: _oc(open_clip.create_model("ViT-B-16")) + (16, 1, (224, 224))),
    "open_clip ViT-B-32": (needs_open_clip, lambda: _oc(open_clip.create_model("ViT-B-32")) + (32, 1, (224, 224))),
    "open_clip patch 14": (needs_open_clip, lambda: _oc(_oc_small(14, 56)) + (14, 1, (56, 56))),
    "open_clip tower alone": (needs_open_clip,
                              lambda: (_oc_small().visual, "", "patch_dropout", "ln_pre", 16, 1, (64, 64))),
    # EVA-CLIP: open_clip's TimmModel around a timm Eva trunk (PE-Core-* is built the same way)
    "open_clip EVA02-B-16": (needs_open_clip,
                             lambda: (open_clip.create_model("EVA02-B-16"), "visual.trunk", "patch_drop",
                                      "norm_pre", 16, 1, (224, 224))),
    # SigLIP's tower form (attention pooling, no projection), passed alone
    "open_clip TimmModel alone": (needs_open_clip,
                                  lambda: (open_clip.timm_model.TimmModel("vit_tiny_patch16_224", embed_dim=192,
                                                                          pool="map", proj="none"),
                                           "trunk", "patch_drop", "norm_pre", 16, 1, (224, 224))),
    "timm vit_base_patch16_224": (needs_timm,
                                  lambda: _timm(timm.create_model("vit_base_patch16_224")) + (16, 1, (224, 224))),
    "timm registers": (needs_timm, lambda: _timm(_timm_small(reg_tokens=4)) + (16, 5, (64, 64))),
    "timm no class token": (needs_timm,
                            lambda: _timm(_timm_small(class_token=False, global_pool="avg")) + (16, 0, (64, 64))),
    "timm patch 14": (needs_timm, lambda: _timm(_timm_small(img_size=56, patch_size=14)) + (14, 1, (56, 56))),
    "timm dynamic_img_size 64x96": (needs_timm,
                                    lambda: _timm(_timm_small(dynamic_img_size=True)) + (16, 1, (64, 96))),
    "timm DeiT distilled": (needs_timm, lambda: _timm(_deit_distilled_small()) + (16, 2, (64, 64))),
    "timm Eva": (needs_timm, lambda: _timm(_eva_small()) + (16, 1, (64, 64))),
    "timm Eva PE registers": (needs_timm, lambda: _timm(_pe_small()) + (16, 3, (64, 64))),
    "timm Eva dynamic_img_size 64x96": (needs_timm,
                                        lambda: _timm(_eva_small(dynamic_img_size=True)) + (16, 1, (64, 96))),
}
_PRISTINE = {}


def make(name):
    """A fresh copy of the named model (built once per session: the ViT-Bs take a second)."""
    mark, factory = FACTORIES[name]
    if name not in _PRISTINE:
        torch.manual_seed(0)
        _PRISTINE[name] = factory()
    model, path, slot, norm, P, n, size = _PRISTINE[name]
    fresh = copy.deepcopy(model)
    return fresh, fresh.get_submodule(path), slot, norm, P, n, size


def tower_path(name):
    make(name)
    return _PRISTINE[name][1]


def model_params(names=FACTORIES):
    return [pytest.param(n, marks=FACTORIES[n][0], id=n) for n in names]


def images_for(size, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, *size, generator=g)
    # Structure at a coarse scale, so that PGS has background and objects to tell apart.
    x += 2 * torch.nn.functional.interpolate(torch.randn(B, 3, 4, 4, generator=g), size=size, mode="bilinear")
    return x


def forward(model, images):
    return model.encode_image(images) if hasattr(model, "encode_image") else model(images)


def compile_forward(model, backend):
    """What a training step calls, compiled: ``encode_image`` for open_clip's
    models (``torch.compile(model).encode_image`` is the eager method), else
    the module."""
    fn = model.encode_image if hasattr(model, "encode_image") else model
    return torch.compile(fn, fullgraph=True, backend=backend)


def watch(tower, slot_name, norm_name):
    """Record the slot's input with the RNG state it starts from, and what the
    module after the slot receives."""
    seen = {}
    slot = getattr(tower, slot_name)

    def before_slot(mod, args):
        seen["x"], seen["rng"] = args[0].detach().clone(), torch.get_rng_state()

    def after_slot(mod, args):
        seen["out"] = args[0].detach().clone()

    handles = [slot.register_forward_pre_hook(before_slot),
               getattr(tower, norm_name).register_forward_pre_hook(after_slot)]
    return seen, handles


def expected_tokens(seen, images, P, n, **options):
    """The prefix tokens, then the patch tokens pgs_select keeps for the same
    images, options and noise (the RNG state the slot started from)."""
    return expected_pgs_tokens(seen["x"], images, seen["rng"], P, n, **options)


# --------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("name", model_params())
@pytest.mark.parametrize("options", [dict(mask_ratio=0.5), dict(mask_ratio=0.75, token_weight=0.5, ot_iters=5)],
                         ids=["default", "tokens"])
def test_train_mode_keeps_prefix_then_the_pgs_selection(name, options):
    model, tower, slot, norm, P, n, size = make(name)
    use_pgs(model, **options)
    assert isinstance(getattr(tower, slot), PGSDropoutSlot)
    assert getattr(tower, slot).patch_size == P and getattr(tower, slot).num_prefix_tokens == n
    model.train()
    images = images_for(size)
    seen, _ = watch(tower, slot, norm)
    forward(model, images)
    want, sel = expected_tokens(seen, images, P, n, **options)
    L = (size[0] // P) * (size[1] // P)
    K = pgs_kernels.pgs_counts(L, options["mask_ratio"], 0.05)[0]
    assert seen["x"].shape[1] == n + L
    assert seen["out"].shape[1] == n + K
    assert torch.equal(seen["out"], want)
    assert torch.equal(getattr(tower, slot).last_selection.keep_idx, sel.keep_idx)


@pytest.mark.parametrize("name", model_params())
def test_eval_output_is_bit_identical(name):
    model, *_, size = make(name)
    images = images_for(size)
    model.eval()
    with torch.no_grad():
        before = forward(model, images)
        use_pgs(model, mask_ratio=0.5, token_weight=0.5)
        after = forward(model, images)
    assert torch.equal(before, after)


@needs_timm
@pytest.mark.parametrize("build", [_eva_small, _pe_small], ids=["EVA-02", "PE"])
def test_eva_rotary_embeddings_follow_the_kept_patches(build, monkeypatch):
    """The whole training forward equals timm's own patch-dropout path
    (PatchDropoutWithIndices, which hands Eva the indices for its rotary
    embeddings) made to keep the patches PGS kept, in PGS's order."""
    torch.manual_seed(0)
    plain = build()
    model = use_pgs(copy.deepcopy(plain), mask_ratio=0.5).train()
    images = images_for((64, 64))
    out = model(images)
    keep = model.patch_drop.last_selection.keep_idx

    class NoiseThatKeeps:
        """timm's patch dropout keeps the first K of argsort(torch.randn(B, L)): noise ranking ``keep`` first."""

        def __getattr__(self, name):
            return getattr(torch, name)

        def randn(self, B, L, device=None):
            noise = torch.full((B, L), float(L))
            return noise.scatter(1, keep, torch.arange(keep.shape[1], dtype=noise.dtype).expand(B, -1)).to(device)

    patch_dropout = importlib.import_module("timm.layers.patch_dropout")
    monkeypatch.setattr(patch_dropout, "torch", NoiseThatKeeps())
    plain.patch_drop = patch_dropout.PatchDropoutWithIndices(0.5, num_prefix_tokens=plain.num_prefix_tokens)
    plain.train()
    want = plain(images)
    monkeypatch.undo()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert model.patch_drop.return_indices and model.patch_drop.last_selection is not None


@pytest.mark.parametrize("name", model_params(["open_clip patch 14", "timm registers"]))
def test_bf16_autocast(name):
    model, tower, slot, norm, P, n, size = make(name)
    options = dict(mask_ratio=0.5, token_weight=0.5)
    use_pgs(model, **options).train()
    images = images_for(size)
    seen, _ = watch(tower, slot, norm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = forward(model, images)
    assert torch.isfinite(out.float()).all()
    assert seen["x"].dtype in (torch.bfloat16, torch.float32)  # the patch embedding ran in bf16
    want, _ = expected_tokens(seen, images, P, n, **options)
    assert torch.equal(seen["out"], want)


@pytest.mark.parametrize("name", model_params(["open_clip patch 14", "timm registers", "timm dynamic_img_size 64x96",
                                               "timm Eva"]))
def test_gradients_reach_the_patch_embedding(name):
    model, tower, *_, size = make(name)
    use_pgs(model, mask_ratio=0.5).train()
    forward(model, images_for(size)).float().square().mean().backward()
    embed = tower.conv1 if hasattr(tower, "conv1") else tower.patch_embed.proj
    g = embed.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("name", model_params(["open_clip patch 14", "timm registers", "timm Eva"]))
def test_compiled_training_step_matches_eager(name):
    from torch._dynamo.testing import CompileCounterWithBackend

    model, tower, slot, norm, P, n, size = make(name)
    use_pgs(model, mask_ratio=0.5, token_weight=0.5).train()
    images = images_for(size)
    torch.manual_seed(3)
    eager = forward(model, images)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = compile_forward(model, counter)
    torch.manual_seed(3)
    out = compiled(images)
    assert counter.frame_count >= 1  # it compiled (calling compiled_module.encode_image would not)
    torch.testing.assert_close(out, eager)
    out.square().mean().backward()
    # a second batch of another size, as at an epoch's short last batch
    assert compiled(images[:1]).shape[0] == 1
    set_pgs_epoch(compiled if isinstance(compiled, torch.nn.Module) else model, 4, 8)
    assert getattr(tower, slot).token_weight == 0.5


@pytest.mark.parametrize("name", model_params(["timm registers", "open_clip patch 14"]))
def test_compile_fullgraph_across_the_token_weight_schedule(name):
    """A schedule under torch.compile, tiny: set_pgs_epoch(epoch, 10) each epoch,
    fullgraph, a backward per step. One graph serves every epoch (the weight
    reaches the operator in a tensor, whose value dynamo does not guard on;
    a float there would be a recompile per epoch, and fullgraph fails past
    dynamo's recompile limit), and the compiled step equals the eager one."""
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, tower, slot, norm, P, n, size = make(name)
    use_pgs(model, mask_ratio=0.5).train()
    counter = CompileCounter()
    compiled = compile_forward(model, counter)
    images = images_for(size)
    frames = []
    for epoch in range(6):
        set_pgs_epoch(model, epoch, 10)
        torch.manual_seed(epoch)
        out = compiled(images)
        out.square().mean().backward()
        frames.append(counter.frame_count)
        torch.manual_seed(epoch)
        torch.testing.assert_close(out, forward(model, images))
    assert getattr(tower, slot).token_weight == 0.5
    assert frames == [1] * 6, f"frames compiled by the end of each epoch: {frames}"
    assert not counters["graph_break"], dict(counters["graph_break"])


@needs_timm
def test_compile_fullgraph_two_models_with_other_options_in_one_process():
    """A second compiled model with other float options reuses the same code
    objects, so dynamo sees those floats change (and makes them symbolic)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    images = images_for((64, 64))
    for options in (dict(mask_ratio=0.5), dict(mask_ratio=0.25, token_weight=0.5, sim_threshold=0.8),
                    dict(mask_ratio=0.75, token_weight=0.25, candidate_ratio=0.1)):
        torch.manual_seed(0)
        model = use_pgs(_timm_small(reg_tokens=2), **options).train()
        counter = CompileCounter()
        compiled = torch.compile(model, fullgraph=True, backend=counter)
        torch.manual_seed(1)
        out = compiled(images)
        out.square().mean().backward()
        assert counter.frame_count == 1
        torch.manual_seed(1)
        torch.testing.assert_close(out, model(images))


# --------------------------------------------------------------------------- checkpoints and copies


@pytest.mark.parametrize("name", model_params(["open_clip ViT-B-16", "timm registers", "timm Eva",
                                               "timm DeiT distilled", "open_clip TimmModel alone"]))
def test_state_dict_keys_unchanged_and_checkpoints_load_both_ways(name):
    model, *_ = make(name)
    plain, *_ = make(name)
    assert_pgs_keeps_state_dict(model, plain)


@pytest.mark.parametrize("name", model_params(["open_clip patch 14", "timm registers", "timm Eva"]))
def test_deepcopy_and_pickle_keep_pgs(name):
    model, tower, slot, norm, P, n, size = make(name)
    use_pgs(model, mask_ratio=0.5).train()
    images = images_for(size)
    torch.manual_seed(1)
    want = forward(model, images)
    buf = io.BytesIO()
    torch.save(model, buf)
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model)),
              torch.load(io.BytesIO(buf.getvalue()), weights_only=False)]
    for other in copies:
        other_tower = other.get_submodule(tower_path(name))
        assert isinstance(getattr(other_tower, slot), PGSDropoutSlot)
        torch.manual_seed(1)
        assert torch.equal(forward(other, images), want)
        # the copy's hook feeds the copy's slot, not the original's
        assert getattr(tower, slot)._images is None
        assert getattr(other_tower, slot).last_selection is not None
        # and its forward_intermediates guard is the copy's
        assert other_tower.__dict__["forward_intermediates"].tower is other_tower
        with pytest.raises(RuntimeError, match="forward_intermediates"):
            other_tower.forward_intermediates(images)
        remove_pgs(other)
        assert not isinstance(getattr(other_tower, slot), PGSDropoutSlot)
        assert isinstance(getattr(tower, slot), PGSDropoutSlot)


def test_calling_again_replaces_the_options_and_the_hook():
    if not HAVE_TIMM:
        pytest.skip("needs timm")
    model, tower, slot, norm, P, n, size = make("timm registers")
    use_pgs(model, mask_ratio=0.5)
    use_pgs(model, mask_ratio=0.25)
    assert getattr(model, slot).mask_ratio == 0.25
    assert len(model.patch_embed._forward_pre_hooks) == 1
    assert model.patch_embed.pgs_slot is model.patch_drop
    model.train()
    seen, _ = watch(tower, slot, norm)
    model(images_for(size))
    assert seen["out"].shape[1] == n + pgs_kernels.pgs_counts(16, 0.25, 0.05)[0]


@pytest.mark.parametrize("name", model_params(["open_clip patch 14", "timm registers", "timm Eva"]))
def test_remove_pgs_restores_the_model(name):
    model, tower, slot, norm, P, n, size = make(name)
    original = getattr(tower, slot)  # an Identity, or None for timm's Eva
    modules = [type(m) for m in model.modules()]
    use_pgs(model).train()
    remove_pgs(model)
    assert getattr(tower, slot) is original
    assert [type(m) for m in model.modules()] == modules
    assert "forward_intermediates" not in tower.__dict__
    embed = tower.conv1 if hasattr(tower, "conv1") else tower.patch_embed
    assert not embed._forward_pre_hooks
    seen = []
    getattr(tower, norm).register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    forward(model, images_for(size))
    assert seen == [n + (size[0] // P) * (size[1] // P)]


# --------------------------------------------------------------------------- a patch dropout the model was built with


def _oc_b32_patch_dropout():
    model = open_clip.create_model("ViT-B-32", force_patch_dropout=0.5)
    return model, model.visual, "patch_dropout", "ln_pre", 32, 1, (224, 224), r"open_clip\.transformer\.PatchDropout"


def _timm_patch_dropout():
    model = _timm_small(reg_tokens=2, patch_drop_rate=0.25)
    return model, model, "patch_drop", "norm_pre", 16, 3, (64, 64), r"timm\.layers\.patch_dropout\.PatchDropout\b"


def _eva_patch_dropout():
    model = _eva_small(patch_drop_rate=0.25)
    return (model, model, "patch_drop", "norm_pre", 16, 1, (64, 64),
            r"timm\.layers\.patch_dropout\.PatchDropoutWithIndices")


@pytest.mark.parametrize("build", [pytest.param(_oc_b32_patch_dropout, marks=needs_open_clip, id="open_clip"),
                                   pytest.param(_timm_patch_dropout, marks=needs_timm, id="timm"),
                                   pytest.param(_eva_patch_dropout, marks=needs_timm, id="timm Eva")])
def test_a_configured_patch_dropout_is_named_and_put_back(build):
    model, tower, slot, norm, P, n, size, cls = build()
    original = getattr(tower, slot)
    prob = original.prob
    with pytest.warns(UserWarning, match=rf"use_pgs replaces the patch dropout .*{cls}, prob={prob}.*remove_pgs"):
        use_pgs(model, mask_ratio=0.75)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        use_pgs(model, mask_ratio=0.5)  # again: it replaces its own slot, which says nothing
    model.eval()
    remove_pgs(model)
    assert getattr(tower, slot) is original
    assert not original.training  # it follows the mode the model is in now
    model.train()
    seen, _ = watch(tower, slot, norm)
    forward(model, images_for(size))
    L = (size[0] // P) * (size[1] // P)
    assert seen["out"].shape[1] == n + max(1, int(L * (1 - prob)))  # the library's dropout, as built


# --------------------------------------------------------------------------- forward_intermediates


def _intermediates(tower, images, fmt):
    if hasattr(tower, "conv1"):  # open_clip: a dict
        return tower.forward_intermediates(images, output_fmt=fmt, intermediates_only=True)["image_intermediates"]
    return tower.forward_intermediates(images, output_fmt=fmt, intermediates_only=True)


@pytest.mark.parametrize("name", model_params(["open_clip patch 14", "timm registers", "timm Eva"]))
def test_forward_intermediates_in_training_refuses_a_spatial_map(name):
    model, tower, slot, norm, P, n, size = make(name)
    plain, plain_tower, *_ = make(name)
    use_pgs(model, mask_ratio=0.5).train()
    images = images_for(size)
    with pytest.raises(RuntimeError, match=r"output_fmt='NCHW'.*training.*eval.*'NLC'.*remove_pgs"):
        _intermediates(tower, images, "NCHW")
    with pytest.raises(RuntimeError, match="output_fmt='NCHW'"):
        tower.forward_intermediates(images)  # the libraries' default is NCHW
    if hasattr(model, "encode_image"):  # through the CLIP model's own forward_intermediates too
        with pytest.raises(RuntimeError, match="output_fmt='NCHW'"):
            model.forward_intermediates(image=images)
    # NLC: the kept tokens, the prefix apart, as the library splits them
    L = (size[0] // P) * (size[1] // P)
    K = pgs_kernels.pgs_counts(L, 0.5, 0.05)[0]
    assert all(y.shape[:2] == (2, K) for y in _intermediates(tower, images, "NLC"))
    if not hasattr(tower, "conv1"):  # timm: the last one, normed, is forward_features' patch part
        torch.manual_seed(5)
        last = tower.forward_intermediates(images, indices=1, norm=True, output_fmt="NLC", intermediates_only=True)
        torch.manual_seed(5)
        torch.testing.assert_close(last[0], tower.forward_features(images)[:, n:], rtol=0, atol=0)
    # eval: the library's maps, bit for bit
    model.eval()
    plain.eval()
    with torch.no_grad():
        for got, want in zip(_intermediates(tower, images, "NCHW"), _intermediates(plain_tower, images, "NCHW")):
            assert torch.equal(got, want)


# --------------------------------------------------------------------------- DDP and DataParallel


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = use_pgs(_timm_small(reg_tokens=2), mask_ratio=0.5, token_weight=0.5)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    set_pgs_epoch(ddp, 1, 2)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)  # another batch and other noise on each rank
    ddp.train()
    for _ in range(2):
        loss = ddp(images_for((64, 64), B=3, seed=rank)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save(dict(params=flat, keep=model.patch_drop.last_selection.keep_idx,
                    token_weight=model.patch_drop.token_weight), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@needs_timm
def test_ddp_two_processes_gloo(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["params"], r1["params"])  # gradients were averaged: the replicas agree
    assert not torch.equal(r0["keep"], r1["keep"])  # each rank selected for its own images
    assert r0["token_weight"] == r1["token_weight"] == 0.5


def _replicate_on_cpu(model, copies, monkeypatch):
    """torch.nn.parallel.replicate, with its one CUDA step (broadcasting the
    tensors to each GPU) replaced by views on the CPU: the replicas are built
    as nn.DataParallel builds them."""
    replicate = importlib.import_module("torch.nn.parallel.replicate")
    monkeypatch.setattr(replicate, "_broadcast_coalesced_reshape", lambda tensors, devices, detach=False: [
        [t.detach() if detach else t.view_as(t) for t in tensors] for _ in devices])
    return replicate.replicate(model, list(range(copies)))


@pytest.mark.parametrize("name", model_params(["open_clip patch 14", "timm registers", "timm Eva"]))
def test_data_parallel_replicas_select_for_their_own_images(name, monkeypatch):
    """DataParallel's replicas share the patch embedding's hook object; each
    must hand its images to its own slot."""
    model, tower, slot, norm, P, n, size = make(name)
    use_pgs(model, mask_ratio=0.5).train()
    images = images_for(size, B=4)
    for replica, chunk in zip(_replicate_on_cpu(model, 2, monkeypatch), images.chunk(2)):
        replica_tower = replica.get_submodule(tower_path(name))
        assert getattr(replica_tower, slot) is not getattr(tower, slot)
        seen, handles = watch(replica_tower, slot, norm)
        forward(replica, chunk)
        for handle in handles:  # a replica shares its hook dicts with the model
            handle.remove()
        want, _ = expected_tokens(seen, chunk, P, n, mask_ratio=0.5)
        assert torch.equal(seen["out"], want)
    assert getattr(tower, slot)._images is None


@needs_cuda
@needs_timm
def test_data_parallel_on_cuda_each_replica_selects_for_its_chunk():
    """nn.DataParallel over every GPU here (with one GPU it does not
    replicate; the CPU test above covers the replicas): each replica's slot
    gets its own chunk of the batch and keeps what pgs_select keeps for it."""
    torch.manual_seed(0)
    model = use_pgs(_timm_small(reg_tokens=2), mask_ratio=0.5).cuda().train()
    ndev = torch.cuda.device_count()
    images = images_for((64, 64), B=2 * ndev).cuda()
    seen = {}  # by device: what each replica's slot was given and returned (replicas run in threads)

    def before(mod, args):
        dev = args[0].device
        seen[dev.index] = dict(x=args[0].detach().clone(), rng=torch.cuda.get_rng_state(dev),
                               images=None if mod._images is None else mod._images.detach().clone())

    def after(mod, args, out):
        seen[out.device.index]["out"] = out.detach().clone()

    handles = [model.patch_drop.register_forward_pre_hook(before), model.patch_drop.register_forward_hook(after)]
    out = torch.nn.DataParallel(model)(images)
    for handle in handles:
        handle.remove()
    out.square().mean().backward()
    assert sorted(seen) == list(range(ndev))
    for dev, chunk in enumerate(images.chunk(ndev)):
        rec = seen[dev]
        chunk = chunk.to(f"cuda:{dev}")
        assert rec["images"] is not None and torch.equal(rec["images"], chunk)
        saved = torch.cuda.get_rng_state(dev)
        torch.cuda.set_rng_state(rec["rng"], dev)
        sel = pgs_select(chunk, None, patch_size=16, mask_ratio=0.5)
        torch.cuda.set_rng_state(saved, dev)
        x = rec["x"]
        want = torch.cat([x[:, :3], torch.gather(x[:, 3:], 1, sel.keep_idx[..., None].expand(-1, -1, x.shape[-1]))], 1)
        assert torch.equal(rec["out"], want)


# --------------------------------------------------------------------------- the schedule, a timm trunk


@needs_open_clip
def test_set_pgs_epoch_follows_the_published_schedule():
    model, tower, slot, *_ = make("open_clip patch 14")
    use_pgs(model)
    set_pgs_epoch(model, 8, 32)
    assert getattr(tower, slot).token_weight == 0.25
    set_pgs_epoch(model, 40, 32)
    assert getattr(tower, slot).token_weight == 1.0
    with pytest.raises(ValueError, match="epochs"):
        set_pgs_epoch(model, 1, 0)
    with pytest.raises(ValueError, match="use_pgs"):
        set_pgs_epoch(torch.nn.Linear(2, 2), 1, 2)


@needs_open_clip
def test_open_clip_with_a_timm_trunk():
    if not HAVE_TIMM:
        pytest.skip("needs timm")
    model = open_clip.create_model("ViT-B-16-SigLIP")
    trunk = model.visual.trunk
    use_pgs(model, mask_ratio=0.5).train()
    assert isinstance(trunk.patch_drop, PGSDropoutSlot) and trunk.patch_drop.num_prefix_tokens == 0
    seen, _ = watch(trunk, "patch_drop", "norm_pre")
    images = images_for((224, 224), B=1)
    model.encode_image(images)
    want, _ = expected_tokens(seen, images, 16, 0, mask_ratio=0.5)
    assert torch.equal(seen["out"], want)
    # the tower alone, open_clip's TimmModel, is the same tower
    remove_pgs(model)
    assert not isinstance(trunk.patch_drop, PGSDropoutSlot)
    use_pgs(model.visual, mask_ratio=0.5)
    assert isinstance(trunk.patch_drop, PGSDropoutSlot) and trunk.patch_drop.num_prefix_tokens == 0


# --------------------------------------------------------------------------- what it cannot serve


@needs_open_clip
def test_open_clip_resnet_is_not_a_vit():
    with pytest.raises(TypeError, match=r"open_clip\.modified_resnet\.ModifiedResNet, not a ViT"):
        use_pgs(open_clip.create_model("RN50"))


@needs_timm
@pytest.mark.parametrize("arch,match", [
    ("vit_tiny_r_s16_p8_224", r"timm\.models\.vision_transformer\.VisionTransformer embeds its patches with "
                              r"timm\.layers\.hybrid_embed\.HybridEmbed.*hybrid"),
    ("resnet18", r"got timm\.models\.resnet\.ResNet, whose token code use_pgs does not know")])
def test_timm_models_it_does_not_know(arch, match):
    with pytest.raises(TypeError, match=match):
        use_pgs(timm.create_model(arch))


@needs_timm
@pytest.mark.parametrize("base,build", [("VisionTransformer", _timm_small), ("Eva", _eva_small),
                                        ("VisionTransformerDistilled", _deit_distilled_small)])
def test_a_subclass_with_its_own_token_code_is_refused(base, build):
    model = build()

    class Custom(type(model)):
        def _pos_embed(self, x):
            return super()._pos_embed(x)

    model.__class__ = Custom
    with pytest.raises(TypeError, match=rf"test_integrations\..*Custom overrides how timm's {base} builds its "
                                        r"token sequence.*token code"):
        use_pgs(model)


@needs_open_clip
def test_torchvision_vit_names_its_library():
    import torchvision

    model = torchvision.models.vision_transformer.VisionTransformer(image_size=32, patch_size=16, num_layers=1,
                                                                     num_heads=2, hidden_dim=32, mlp_dim=64)
    with pytest.raises(TypeError, match=r"got torchvision\.models\.vision_transformer\.VisionTransformer, whose "
                                        r"token code use_pgs does not know"):
        use_pgs(model)


@pytest.mark.parametrize("build", [pytest.param(lambda: _timm_small(), marks=needs_timm, id="timm"),
                                   pytest.param(lambda: _eva_small(), marks=needs_timm, id="timm Eva"),
                                   pytest.param(lambda: _oc_small().visual, marks=needs_open_clip, id="open_clip")])
def test_overlapping_patches_are_refused(build):
    model = build()
    if hasattr(model, "conv1"):
        model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=16, stride=8, bias=False)
    else:
        model.patch_embed.proj = torch.nn.Conv2d(3, 64, kernel_size=16, stride=8)
    with pytest.raises(TypeError, match=r"(conv1|patch_embed\.proj) has kernel \(16, 16\), stride \(8, 8\).*"
                                        "overlapping"):
        use_pgs(model)


@needs_timm
def test_images_that_do_not_fit_the_grid_name_images():
    model = use_pgs(_timm_small(dynamic_img_size=True, dynamic_img_pad=True)).train()
    with pytest.raises(ValueError, match=r"images: H=70, W=64 is not divisible by patch_size=16"):
        model(torch.randn(2, 3, 70, 64))
    model.eval()
    model(torch.randn(2, 3, 70, 64))  # eval: the model as it was


@needs_timm
@pytest.mark.parametrize("kwargs,exc,match", [(dict(mask_ratio=1.0), ValueError, "mask_ratio"),
                                              (dict(patch_size=16), TypeError, "patch_size"),
                                              (dict(ot_reg=0.0), ValueError, "ot_reg"),
                                              (dict(backend="gpu"), ValueError, "backend")])
def test_bad_options_are_named(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        use_pgs(_timm_small(), **kwargs)


@needs_timm
def test_wrappers_and_non_models_are_refused():
    with pytest.raises(TypeError, match="before wrapping"):
        use_pgs(torch.compile(_timm_small()))
    with pytest.raises(TypeError, match="before wrapping"):
        use_pgs(torch.nn.DataParallel(_timm_small()))
    with pytest.raises(TypeError, match=r"got torch\.nn\.modules\.linear\.Linear"):
        use_pgs(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match=r"got builtins\.str"):
        use_pgs("ViT-B-16")


@needs_timm
def test_a_foreign_layer_in_the_slot_is_refused():
    model = _timm_small()
    model.patch_drop = torch.nn.Dropout(0.1)
    with pytest.raises(TypeError, match=r"patch_drop is torch\.nn\.modules\.dropout\.Dropout"):
        use_pgs(model)


@needs_timm
def test_slot_without_images_says_why():
    model = use_pgs(_timm_small()).train()
    with pytest.raises(RuntimeError, match="no images reached"):
        model.patch_drop(torch.randn(2, 17, 64))


# --------------------------------------------------------------------------- the README's examples


@pytest.mark.skipif(not (HAVE_OPEN_CLIP and HAVE_TIMM), reason="needs open_clip and timm")
def test_readme_examples_run_as_pasted():
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    examples = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "use_pgs(" in b]
    assert len(examples) == 3  # open_clip (the quick start), timm, Hugging Face
    # No network here: the Hugging Face example's checkpoint becomes its architecture, without weights.
    hub = 'transformers.CLIPModel.from_pretrained("openai/clip-vit-base-patch16")'
    offline = "transformers.CLIPModel(transformers.CLIPConfig(vision_config=dict(patch_size=16)))"
    assert sum(hub in e for e in examples) == 1
    examples = [e.replace(hub, offline) for e in examples]
    for example in examples:
        if "transformers" in example and isinstance(_import("transformers"), Exception):
            continue
        scope = {}
        exec(compile(example, "README.md", "exec"), scope)
        layers = [m for m in scope["model"].modules() if isinstance(m, pgs_kernels.PGSPatchDropout)]
        assert len(layers) == 1 and layers[0].mask_ratio == 0.5
