"""Training throughput of each masking mode on one model and one batch.

    python -m bench.clip.throughput            # CUDA: ViT-B/16, batch 256, bf16; CPU: tiny, batch 64

For every mode (none, random, pgs, pgs-reference, published) it times

(a) the image tower alone: forward + backward of a scalar of its features;
(b) the whole CLIP step: both towers, contrastive loss, backward, AdamW;

after warm-up steps, starting each mode from the same weights and optimizer
state. Every step and its masking slot are timed with CUDA event pairs
(``perf_counter`` on CPU) and only the measured loops synchronize (once
before, once after). A round's figure is the per-step median; rounds
interleave the modes (``--repeats``) and the fastest is kept, so a drifting
clock or a busy neighbour hurts every mode alike.

Writes ``bench/out/train-<device>.json`` (``train-<model>-<device>.json`` for
another ``--model``; ``bench/results/`` with ``--refresh``; overwritten)
unless ``--out`` is given: the device, torch and triton versions, the commit, the
machine's load before and after (with a warning when another process held a
core the run needed) and one row per mode: images/s of (a) and (b),
their ratios to ``none``, the step time relative to ``random``, the masking
slot's milliseconds and share of the step, tokens reaching the blocks, and
peak memory. Targets (on an H100 with ViT-B/16, batch 256): pgs image tower
>= 1.9x none, whole step >= 1.6x none, pgs step <= 1.02x random.
"""

from __future__ import annotations

import copy
import math
import statistics
import sys
from contextlib import nullcontext

import torch

from bench.clip.data import SyntheticScenes
from bench.clip.model import MASK_MODES, CONFIGS, build_model, clip_loss, model_arg, param_groups
from bench.clip.open_clip_model import MASK_MODES as OPEN_CLIP_MODES
from bench.clip.open_clip_model import is_open_clip_name
from bench.clip.train import peak_memory_mb, pgs_backend
from bench.common import (LoadRecord, SectionTimer, argument_parser, device_slug, environment, out_help,
                          pick_device, result_path, sync, tf32_flags_restored, write_result)

TARGETS = {"tower_pgs_vs_none_min": 1.9, "step_pgs_vs_none_min": 1.6, "step_pgs_vs_random_max": 1.02}


def parse_args(argv=None):
    p = argument_parser(__doc__)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--model", default=None, type=model_arg,
                   help=f"{', '.join(sorted(CONFIGS))} or open_clip:<arch>, e.g. open_clip:ViT-B-16 (open_clip's "
                        "model masked through use_pgs); default: vit-b-16 on CUDA, tiny on CPU")
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA, 64 on CPU")
    p.add_argument("--mask-ratio", type=float, default=0.5)
    p.add_argument("--token-weight", type=float, default=0.5,
                   help="PGS/published token weight during the runs (mid-schedule, so token similarity is on)")
    p.add_argument("--modes", default=None,
                   help=f"default: {','.join(MASK_MODES)} (open_clip: {','.join(OPEN_CLIP_MODES)})")
    p.add_argument("--warmup", type=int, default=None, help="default: 5 on CUDA, 3 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 20)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None,
                   help=out_help("train-<device>.json, or train-<model>-<device>.json for another --model"))
    return p.parse_args(argv)


def measure(fn, model, device, warmup: int, steps: int):
    """Per-step median ms of ``fn()``, its masking slot's median ms, and peak memory MB.

    Each step is an event pair (``perf_counter`` on CPU) with no sync in
    between; the median shrugs off a step that a busy neighbour stalled."""
    sel_timer, step_timer = SectionTimer(device), SectionTimer(device)
    model.visual.timer = sel_timer
    for _ in range(warmup):
        fn()
    sync(device)
    sel_timer.take()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_recs, sel_recs = [], []
    for _ in range(steps):
        step_timer.start()
        fn()
        step_timer.stop()
        step_recs.append(step_timer.take())
        sel_recs.append(sel_timer.take())
    sync(device)
    model.visual.timer = None
    step_ms = statistics.median(SectionTimer.total_ms(r) for r in step_recs)
    sel_ms = statistics.median(SectionTimer.total_ms(r) for r in sel_recs)
    return step_ms, sel_ms, peak_memory_mb(device)[0]


