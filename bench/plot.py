"""Every figure of the benchmarks, drawn from their result JSON.

    python -m bench.plot                          # every bench/results/*.json it knows
    python -m bench.plot bench/results/micro-cpu.json

Each PNG goes beside its JSON, under the same name (the retention study
writes two: ``<name>.png`` for the photos, ``<name>-scenes.png`` for the
synthetic scenes). The kind of a file is its ``"benchmark"`` field (or, for
files written before it existed, its name):

* ``micro``          latency against batch size: one summary panel (224², patch
                     16: the fused op, the eager fp32 reference, the published
                     algorithm, random masking), then the fused op across
                     resolutions and across dtypes/tokens;
* ``retention``      photos and scenes with each method's dropped patches in grey;
* ``train_quality``  zero-shot accuracy and retrieval R@1 against training
                     cost, per masking mode (mean ± std over seeds).

Files of other kinds are skipped. The benchmark scripts call
:func:`plot_file` after writing their JSON.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import sys
from typing import Dict, List, Optional, Sequence

from bench.common import RESULTS, argument_parser

GREY_NOTE = "grey = dropped patch"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def kind_of(doc: Dict, path: str) -> Optional[str]:
    kind = doc.get("benchmark")
    if kind:
        return kind
    name = os.path.basename(path)
    if name.startswith("micro-") and "impls" in doc:
        return "micro"
    if name.startswith("retention") and "synthetic" in doc:
        return "retention"
    return None


def plot_file(path: str) -> List[str]:
    """Draws the figures of one result JSON; returns the PNGs written."""
    with open(path) as f:
        doc = json.load(f)
    kind = kind_of(doc, path)
    stem = os.path.splitext(path)[0]
    if kind == "micro":
        return micro(doc, stem + ".png")
    if kind == "retention":
        return retention(doc, stem)
    if kind == "train_quality":
        return train_quality(doc, stem + ".png")
    return []


# ----------------------------------------------------------------------------- micro

FUSED = "pgs_select[auto]"
# the summary panel's implementations, in legend order
SUMMARY = ("pgs_select[auto]", "python_ref_fp32", "python_ref_compiled", "published", "random")
STYLE = {
    "pgs_select[auto]": dict(color="C3", lw=2.6, marker="o"),
    "python_ref_fp32": dict(color="C0", lw=1.6, marker="s"),
    "python_ref_compiled": dict(color="C9", lw=1.6, marker="D"),
    "published": dict(color="C1", lw=1.6, marker="^"),
    "random": dict(color="0.45", lw=1.4, marker="v", ls="--"),
}


def _micro_label(impl: str, doc: Dict) -> str:
    return {
        FUSED: f"pgs_select, fused op ({doc.get('fused_backend', 'auto')})",
        "python_ref_fp32": "python_ref fp32 (eager reference)",
        "python_ref_compiled": "torch.compile(python_ref)",
        "published": "published CLIP-PGS (python_ref)",
        "random": "random masking (the floor)",
    }.get(impl, impl)


def _series_key(r: Dict):
    return (r["height"], r["patch_size"], r["dtype"], r["tokens_dtype"])


def _series_name(key, with_size: bool = True) -> str:
    res, P, dt, tk = key
    size = f"{res}/{P} " if with_size else ""
    return f"{size}{dt}" + (f", {tk} tokens" if tk else "")


def _points(rows, impl, key, per_image=False):
    pts = sorted((r["batch"], r["ms"] / (r["batch"] if per_image else 1)) for r in rows
                 if r["impl"] == impl and _series_key(r) == key)
    return [p[0] for p in pts], [p[1] for p in pts]


def _log_axes(ax, minor_digits=(2, 5)) -> None:
    """Log-log axes labelled with plain numbers (batch 1, 4, 16; 0.2 ms);
    minor ticks labelled where their leading digit is in ``minor_digits``."""
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(plain)
    ax.yaxis.set_major_formatter(plain)

    def minor(v, _):
        lo, hi = ax.get_ylim()
        # within less than a decade too few minor ticks are left to read by: label each
        narrow = hi < 10 * lo
        return f"{v:.3g}" if narrow or int(f"{v:e}"[0]) in minor_digits else ""

    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def micro(doc: Dict, png: str) -> List[str]:
    rows = doc.get("rows", [])
    if not rows:
        return []
    keys = []
    for r in rows:
        if _series_key(r) not in keys:
            keys.append(_series_key(r))
    summary = next((k for k in [(224, 16, "fp32", None)] if k in keys), keys[0])
    # secondary panels: the fused op across resolutions (fp32, no tokens) and
    # across dtypes and tokens (at the summary's resolution)
    by_res = [k for k in keys if k[2] == "fp32" and k[3] is None]
    by_dtype = [k for k in keys if k[:2] == summary[:2]]
    panels = [p for p in (by_res, by_dtype) if len(p) > 1]
    plt = _plt()
    widths = [1.5] + [1.0] * len(panels)
    fig, axes = plt.subplots(1, len(widths), figsize=(6.4 + 4.4 * len(panels), 4.8),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    axes = axes[0]
    ax = axes[0]
    fused = dict(zip(*_points(rows, FUSED, summary)))
    for impl in SUMMARY:
        xs, ys = _points(rows, impl, summary)
        if not xs:
            continue
        ax.plot(xs, ys, ms=5, label=_micro_label(impl, doc), **STYLE[impl])
        if impl not in (FUSED, "random"):
            for x, y in zip(xs, ys):  # how many times slower than the fused op
                if x in fused:
                    ax.annotate(f"{y / fused[x]:.0f}×", (x, y), textcoords="offset points",
                                xytext=(5, 2) if impl == "published" else (5, -10),
                                fontsize=7, color=STYLE[impl]["color"])
    _log_axes(ax)
    ax.set_xlabel("batch size (images per call)")
    ax.set_ylabel("ms per call (median)")
    ax.set_title(f"PGS selection, {summary[0]}² images, patch {summary[1]}, {summary[2]}"
                 + (f", {summary[3]} tokens" if summary[3] else ", no tokens"), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", framealpha=0.9,
              title="× = times slower than the fused op", title_fontsize=7)
    for ax, keys_ in zip(axes[1:], panels):
        same_size = keys_ is by_dtype
        for i, k in enumerate(keys_):
            xs, ys = _points(rows, FUSED, k, per_image=True)
            if xs:
                ax.plot(xs, ys, marker="o", ms=3, lw=1.4, color=f"C{i}",
                        label=_series_name(k, with_size=not same_size))
        _log_axes(ax, minor_digits=(2, 3, 5))
        ax.set_xlabel("batch size")
        ax.set_ylabel("fused op, ms per image")
        ax.set_title(f"fused op at {summary[0]}/{summary[1]}: dtypes and tokens" if same_size
                     else "fused op across resolution/patch (fp32, no tokens)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best", framealpha=0.9)
    load = doc.get("load") or {}
    before = load.get("before") or doc.get("loadavg_start")
    note = (f"{doc.get('device_name', doc.get('device'))}; torch {doc.get('torch')}; "
            f"{doc.get('settings', {}).get('threads', '?')} thread(s); commit {str(doc.get('commit'))[:10]}"
            + (f"; load {before[0]:.2f} at start" if before else "")
            + ("  BUSY MACHINE" if load.get("busy") else ""))
    fig.text(0.01, 0.01, note, fontsize=7, color="0.3")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [png]


# ----------------------------------------------------------------------------- retention

def _image_grid(path: str, rows, col_titles: Sequence[str], row_titles: Sequence[str], caption: str) -> None:
    plt = _plt()
    nr, nc = len(rows), len(rows[0])
    fig, axes = plt.subplots(nr, nc, figsize=(2.2 * nc, 2.2 * nr + 0.45), squeeze=False)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            ax = axes[i, j]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col_titles[j], fontsize=9)
            if j == 0:
                ax.set_ylabel(row_titles[i], fontsize=9)
    fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=9)
    fig.tight_layout(rect=(0, 0.45 / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _kept_title(method: str, dropped: Sequence[int], L: int) -> str:
    return f"{method} ({L - len(dropped)}/{L} kept)"


def retention(doc: Dict, stem: str) -> List[str]:
    from bench.retention import load_photo, object_patches
    from pgs_kernels import samples

    figs = doc.get("figures")
    if not figs:
        return []
    P, ratio, methods = figs["patch_size"], figs["mask_ratio"], figs["methods"]
    out = []

    def dropped_mask(idx, L):
        import numpy as np

        m = np.zeros(L, dtype=bool)
        m[list(idx)] = True
        return m

    ph = figs.get("photos")
    if ph:
        rows, titles = [], None
        for i, name in enumerate(ph["names"]):
            _, disp = load_photo(name, ph["size"])
            L = (disp.shape[0] // P) * (disp.shape[1] // P)
            drops = {m: ph["dropped"][m][i] for m in methods}
            rows.append([disp] + [samples.grey_dropped(disp, dropped_mask(drops[m], L), P) for m in methods])
            if titles is None:
                titles = ["photo (centre crop)"] + [_kept_title(m, drops[m], L) for m in methods]
        path = stem + ".png"
        _image_grid(path, rows, titles, ph["names"],
                    f"{GREY_NOTE} (mask ratio {ratio}, {P}x{P} patches, same noise for every method)")
        out.append(path)
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
                        + [samples.grey_dropped(disp, dropped_mask(drops[m], L), P) for m in methods])
            labels.append(f"{s['background']} (seed {seed})")
            if titles is None:
                titles = ["scene", "object patches"] + [_kept_title(m, drops[m], L) for m in methods]
        path = stem + "-scenes.png"
        _image_grid(path, rows, titles, labels,
                    f"{GREY_NOTE} (mask ratio {ratio}, {P}x{P} patches); "
                    "column 2: grey = not an object patch (< half object pixels)")
        out.append(path)
    return out


# ----------------------------------------------------------------------------- training quality

MODE_STYLE = {"none": ("0.2", "o"), "random": ("C0", "s"), "published": ("C1", "^"), "pgs": ("C3", "D")}


def _mean_std(v: List[float]):
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def train_quality(doc: Dict, png: str) -> List[str]:
    rows = doc.get("rows", [])
    if not rows:
        return []
    groups: Dict = {}
    for r in rows:
        groups.setdefault((r["mode"], r["mask_ratio"]), []).append(r)
    order = sorted(groups, key=lambda k: (list(MODE_STYLE).index(k[0]) if k[0] in MODE_STYLE else 9, k[1]))
    metrics = [("zero_shot_acc", "zero-shot accuracy"), ("i2t_r1", "image→text R@1"),
               ("t2i_r1", "text→image R@1"),
               ("zero_shot_acc_masked", "zero-shot accuracy, test images\nmasked as in training")]
    cost = "cpu_s" if all("cpu_s" in r for r in rows) else "wall_s"
    cost_label = ("CPU time per training run, s (all threads)" if cost == "cpu_s"
                  else "training wall time per run, s")
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 4.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], metrics):
        for mode, ratio in order:
            rs = [r for r in groups[(mode, ratio)] if key in r]
            if not rs:
                continue
            color, marker = MODE_STYLE.get(mode, ("C7", "x"))
            x, xs = _mean_std([r[cost] for r in rs])
            y, ys = _mean_std([r[key] for r in rs])
            filled = ratio <= 0.5  # open markers: the higher mask ratio
            ax.errorbar(x, y, xerr=xs, yerr=ys, fmt=marker, ms=8, color=color, capsize=3,
                        mfc=color if filled else "white", mew=1.6,
                        label=f"{mode}" + (f", mask {ratio:g}" if ratio else ""))
        if key.endswith("_masked") and ("none", 0.0) in groups:
            ref = statistics.mean(r[key[:-len("_masked")]] for r in groups[("none", 0.0)])
            ax.axhline(ref, color=MODE_STYLE["none"][0], ls="--", lw=1)
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, max(hi, ref + 0.08 * (ref - lo)))
            ax.annotate("none, full images", (0.99, ref), xycoords=("axes fraction", "data"),
                        textcoords="offset points", xytext=(0, -10), fontsize=7, ha="right")
        ax.set_xlabel(cost_label, fontsize=9)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best", framealpha=0.9)
    cfg = doc.get("config", {})
    load = doc.get("load") or {}
    fig.suptitle(f"Tiny CLIP, held-out captioned scenes: quality against training cost "
                 f"({cfg.get('steps', '?')} steps of batch {cfg.get('batch_size', '?')} for every mode"
                 + (f", the last {cfg['unmasked_steps']} unmasked" if cfg.get("unmasked_steps") else "") + "; "
                 f"mean ± std over {len(doc.get('seeds', [])) or '?'} seeds)", fontsize=10)
    before = load.get("before")
    fig.text(0.01, 0.01, f"{doc.get('device_name', doc.get('device'))}; torch {doc.get('torch')}; "
             f"{load.get('threads', '?')} thread(s); commit {str(doc.get('commit'))[:10]}"
             + (f"; load {before[0]:.2f} at start" if before else "")
             + (f"; other processes {load['others_cores_during']} cores on average"
                if load.get("others_cores_during") is not None else ""),
             fontsize=7, color="0.3")
    fig.tight_layout(rect=(0, 0.03, 1, 0.94))
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [png]


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argument_parser(__doc__)
    ap.add_argument("files", nargs="*", help="result JSON (default: bench/results/*.json)")
    args = ap.parse_args(argv)
    files = args.files or sorted(glob.glob(os.path.join(RESULTS, "*.json")))
    for path in files:
        written = plot_file(path)
        for png in written:
            print(f"wrote {png}")
        if not written:
            print(f"skipped {path} (no figure for this file)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
