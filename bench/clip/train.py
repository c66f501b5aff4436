"""Thin CLIP trainer: one model, one loss, the masking mode under test.

    python -m bench.clip.train --model tiny --mask pgs --steps 300 --out /tmp/tiny.json
    torchrun --nproc_per_node 8 -m bench.clip.train --model vit-b-16 --mask pgs \\
        --data train.csv --epochs 32 --batch-size 256

Single process, or one process per device under ``torchrun`` (DDP: NCCL on
CUDA, gloo on CPU); features are gathered across ranks for the loss, as
open_clip does. AdamW with a linear warm-up then cosine decay; bf16 autocast
on CUDA (``--precision``), optional activation checkpointing. The PGS token
weight follows the published schedule ``epoch / epochs`` (``set_epoch`` at
the start of every epoch).

Timing never forces a sync on the hot path: step and masking-slot times are
CUDA event pairs (``perf_counter`` on CPU), read and the losses fetched
every ``--log-every`` steps after one ``synchronize``. The JSON log has per
step loss, lr, step ms, masking ms and tokens kept, images/s per logging
window, the machine's load before and after (with a warning when another
process held a core the run needed) and a summary (images/s, step ms, masking
share, peak memory, loss at start and end). It is written only where
``--out`` says (nothing goes into bench/results/ unless asked); the summary is
printed either way.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import sys
import time
from contextlib import nullcontext

import torch

from bench.clip.data import batches, make_dataset, steps_per_epoch
from bench.clip.model import MASK_MODES, CONFIGS, build_model, clip_loss, config_dict, model_arg, param_groups
from bench.common import (LoadRecord, SectionTimer, argument_parser, environment, pick_device,
                          tf32_flags_restored, write_result)


def parse_args(argv=None):
    p = argument_parser(__doc__)
    p.add_argument("--model", default="tiny", type=model_arg,
                   help=f"{', '.join(sorted(CONFIGS))} or open_clip:<arch> (open_clip's model through use_pgs)")
    p.add_argument("--mask", default="pgs", choices=MASK_MODES)
    p.add_argument("--mask-ratio", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="default: one pass over a CSV; with synthetic data, --steps / --epochs")
    p.add_argument("--steps", type=int, default=None, help="total steps (split evenly over --epochs)")
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    p.add_argument("--wd", type=float, default=0.2)
    p.add_argument("--grad-clip", type=float, default=0.0, help="max grad norm, 0 = off")
    p.add_argument("--unmasked-steps", type=int, default=0,
                   help="the last N steps see every patch (unmasked tuning, as FLIP does); default 0")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a CSV of filepath/title rows")
    p.add_argument("--csv-separator", default="\t")
    p.add_argument("--csv-img-key", default="filepath")
    p.add_argument("--csv-caption-key", default="title")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for a CSV")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10, help="steps between syncs / log reads")
    p.add_argument("--out", "--log-json", dest="log_json", default=None,
                   help="write the JSON log here (default: none, the summary is printed)")
    p.add_argument("--save", default=None, help="write the final state_dict here")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * base * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def setup_distributed(device_arg):
    """(rank, world, device); initializes the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg is not None:
        pick_device(device_arg)  # a clear exit where the device is missing
    use_cuda = torch.cuda.is_available() if device_arg is None else device_arg.startswith("cuda")
    if use_cuda:
        device = torch.device("cuda", local) if world > 1 or device_arg in (None, "cuda") else torch.device(device_arg)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                **({"device_id": device} if use_cuda else {}))
    return rank, world, device