def run(args) -> dict:
    # TF32 is for this run only: a later fp32 computation in the same process
    # (a test session) must not inherit it.
    with tf32_flags_restored():
        return _run(args)


def _run(args) -> dict:
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device, "train_throughput")
    name = args.model or ("vit-b-16" if cuda else "tiny")
    B = args.batch_size or (256 if cuda else 64)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 3)
    steps = args.steps or 20
    repeats = args.repeats or 3
    allowed = OPEN_CLIP_MODES if is_open_clip_name(name) else MASK_MODES
    modes = [m.strip() for m in (args.modes or ",".join(allowed)).split(",") if m.strip()]
    for m in modes:
        if m not in allowed:
            raise SystemExit(f"--modes: unknown mode {m!r} for {name}; choose from {allowed}")
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cuda)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    load = LoadRecord()
    torch.manual_seed(0)
    model = build_model(name, "none", args.mask_ratio, args.grad_checkpointing).to(device).train()
    cfg = model.cfg
    images, text = SyntheticScenes(cfg.image_size, cfg.context_length, cfg.vocab_size, seed=0).batch(range(B), device)
    init_state = copy.deepcopy(model.state_dict())
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext

    def tower_step():
        with autocast():
            feats = model.visual(images)
        feats.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    state = {}

    def clip_step():
        opt = state["opt"]
        with autocast():
            img_f, txt_f, scale = model(images, text)
        loss = clip_loss(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    results = {m: {"tower_ms": [], "step_ms": [], "tower_sel_ms": [], "step_sel_ms": [], "peak_mem_mb": 0.0}
               for m in modes}
    tokens = {}
    for rnd in range(repeats):
        for m in modes:
            model.visual.set_mask("none")  # the saved state has no dropout layer (nor its schedule buffer)
            model.load_state_dict(init_state)
            model.visual.set_mask(m, args.mask_ratio)
            model.visual.set_epoch(args.token_weight, 1.0)
            torch.manual_seed(1 + rnd)
            state["opt"] = torch.optim.AdamW(param_groups(model, 0.2), lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
            t_ms, t_sel, t_mem = measure(tower_step, model, device, warmup, steps)
            s_ms, s_sel, s_mem = measure(clip_step, model, device, warmup, steps)
            r = results[m]
            r["tower_ms"].append(t_ms); r["tower_sel_ms"].append(t_sel)
            r["step_ms"].append(s_ms); r["step_sel_ms"].append(s_sel)
            r["peak_mem_mb"] = max(r["peak_mem_mb"], t_mem, s_mem)
            tokens[m] = model.visual.last_num_tokens
            print(f"round {rnd + 1}/{repeats} {m:14s} tower {t_ms:8.2f} ms  step {s_ms:8.2f} ms  "
                  f"masking {s_sel:6.2f} ms", file=sys.stderr, flush=True)
    state.clear()

    # the fastest round: contention only ever adds time
    med = {m: {k: min(v) if isinstance(v, list) else v for k, v in r.items()} for m, r in results.items()}
    rows = []
    for m in modes:
        r = med[m]
        row = {
            "mode": m,
            "tokens": tokens[m],
            "tower_ms": r["tower_ms"],
            "tower_images_per_s": B * 1e3 / r["tower_ms"],
            "step_ms": r["step_ms"],
            "step_images_per_s": B * 1e3 / r["step_ms"],
            "sel_ms": r["step_sel_ms"],
            "sel_share_of_step": r["step_sel_ms"] / r["step_ms"],
            "sel_share_of_tower": r["tower_sel_ms"] / r["tower_ms"],
            "peak_mem_mb": r["peak_mem_mb"],
            "tower_ms_rounds": results[m]["tower_ms"],
            "step_ms_rounds": results[m]["step_ms"],
        }
        if "none" in med:
            row["tower_speedup_vs_none"] = med["none"]["tower_ms"] / r["tower_ms"]
            row["step_speedup_vs_none"] = med["none"]["step_ms"] / r["step_ms"]
        if "random" in med:
            row["step_time_vs_random"] = r["step_ms"] / med["random"]["step_ms"]
            row["tower_time_vs_random"] = r["tower_ms"] / med["random"]["tower_ms"]
        rows.append(row)

    by = {r["mode"]: r for r in rows}
    checks = {}
    if "pgs" in by and "none" in by:
        checks["tower_pgs_vs_none"] = by["pgs"]["tower_speedup_vs_none"]
        checks["step_pgs_vs_none"] = by["pgs"]["step_speedup_vs_none"]
    if "pgs" in by and "random" in by:
        checks["step_pgs_vs_random"] = by["pgs"]["step_time_vs_random"]
    report = {
        **env,
        "load": load.finish(),
        "pgs_backend": pgs_backend(device),
        "model": name,
        "batch_size": B,
        "mask_ratio": args.mask_ratio,
        "token_weight": args.token_weight,
        "precision": "bf16-autocast" if bf16 else "fp32",
        "grad_checkpointing": args.grad_checkpointing,
        "warmup": warmup,
        "steps": steps,
        "repeats": repeats,
        "statistic": "min over rounds of the per-step median",
        "rows": rows,
        "checks": checks,
        "targets": TARGETS,
        "targets_apply": cuda and name == "vit-b-16" and "h100" in device_slug(device),
    }
    print_table(report)
    default_model = "vit-b-16" if cuda else "tiny"
    model_part = "" if name == default_model else name.replace(":", "-").lower() + "-"
    write_result(args.out or result_path(f"train-{model_part}{device_slug(device)}.json"), report)
    return report


def print_table(rep: dict) -> None:
    print(f"{rep['device_name']} | torch {rep['torch']} | triton {rep['triton']} | {rep['model']} batch "
          f"{rep['batch_size']} {rep['precision']} | mask_ratio {rep['mask_ratio']} | pgs backend {rep['pgs_backend']}")
    head = (f"{'mode':14s} {'tokens':>6s} {'tower img/s':>12s} {'x none':>7s} {'step img/s':>11s} {'x none':>7s} "
            f"{'t/random':>8s} {'mask ms':>8s} {'% step':>7s} {'peak MB':>9s}")
    print(head)
    print("-" * len(head))
    for r in rep["rows"]:
        print(f"{r['mode']:14s} {r['tokens']:6d} {r['tower_images_per_s']:12.1f} "
              f"{r.get('tower_speedup_vs_none', float('nan')):7.2f} {r['step_images_per_s']:11.1f} "
              f"{r.get('step_speedup_vs_none', float('nan')):7.2f} {r.get('step_time_vs_random', float('nan')):8.3f} "
              f"{r['sel_ms']:8.2f} {100 * r['sel_share_of_step']:6.1f}% {r['peak_mem_mb']:9.0f}")
    c, t = rep["checks"], rep["targets"]
    if c:
        note = "" if rep["targets_apply"] else "  (targets are for ViT-B/16 on an H100)"
        print(f"pgs tower x none {c.get('tower_pgs_vs_none', float('nan')):.2f} (target >= {t['tower_pgs_vs_none_min']}), "
              f"step x none {c.get('step_pgs_vs_none', float('nan')):.2f} (>= {t['step_pgs_vs_none_min']}), "
              f"step / random {c.get('step_pgs_vs_random', float('nan')):.3f} (<= {t['step_pgs_vs_random_max']}){note}")


def main(argv=None):
    run(parse_args(argv))


if __name__ == "__main__":
    main()
