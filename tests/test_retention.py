"""The retention study's scenes and metrics (bench/scenes.py, bench/retention.py)."""

import math

import numpy as np
import torch

from bench import scenes
from bench.retention import kept_share, object_kept, patch_edge_energy
from python_ref import edge_energy


def test_scene_is_a_function_of_its_seed():
    a, b, c = scenes.make_scene(3), scenes.make_scene(3), scenes.make_scene(4)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(a["image"], c["image"])


def test_scene_shapes_and_normalization():
    s = scenes.make_scene(0)
    assert s["image"].shape == (3, 224, 224) and s["image"].dtype == torch.float32
    assert s["mask"].shape == (224, 224) and s["mask"].dtype == torch.bool
    assert s["background"] in scenes.BACKGROUNDS
    m = s["image"].mean(dim=(1, 2))
    sd = s["image"].std(dim=(1, 2))
    assert torch.allclose(m, torch.zeros(3), atol=1e-4) and torch.allclose(sd, torch.ones(3), atol=1e-3)


def test_every_background_kind():
    for kind in scenes.BACKGROUNDS:
        s = scenes.make_scene(1, background=kind)
        assert s["background"] == kind and s["mask"].any()


def test_mask_marks_the_textured_objects():
    # Objects are filled with high-frequency texture on a background that is
    # flat at pixel scale: local pixel differences must be far larger inside.
    for seed in range(6):
        s = scenes.make_scene(seed)
        d = np.asarray(s["display"]).mean(axis=2)
        grad = np.abs(np.diff(d, axis=1))[:-1, :] + np.abs(np.diff(d, axis=0))[:, :-1]
        m = s["mask"].numpy()
        inside = m[:-1, :-1] & m[1:, :-1] & m[:-1, 1:]
        outside = ~m[:-1, :-1] & ~m[1:, :-1] & ~m[:-1, 1:]
        # Erode by a pixel so that object borders count for neither side.
        assert grad[inside].mean() > 3 * grad[outside].mean(), seed


def test_object_patches_threshold():
    masks = torch.zeros(1, 32, 32, dtype=torch.bool)
    masks[0, :16, :8] = True  # patch 0 half covered -> object patch
    masks[0, 16:, 16:20] = True  # patch 3 a quarter covered -> not
    obj = scenes.object_patches(masks, 16)
    assert obj.tolist() == [[True, False, False, False]]


def test_patch_edge_energy_matches_spec_after_min_max():
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    e = patch_edge_energy(x, 16)
    lo, hi = e.amin(1, keepdim=True), e.amax(1, keepdim=True)
    assert torch.allclose((e - lo) / (hi - lo + 1e-6), edge_energy(x, 16), atol=1e-10)
    assert torch.equal(patch_edge_energy(torch.ones(1, 3, 32, 32), 16), torch.zeros(1, 4, dtype=torch.float64))


def test_kept_share_and_object_kept():
    dropped = torch.tensor([[True, False, False, True], [False, False, False, False]])
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    s = kept_share(dropped, w)
    assert s[0].item() == 0.5 and math.isnan(s[1].item())
    obj = torch.tensor([[True, True, False, False], [False, True, True, False]])
    assert object_kept(dropped, obj).tolist() == [0.5, 1.0]
