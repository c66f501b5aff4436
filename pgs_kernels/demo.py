"""Demo: PGS masking on real photos and synthetic scenes.

    python -m pgs_kernels.demo [--out demo_out] [--mask-ratio 0.5] [--seed 0]

Runs ``pgs_select`` on scikit-image's sample photos (centre-cropped to a
square, then resized to 224²) and on a few synthetic scenes (textured objects
on smooth, gradient or textured backgrounds; ``pgs_kernels.samples``), prints
per-image selection statistics (edge energy kept by PGS and by random
masking, candidates, redundant patches) and the time per call of every
backend available here, and writes ``<out>/pgs_demo.png``: each image beside
its random mask and its PGS mask, dropped patches in grey. Needs the
``demo`` extra (scikit-image, matplotlib).
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import time

import torch

import python_ref
from pgs_kernels import available_backends, pgs_select, samples

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")

#: What the ``demo`` extra installs: distribution -> the module the demo imports from it
#: (skimage.io: the photos load through it, and it pulls in scipy).
DEMO_EXTRA = {"numpy": "numpy", "matplotlib": "matplotlib.pyplot", "scikit-image": "skimage.io"}


def missing_demo_modules():
    """The modules the demo needs that do not import here, by the name that
    failed (a dependency of the one asked for, where that is what is missing),
    with the distribution's name where it is one of the extra's."""
    dists = {module.split(".")[0]: dist for dist, module in DEMO_EXTRA.items()}
    missing = []
    for module in DEMO_EXTRA.values():
        try:
            importlib.import_module(module)
        except ImportError as exc:
            top = (exc.name or module).split(".")[0]
            missing.append(dists.get(top, top))
    return list(dict.fromkeys(missing))


def require_demo_extra():
    """Ends the demo with a message naming the extra, not a traceback from
    deep inside, when a module it draws with is missing."""
    missing = missing_demo_modules()
    if missing:
        raise SystemExit(
            f"pgs_kernels.demo: the demo needs the [demo] extra ({', '.join(DEMO_EXTRA)}); "
            f"missing here: {', '.join(missing)}. Install it with: pip install 'pgs-kernels[demo]' "
            f"(or: pip install {' '.join(missing)})"
        )


def load_photos(size: int = 224):
    """The demo's photos: ``(N, 3, size, size)`` standardized tensors, their
    RGB in [0, 1] ``(N, 3, size, size)`` for display, and their names."""
    rgb = torch.stack([samples.photo(name, size) for name in PHOTOS])
    return samples.standardize(rgb), rgb, list(PHOTOS)


def synthetic_scenes(n: int, size: int = 224, seed: int = 0):
    """``n`` scenes of ``samples.make_scene`` (seeds ``seed .. seed + n - 1``),
    standardized, with their display RGB and names."""
    scenes = [samples.make_scene(seed + i, size) for i in range(n)]
    rgb = torch.stack([torch.from_numpy(s["display"]).permute(2, 0, 1).float() for s in scenes])
    names = [f"scene {seed + i} ({s['background']})" for i, s in enumerate(scenes)]
    return torch.stack([s["image"] for s in scenes]), rgb, names


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


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (OSError, AttributeError):  # not on every platform
        return "unknown"


def edge_kept(mask: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """Fraction of each image's patch edge energy that the kept patches hold."""
    return ((~mask) * energy).sum(1) / energy.sum(1).clamp_min(1e-12)


def render(rgb, masks_random, masks_pgs, names, patch_size, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(names)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n + 0.4))
    axes = np.atleast_2d(axes)
    for i, name in enumerate(names):
        img = rgb[i].permute(1, 2, 0).numpy()
        for col, (title, shown) in enumerate(
            (("image", img),
             ("random masking", samples.grey_dropped(img, masks_random[i].numpy(), patch_size)),
             ("PGS", samples.grey_dropped(img, masks_pgs[i].numpy(), patch_size)))
        ):
            ax = axes[i, col]
            ax.imshow(np.clip(shown, 0, 1))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title)
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
    kept = int((~masks_pgs[0]).sum())
    fig.text(0.5, 0.005, f"grey = dropped patch ({kept} of {masks_pgs.shape[1]} patches kept, "
             f"{patch_size}x{patch_size} px; same noise for both methods)", ha="center", va="bottom", fontsize=9)
    fig.tight_layout(rect=(0, 0.4 / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="demo_out", help="folder for pgs_demo.png")
    ap.add_argument("--mask-ratio", type=float, default=0.5)
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--synthetic", type=int, default=3, help="number of synthetic scenes")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a busy machine a second thread makes timings swing)")
    args = ap.parse_args(argv)
    require_demo_extra()
    torch.set_num_threads(args.threads)

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
    print(f"{'image':<20}{'edge kept PGS':>14}{'edge kept rnd':>14}{'redundant':>11}")
    for i, name in enumerate(names):
        print(f"{name:<20}{kept_pgs[i]:>14.3f}{kept_rnd[i]:>14.3f}{int(redundant[i]):>11d}")
    print(f"{'mean':<20}{kept_pgs.mean():>14.3f}{kept_rnd.mean():>14.3f}")

    load = _load()
    print(f"\ntime per call, batch {B} (median of 5, {device}, {torch.get_num_threads()} CPU thread(s); "
          f"load average {load} of {os.cpu_count()} CPUs before):")
    for backend in available_backends(device):
        ms = time_call(lambda: pgs_select(images, noise=noise, patch_size=P, mask_ratio=args.mask_ratio,
                                          backend=backend))
        print(f"  pgs_select backend={backend:<10} {ms:9.3f} ms")
    ms = time_call(lambda: python_ref.published_pgs(images, noise=noise, patch_size=P, mask_ratio=args.mask_ratio))
    print(f"  {'published_pgs (baseline)':<29} {ms:9.3f} ms")
    ms = time_call(lambda: python_ref.random_masking(images, noise=noise, patch_size=P, mask_ratio=args.mask_ratio))
    print(f"  {'random_masking (floor)':<29} {ms:9.3f} ms")
    print(f"  load average {_load()} after: where it exceeds the CPUs the threads need, other processes "
          "shared them and these times are too long")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "pgs_demo.png")
    render(rgb, rnd.mask.cpu(), pgs.mask.cpu(), names, P, path)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
