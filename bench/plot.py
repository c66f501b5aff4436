"""The figures of the benchmarks, drawn from what the scripts hand over:
their result JSON, or (the retention study) the images it rendered.

    python -m bench.plot                          # every bench/results/*.json it knows
    python -m bench.plot bench/results/micro-cpu.json

Each PNG goes beside its JSON, under the same name. The kind of a file is
its ``"benchmark"`` field (or, for files written before it existed, its
name):

* ``micro``          latency against batch size: one summary panel (224², patch
                     16: the fused op, the eager fp32 reference, the published
                     algorithm, random masking), then the fused op across
                     resolutions and across dtypes/tokens;
* ``train_quality``  zero-shot accuracy and retrieval R@1 against training
                     cost, per masking mode (mean ± std over seeds);
* ``train_quality_equal_compute``  the same scores against the unmasked
                     share at equal FLOPs, and the paired differences per seed.

Files of other kinds are skipped. The benchmark scripts call
:func:`plot_file` after writing their JSON. The module computes nothing of
its own: the retention figures show photos and scenes that
``bench.retention`` renders and hands to :func:`image_grid` (two PNGs,
``<name>.png`` and ``<name>-scenes.png``; ``python -m bench.retention
--plot-only`` redraws them from its JSON).
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import sys
from typing import Dict, List, Optional, Sequence

from bench.common import RESULTS, argument_parser

#: Kinds whose figures need more than their JSON (the retention study's
#: photos and scenes): their own script redraws them.
DRAWN_BY = {"retention": "python -m bench.retention --plot-only --out FILE"}


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
    if kind == "train_quality":
        return train_quality(doc, stem + ".png")
    if kind == "train_quality_equal_compute":
        return train_quality_equal_compute(doc, stem + ".png")
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


# ----------------------------------------------------------------------------- image grids

def image_grid(path: str, rows, col_titles: Sequence[str], row_titles: Sequence[str], caption: str) -> str:
    """A grid of images (``rows``: lists of (H, W, 3) arrays in [0, 1]) with
    column and row titles and a caption; the retention study computes them."""
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
    return path


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
    _footer(fig, doc, load, f"{load.get('threads', '?')} thread(s)")
    fig.tight_layout(rect=(0, 0.03, 1, 0.94))
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [png]


def _footer(fig, doc: Dict, load: Dict, threads: str) -> None:
    """A study figure's last line: machine, torch, threads, commit, load."""
    before = load.get("before")
    fig.text(0.01, 0.01, f"{doc.get('device_name', doc.get('device'))}; torch {doc.get('torch')}; {threads}; "
             f"commit {str(doc.get('commit'))[:10]}" + (f"; load {before[0]:.2f} at start" if before else "")
             + (f"; other processes {load['others_cores_during']} cores on average"
                if load.get("others_cores_during") is not None else ""),
             fontsize=7, color="0.3")


def _label_share(share) -> str:
    return "every step" if share is None else f"{share:g}"


def train_quality_equal_compute(doc: Dict, png: str) -> List[str]:
    """Scores against the unmasked share at equal FLOPs, and the paired
    differences PGS - random and PGS - none per seed, as the study computed them."""
    summary = doc.get("summary", [])
    if not summary:
        return []
    metrics = [("zero_shot_acc", "zero-shot accuracy"), ("i2t_r1", "image→text R@1"), ("t2i_r1", "text→image R@1")]
    ratios = doc.get("ratios") or sorted({s["mask_ratio"] for s in summary if s["mode"] != "none"})
    none = next((s for s in summary if s["mode"] == "none"), None)
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(4.6 * (len(metrics) + 1), 4.8), squeeze=False)
    axes = axes[0]
    for ax, (key, title) in zip(axes, metrics):
        if none:
            ax.axhline(none[key], color=MODE_STYLE["none"][0], ls="--", lw=1.2,
                       label=f"none, {none['steps']} steps")
            ax.axhspan(none[key] - none[key + "_std"], none[key] + none[key + "_std"], color="0.85", alpha=0.6)
        for i, mode in enumerate(m for m in MODE_STYLE if m != "none"):
            color, marker = MODE_STYLE[mode]
            for ratio in ratios:
                pts = sorted((s["unmasked_share"], s[key], s[key + "_std"], s["steps"]) for s in summary
                             if s["mode"] == mode and s["mask_ratio"] == ratio)
                if not pts:
                    continue
                first = ratio == ratios[0]
                dx = 0.004 * (i - 1) + (0 if first else 0.012)  # keep the error bars of overlapping points apart
                ax.errorbar([p[0] + dx for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                            fmt=marker + ("-" if first else ""), ms=7, color=color, capsize=3, lw=1.2,
                            mfc=color if first else "white", mew=1.5,
                            label=f"{mode}, mask {ratio:g} ({words_steps(pts)} steps)")
        ax.set_xlabel("share of a masked run's steps unmasked, at its end", fontsize=9)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    # below the panels: inside, the legend would cover the points of a panel
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7, bbox_to_anchor=(0.5, 0.04))
    ax = axes[-1]
    paired = [d for d in doc.get("paired", []) if d["metric"] == "zero_shot_acc"]
    cases = list(dict.fromkeys((d["mask_ratio"], d["unmasked_share"]) for d in paired))
    for j, (against, color) in enumerate((("random", MODE_STYLE["random"][0]), ("none", MODE_STYLE["none"][0]))):
        for k, case in enumerate(cases):
            d = next((d for d in paired if d["against"] == against and (d["mask_ratio"], d["unmasked_share"]) == case),
                     None)
            if d is None:
                continue
            x = k + (j - 0.5) * 0.3
            ax.scatter([x] * len(d["per_seed"]), d["per_seed"], s=14, color=color, alpha=0.6)
            ax.errorbar([x], [d["mean"]], yerr=[d["std"]], fmt="_", ms=14, mew=2, color=color, capsize=4,
                        label=f"PGS − {against}" if k == 0 else None)
            ax.annotate(f"{d['positive']}/{len(d['per_seed'])}", (x, max(d["per_seed"])), textcoords="offset points",
                        xytext=(0, 4), fontsize=7, ha="center", color=color)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"mask {r:g}\nshare {_label_share(s)}" for r, s in cases], fontsize=7)
    ax.set_title("paired zero-shot difference per seed\n(n/N: seeds where PGS is ahead)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    budget = doc.get("budget", {})
    load = doc.get("load") or {}
    fig.suptitle(f"Tiny CLIP at equal compute: every run spends the FLOPs of {budget.get('steps', '?')} unmasked "
                 f"steps of batch {doc.get('config', {}).get('batch_size', '?')} "
                 f"({budget.get('flops', 0) / 1e12:.2f} TFLOP); mean ± std over "
                 f"{len(doc.get('seeds', [])) or '?'} seeds", fontsize=10)
    _footer(fig, doc, load, f"{doc.get('config', {}).get('jobs', 1)} run(s) at a time, "
                            f"{load.get('threads', '?')} thread(s) in all")
    fig.tight_layout(rect=(0, 0.1, 1, 0.94))
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [png]


def words_steps(pts) -> str:
    steps = [p[3] for p in pts]
    return str(steps[0]) if len(set(steps)) == 1 else f"{min(steps)}-{max(steps)}"


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
            with open(path) as f:
                by = DRAWN_BY.get(kind_of(json.load(f), path))
            print(f"skipped {path} ({'its figures: ' + by if by else 'no figure for this file'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
