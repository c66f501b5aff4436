"""Samples/s of open_clip's trainer with and without PGS, from the trainer's own log.

    python -m bench.trainer_speed       # CUDA: ViT-B-16, batch 256, amp; CPU: ViT-S-16 at 112 px, batch 16, 1 thread
    python -m bench.trainer_speed --device cpu --model ViT-B-16 --batch-size 8 --steps 6 --warmup 2

Runs ``python -m pgs_kernels.train`` (open_clip_train.main) once per variant,
one epoch of ``--steps`` steps on synthetic data (``--dataset-type
synthetic``), logging every step, in a fresh process each:

* ``none``: no masking (open_clip_train as it is);
* ``random``: open_clip's random patch dropout, ``--force-patch-dropout 0.5``;
* ``pgs``: the published flags, ``--force-patch-dropout 0.05 --target-mask-ratio
  0.5 --min-mask-ratio 0.5 --use-ed --use-otn``, with ``--pgs-token-weight 0.5``
  (mid-schedule: token similarity on, as in most of a run; epoch 0 of the
  schedule would leave it off).

A variant's figure is the median over the steps after ``--warmup`` of the
samples/s open_clip_train logs for each step ("Batch (t): ..., N/s"; the
step's wall time, data loading included). On CUDA, a run of ``none`` that
runs out of memory is retried at half the batch, and every variant uses the
batch that fitted.

Writes ``bench/out/trainer-<device>.json`` (``bench/results/`` with
``--refresh``; overwritten) unless ``--out`` is given: the device, torch,
triton and open_clip versions, the commit, the load average before and
after, the settings, and per variant the samples/s (median, mean, min, max,
steps measured), the tokens that reach the image tower, the command and its
wall time; then the ratios pgs/none, random/none and pgs/random. Where
open_clip_train does not import, it says so and writes a JSON with
``skipped`` (exit status 0): the trainer is an optional part of the package.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, Optional

from bench.common import (ROOT, argument_parser, environment, load_average, out_help, pick_device, result_path,
                          write_result)

VARIANTS = {
    "none": [],
    "random": ["--force-patch-dropout", "0.5"],
    "pgs": ["--force-patch-dropout", "0.05", "--target-mask-ratio", "0.5", "--min-mask-ratio", "0.5", "--use-ed",
            "--use-otn", "--pgs-token-weight", "0.5"],
}
STEP = re.compile(r"Train Epoch: \d+ \[.*?\] .*?Batch \(t\): [\d.]+, ([\d.]+)/s")
TOKENS = re.compile(r"in training (\d+ \+ \d+) of the (\d+ \+ \d+) tokens")
OOM = re.compile(r"out of memory", re.IGNORECASE)


def parse_args(argv=None):
    p = argument_parser(__doc__)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--model", default=None,
                   help="an open_clip model name (default: ViT-B-16 on CUDA, ViT-S-16 on CPU)")
    p.add_argument("--image-size", type=int, default=None, help="--force-image-size (default: the model's; 112 on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="per process (default: 256 on CUDA, 16 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="steps per variant (default: 40 on CUDA, 8 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="first steps left out (default: 10 on CUDA, 2 on CPU)")
    p.add_argument("--precision", default=None, help="open_clip_train's --precision (default: amp on CUDA, fp32 on CPU)")
    p.add_argument("--workers", type=int, default=None, help="data loader workers (default: 8 on CUDA, 0 on CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS of the trainer (default: 1 on CPU, where a busy neighbour makes "
                        "multi-threaded steps wait on each other; unset on CUDA)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--run-timeout", type=float, default=None,
                   help="seconds per trainer run (default: 110 on CUDA, 600 on CPU)")
    p.add_argument("--out", default=None, help=out_help("trainer-<device>.json"))
    args = p.parse_args(argv)
    for name in args.variants.split(","):
        if name not in VARIANTS:
            p.error(f"--variants: unknown variant {name!r} (of {', '.join(VARIANTS)})")
    return args


def trainer_missing() -> Optional[str]:
    try:
        import open_clip_train.main  # noqa: F401
    except Exception as exc:  # torchvision beside a CPU-only torch raises RuntimeError, not ImportError
        return f"{type(exc).__name__}: {exc}"
    return None


def run_variant(name: str, cfg: Dict, batch: int, workdir: str) -> Dict:
    """One trainer run; its per-step samples/s from out.log."""
    cmd = [sys.executable, "-m", "pgs_kernels.train", "--dataset-type", "synthetic",
           "--train-num-samples", str(batch * cfg["steps"]), "--batch-size", str(batch), "--epochs", "1",
           "--model", cfg["model"], "--device", cfg["device"], "--precision", cfg["precision"],
           "--workers", str(cfg["workers"]), "--log-every-n-steps", "1", "--warmup", "1", "--seed", "0",
           # --logs none: open_clip_train writes out.log under ./none/<name>/ and no checkpoint
           "--logs", "none", "--name", f"{name}-b{batch}", *VARIANTS[name]]
    if cfg["image_size"]:
        cmd += ["--force-image-size", str(cfg["image_size"])]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if cfg["threads"]:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(cfg["threads"])
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=cfg["run_timeout"])
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = "timeout"
        output = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
    wall = time.monotonic() - t0
    log_path = os.path.join(workdir, "none", f"{name}-b{batch}", "out.log")
    log = open(log_path).read() if os.path.exists(log_path) else ""
    rates = [float(m.group(1)) for m in STEP.finditer(log)]
    measured = rates[cfg["warmup"]:]
    row = {"batch_size": batch, "exit": rc, "wall_s": round(wall, 1), "steps_logged": len(rates),
           "command": " ".join(cmd[1:])}
    tokens = TOKENS.search(log)
    if tokens:
        row["tokens_train"], row["tokens_all"] = tokens.group(1), tokens.group(2)
    if rc == 0 and measured:
        row.update(samples_per_s=round(statistics.median(measured), 2), mean=round(statistics.mean(measured), 2),
                   min=round(min(measured), 2), max=round(max(measured), 2), steps_measured=len(measured))
    else:
        row["oom"] = bool(OOM.search(output))
        row["output_tail"] = output[-3000:]
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    doc = environment(device, "trainer_speed")
    out = args.out or result_path(f"trainer-{doc['device']}.json")
    missing = trainer_missing()
    if missing:
        print(f"trainer_speed: skipped: open_clip_train does not import ({missing}); "
              "pip install \"pgs-kernels[train]\" to time the trainer", flush=True)
        doc["skipped"] = f"open_clip_train does not import: {missing}"
        write_result(out, doc)
        return 0
    import open_clip

    cfg = {
        "model": args.model or ("ViT-B-16" if cuda else "ViT-S-16"),
        "image_size": args.image_size or (None if cuda else 112),
        "batch_size": args.batch_size or (256 if cuda else 16),
        "steps": args.steps or (40 if cuda else 8),
        "warmup": (10 if cuda else 2) if args.warmup is None else args.warmup,
        "precision": args.precision or ("amp" if cuda else "fp32"),
        "workers": (8 if cuda else 0) if args.workers is None else args.workers,
        "device": "cuda" if cuda else "cpu",
        "threads": args.threads or (None if cuda else 1),
        "run_timeout": args.run_timeout or (110 if cuda else 600),
    }
    if cfg["steps"] <= cfg["warmup"]:
        raise SystemExit(f"trainer_speed: --steps ({cfg['steps']}) must exceed --warmup ({cfg['warmup']})")
    doc.update(open_clip=open_clip.__version__, settings=cfg, load={"before": load_average()})
    names = args.variants.split(",")
    if "none" in names:  # the unmasked run needs the most memory: it goes first and sets the batch
        names = ["none"] + [n for n in names if n != "none"]
    rows: Dict[str, Dict] = {}
    batch = cfg["batch_size"]
    with tempfile.TemporaryDirectory(prefix="trainer_speed_") as workdir:
        for name in names:
            print(f"trainer_speed: {name}, {cfg['model']}, batch {batch}, {cfg['steps']} steps ...", flush=True)
            row = run_variant(name, cfg, batch, workdir)
            while cuda and name == "none" and row.get("oom") and batch > 8:
                batch //= 2
                print(f"trainer_speed: out of memory; batch {batch}", flush=True)
                row = run_variant(name, cfg, batch, workdir)
            rows[name] = row
            print(f"  {row.get('samples_per_s', 'failed')} samples/s (exit {row['exit']}, {row['wall_s']} s)",
                  flush=True)
    doc["load"]["after"] = load_average()
    doc["variants"] = rows
    rate = {n: r.get("samples_per_s") for n, r in rows.items()}
    doc["ratios"] = {f"{a}/{b}": round(rate[a] / rate[b], 3)
                     for a, b in (("pgs", "none"), ("random", "none"), ("pgs", "random"))
                     if rate.get(a) and rate.get(b)}
    write_result(out, doc)
    print(json.dumps({"samples_per_s": rate, "ratios": doc["ratios"]}), flush=True)
    return 0 if all(r.get("samples_per_s") for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