class Progress:
    """A one-line bar on a terminal; on a pipe, a line every 5 %."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.tty = sys.stderr.isatty()
        self.last_pct = -1

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        frac = step / max(1, self.total)
        if self.tty:
            n = int(30 * frac)
            sys.stderr.write(f"\r[{'#' * n}{'.' * (30 - n)}] {step}/{self.total} {text}")
            sys.stderr.flush()
        elif int(frac * 20) > self.last_pct or step == self.total:
            self.last_pct = int(frac * 20)
            print(f"{step}/{self.total} {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def peak_memory_mb(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"


def train(args) -> dict:
    """Trains as ``args`` say; returns the log (written to ``args.log_json`` if set)."""
    return fit(args)[1]


def fit(args, dataset=None, record_load: bool = True, verbose: bool = True):
    """Trains as ``args`` say; returns the trained (unwrapped) model and the
    log. ``dataset`` replaces the one ``args.data`` names; without
    ``record_load`` the log has no load block (a caller that runs many
    trainings records the load once); without ``verbose`` the summary is
    not printed."""
    # The training turns TF32 on for its CUDA matmuls. The flags are process-wide:
    # whatever runs next (an fp32 reference in the same test session) must not inherit them.
    with tf32_flags_restored():
        return _fit(args, dataset, record_load, verbose)


def _fit(args, dataset, record_load, verbose):
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args.device)
    load = LoadRecord(quiet=rank != 0) if record_load else None
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model = build_model(args.model, args.mask, args.mask_ratio, args.grad_checkpointing).to(device)
    raw = model
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    torch.manual_seed(args.seed + 1 + rank)  # masking noise differs per rank

    if dataset is None:
        dataset = make_dataset(args.data, raw.cfg, seed=args.seed, sep=args.csv_separator,
                               img_key=args.csv_img_key, caption_key=args.csv_caption_key)
    per_epoch = args.steps_per_epoch or steps_per_epoch(dataset, args.batch_size, world)
    if per_epoch is None:
        per_epoch = math.ceil((args.steps or 100) / args.epochs)
    total = args.steps if args.steps is not None else per_epoch * args.epochs
    warmup = min(args.warmup, max(1, total // 2))
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    opt = torch.optim.AdamW(param_groups(raw, args.wd), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    data = batches(dataset, args.batch_size, rank=rank, world=world, seed=args.seed, device=device,
                   num_workers=args.workers)
    step_timer, sel_timer = SectionTimer(device), SectionTimer(device)
    raw.visual.timer = sel_timer
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    log = {"config": {**vars(args), "world_size": world, "device": str(device), "bf16": bf16,
                      "total_steps": total, "steps_per_epoch": per_epoch, "warmup_steps": warmup,
                      "model_config": config_dict(raw),
                      "pgs_backend": pgs_backend(device) if args.mask == "pgs" else None},
           "steps": [], "windows": []}
    bar = Progress(total, rank == 0 and not args.no_progress)
    pending = []  # (step, epoch, lr, loss tensor, tokens, token_weight) awaiting the next sync
    window_t0, window_start = time.perf_counter(), 0
    t_train = window_t0
    model.train()
    epoch = -1
    for step in range(total):
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            raw.visual.set_epoch(epoch, args.epochs)
        if step == total - args.unmasked_steps and args.unmasked_steps > 0:
            raw.visual.set_mask("none")
        lr = lr_at(step, total, warmup, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        images, text = next(data)
        step_timer.start()
        with autocast():
            img_f, txt_f, scale = model(images, text)
        loss = clip_loss(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip)
        opt.step()
        with torch.no_grad():
            raw.logit_scale.clamp_(0, math.log(100))
        step_timer.stop()
        pending.append((step, epoch, lr, loss.detach(), raw.visual.last_num_tokens, raw.visual.token_weight,
                        step_timer.take(), sel_timer.take()))

        if len(pending) == args.log_every or step == total - 1:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            step_ms = []
            for s, e, lr_s, l, tok, tw, st, se in pending:
                step_ms.append(SectionTimer.total_ms(st))
                log["steps"].append({"step": s, "epoch": e, "lr": lr_s, "loss": float(l), "step_ms": step_ms[-1],
                                     "sel_ms": SectionTimer.total_ms(se), "tokens": tok, "token_weight": tw})
            ips = len(pending) * args.batch_size * world / (now - window_t0)
            log["windows"].append({"first_step": window_start, "steps": len(pending), "images_per_s": ips})
            bar.update(step + 1, f"ep {epoch} loss {float(pending[-1][3]):.3f} "
                                 f"{sum(step_ms) / len(step_ms):.1f} ms/step {ips:.0f} img/s")
            pending = []
            window_t0, window_start = time.perf_counter(), step + 1
    bar.close()
    raw.visual.timer = None
    if raw.visual.mask != args.mask:  # after unmasked tuning, the model keeps its masking mode
        raw.visual.set_mask(args.mask, args.mask_ratio)

    summary = summarize(log, device)
    summary["wall_s"] = time.perf_counter() - t_train  # the training loop, data included
    log["summary"] = summary
    if load is not None:
        log["load"] = load.finish()
    log = {**environment(device, "train"), **log}
    if rank == 0:
        if args.log_json:
            write_result(args.log_json, log, quiet=True)
        if args.save:
            torch.save(raw.state_dict(), args.save)
        if verbose:
            print(json.dumps(summary), flush=True)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return raw, log


def summarize(log: dict, device: torch.device) -> dict:
    steps, windows = log["steps"], log["windows"]
    n = len(steps)
    skip = min(max(1, n // 10), n - 1)  # the first steps carry allocator and kernel warm-up
    timed = steps[skip:]
    step_ms = sum(s["step_ms"] for s in timed) / len(timed)
    sel_ms = sum(s["sel_ms"] for s in timed) / len(timed)
    w = windows[1:] or windows
    ips = sum(x["images_per_s"] * x["steps"] for x in w) / sum(x["steps"] for x in w)
    head = max(1, min(10, n // 5))
    mem, kind = peak_memory_mb(device)
    return {
        "steps": n,
        "images_per_s": ips,
        "step_ms": step_ms,
        "step_ms_median": statistics.median(s["step_ms"] for s in timed),
        "sel_ms": sel_ms,
        "sel_share": sel_ms / step_ms if step_ms else 0.0,
        "tokens": steps[-1]["tokens"],
        "loss_start": sum(s["loss"] for s in steps[:head]) / head,
        "loss_end": sum(s["loss"] for s in steps[-head:]) / head,
        "peak_mem_mb": mem,
        "peak_mem_kind": kind,
    }


def pgs_backend(device: torch.device) -> str:
    """Which kernel ``backend="auto"`` runs on ``device``."""
    from pgs_kernels import resolve_backend

    return resolve_backend("auto", device).name


def main(argv=None):
    train(parse_args(argv))


if __name__ == "__main__":
    main()
