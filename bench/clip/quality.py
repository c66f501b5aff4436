"""Training quality at equal cost: does a CLIP trained with PGS masking
beat one trained with random masking, or with the published algorithm?

    python -m bench.clip.quality                 # CPU, the tiny CLIP, about 15 minutes
    python -m bench.clip.quality --steps 20 --seeds 1 --eval-scenes 64   # a smoke run

Trains the tiny CLIP (``bench.clip.model``, ``--model tiny``) on captioned
scenes (``bench.clip.scenes.CaptionedScenes``: coloured shapes in a 3x3
layout on a background that says nothing about the caption) once per mode
and mask ratio: ``none`` (every patch, once), and ``random``, ``published``
and ``pgs`` at each ``--ratios`` (default 0.5 and 0.75). Every run of a seed
has the same initial weights, the same batches in the same order, the same
steps and the same learning-rate schedule (linear warm-up, cosine decay);
only the masking differs. The PGS and published token weight follows the
published schedule ``epoch / epochs``. Three seeds by default.

Each trained model is evaluated, every patch visible, on held-out scenes it
never saw (another generator seed):

* ``zero_shot_acc``: single-object scenes classified among the 32
  colour-shape classes, each class's text embedding the mean over the nine
  place phrasings ("a red circle at the top left", ...), as CLIP's prompt
  ensembles do;
* ``i2t_r1`` / ``t2i_r1``: retrieval among ``--eval-scenes`` scenes of 1-3
  objects, image to caption and caption to image; a hit is the top match
  carrying the query's exact caption.

The same three scores with the images masked as in training (``*_masked``,
masked modes only) tell how much of a gap is the shift from masked training
images to full test images; ``--unmasked-steps N`` lets the last N steps of
every run see every patch (FLIP's unmasked tuning), which narrows that shift
at the same cost for every masked mode.

Cost: the run's wall time (training loop, data included), images/s, and
the CPU time the training took (all threads; on a shared machine it moves
less than wall time, since waiting for a core costs no CPU time).

Writes ``bench/out/train-quality-cpu.json`` (``bench/results/`` with
``--refresh``; overwritten) unless ``--out`` is given, with one row per (mode, mask ratio, seed), a summary per
(mode, mask ratio) (mean and std over seeds), the environment and the
machine's load before and during the whole study (with a warning when
another process held a core the study needed), and the plot beside it
(accuracy against cost, ``python -m bench.plot``).
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from bench.clip.data import SyntheticScenes
from bench.clip.model import CLIP
from bench.clip.train import fit, parse_args as train_args
from bench.common import LoadRecord, argument_parser, environment, out_help, pick_device, result_path, write_result
from bench.clip.scenes import COLORS, PLACES, SHAPES, object_phrase
from pgs_kernels.samples import clip_normalize

MODES = ("none", "random", "published", "pgs")
DEFAULT_OUT = "train-quality-cpu.json"
# the held-out scenes come from generator seeds no training run uses
EVAL_SEED = 1_000_003
ZERO_SHOT_SEED = 1_000_033


def parse_args(argv=None):
    p = argument_parser(__doc__)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, from " + ", ".join(MODES))
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75], help="mask ratios of the masked modes")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (weights, data order, masking noise)")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--epochs", type=int, default=5, help="epochs of the token-weight schedule")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--unmasked-steps", type=int, default=0,
                   help="the last N of --steps see every patch in every mode (unmasked tuning); default 0")
    p.add_argument("--eval-scenes", type=int, default=1000, help="held-out scenes for retrieval")
    p.add_argument("--zero-shot-scenes", type=int, default=640, help="held-out single-object scenes")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--out", default=result_path(DEFAULT_OUT), help=out_help(DEFAULT_OUT))
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        p.error(f"--modes: unknown {bad}; choose from {MODES}")
    args.modes = modes
    for r in args.ratios:
        if not 0.0 < r < 1.0:
            p.error(f"--ratios must be in (0, 1), got {r}")
    if args.seeds < 1 or args.steps < 1:
        p.error("--seeds and --steps must be at least 1")
    if not 0 <= args.unmasked_steps <= args.steps:
        p.error(f"--unmasked-steps must be in [0, --steps={args.steps}], got {args.unmasked_steps}")
    return args


def runs(modes: Sequence[str], ratios: Sequence[float], seeds: int):
    """(mode, mask_ratio, seed) in the order they run: seed-major, so that a
    cut-short study still has every mode of its first seeds."""
    for seed in range(seeds):
        for mode in modes:
            for r in ([0.0] if mode == "none" else ratios):
                yield mode, r, seed


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def embed(model: CLIP, data: SyntheticScenes, indices: Sequence[int], device, batch: int = 256):
    """Normalized image and text features and the captions of ``indices``."""
    imgs, txts, caps = [], [], []
    for i in range(0, len(indices), batch):
        part = list(indices[i:i + batch])
        pixels, captions = data.render(part, device)
        imgs.append(model.encode_image(clip_normalize(pixels)))
        txts.append(model.encode_text(data.tokenizer(captions).to(device)))
        caps += captions
    return torch.cat(imgs), torch.cat(txts), caps


def retrieval_r1(img: torch.Tensor, txt: torch.Tensor, captions: List[str]) -> Dict[str, float]:
    """R@1 both ways; a hit is a top match whose caption is the query's (two
    scenes may share a caption)."""
    ids = {c: k for k, c in enumerate(dict.fromkeys(captions))}
    cid = torch.tensor([ids[c] for c in captions])
    sim = img @ txt.t()
    i2t = (cid[sim.argmax(dim=1).cpu()] == cid).float().mean().item()
    t2i = (cid[sim.argmax(dim=0).cpu()] == cid).float().mean().item()
    return {"i2t_r1": i2t, "t2i_r1": t2i}


@torch.no_grad()
def zero_shot_accuracy(model: CLIP, data: SyntheticScenes, n: int, device) -> float:
    """Accuracy over the colour x shape classes on ``n`` single-object scenes
    (``data`` must draw one object per scene)."""
    classes = [(c, s) for c in COLORS for s in SHAPES]
    prompts = [object_phrase(c, s, p) for c, s in classes for p in PLACES]
    tok = data.tokenizer(prompts).to(device)
    t = model.encode_text(tok).view(len(classes), len(PLACES), -1).mean(dim=1)
    t = F.normalize(t, dim=-1)
    img, _, _ = embed(model, data, range(n), device)
    truth = []
    for i in range(n):
        objs, _ = data.describe(i)
        truth.append(classes.index((objs[0][0], objs[0][1])))
    pred = (img @ t.t()).argmax(dim=1).cpu()
    return (pred == torch.tensor(truth)).float().mean().item()


def evaluate(model: CLIP, args, device, masked: bool = False) -> Dict[str, float]:
    """The three scores on full images; with ``masked``, on images masked as
    in training (a diagnostic: how much of a gap is the shift from masked
    training images to full test images)."""
    cfg = model.cfg
    model.eval()
    if masked:
        model.visual.train()  # the masking slot runs in training mode only; the model has no other
        torch.manual_seed(EVAL_SEED)
    held_out = SyntheticScenes(cfg.image_size, cfg.context_length, cfg.vocab_size, seed=EVAL_SEED)
    img, txt, caps = embed(model, held_out, range(args.eval_scenes), device)
    single = SyntheticScenes(cfg.image_size, cfg.context_length, cfg.vocab_size, seed=ZERO_SHOT_SEED, max_shapes=1)
    return {"zero_shot_acc": zero_shot_accuracy(model, single, args.zero_shot_scenes, device),
            **retrieval_r1(img, txt, caps)}


# ----------------------------------------------------------------------------- study

def train_one(args, mode: str, ratio: float, seed: int, device):
    targv = ["--model", "tiny", "--mask", mode, "--mask-ratio", str(ratio if mode != "none" else 0.5),
             "--steps", str(args.steps), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
             "--lr", str(args.lr), "--warmup", str(args.warmup), "--seed", str(seed), "--device", str(device),
             "--unmasked-steps", str(args.unmasked_steps), "--log-every", "25", "--no-progress"]
    model, log = fit(train_args(targv), record_load=False, verbose=False)
    return model, log["summary"]


def summarize(rows: List[Dict]) -> List[Dict]:
    groups: Dict = {}
    for r in rows:
        groups.setdefault((r["mode"], r["mask_ratio"]), []).append(r)
    out = []
    for (mode, ratio), rs in groups.items():
        entry = {"mode": mode, "mask_ratio": ratio, "seeds": len(rs)}
        for key in ("zero_shot_acc", "i2t_r1", "t2i_r1", "zero_shot_acc_masked", "i2t_r1_masked",
                    "t2i_r1_masked", "images_per_s", "wall_s", "cpu_s", "loss_end"):
            v = [r[key] for r in rs if key in r]
            if not v:
                continue
            entry[key] = statistics.mean(v)
            entry[key + "_std"] = statistics.stdev(v) if len(v) > 1 else 0.0
        out.append(entry)
    return out


def print_summary(summary: List[Dict]) -> None:
    keys = ("zero_shot_acc", "i2t_r1", "t2i_r1", "zero_shot_acc_masked")
    print(f"\n{'mode':<10}{'mask':>6}{'seeds':>6}{'zero-shot':>16}{'i2t R@1':>16}{'t2i R@1':>16}"
          f"{'zero-shot masked':>18}{'img/s':>8}{'wall s':>8}{'CPU s':>8}")
    for e in summary:
        cells = "".join(f"{e[k]:>10.3f}±{e[k + '_std']:.3f}" if k in e else f"{'-':>16}" for k in keys)
        print(f"{e['mode']:<10}{e['mask_ratio']:>6.2f}{e['seeds']:>6}{cells}  {e['images_per_s']:>8.0f}"
              f"{e['wall_s']:>8.1f}{e['cpu_s']:>8.1f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="pgs_kernels: the native CPU kernel is not built")
    env = environment(device, "train_quality")
    load = LoadRecord(threads=args.threads)
    plan = list(runs(args.modes, args.ratios, args.seeds))
    doc = {
        **env,
        "config": {"model": "tiny", "steps": args.steps, "unmasked_steps": args.unmasked_steps,
                   "epochs": args.epochs, "batch_size": args.batch_size,
                   "lr": args.lr, "warmup": args.warmup, "schedule": "linear warm-up, cosine decay",
                   "threads": args.threads, "eval_scenes": args.eval_scenes,
                   "zero_shot_scenes": args.zero_shot_scenes, "zero_shot_classes": len(COLORS) * len(SHAPES),
                   "eval_seed": EVAL_SEED, "zero_shot_seed": ZERO_SHOT_SEED, "data": "CaptionedScenes"},
        "modes": args.modes,
        "ratios": args.ratios,
        "seeds": list(range(args.seeds)),
        "rows": [],
    }
    t0 = time.perf_counter()
    for k, (mode, ratio, seed) in enumerate(plan):
        cpu0 = time.process_time()
        model, summary = train_one(args, mode, ratio, seed, device)
        cpu_s = time.process_time() - cpu0
        scores = evaluate(model, args, device)
        if mode != "none":
            scores.update({k + "_masked": v for k, v in evaluate(model, args, device, masked=True).items()})
        row = {"mode": mode, "mask_ratio": ratio, "seed": seed, "steps": args.steps, **scores,
               "images_per_s": summary["images_per_s"], "wall_s": summary["wall_s"], "cpu_s": cpu_s,
               "tokens": summary["tokens"], "loss_end": summary["loss_end"],
               "sel_share": summary["sel_share"]}
        doc["rows"].append(row)
        print(f"[{k + 1}/{len(plan)}] {mode:<9} mask {ratio:.2f} seed {seed}: zero-shot {scores['zero_shot_acc']:.3f} "
              f"i2t {scores['i2t_r1']:.3f} t2i {scores['t2i_r1']:.3f} | {summary['images_per_s']:.0f} img/s, "
              f"{summary['wall_s']:.1f} s, loss {summary['loss_end']:.3f}  ({time.perf_counter() - t0:.0f} s so far)",
              flush=True)
        doc["wall_s"] = time.perf_counter() - t0
        write_result(args.out, doc, quiet=True)  # after every run: a killed study keeps what it measured
    doc["summary"] = summarize(doc["rows"])
    doc["load"] = load.finish()
    doc["wall_s"] = time.perf_counter() - t0
    print_summary(doc["summary"])
    print(f"study wall time {doc['wall_s']:.0f} s; load before {doc['load']['before']}, after {doc['load']['after']}, "
          f"other processes {doc['load']['others_cores_during']} cores on average")
    write_result(args.out, doc)
    if not args.no_plot:
        from bench.plot import plot_file

        for png in plot_file(args.out):
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
