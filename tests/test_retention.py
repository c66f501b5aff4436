"""The retention study's scenes and metrics (pgs_kernels/samples.py, bench/retention.py)."""

import math

import numpy as np
import pytest
import torch

from bench import retention
from bench.retention import kept_share, object_kept, patch_edge_energy
from pgs_kernels import samples
from python_ref import edge_energy


def test_scene_is_a_function_of_its_seed():
    a, b, c = samples.make_scene(3), samples.make_scene(3), samples.make_scene(4)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(a["image"], c["image"])


def test_scene_shapes_and_normalization():
    s = samples.make_scene(0)
    assert s["image"].shape == (3, 224, 224) and s["image"].dtype == torch.float32
    assert s["mask"].shape == (224, 224) and s["mask"].dtype == torch.bool
    assert s["background"] in samples.BACKGROUNDS
    m = s["image"].mean(dim=(1, 2))
    sd = s["image"].std(dim=(1, 2))
    assert torch.allclose(m, torch.zeros(3), atol=1e-4) and torch.allclose(sd, torch.ones(3), atol=1e-3)


def test_every_background_kind():
    for kind in samples.BACKGROUNDS:
        s = samples.make_scene(1, background=kind)
        assert s["background"] == kind and s["mask"].any()


def test_mask_marks_the_textured_objects():
    # Objects are filled with high-frequency texture on a background that is
    # flat at pixel scale: local pixel differences must be far larger inside.
    for seed in range(6):
        s = samples.make_scene(seed)
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
    obj = retention.object_patches(masks, 16)
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


def test_scenes_are_those_of_the_published_figures():
    # Fingerprints of the scenes behind bench/results/retention*.json: the
    # study's figures and tables are reproducible from their seeds.
    expect = {0: ("textured", 5227, 88170.654), 1: ("gradient", 3536, 118809.446), 2: ("textured", 6606, 90053.782)}
    for seed, (kind, n_obj, abs_sum) in expect.items():
        s = samples.make_scene(seed)
        assert s["background"] == kind and int(s["mask"].sum()) == n_obj
        assert float(s["image"].double().abs().sum()) == pytest.approx(abs_sum, rel=1e-5)


def test_photo_is_centre_cropped_not_squashed():
    # coffee is 400 x 600: the square crop keeps its middle 400 columns.
    from skimage import data

    full = np.asarray(data.coffee(), dtype=np.float32) / 255.0
    sq = samples.photo("coffee", 100)
    assert sq.shape == (3, 100, 100) and 0.0 <= float(sq.min()) and float(sq.max()) <= 1.0
    mid = torch.from_numpy(full[:, 100:500]).permute(2, 0, 1)[None]
    expect = torch.nn.functional.interpolate(mid, size=(100, 100), mode="area")[0]
    torch.testing.assert_close(sq, expect, rtol=0, atol=1e-6)
    wide = samples.photo("astronaut", (32, 64))  # 512 x 512: rows 128..384 kept
    assert wide.shape == (3, 32, 64)
    img, disp = retention.load_photo("camera", 64)  # a grey photo gets three equal channels
    assert img.shape == (3, 64, 64) and disp.shape == (64, 64, 3)
    assert torch.equal(img[0], img[1]) and torch.allclose(img.mean(dim=(1, 2)), torch.zeros(3), atol=1e-5)


def test_normalizations():
    x = torch.rand(2, 3, 8, 8)
    z = samples.standardize(x)
    assert torch.allclose(z.mean(dim=(2, 3)), torch.zeros(2, 3), atol=1e-5)
    assert torch.allclose(z.std(dim=(2, 3)), torch.ones(2, 3), atol=1e-4)
    c = samples.clip_normalize(torch.ones(1, 3, 2, 2))
    expect = [(1 - m) / s for m, s in zip(samples.CLIP_MEAN, samples.CLIP_STD)]
    assert torch.allclose(c[0, :, 0, 0], torch.tensor(expect))


def test_grey_dropped_marks_only_dropped_patches():
    disp = np.zeros((32, 32, 3))
    out = samples.grey_dropped(disp, np.array([False, True, False, False]), 16)
    assert (out[:16, 16:] > 0).all() and (out[:16, :16] == 0).all() and (out[16:] == 0).all()
    assert (disp == 0).all()  # the input is not modified
