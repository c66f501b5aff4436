"""Demo: PGS masking on real photos and synthetic scenes.

    python -m pgs_kernels.demo [--out demo_out] [--mask-ratio 0.5] [--seed 0]

Runs ``pgs_select`` on scikit-image's sample photos and on a few synthetic
scenes (a textured object on a smooth background), prints per-image selection
statistics (edge energy kept by PGS and by random masking, candidates,
redundant patches) and the time per call of every backend available here,
and writes ``<out>/pgs_demo.png``: each image beside its random mask and its
PGS mask (dropped patches greyed out). Needs the ``demo`` extra
(scikit-image, matplotlib).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

import python_ref
from pgs_kernels import available_backends, pgs_select

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def _normalize(t: torch.Tensor) -> torch.Tensor:
    return (t - t.mean(dim=(1, 2), keepdim=True)) / (t.std(dim=(1, 2), keepdim=True) + 1e-6)


def load_photos(size: int = 224):
    """scikit-image sample photos as ``(N, 3, size, size)`` normalized tensors,
    plus the unnormalized RGB in [0, 1] for display."""
    from skimage import data

    rgb = []
    for name in PHOTOS:
        img = np.asarray(getattr(data, name)(), dtype=np.float32) / 255.0
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        t = torch.from_numpy(img[..., :3]).permute(2, 0, 1)[None]
        rgb.append(torch.nn.functional.interpolate(t, size=(size, size), mode="area")[0])
    rgb = torch.stack(rgb)
    return torch.stack([_normalize(t) for t in rgb]), rgb, list(PHOTOS)


def synthetic_scenes(n: int, size: int = 224, seed: int = 0):
    """Textured disks (the object) on smooth gradients (the background)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    rgb = []
    for _ in range(n):
        base = torch.rand(3, 1, 1, generator=g)
        img = base * (0.6 + 0.4 * yy) + 0.1 * xx
        cy, cx = (0.3 + 0.4 * torch.rand(2, generator=g)).tolist()
        radius = 0.12 + 0.15 * torch.rand(1, generator=g).item()
        inside = ((yy - cy) ** 2 + (xx - cx) ** 2) < radius**2
        texture = torch.rand(3, size, size, generator=g)
        img = torch.where(inside, texture, img).clamp(0, 1)
        rgb.append(img)
    rgb = torch.stack(rgb)
    return torch.stack([_normalize(t) for t in rgb]), rgb, [f"synthetic-{i}" for i in range(n)]


def time_call(fn, repeats: int = 5) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def edge_kept(mask: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """Fraction of each image's patch edge energy that the kept patches hold."""
    return ((~mask) * energy).sum(1) / energy.sum(1).clamp_min(1e-12)


def render(rgb, masks_random, masks_pgs, names, patch_size, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n))
    axes = np.atleast_2d(axes)
    H, W = rgb.shape[-2:]
    gw = W // patch_size

    def masked(img, mask):
        out = img.permute(1, 2, 0).numpy().copy()
        for j in torch.nonzero(mask).flatten().tolist():
            r, c = divmod(j, gw)
            sl = (slice(r * patch_size, (r + 1) * patch_size), slice(c * patch_size, (c + 1) * patch_size))
            out[sl] = 0.5 * out[sl] + 0.5 * 0.55  # grey out, keep a trace of the content
        return out

    for i, name in enumerate(names):
        for col, (title, img) in enumerate(
            (("image", rgb[i].permute(1, 2, 0).numpy()),
             ("random", masked(rgb[i], masks_random[i])),
             ("PGS", masked(rgb[i], masks_pgs[i])))
        ):
            ax = axes[i, col]
            ax.imshow(np.clip(img, 0, 1))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title)
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="demo_out", help="folder for pgs_demo.png")
    ap.add_argument("--mask-ratio", type=float, default=0.5)
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--synthetic", type=int, default=3, help="number of synthetic scenes")
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    photos, photos_rgb, photo_names = load_photos()
    synth, synth_rgb, synth_names = synthetic_scenes(args.synthetic, seed=args.seed)
    images = torch.cat([photos, synth]).to(device)
    rgb = torch.cat([photos_rgb, synth_rgb])
    names = photo_names + synth_names
    B, P = images.shape[0], args.patch_size
    L = (images.shape[2] // P) * (images.shape[3] // P)

    gen = torch.Generator(device=device).manual_seed(args.seed)
    noise = torch.rand(B, L, generator=gen, device=device)
    pgs = pgs_select(images, noise=noise, patch_size=P, mask_ratio=args.mask_ratio, return_scores=True)
    rnd = python_ref.random_masking(images, noise=noise, patch_size=P, mask_ratio=args.mask_ratio)
    energy = python_ref.patch_sobel_energy(images.cpu(), P)
    kept_pgs = edge_kept(pgs.mask.cpu(), energy)
    kept_rnd = edge_kept(rnd.mask.cpu(), energy)
    redundant = (pgs.redundancy.cpu() > 0.5).sum(1)

    print(f"PGS selection on {B} images {tuple(images.shape[1:])}, patch {P}, L={L}, "
          f"mask_ratio={args.mask_ratio}: keep {pgs.keep_idx.shape[1]}, "
          f"{pgs.candidates.shape[1]} candidates, device {device}")
    print(f"{'image':<14}{'edge kept PGS':>14}{'edge kept rnd':>14}{'redundant':>11}")
    for i, name in enumerate(names):
        print(f"{name:<14}{kept_pgs[i]:>14.3f}{kept_rnd[i]:>14.3f}{int(redundant[i]):>11d}")
    print(f"{'mean':<14}{kept_pgs.mean():>14.3f}{kept_rnd.mean():>14.3f}")

    print(f"\ntime per call, batch {B} (median of 5, {device}):")
    for backend in available_backends(device):
        ms = time_call(lambda: pgs_select(images, noise=noise, patch_size=P, mask_ratio=args.mask_ratio,
                                          backend=backend))
        print(f"  pgs_select backend={backend:<10} {ms:9.3f} ms")
    ms = time_call(lambda: python_ref.published_pgs(images, noise=noise, patch_size=P, mask_ratio=args.mask_ratio))
    print(f"  {'published_pgs (baseline)':<29} {ms:9.3f} ms")
    ms = time_call(lambda: python_ref.random_masking(images, noise=noise, patch_size=P, mask_ratio=args.mask_ratio))
    print(f"  {'random_masking (floor)':<29} {ms:9.3f} ms")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "pgs_demo.png")
    render(rgb, rnd.mask.cpu(), pgs.mask.cpu(), names, P, path)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
