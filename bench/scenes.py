"""Test images for the retention study: synthetic scenes with ground truth,
and scikit-image's sample photos.

Synthetic scene (``make_scene(seed)``): 1 to 4 objects (ellipses and
rectangles, 16 to 96 px across) filled with a high-frequency texture
(gratings, checkerboards or fine noise, random colours) on one of three
backgrounds:

* ``smooth``   a flat colour with a very low-frequency wash;
* ``gradient`` a linear colour ramp in a random direction;
* ``textured`` low-contrast, coarse (blurred) noise: texture, but at a
  scale and contrast the objects do not share.

Every scene gets mild pixel noise (a camera's), then is normalized per
channel to mean 0, std 1 like a CLIP input. The object mask is exact at
pixel level; an *object patch* is a patch with at least half of its pixels
inside an object (``object_patches``).
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "BACKGROUNDS",
    "PHOTO_NAMES",
    "make_scene",
    "make_scenes",
    "object_patches",
    "normalize",
    "load_photo",
    "load_photos",
]

BACKGROUNDS = ("smooth", "gradient", "textured")

# Photos with a subject on a background; the texture samples (brick, grass,
# gravel) and documents are left out because "what matters" is ill-defined there.
PHOTO_NAMES = (
    "astronaut", "coffee", "chelsea", "rocket", "camera",
    "coins", "clock", "moon", "retina", "hubble_deep_field",
)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array (reflect border), via torch so
    that scenes need no scipy (absent on the GPU machine)."""
    r = max(1, int(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))[None, None]
    t = torch.nn.functional.pad(t, (r, r, r, r), mode="reflect")
    t = torch.nn.functional.conv2d(t, k.reshape(1, 1, -1, 1))
    t = torch.nn.functional.conv2d(t, k.reshape(1, 1, 1, -1))
    return t[0, 0].numpy()


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    base = rng.uniform(0.2, 0.8, size=3)
    if kind == "smooth":
        # A wash with a period longer than the image: nearly flat at patch scale.
        phase = rng.uniform(0, 2 * math.pi)
        wash = 0.05 * np.sin(2 * math.pi * 0.5 * (xx + yy) + phase)
        img = base[:, None, None] + wash[None]
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        ramp = np.cos(theta) * xx + np.sin(theta) * yy
        ramp = ramp - ramp.mean()
        amp = rng.uniform(0.3, 0.6, size=3) * rng.choice([-1, 1], size=3)
        img = base[:, None, None] + amp[:, None, None] * ramp[None]
    elif kind == "textured":
        n = _blur(rng.standard_normal((size, size)), sigma=6.0)
        n = n / (n.std() + 1e-12)
        img = base[:, None, None] + 0.06 * n[None] * rng.uniform(0.7, 1.3, size=3)[:, None, None]
    else:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {kind!r}")
    return img


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A high-frequency texture in [0, 1], (size, size)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    kind = rng.integers(3)
    if kind == 0:  # grating, period 3 to 7 px
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(3, 7)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (np.cos(theta) * xx + np.sin(theta) * yy) / period)
    elif kind == 1:  # checkerboard, cells of 2 to 5 px
        c = int(rng.integers(2, 6))
        t = ((yy // c + xx // c) % 2).astype(np.float64)
    else:  # fine noise, a little blurred so it is not pure pixel noise
        t = _blur(rng.standard_normal((size, size)), sigma=0.8)
        t = np.clip(0.5 + 0.5 * t / (t.std() + 1e-12), 0, 1)
    return t


def _shape_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    # Sizes span small (about one patch) to large (several patches) objects.
    half = rng.uniform(8, 48, size=2)
    cy, cx = rng.uniform(half.max(), size - half.max(), size=2)
    if rng.random() < 0.5:
        return ((yy - cy) / half[0]) ** 2 + ((xx - cx) / half[1]) ** 2 <= 1.0
    return (np.abs(yy - cy) <= half[0]) & (np.abs(xx - cx) <= half[1])


def normalize(img: torch.Tensor) -> torch.Tensor:
    """Per-channel mean 0 / std 1 of a (3, H, W) image, like a CLIP input."""
    return (img - img.mean(dim=(1, 2), keepdim=True)) / (img.std(dim=(1, 2), keepdim=True) + 1e-6)


def make_scene(seed: int, size: int = 224, background: str | None = None) -> Dict:
    """One synthetic scene, a pure function of ``seed``.

    Returns a dict with ``image`` (3, size, size) float32 normalized,
    ``display`` (size, size, 3) float in [0, 1] (for figures), ``mask``
    (size, size) bool (object pixels) and ``background`` (its kind).
    """
    rng = np.random.default_rng(seed)
    kind = background if background is not None else BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    img = _background(rng, kind, size)
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, 5))):
        m = _shape_mask(rng, size)
        tex = _texture(rng, size)
        lo, hi = rng.uniform(0.0, 0.3, size=3), rng.uniform(0.7, 1.0, size=3)
        fill = lo[:, None, None] + (hi - lo)[:, None, None] * tex[None]
        img = np.where(m[None], fill, img)
        mask |= m
    img = img + 0.01 * rng.standard_normal(img.shape)
    img = np.clip(img, 0.0, 1.0)
    t = torch.from_numpy(img.astype(np.float32))
    return {
        "image": normalize(t),
        "display": img.transpose(1, 2, 0),
        "mask": torch.from_numpy(mask),
        "background": kind,
    }


def make_scenes(seeds: Sequence[int], size: int = 224) -> Tuple[torch.Tensor, torch.Tensor, List[str], List[np.ndarray]]:
    """A batch of scenes: images (B, 3, H, W), masks (B, H, W), backgrounds, displays."""
    scenes = [make_scene(int(s), size) for s in seeds]
    return (
        torch.stack([s["image"] for s in scenes]),
        torch.stack([s["mask"] for s in scenes]),
        [s["background"] for s in scenes],
        [s["display"] for s in scenes],
    )


def object_patches(masks: torch.Tensor, patch_size: int, min_fraction: float = 0.5) -> torch.Tensor:
    """(B, H, W) pixel masks -> (B, L) bool: patch holds >= ``min_fraction``
    object pixels; patches in the SPEC's row-major order."""
    B, H, W = masks.shape
    P = patch_size
    frac = masks.float().reshape(B, H // P, P, W // P, P).mean(dim=(2, 4))
    return (frac >= min_fraction).reshape(B, -1)


def load_photo(name: str, size: int = 224) -> Tuple[torch.Tensor, np.ndarray]:
    """A scikit-image sample photo resized (by area) to size x size: the
    normalized (3, H, W) float32 tensor and the (H, W, 3) display image."""
    from skimage import data

    img = np.asarray(getattr(data, name)(), dtype=np.float32)
    if img.max() > 1.0:
        img = img / 255.0
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    t = torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1)[None]
    t = torch.nn.functional.interpolate(t, size=(size, size), mode="area")[0]
    return normalize(t), t.permute(1, 2, 0).clamp(0, 1).numpy()


def load_photos(names: Sequence[str] = PHOTO_NAMES, size: int = 224) -> Tuple[torch.Tensor, List[np.ndarray]]:
    pairs = [load_photo(n, size) for n in names]
    return torch.stack([p[0] for p in pairs]), [p[1] for p in pairs]
