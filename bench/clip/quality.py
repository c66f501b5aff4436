"""Training quality: does a CLIP trained with PGS masking beat one trained
with random masking, or with the published algorithm, for the same number
of steps, or (``--equal-compute``) for the same FLOPs?

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

Equal compute (``--equal-compute``, about 30 minutes on 2 idle cores with ``--jobs 2``):

    python -m bench.clip.quality --equal-compute --jobs 2 --refresh

Masking makes a step cheaper; at equal compute a masked run takes more
steps. The budget is FLOPs: ``--steps`` (250) unmasked steps. One training
step (image and text towers, forward and backward, batch ``--batch-size``)
is counted once per (mode, mask ratio), in the same run, with
``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions and
attention (on CPU, SDPA's flash kernel, which the counter has no formula
for, is counted as the counter counts SDPA on CUDA); elementwise ops, norms
and the optimizer are not counted. The masking selection is left out of a
step's FLOPs and recorded beside it (``selection_flops``: the published
algorithm's similarity and Sobel filter; PGS runs as one custom op the
counter does not see); its time share is ``sel_share``. A masked run at
unmasked share ``s`` takes ``n`` steps, the last ``round(s n)`` of them
unmasked, ``n`` the largest with ``(n - round(s n)) F_masked + round(s n)
F_unmasked <= budget``. Its warm-up and cosine decay stretch with it
(warm-up ``round(--warmup * n / --steps)``), and so does the token-weight
schedule (``--epochs`` over ``n``). Per seed every run starts from the same
weights and sees the same batches in the same order: a longer run sees the
250 batches of the unmasked run, then the next ones of the same stream.
Modes ``none`` (``--steps``, every patch), ``random``, ``published`` and
``pgs`` at every ``--unmasked-shares`` (0, 0.05, 0.1, 0.2) at the first of
``--ratios`` and at ``--unmasked-share`` (0.1) at the others; 6 seeds. The
masked-as-trained scores are not computed in this arm. ``--jobs N`` trains
N runs at a time in separate processes (the FLOPs do not depend on the
machine's load; the CPU times do).

Writes ``bench/out/train-quality-equal-compute-cpu.json`` (``bench/results/``
with ``--refresh``; overwritten) unless ``--out`` is given: the FLOPs per
step, the plan (steps per mode, ratio and share), one row per run, mean and
std over seeds per (mode, ratio, share), the paired differences PGS - random
and PGS - none per seed with how many seeds are positive, the load, and the
plot beside it.
"""

from __future__ import annotations

import multiprocessing
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from bench.clip.data import SyntheticScenes, batches, make_dataset
from bench.clip.model import CLIP, build_model, clip_loss
from bench.clip.train import fit, parse_args as train_args
from bench.common import LoadRecord, argument_parser, environment, out_help, pick_device, result_path, write_result
from bench.clip.scenes import COLORS, PLACES, SHAPES, object_phrase
from pgs_kernels.samples import clip_normalize

MODES = ("none", "random", "published", "pgs")
DEFAULT_OUT = "train-quality-cpu.json"
EQUAL_OUT = "train-quality-equal-compute-cpu.json"
# the held-out scenes come from generator seeds no training run uses
EVAL_SEED = 1_000_003
ZERO_SHOT_SEED = 1_000_033


def parse_args(argv=None):
    p = argument_parser(__doc__)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, from " + ", ".join(MODES))
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75], help="mask ratios of the masked modes")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds 0 .. N-1 (weights, data order, masking noise); default 3, 6 with --equal-compute")
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
    p.add_argument("--equal-compute", action="store_true",
                   help="the equal-compute arm: each masked run takes the steps that fit in the unmasked run's FLOPs")
    p.add_argument("--unmasked-shares", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2],
                   help="--equal-compute: shares of a masked run's steps, at its end, that see every patch, "
                        "at the first of --ratios")
    p.add_argument("--unmasked-share", type=float, default=0.1, help="--equal-compute: the share at the other ratios")
    p.add_argument("--jobs", type=int, default=1,
                   help="--equal-compute: runs trained at a time, each in its own process with --threads threads")
    p.add_argument("--out", default=None, help=out_help(DEFAULT_OUT) + f"; with --equal-compute {EQUAL_OUT}")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = 6 if args.equal_compute else 3
    if args.out is None:  # after parsing: --refresh decides the folder
        args.out = result_path(EQUAL_OUT if args.equal_compute else DEFAULT_OUT)
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
    for s in args.unmasked_shares + [args.unmasked_share]:
        if not 0.0 <= s < 1.0:
            p.error(f"--unmasked-shares and --unmasked-share must be in [0, 1), got {s}")
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
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

