"""Sample inputs for the demo (and the tests and benchmarks that use the same ones).

* Photos: scikit-image's sample photos, centre-cropped to the requested
  aspect ratio and resized by area (:func:`photo`).
* Normalization: :func:`standardize` (per image and channel, mean 0 and
  std 1) and :func:`clip_normalize` (OpenAI CLIP's fixed channel mean/std).
* Scenes with ground truth (:func:`make_scene`): textured objects on smooth,
  gradient or textured backgrounds, with the exact object mask.
* :func:`grey_dropped`: a display image with the dropped patches greyed out,
  for figures.

The captioned scenes that bench/clip trains on live in ``bench/clip/scenes.py``.

numpy and scikit-image are imported inside the functions that need them, so
``import pgs_kernels`` stays light.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PHOTO_NAMES",
    "BACKGROUNDS",
    "CLIP_MEAN",
    "CLIP_STD",
    "photo",
    "standardize",
    "clip_normalize",
    "make_scene",
    "grey_dropped",
]

# Photos with a subject on a background; the texture samples (brick, grass,
# gravel) and documents are left out because "what matters" is ill-defined there.
PHOTO_NAMES = (
    "astronaut", "coffee", "chelsea", "rocket", "camera",
    "coins", "clock", "moon", "retina", "hubble_deep_field",
)
BACKGROUNDS = ("smooth", "gradient", "textured")

# OpenAI CLIP's pixel normalization
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Size = Union[int, Tuple[int, int]]


# ----------------------------------------------------------------------------- normalization

def standardize(img: Tensor) -> Tensor:
    """Per image and channel: ``(x - mean) / (std + 1e-6)`` over ``(H, W)`` of
    a ``(..., C, H, W)`` tensor (the statistics a CLIP input roughly has)."""
    return (img - img.mean(dim=(-2, -1), keepdim=True)) / (img.std(dim=(-2, -1), keepdim=True) + 1e-6)


def clip_normalize(images: Tensor) -> Tensor:
    """``(B, 3, H, W)`` pixels in [0, 1] -> ``(x - CLIP_MEAN) / CLIP_STD`` per channel."""
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


# ----------------------------------------------------------------------------- photos

def photo(name: str, size: Size = 224) -> Tensor:
    """scikit-image's sample photo ``name`` as ``(3, H, W)`` float32 in [0, 1]:
    centre-cropped to the aspect ratio of ``size`` (an int for a square, or
    ``(H, W)``), then resized by area. Grey photos get three equal channels."""
    import numpy as np
    from skimage import data

    H, W = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    img = np.asarray(getattr(data, name)(), dtype=np.float32)
    if img.max() > 1.0:
        img = img / 255.0
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    h, w = img.shape[:2]
    # the largest centred window of aspect W / H
    ch, cw = (h, round(h * W / H)) if w * H >= h * W else (round(w * H / W), w)
    top, left = (h - ch) // 2, (w - cw) // 2
    img = img[top:top + ch, left:left + cw, :3]
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]
    return F.interpolate(t, size=(H, W), mode="area")[0].clamp(0, 1)


# ----------------------------------------------------------------------------- scenes with ground truth

def _blur(a, sigma: float):
    """Separable Gaussian blur of a 2-D array (reflect border), via torch so
    that scenes need no scipy."""
    import numpy as np

    r = max(1, int(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))[None, None]
    t = F.pad(t, (r, r, r, r), mode="reflect")
    t = F.conv2d(t, k.reshape(1, 1, -1, 1))
    t = F.conv2d(t, k.reshape(1, 1, 1, -1))
    return t[0, 0].numpy()


def _background(rng, kind: str, size: int):
    import numpy as np

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


def _texture(rng, size: int):
    """A high-frequency texture in [0, 1], (size, size)."""
    import numpy as np

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


def _shape_mask(rng, size: int):
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    # Sizes span small (about one patch) to large (several patches) objects.
    half = rng.uniform(8, 48, size=2)
    cy, cx = rng.uniform(half.max(), size - half.max(), size=2)
    if rng.random() < 0.5:
        return ((yy - cy) / half[0]) ** 2 + ((xx - cx) / half[1]) ** 2 <= 1.0
    return (np.abs(yy - cy) <= half[0]) & (np.abs(xx - cx) <= half[1])


def make_scene(seed: int, size: int = 224, background: str | None = None) -> Dict:
    """One synthetic scene, a pure function of ``seed``: 1 to 4 objects
    (ellipses and rectangles, 16 to 96 px across) filled with a
    high-frequency texture (gratings, checkerboards or fine noise, random
    colours) on one of :data:`BACKGROUNDS`:

    * ``smooth``   a flat colour with a very low-frequency wash;
    * ``gradient`` a linear colour ramp in a random direction;
    * ``textured`` low-contrast, coarse (blurred) noise: texture, but at a
      scale and contrast the objects do not share.

    Mild pixel noise (a camera's) is added, then the image is standardized.
    Returns a dict with ``image`` (3, size, size) float32 standardized,
    ``display`` (size, size, 3) float in [0, 1] (for figures), ``mask``
    (size, size) bool (object pixels, exact) and ``background`` (its kind).
    """
    import numpy as np

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
        "image": standardize(t),
        "display": img.transpose(1, 2, 0),
        "mask": torch.from_numpy(mask),
        "background": kind,
    }


# ----------------------------------------------------------------------------- figures

def grey_dropped(display, dropped, patch_size: int, strength: float = 0.85, grey: float = 0.5):
    """A copy of the ``(H, W, 3)`` display image with each dropped patch
    (``dropped``: (L,) bool, row-major) blended towards ``grey`` by
    ``strength``, so that what a method keeps stands out."""
    import numpy as np

    img = np.array(display, dtype=np.float64, copy=True)
    P = patch_size
    gw = img.shape[1] // P
    for j in np.flatnonzero(np.asarray(dropped)):
        y, x = (j // gw) * P, (j % gw) * P
        img[y:y + P, x:x + P] = (1 - strength) * img[y:y + P, x:x + P] + strength * grey
    return img
