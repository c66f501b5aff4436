"""What each masking method keeps: object patches of synthetic scenes and
edge energy of synthetic scenes and real photos.

Methods, all at the same mask ratio and on the same noise:

* ``random``     FLIP random masking (``python_ref.random_masking``);
* ``published``  the published CLIP-PGS algorithm (``python_ref.published_pgs``),
                 whose keep count depends on the batch: its actual keep
                 fraction is reported next to its scores;
* ``cluster``    E-CLIP-style cluster masking, ``pgs_select(edge_weight=0, use_ot=False)``;
* ``pgs_no_ot``  PGS without optimal transport (``use_ot=False``);
* ``pgs``        PGS with the contract's defaults.

Metrics, per image, then mean and std over images x seeds:

* ``object_kept``: kept object patches / object patches (synthetic only; an
  object patch has >= 50 % object pixels, ``object_patches``);
* ``edge_kept``: sum of kept ``e_j`` / sum of all ``e_j``, ``e_j`` the mean
  Sobel magnitude of the normalized image over patch ``j`` (the contract's
  ``e_j`` before min-max);
* ``keep_frac``: kept patches / L.

Scenes are ``pgs_kernels.samples.make_scene(seed)`` for seeds ``0..N-1``;
photos are scikit-image's, centre-cropped to a square and resized to 224²
(:func:`load_photo`).

Run ``python -m bench.retention`` (``--quick`` for a smoke run). Writes
``bench/out/retention.json`` (``bench/results/`` with ``--refresh``;
overwritten) unless ``--out`` is given,
and beside it ``retention.png`` (photos) and ``retention-scenes.png``
(synthetic scenes), each with every method's dropped patches in grey
(``--plot-only`` redraws them from the JSON at ``--out``, running nothing
else).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import LoadRecord, argument_parser, environment, out_help, result_path, write_result
from bench.plot import image_grid
from pgs_kernels import samples

METHODS = ("random", "published", "cluster", "pgs_no_ot", "pgs")
RATIOS = (0.3, 0.5, 0.75)


# ----------------------------------------------------------------------------- inputs

def load_photo(name: str, size: int = 224):
    """The standardized ``(3, H, W)`` float32 photo and its ``(H, W, 3)`` numpy
    display image in [0, 1]."""
    rgb = samples.photo(name, size)
    return samples.standardize(rgb), rgb.permute(1, 2, 0).numpy()


def load_photos(names: Sequence[str] = samples.PHOTO_NAMES, size: int = 224):
    """``(N, 3, H, W)`` standardized photos and their display images."""
    pairs = [load_photo(n, size) for n in names]
    return torch.stack([p[0] for p in pairs]), [p[1] for p in pairs]


def make_scenes(seeds: Sequence[int], size: int = 224):
    """A batch of scenes: images (B, 3, H, W), masks (B, H, W), backgrounds, displays."""
    scenes = [samples.make_scene(int(s), size) for s in seeds]
    return (
        torch.stack([s["image"] for s in scenes]),
        torch.stack([s["mask"] for s in scenes]),
        [s["background"] for s in scenes],
        [s["display"] for s in scenes],
    )


def object_patches(masks: torch.Tensor, patch_size: int, min_fraction: float = 0.5) -> torch.Tensor:
    """(B, H, W) pixel masks -> (B, L) bool: patch holds >= ``min_fraction``
    object pixels; patches in row-major order."""
    B, H, W = masks.shape
    P = patch_size
    frac = masks.float().reshape(B, H // P, P, W // P, P).mean(dim=(2, 4))
    return (frac >= min_fraction).reshape(B, -1)


def patch_edge_energy(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``e_j``: mean Sobel magnitude (replicated border) of the channel mean
    over each patch, fp64, (B, L). Written independently of the kernels so
    that the metric does not share a bug with what it measures."""
    B, C, H, W = images.shape
    P = patch_size
    Y = images.double().mean(dim=1, keepdim=True)
    sx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    k = torch.stack([sx, sx.t()])[:, None]
    g = F.conv2d(F.pad(Y, (1, 1, 1, 1), mode="replicate"), k)
    G = g.pow(2).sum(dim=1).sqrt()
    return G.reshape(B, H // P, P, W // P, P).mean(dim=(2, 4)).reshape(B, -1)


def kept_share(dropped: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per row, sum of ``weight`` over kept patches / sum over all (NaN where
    the total is 0)."""
    w = weight.double()
    total = w.sum(dim=1)
    kept = (w * (~dropped).double()).sum(dim=1)
    return torch.where(total > 0, kept / total, torch.full_like(total, math.nan))


def object_kept(dropped: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
    """Per row, kept object patches / object patches (NaN without objects)."""
    return kept_share(dropped, objects.double())


def make_methods(edge_weight: float, sim_threshold: float, candidate_ratio: float,
                 ot_reg: float, patch_size: int) -> Dict[str, Callable]:
    """name -> f(images, noise, mask_ratio, generator) -> dropped mask (B, L)."""
    import pgs_kernels
    from python_ref import published_pgs, random_masking

    common = dict(patch_size=patch_size, candidate_ratio=candidate_ratio, sim_threshold=sim_threshold,
                  backend="auto")

    def pgs(**kw):
        return lambda x, u, r, g: pgs_kernels.pgs_select(x, noise=u, mask_ratio=r, **common, **kw).mask

    return {
        "random": lambda x, u, r, g: random_masking(x, noise=u, patch_size=patch_size, mask_ratio=r).mask,
        "published": lambda x, u, r, g: published_pgs(
            x, noise=u, generator=g, patch_size=patch_size, mask_ratio=r, candidate_ratio=candidate_ratio,
            sim_threshold=sim_threshold).mask,
        "cluster": pgs(edge_weight=0.0, use_ot=False),
        "pgs_no_ot": pgs(edge_weight=edge_weight, use_ot=False),
        "pgs": pgs(edge_weight=edge_weight, use_ot=True, ot_reg=ot_reg),
    }


def _summary(values: List[torch.Tensor]) -> Dict:
    v = torch.cat(values).double()
    v = v[~torch.isnan(v)]
    if v.numel() == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0, "n": int(v.numel())}


def evaluate(batches, methods: Dict[str, Callable], ratios: Sequence[float], patch_size: int,
             with_objects: bool) -> Dict:
    """``batches``: iterable of (images, objects or None, seed, tags). Returns
    {ratio: {method: {metric: summary}}} plus per-tag object_kept means."""
    acc: Dict = {}
    for images, objects, seed, tags in batches:
        energy = patch_edge_energy(images, patch_size)
        B, L = energy.shape
        for r in ratios:
            # Same noise for every method: the comparison is paired.
            gen = torch.Generator().manual_seed(10_000 * seed + int(round(1000 * r)))
            noise = torch.rand((B, L), generator=gen)
            for name, f in methods.items():
                dropped = f(images, noise, r, gen).cpu()
                a = acc.setdefault(r, {}).setdefault(name, {"edge_kept": [], "keep_frac": [], "object_kept": [],
                                                            "by_tag": {}})
                a["edge_kept"].append(kept_share(dropped, energy))
                a["keep_frac"].append((~dropped).double().mean(dim=1))
                if with_objects:
                    ok = object_kept(dropped, objects)
                    a["object_kept"].append(ok)
                    for t, v in zip(tags, ok.tolist()):
                        a["by_tag"].setdefault(t, []).append(v)
    out: Dict = {}
    for r, per in acc.items():
        out[str(r)] = {}
        for name, a in per.items():
            row = {"edge_kept": _summary(a["edge_kept"]), "keep_frac": _summary(a["keep_frac"])}
            if with_objects:
                row["object_kept"] = _summary(a["object_kept"])
                row["object_kept_by_background"] = {
                    t: float(np.nanmean(v)) for t, v in sorted(a["by_tag"].items())}
            out[str(r)][name] = row
    return out


def synthetic_batches(n_scenes: int, batch: int, patch_size: int):
    for start in range(0, n_scenes, batch):
        seeds = list(range(start, min(n_scenes, start + batch)))
        images, masks, bgs, _ = make_scenes(seeds)
        yield images, object_patches(masks, patch_size), start, bgs


def photo_batches(images: torch.Tensor, names: Sequence[str], n_seeds: int):
    for s in range(n_seeds):
        yield images, None, s, list(names)


def _fmt(s: Dict) -> str:
    return "   n/a      " if s["mean"] is None else f"{s['mean']:.3f}±{s['std']:.3f}"


def print_table(title: str, res: Dict, metrics: Sequence[str]) -> None:
    print(f"\n{title}")
    head = f"{'ratio':>5} {'method':<10} " + " ".join(f"{m:>12}" for m in metrics) + "   vs random"
    print(head)
    print("-" * len(head))
    for r, per in res.items():
        base = per["random"][metrics[0]]["mean"]
        for name in METHODS:
            row = per[name]
            rel = row[metrics[0]]["mean"] / base if base else float("nan")
            print(f"{float(r):>5.2f} {name:<10} " + " ".join(f"{_fmt(row[m]):>12}" for m in metrics)
                  + f"   {rel:6.2f}x")


FIGURE_METHODS = ("random", "published", "pgs")
FIGURE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def figure_selections(methods: Dict[str, Callable], photos: torch.Tensor, batch: int, ratio: float,
                      patch_size: int) -> Dict:
    """The dropped patches the figures show: four photos and one scene of
    each background kind at ``ratio``, from noise seed 0; photos are selected
    as one batch of all photos and scenes as one batch of ``batch`` scenes,
    as in the study."""
    P = patch_size
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand((photos.shape[0], photos.shape[2] * photos.shape[3] // P ** 2), generator=gen)
    drops = {m: methods[m](photos, noise, ratio, gen) for m in FIGURE_METHODS}
    picks = [samples.PHOTO_NAMES.index(n) for n in FIGURE_PHOTOS]
    doc = {"patch_size": P, "mask_ratio": ratio, "methods": list(FIGURE_METHODS),
           "photos": {"names": list(FIGURE_PHOTOS), "size": photos.shape[-1],
                      "dropped": {m: [torch.nonzero(d[i]).flatten().tolist() for i in picks]
                                  for m, d in drops.items()}}}
    images, masks, bgs, _ = make_scenes(range(batch))
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand((images.shape[0], images.shape[2] * images.shape[3] // P ** 2), generator=gen)
    drops = {m: methods[m](images, noise, ratio, gen) for m in FIGURE_METHODS}
    picks = [bgs.index(b) for b in samples.BACKGROUNDS if b in bgs]
    doc["scenes"] = {"seeds": picks, "size": images.shape[-1],
                     "dropped": {m: [torch.nonzero(d[i]).flatten().tolist() for i in picks]
                                 for m, d in drops.items()}}
    return doc


GREY_NOTE = "grey = dropped patch"


def _kept_title(method: str, dropped: Sequence[int], L: int) -> str:
    return f"{method} ({L - len(dropped)}/{L} kept)"


def _dropped_mask(idx: Sequence[int], L: int) -> np.ndarray:
    m = np.zeros(L, dtype=bool)
    m[list(idx)] = True
    return m


def plot_figures(doc: Dict, stem: str) -> List[str]:
    """Renders the photos and scenes of ``doc["figures"]`` with each method's
    dropped patches in grey and has ``bench.plot`` draw them:
    ``<stem>.png`` (photos) and ``<stem>-scenes.png``; returns the PNGs."""
    figs = doc.get("figures")
    if not figs:
        return []
    P, ratio, methods = figs["patch_size"], figs["mask_ratio"], figs["methods"]
    out = []
    ph = figs.get("photos")
    if ph:
        rows, titles = [], None
        for i, name in enumerate(ph["names"]):
            _, disp = load_photo(name, ph["size"])
            L = (disp.shape[0] // P) * (disp.shape[1] // P)
            drops = {m: ph["dropped"][m][i] for m in methods}
            rows.append([disp] + [samples.grey_dropped(disp, _dropped_mask(drops[m], L), P) for m in methods])
            if titles is None:
                titles = ["photo (centre crop)"] + [_kept_title(m, drops[m], L) for m in methods]
        out.append(image_grid(stem + ".png", rows, titles, ph["names"],
                              f"{GREY_NOTE} (mask ratio {ratio}, {P}x{P} patches, same noise for every method)"))
    sc = figs.get("scenes")
    if sc:
        rows, titles, labels = [], None, []
        for i, seed in enumerate(sc["seeds"]):
            s = samples.make_scene(seed, sc["size"])
            disp = s["display"]
            L = (disp.shape[0] // P) * (disp.shape[1] // P)
            objects = object_patches(s["mask"][None], P)[0].numpy()
            drops = {m: sc["dropped"][m][i] for m in methods}
            rows.append([disp, samples.grey_dropped(disp, ~objects, P)]
                        + [samples.grey_dropped(disp, _dropped_mask(drops[m], L), P) for m in methods])
            labels.append(f"{s['background']} (seed {seed})")
            if titles is None:
                titles = ["scene", "object patches"] + [_kept_title(m, drops[m], L) for m in methods]
        out.append(image_grid(stem + "-scenes.png", rows, titles, labels,
                              f"{GREY_NOTE} (mask ratio {ratio}, {P}x{P} patches); "
                              "column 2: grey = not an object patch (< half object pixels)"))
    return out


def main(argv=None) -> int:
    ap = argument_parser(__doc__)
    ap.add_argument("--scenes", type=int, default=256, help="synthetic scenes (seeds 0..N-1)")
    ap.add_argument("--batch", type=int, default=32, help="batch size per call (sets published's keep count)")
    ap.add_argument("--photo-seeds", type=int, default=16, help="noise seeds per photo")
    ap.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    ap.add_argument("--edge-weight", type=float, default=1.0, help="w_e of pgs / pgs_no_ot")
    ap.add_argument("--sim-threshold", type=float, default=0.5, help="theta of every PGS-like method")
    ap.add_argument("--candidate-ratio", type=float, default=0.05)
    ap.add_argument("--ot-reg", type=float, default=0.05)
    ap.add_argument("--quick", action="store_true", help="64 scenes, 4 photo seeds")
    ap.add_argument("--out", default=result_path("retention.json"), help=out_help("retention.json"))
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--plot-only", action="store_true", help="redraw the figures of the JSON at --out; run nothing")
    args = ap.parse_args(argv)
    if args.plot_only:
        with open(args.out) as f:
            pngs = plot_figures(json.load(f), os.path.splitext(args.out)[0])
        for png in pngs:
            print(f"wrote {png}")
        return 0 if pngs else 1
    if args.quick:
        args.scenes, args.photo_seeds = 64, 4
    P = 16
    warnings.filterwarnings("ignore", message="pgs_kernels: the native CPU kernel is not built")
    import pgs_kernels

    env = environment("cpu", "retention")
    load = LoadRecord()
    t0 = time.perf_counter()
    methods = make_methods(args.edge_weight, args.sim_threshold, args.candidate_ratio, args.ot_reg, P)
    synth = evaluate(synthetic_batches(args.scenes, args.batch, P), methods, args.ratios, P, True)
    t_synth = time.perf_counter() - t0
    photos, _ = load_photos(samples.PHOTO_NAMES)
    real = evaluate(photo_batches(photos, samples.PHOTO_NAMES, args.photo_seeds), methods, args.ratios, P, False)
    elapsed = time.perf_counter() - t0

    backend = pgs_kernels.resolve_backend("auto", "cpu").name
    print(f"pgs backend (auto on cpu): {backend};  w_e={args.edge_weight} theta={args.sim_threshold} "
          f"candidate_ratio={args.candidate_ratio} eps={args.ot_reg}")
    print_table(f"Synthetic scenes: {args.scenes} scenes, batches of {args.batch}, 224^2, P=16 "
                "(mean±std over scenes)", synth, ("object_kept", "edge_kept", "keep_frac"))
    print_table(f"Photos: {len(samples.PHOTO_NAMES)} photos x {args.photo_seeds} seeds, one batch of "
                f"{len(samples.PHOTO_NAMES)} (mean±std over photo x seed)", real, ("edge_kept", "keep_frac"))

    targets = {}
    if "0.5" in synth:
        s, p = synth["0.5"], real["0.5"]
        targets = {
            "pgs_over_random_object_kept@0.5": s["pgs"]["object_kept"]["mean"] / s["random"]["object_kept"]["mean"],
            "target_object_ratio": 1.3,
            "pgs_edge_kept_photos@0.5": p["pgs"]["edge_kept"]["mean"],
            "published_edge_kept_photos@0.5": p["published"]["edge_kept"]["mean"],
        }
        targets["object_target_met"] = targets["pgs_over_random_object_kept@0.5"] >= 1.3
        targets["edge_target_met"] = targets["pgs_edge_kept_photos@0.5"] > targets["published_edge_kept_photos@0.5"]
        print(f"\nTargets @0.5: PGS/random object patches kept = "
              f"{targets['pgs_over_random_object_kept@0.5']:.2f}x (target >= 1.3x: "
              f"{'met' if targets['object_target_met'] else 'MISSED'}); photo edge energy kept PGS "
              f"{targets['pgs_edge_kept_photos@0.5']:.3f} vs published "
              f"{targets['published_edge_kept_photos@0.5']:.3f} "
              f"({'met' if targets['edge_target_met'] else 'MISSED'})")
    print(f"\nwall time {elapsed:.1f} s (synthetic {t_synth:.1f} s)")

    doc = {
        **env,
        "load": load.finish(),
        "pgs_backend": backend,
        "params": {"patch_size": P, "edge_weight": args.edge_weight, "sim_threshold": args.sim_threshold,
                   "candidate_ratio": args.candidate_ratio, "ot_reg": args.ot_reg, "ot_iters": 20,
                   "object_patch_min_fraction": 0.5},
        "synthetic": {"scenes": args.scenes, "batch": args.batch, "size": 224, "results": synth},
        "photos": {"names": list(samples.PHOTO_NAMES), "seeds": args.photo_seeds,
                   "batch": len(samples.PHOTO_NAMES), "size": 224, "crop": "centre square", "results": real},
        "targets": targets,
        "wall_s": elapsed,
    }
    if not args.no_plot:
        doc["figures"] = figure_selections(methods, photos, args.batch, 0.5, P)
    write_result(args.out, doc)
    if not args.no_plot:
        for png in plot_figures(doc, os.path.splitext(args.out)[0]):
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