def train_one(args, mode: str, ratio: float, seed: int, device, steps: Optional[int] = None,
              warmup: Optional[int] = None, unmasked_steps: Optional[int] = None):
    """The trained model and the training log; ``steps``, ``warmup`` and
    ``unmasked_steps`` default to the study's."""
    steps = args.steps if steps is None else steps
    warmup = args.warmup if warmup is None else warmup
    unmasked_steps = args.unmasked_steps if unmasked_steps is None else unmasked_steps
    targv = ["--model", "tiny", "--mask", mode, "--mask-ratio", str(ratio if mode != "none" else 0.5),
             "--steps", str(steps), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
             "--lr", str(args.lr), "--warmup", str(warmup), "--seed", str(seed), "--device", str(device),
             "--unmasked-steps", str(unmasked_steps), "--log-every", "25", "--no-progress"]
    return fit(train_args(targv), record_load=False, verbose=False)


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
    if args.equal_compute:
        return equal_compute(args)
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
        model, log = train_one(args, mode, ratio, seed, device)
        summary = log["summary"]
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
    print_summary(doc["summary"])
    return finish_study(args, doc, load, t0)


def finish_study(args, doc: Dict, load: LoadRecord, t0: float) -> int:
    """A study's last step: the load and wall time, the JSON, its plot."""
    doc["load"] = load.finish()
    doc["wall_s"] = time.perf_counter() - t0
    print(f"study wall time {doc['wall_s']:.0f} s; load before {doc['load']['before']}, after {doc['load']['after']}, "
          f"other processes {doc['load']['others_cores_during']} cores on average")
    write_result(args.out, doc)
    if not args.no_plot:
        from bench.plot import plot_file

        for png in plot_file(args.out):
            print(f"wrote {png}")
    return 0


# ----------------------------------------------------------------------------- equal compute

METRICS = ("zero_shot_acc", "i2t_r1", "t2i_r1")


def _sdpa_cpu(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _sdpa_cpu_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


# On CPU, SDPA runs as its flash kernel for CPU, which FlopCounterMode has no
# formula for: without these the attention matmuls (about a tenth of an
# unmasked tiny step, and the part masking cuts quadratically) would be missed.
CPU_SDPA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward}


class SelectionFlops:
    """Takes the place of the vision tower's masking-slot timer: counts the
    FLOPs of the selection alone, so that they can be taken out of the step's."""

    def __init__(self):
        self.flops = 0
        self._counter = None

    def start(self) -> None:
        self._counter = FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS)
        self._counter.__enter__()

    def stop(self) -> None:
        self._counter.__exit__(None, None, None)
        self.flops += self._counter.get_total_flops()
        self._counter = None


def step_flops(args, mode: str, ratio: float, device) -> Dict:
    """FLOPs of one training step of seed 0's first batch (forward and
    backward, both towers), the selection's FLOPs apart, and the tokens that
    reached the image blocks."""
    torch.manual_seed(0)
    model = build_model("tiny", mode, ratio if mode != "none" else 0.5).to(device).train()
    model.visual.set_epoch(0, args.epochs)
    data = make_dataset("synthetic", model.cfg, seed=0)
    images, text = next(batches(data, args.batch_size, seed=0, device=device))
    sel = SelectionFlops()
    model.visual.timer = sel
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        img_f, txt_f, scale = model(images, text)
        clip_loss(img_f, txt_f, scale).backward()
    model.visual.timer = None
    return {"mode": mode, "mask_ratio": ratio, "flops": counter.get_total_flops() - sel.flops,
            "selection_flops": sel.flops, "tokens": model.visual.last_num_tokens}


def run_flops(steps: int, unmasked: int, f_masked: int, f_full: int) -> int:
    return (steps - unmasked) * f_masked + unmasked * f_full


def plan_equal_compute(args, flops: Dict) -> List[Dict]:
    """One entry per (mode, mask ratio, unmasked share): the steps that fit
    in the budget of ``args.steps`` unmasked steps."""
    f_full = flops[("none", 0.0)]
    budget = args.steps * f_full
    plan = []
    if "none" in args.modes:
        plan.append({"mode": "none", "mask_ratio": 0.0, "unmasked_share": None, "steps": args.steps,
                     "unmasked_steps": 0, "warmup": args.warmup, "flops": budget})
    for mode in [m for m in args.modes if m != "none"]:
        for ratio in args.ratios:
            f_masked = flops[(mode, ratio)]
            for share in (args.unmasked_shares if ratio == args.ratios[0] else [args.unmasked_share]):
                n = int(budget / ((1 - share) * f_masked + share * f_full)) + 1
                while run_flops(n, int(share * n + 0.5), f_masked, f_full) > budget:  # float rounding
                    n -= 1
                u = int(share * n + 0.5)
                plan.append({"mode": mode, "mask_ratio": ratio, "unmasked_share": share, "steps": n,
                             "unmasked_steps": u, "warmup": max(1, round(args.warmup * n / args.steps)),
                             "flops": run_flops(n, u, f_masked, f_full)})
    for entry in plan:
        entry["budget_fraction"] = entry["flops"] / budget
    return plan


