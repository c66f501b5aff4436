"""use_pgs on open_clip and timm ViTs: what reaches the transformer in
training, eval unchanged bit for bit, gradients, torch.compile, checkpoints,
copies, DDP, and a clear error for anything it cannot serve.

open_clip and timm import only beside a CUDA build of torch (torchvision's
wheel needs one), so these tests run in the second CI environment
(requirements-cuda.txt, on the CPU) and skip elsewhere; with
``PGS_TEST_INTEGRATIONS=1`` (set there) a missing library is a failure.
"""

import copy
import io
import os
import pickle

import pytest
import torch

import pgs_kernels
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


if os.environ.get("PGS_TEST_INTEGRATIONS") == "1":
    # The CI environment of the users' stack: the adapter tests must run there, not skip.
    assert HAVE_OPEN_CLIP and HAVE_TIMM, f"PGS_TEST_INTEGRATIONS=1 but open_clip: {open_clip!r}, timm: {timm!r}"
elif not (HAVE_OPEN_CLIP or HAVE_TIMM):
    pytest.skip(f"neither open_clip ({open_clip!r}) nor timm ({timm!r}) imports here; requirements-cuda.txt "
                "has both", allow_module_level=True)


# --------------------------------------------------------------------------- models
# Each factory: (model, tower, slot attribute, norm after the slot, patch size, prefix tokens, image size).


def _oc_small(patch=16, size=64):
    vision = dict(image_size=size, patch_size=patch, width=64, layers=2, head_width=32, mlp_ratio=2.0)
    text = dict(context_length=16, vocab_size=100, width=64, heads=2, layers=1)
    return open_clip.model.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text)


def _oc(model):
    return model, model.visual, "patch_dropout", "ln_pre"


def _timm_small(**kw):
    args = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=0)
    args.update(kw)
    return timm.models.vision_transformer.VisionTransformer(**args)


def _timm(model):
    return model, model, "patch_drop", "norm_pre"


FACTORIES = {
    "open_clip ViT-B-16": (needs_open_clip, lambda: _oc(open_clip.create_model("ViT-B-16")) + (16, 1, (224, 224))),
    "open_clip ViT-B-32": (needs_open_clip, lambda: _oc(open_clip.create_model("ViT-B-32")) + (32, 1, (224, 224))),
    "open_clip patch 14": (needs_open_clip, lambda: _oc(_oc_small(14, 56)) + (14, 1, (56, 56))),
    "open_clip tower alone": (needs_open_clip,
                              lambda: (lambda m: (m.visual, m.visual, "patch_dropout", "ln_pre"))(_oc_small())
                              + (16, 1, (64, 64))),
    "timm vit_base_patch16_224": (needs_timm,
                                  lambda: _timm(timm.create_model("vit_base_patch16_224")) + (16, 1, (224, 224))),
    "timm registers": (needs_timm, lambda: _timm(_timm_small(reg_tokens=4)) + (16, 5, (64, 64))),
    "timm no class token": (needs_timm,
                            lambda: _timm(_timm_small(class_token=False, global_pool="avg")) + (16, 0, (64, 64))),
    "timm patch 14": (needs_timm, lambda: _timm(_timm_small(img_size=56, patch_size=14)) + (14, 1, (56, 56))),
    "timm dynamic_img_size 64x96": (needs_timm,
                                    lambda: _timm(_timm_small(dynamic_img_size=True)) + (16, 1, (64, 96))),
}
_PRISTINE = {}


def make(name):
    """A fresh copy of the named model (built once per session: the ViT-Bs take a second)."""
    mark, factory = FACTORIES[name]
    if name not in _PRISTINE:
        torch.manual_seed(0)
        _PRISTINE[name] = factory()
    model, tower, slot, norm, P, n, size = _PRISTINE[name]
    fresh = copy.deepcopy(model)
    tower = fresh if tower is model else fresh.visual
    return fresh, tower, slot, norm, P, n, size


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
    x = seen["x"]
    saved = torch.get_rng_state()
    torch.set_rng_state(seen["rng"])
    tw = options.get("token_weight", 0.0)
    sel = pgs_select(images, x[:, n:] if tw > 0 else None, patch_size=P, **options)
    torch.set_rng_state(saved)
    idx = sel.keep_idx[..., None].expand(-1, -1, x.shape[-1])
    return torch.cat([x[:, :n], torch.gather(x[:, n:], 1, idx)], 1), sel


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


@pytest.mark.parametrize("name", model_params(["open_clip patch 14", "timm registers", "timm dynamic_img_size 64x96"]))
def test_gradients_reach_the_patch_embedding(name):
    model, tower, *_, size = make(name)
    use_pgs(model, mask_ratio=0.5).train()
    forward(model, images_for(size)).float().square().mean().backward()
    embed = tower.conv1 if hasattr(tower, "conv1") else tower.patch_embed.proj
    g = embed.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("name", model_params(["open_clip patch 14", "timm registers"]))
