"""Sample inputs for the demo, the tests and the benchmarks.

* Photos: scikit-image's sample photos, centre-cropped to the requested
  aspect ratio and resized by area (:func:`photo`, :func:`load_photo`).
* Normalization: :func:`standardize` (per image and channel, mean 0 and
  std 1) and :func:`clip_normalize` (OpenAI CLIP's fixed channel mean/std).
* Scenes with ground truth (:func:`make_scene`): textured objects on smooth,
  gradient or textured backgrounds, with the exact object mask, for
  measuring what a masking method keeps.
* Captioned scenes (:class:`CaptionedScenes`): coloured shapes in a 3x3
  layout with a caption naming each one's colour, shape and place, for
  training a small CLIP.
* :func:`grey_dropped`: a display image with the dropped patches greyed out,
  for figures.

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
    "load_photo",
    "load_photos",
    "standardize",
    "clip_normalize",
    "make_scene",
    "make_scenes",
    "object_patches",
    "CaptionedScenes",
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


def load_photo(name: str, size: Size = 224):
    """The standardized ``(3, H, W)`` float32 photo and its ``(H, W, 3)`` numpy
    display image in [0, 1]."""
    rgb = photo(name, size)
    return standardize(rgb), rgb.permute(1, 2, 0).numpy()


def load_photos(names: Sequence[str] = PHOTO_NAMES, size: Size = 224):
    """``(N, 3, H, W)`` standardized photos and their display images."""
    pairs = [load_photo(n, size) for n in names]
    return torch.stack([p[0] for p in pairs]), [p[1] for p in pairs]


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


def make_scenes(seeds: Sequence[int], size: int = 224):
    """A batch of scenes: images (B, 3, H, W), masks (B, H, W), backgrounds, displays."""
    scenes = [make_scene(int(s), size) for s in seeds]
    return (
        torch.stack([s["image"] for s in scenes]),
        torch.stack([s["mask"] for s in scenes]),
        [s["background"] for s in scenes],
        [s["display"] for s in scenes],
    )


def object_patches(masks: Tensor, patch_size: int, min_fraction: float = 0.5) -> Tensor:
    """(B, H, W) pixel masks -> (B, L) bool: patch holds >= ``min_fraction``
    object pixels; patches in row-major order."""
    B, H, W = masks.shape
    P = patch_size
    frac = masks.float().reshape(B, H // P, P, W // P, P).mean(dim=(2, 4))
    return (frac >= min_fraction).reshape(B, -1)


# ----------------------------------------------------------------------------- captioned scenes

COLORS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.9, 0.1),
    "purple": (0.6, 0.2, 0.8),
    "white": (0.95, 0.95, 0.95),
    "orange": (1.0, 0.55, 0.05),
    "cyan": (0.1, 0.85, 0.9),
}
SHAPES = ("circle", "square", "triangle", "cross")
# 3x3 layout cells, row-major, and how a caption names them
PLACES = ("at the top left", "at the top", "at the top right",
          "on the left", "in the center", "on the right",
          "at the bottom left", "at the bottom", "at the bottom right")


def object_phrase(color: str, shape: str, place: str | None = None) -> str:
    """``"a red circle"``, ``"an orange square on the left"``."""
    text = f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"
    return text if place is None else f"{text} {place}"


class CaptionedScenes:
    """Deterministic captioned scenes; sample ``i`` depends only on ``(seed, i)``.

    1 to ``max_shapes`` shapes (circle, square, triangle, cross) of distinct
    colours, each in its own cell of a 3x3 layout, on a dark, slightly noisy
    background; captioned e.g. "a red circle on the left and a blue square at
    the bottom" (objects read top-left to bottom-right). The background says
    nothing about the caption: only the objects do.
    """

    def __init__(self, image_size: int = 64, seed: int = 0, max_shapes: int = 3):
        if not 1 <= max_shapes <= len(PLACES):
            raise ValueError(f"max_shapes must be in [1, {len(PLACES)}], got {max_shapes}")
        self.image_size, self.seed, self.max_shapes = image_size, seed, max_shapes

    def describe(self, index: int):
        """The scene of sample ``index``: a list of (color, shape, cell, jitter, scale), and its caption."""
        import numpy as np

        rng = np.random.default_rng([self.seed, index])
        n = int(rng.integers(1, self.max_shapes + 1))
        cells = rng.choice(len(PLACES), size=n, replace=False)
        colors = rng.choice(len(COLORS), size=n, replace=False)
        objs = []
        for c, cell in zip(colors, cells):
            objs.append((list(COLORS)[c], SHAPES[int(rng.integers(len(SHAPES)))], int(cell),
                         rng.uniform(-0.04, 0.04, size=2), float(rng.uniform(0.10, 0.15))))
        objs.sort(key=lambda o: o[2])
        parts = [object_phrase(col, shp, PLACES[cell]) for col, shp, cell, _, _ in objs]
        caption = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return objs, caption

    def render(self, indices: Sequence[int], device: torch.device | str = "cpu") -> Tuple[Tensor, List[str]]:
        """Pixels in [0, 1], (B, 3, S, S) on ``device``, and captions. Shapes are
        drawn as masks on a shared coordinate grid, one slot per shape."""
        S, B = self.image_size, len(indices)
        scenes = [self.describe(int(i)) for i in indices]
        n = self.max_shapes
        # per (sample, slot): centre, half-size, colour, shape id; absent slots get size 0
        cx = torch.zeros(B, n); cy = torch.zeros(B, n); hs = torch.zeros(B, n)
        rgb = torch.zeros(B, n, 3); kind = torch.full((B, n), -1)
        for b, (objs, _) in enumerate(scenes):
            for s, (col, shp, cell, jit, scale) in enumerate(objs):
                cy[b, s] = (cell // 3 + 0.5) / 3 + jit[0]
                cx[b, s] = (cell % 3 + 0.5) / 3 + jit[1]
                hs[b, s] = scale
                rgb[b, s] = torch.tensor(COLORS[col])
                kind[b, s] = SHAPES.index(shp)
        cx, cy, hs, rgb, kind = (t.to(device) for t in (cx, cy, hs, rgb, kind))
        coords = (torch.arange(S, device=device, dtype=torch.float32) + 0.5) / S
        yy, xx = coords.view(1, 1, S, 1), coords.view(1, 1, 1, S)
        dx, dy = xx - cx[..., None, None], yy - cy[..., None, None]  # (B, n, S, S)
        h = hs[..., None, None]
        k = kind[..., None, None]
        circle = dx * dx + dy * dy <= h * h
        square = (dx.abs() <= 0.85 * h) & (dy.abs() <= 0.85 * h)
        # apex up: the half-width grows linearly from the top edge to the base
        triangle = (dy >= -h) & (dy <= h) & (dx.abs() <= (dy + h) * 0.5)
        cross = ((dx.abs() <= 0.3 * h) & (dy.abs() <= h)) | ((dy.abs() <= 0.3 * h) & (dx.abs() <= h))
        inside = ((k == 0) & circle) | ((k == 1) & square) | ((k == 2) & triangle) | ((k == 3) & cross)
        # background noise per sample (seeded by its index), coarse so that it stays cheap at 224²
        c = max(1, S // 4)
        g = torch.Generator(device="cpu")
        noise = torch.stack([torch.rand(3, c, c, generator=g.manual_seed(int(self.seed) * 1000003 + int(i)))
                             for i in indices]) if B else torch.zeros(0, 3, c, c)
        img = 0.12 + 0.04 * F.interpolate(noise.to(device), size=(S, S), mode="nearest")
        for s in range(n):  # later slots paint over earlier ones; cells are distinct so overlap is rare
            m = inside[:, s, None]
            img = torch.where(m, rgb[:, s, :, None, None], img)
        return img, [c for _, c in scenes]


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