def train_planned(args, entry: Dict, seed: int) -> Dict:
    """Trains and evaluates one planned run (also in a worker process)."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="pgs_kernels: the native CPU kernel is not built")
    device = pick_device(args.device)
    cpu0 = time.process_time()
    model, log = train_one(args, entry["mode"], entry["mask_ratio"], seed, device, steps=entry["steps"],
                           warmup=entry["warmup"], unmasked_steps=entry["unmasked_steps"])
    cpu_s = time.process_time() - cpu0
    summary = log["summary"]
    masked = [s["tokens"] for s in log["steps"][:entry["steps"] - entry["unmasked_steps"]]]
    return {**{k: entry[k] for k in ("mode", "mask_ratio", "unmasked_share", "steps", "unmasked_steps",
                                     "warmup", "flops")}, "seed": seed,
            **evaluate(model, args, device), "images_per_s": summary["images_per_s"], "wall_s": summary["wall_s"],
            "cpu_s": cpu_s, "loss_end": summary["loss_end"], "sel_share": summary["sel_share"],
            "tokens_min": min(masked) if masked else None,
            "tokens_mean": statistics.mean(masked) if masked else None}


def group_key(r: Dict):
    return r["mode"], r["mask_ratio"], r["unmasked_share"]


def summarize_equal_compute(rows: List[Dict]) -> List[Dict]:
    groups: Dict = {}
    for r in rows:
        groups.setdefault(group_key(r), []).append(r)
    out = []
    for (mode, ratio, share), rs in groups.items():
        entry = {"mode": mode, "mask_ratio": ratio, "unmasked_share": share, "seeds": len(rs),
                 "steps": rs[0]["steps"], "unmasked_steps": rs[0]["unmasked_steps"], "flops": rs[0]["flops"]}
        for key in METRICS + ("cpu_s", "wall_s", "sel_share", "loss_end"):
            v = [r[key] for r in rs]
            entry[key] = statistics.mean(v)
            entry[key + "_std"] = statistics.stdev(v) if len(v) > 1 else 0.0
        out.append(entry)
    return out


def paired_differences(rows: List[Dict]) -> List[Dict]:
    """PGS - random (same ratio and share) and PGS - none, per seed and metric."""
    by = {(*group_key(r), r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    out = []
    for pgs in dict.fromkeys(group_key(r) for r in rows if r["mode"] == "pgs"):
        _, ratio, share = pgs
        for against, other in (("random", ("random", ratio, share)), ("none", ("none", 0.0, None))):
            both = [s for s in seeds if (*pgs, s) in by and (*other, s) in by]
            if not both:
                continue
            for metric in METRICS:
                d = [by[(*pgs, s)][metric] - by[(*other, s)][metric] for s in both]
                out.append({"mask_ratio": ratio, "unmasked_share": share, "against": against, "metric": metric,
                            "seeds": both, "per_seed": d, "mean": statistics.mean(d),
                            "std": statistics.stdev(d) if len(d) > 1 else 0.0,
                            "positive": sum(x > 0 for x in d), "negative": sum(x < 0 for x in d)})
    return out


def _share(share) -> str:
    return "all" if share is None else f"{share:g}"


def print_equal_compute(doc: Dict) -> None:
    print(f"\nbudget {doc['budget']['flops'] / 1e12:.3f} TFLOP = {doc['budget']['steps']} unmasked steps")
    print(f"{'mode':<10}{'mask':>6}{'share':>7}{'steps':>7}{'seeds':>6}{'zero-shot':>16}{'i2t R@1':>16}"
          f"{'t2i R@1':>16}{'CPU s':>8}{'sel':>7}")
    for e in doc["summary"]:
        cells = "".join(f"{e[k]:>10.3f}±{e[k + '_std']:.3f}" for k in METRICS)
        print(f"{e['mode']:<10}{e['mask_ratio']:>6.2f}{_share(e['unmasked_share']):>7}{e['steps']:>7}"
              f"{e['seeds']:>6}{cells}{e['cpu_s']:>8.1f}{e['sel_share']:>7.1%}")
    print("\npaired differences, mean ± std over seeds (seeds > 0 / < 0)")
    for d in doc["paired"]:
        print(f"PGS - {d['against']:<7} mask {d['mask_ratio']:.2f} share {_share(d['unmasked_share']):>5} "
              f"{d['metric']:<14}{d['mean']:+.3f} ± {d['std']:.3f}  ({d['positive']}/{d['negative']})")


def equal_compute(args) -> int:
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="pgs_kernels: the native CPU kernel is not built")
    env = environment(device, "train_quality_equal_compute")
    load = LoadRecord(threads=args.threads * args.jobs)
    t0 = time.perf_counter()
    measured = [step_flops(args, "none", 0.0, device)]
    measured += [step_flops(args, m, r, device) for m in args.modes if m != "none" for r in args.ratios]
    flops = {(f["mode"], f["mask_ratio"]): f["flops"] for f in measured}
    plan = plan_equal_compute(args, flops)
    doc = {
        **env,
        "config": {"model": "tiny", "steps": args.steps, "epochs": args.epochs, "batch_size": args.batch_size,
                   "lr": args.lr, "warmup": args.warmup,
                   "schedule": "linear warm-up, cosine decay, both stretched to each run's steps",
                   "unmasked_shares": args.unmasked_shares, "unmasked_share_other_ratios": args.unmasked_share,
                   "threads": args.threads, "jobs": args.jobs, "eval_scenes": args.eval_scenes,
                   "zero_shot_scenes": args.zero_shot_scenes, "zero_shot_classes": len(COLORS) * len(SHAPES),
                   "eval_seed": EVAL_SEED, "zero_shot_seed": ZERO_SHOT_SEED, "data": "CaptionedScenes"},
        "budget": {"steps": args.steps, "flops": args.steps * flops[("none", 0.0)],
                   "definition": (f"FLOPs of {args.steps} unmasked training steps: matmuls, convolutions and "
                                  "attention of both towers, forward and backward, counted on one step with "
                                  "torch.utils.flop_counter.FlopCounterMode (CPU SDPA with its CUDA formula); "
                                  "elementwise ops, norms, the optimizer and the masking selection not counted")},
        "flops_per_step": measured,
        "plan": plan,
        "modes": args.modes,
        "ratios": args.ratios,
        "seeds": list(range(args.seeds)),
        "rows": [],
    }
    # seed-major: a study cut short keeps whole seeds
    jobs = [(entry, seed) for seed in range(args.seeds) for entry in plan]
    order = {(group_key(e), s): k for k, (e, s) in enumerate(jobs)}
    for f in measured:
        print(f"{f['mode']:<10} mask {f['mask_ratio']:.2f}: {f['flops'] / 1e9:.3f} GFLOP a step "
              f"(+{f['selection_flops'] / 1e9:.3f} selection), {f['tokens']} tokens")
    for e in plan:
        print(f"plan {e['mode']:<10} mask {e['mask_ratio']:.2f} share {_share(e['unmasked_share']):>5}: "
              f"{e['steps']} steps ({e['unmasked_steps']} unmasked, warm-up {e['warmup']}), "
              f"{e['budget_fraction']:.4f} of the budget", flush=True)

    def record(row: Dict) -> None:
        doc["rows"].append(row)
        doc["rows"].sort(key=lambda r: order[(group_key(r), r["seed"])])
        doc["wall_s"] = time.perf_counter() - t0
        print(f"[{len(doc['rows'])}/{len(jobs)}] {row['mode']:<9} mask {row['mask_ratio']:.2f} share "
              f"{_share(row['unmasked_share']):>5} seed {row['seed']}: {row['steps']} steps, zero-shot "
              f"{row['zero_shot_acc']:.3f} i2t {row['i2t_r1']:.3f} t2i {row['t2i_r1']:.3f} | {row['cpu_s']:.0f} CPU s "
              f"({doc['wall_s']:.0f} s so far)", flush=True)
        write_result(args.out, doc, quiet=True)  # after every run: a killed study keeps what it measured

    if args.jobs == 1:
        for entry, seed in jobs:
            record(train_planned(args, entry, seed))
    else:
        # spawn, not fork: the parent has already run torch (the FLOP count)
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for fut in as_completed([pool.submit(train_planned, args, entry, seed) for entry, seed in jobs]):
                record(fut.result())
    doc["summary"] = summarize_equal_compute(doc["rows"])
    doc["paired"] = paired_differences(doc["rows"])
    print_equal_compute(doc)
    return finish_study(args, doc, load, t0)


if __name__ == "__main__":
    sys.exit(main())