def test_compiled_training_step_matches_eager(name):
    model, tower, slot, norm, P, n, size = make(name)
    use_pgs(model, mask_ratio=0.5, token_weight=0.5).train()
    images = images_for(size)
    torch.manual_seed(3)
    eager = forward(model, images)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    out = compiled.encode_image(images) if hasattr(model, "encode_image") else compiled(images)
    torch.testing.assert_close(out, eager)
    out.square().mean().backward()
    # a second batch of another size, as at an epoch's short last batch
    out2 = compiled.encode_image(images[:1]) if hasattr(model, "encode_image") else compiled(images[:1])
    assert out2.shape[0] == 1
    set_pgs_epoch(compiled, 4, 8)
    assert getattr(tower, slot).token_weight == 0.5


@pytest.mark.parametrize("name", model_params(["open_clip ViT-B-16", "timm registers"]))
def test_state_dict_keys_unchanged_and_checkpoints_load_both_ways(name):
    model, *_ = make(name)
    plain, *_ = make(name)
    keys = list(plain.state_dict())
    use_pgs(model)
    set_pgs_epoch(model, 3, 10)
    assert list(model.state_dict()) == keys
    plain.load_state_dict(model.state_dict())  # strict
    model.load_state_dict(plain.state_dict())


@pytest.mark.parametrize("name", model_params(["open_clip patch 14", "timm registers"]))
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
        other_tower = other if tower is model else other.visual
        assert isinstance(getattr(other_tower, slot), PGSDropoutSlot)
        torch.manual_seed(1)
        assert torch.equal(forward(other, images), want)
        # the copy's hook feeds the copy's slot, not the original's
        assert getattr(tower, slot)._images is None
        assert getattr(other_tower, slot).last_selection is not None


def test_calling_again_replaces_the_options_and_the_hook():
    if not HAVE_TIMM:
        pytest.skip("needs timm")
    model, tower, slot, norm, P, n, size = make("timm registers")
    use_pgs(model, mask_ratio=0.5)
    use_pgs(model, mask_ratio=0.25)
    assert getattr(model, slot).mask_ratio == 0.25
    assert len(model.patch_embed._forward_pre_hooks) == 1
    model.train()
    seen, _ = watch(tower, slot, norm)
    model(images_for(size))
    assert seen["out"].shape[1] == n + pgs_kernels.pgs_counts(16, 0.25, 0.05)[0]


@pytest.mark.parametrize("name", model_params(["open_clip patch 14", "timm registers"]))
def test_remove_pgs_restores_the_model(name):
    model, tower, slot, norm, P, n, size = make(name)
    use_pgs(model).train()
    remove_pgs(model)
    assert type(getattr(tower, slot)) is torch.nn.Identity
    embed = tower.conv1 if hasattr(tower, "conv1") else tower.patch_embed
    assert not embed._forward_pre_hooks
    seen, _ = watch(tower, slot, norm)
    forward(model, images_for(size))
    assert seen["out"].shape[1] == n + (size[0] // P) * (size[1] // P)


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


# --------------------------------------------------------------------------- what it cannot serve


@needs_open_clip
def test_open_clip_resnet_is_not_a_vit():
    with pytest.raises(TypeError, match="not a ViT"):
        use_pgs(open_clip.create_model("RN50"))


@needs_timm
@pytest.mark.parametrize("arch,match", [("deit_tiny_distilled_patch16_224", "variant"),
                                        ("vit_tiny_r_s16_p8_224", "patch_embed"),
                                        ("resnet18", "must be")])
def test_timm_models_it_does_not_know(arch, match):
    with pytest.raises(TypeError, match=match):
        use_pgs(timm.create_model(arch))


@needs_timm
def test_overlapping_patches_are_rejected():
    model = _timm_small()
    model.patch_embed.proj = torch.nn.Conv2d(3, 64, kernel_size=16, stride=8)
    with pytest.raises(ValueError, match="non-overlapping"):
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
    with pytest.raises(TypeError, match="must be"):
        use_pgs(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="must be"):
        use_pgs("ViT-B-16")


@needs_timm
def test_slot_without_images_says_why():
    model = use_pgs(_timm_small()).train()
    with pytest.raises(RuntimeError, match="no images reached"):
        model.patch_drop(torch.randn(2, 17, 64))


# --------------------------------------------------------------------------- DDP


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


# --------------------------------------------------------------------------- the README's examples


@pytest.mark.skipif(not (HAVE_OPEN_CLIP and HAVE_TIMM), reason="needs open_clip and timm")
def test_readme_examples_run_as_pasted():
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    examples = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "use_pgs(" in b]
    assert len(examples) == 2
    for example in examples:
        scope = {}
        exec(compile(example, "README.md", "exec"), scope)
        slots = [m for m in scope["model"].modules() if isinstance(m, PGSDropoutSlot)]
        assert len(slots) == 1 and slots[0].mask_ratio == 0.5
