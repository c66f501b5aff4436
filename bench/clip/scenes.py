"""Captioned scenes for training the small CLIP of bench/clip: coloured
shapes in a 3x3 layout with a caption naming each one's colour, shape and
place (:class:`CaptionedScenes`)."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

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
