r"""Differential fuzzing of ``pgs_select``: every backend against the fp64 reference.

The cases, the comparison and the categories are :mod:`python_ref.fuzz`'s.

Writes ``bench/out/fuzz-cpu.json`` (overwritten; ``--refresh`` for
``bench/results/``, ``--out`` for elsewhere) with the counts per backend and every finding's seed::

    python -m bench.fuzz --seconds 600          # about 10 minutes on CPU
    python -m bench.fuzz --seed 1234 --cases 1  # replay one case
"""

from __future__ import annotations

import sys

import torch

import pgs_kernels
from bench.common import LoadRecord, argument_parser, environment, out_help, result_path, write_result
from python_ref.fuzz import CATEGORIES, fuzz


def main(argv=None) -> int:
    ap = argument_parser(__doc__)
    ap.add_argument("--seconds", type=float, default=600.0, help="time budget (default 600)")
    ap.add_argument("--cases", type=int, help="stop after this many cases")
    ap.add_argument("--seed", type=int, default=0, help="first case's seed")
    ap.add_argument("--backends", nargs="+", help="default: every backend usable on CPU but the interpreter")
    ap.add_argument("--max-patches", type=int, default=64)
    ap.add_argument("--ot-iters", type=int, nargs="+", help="ot_iters from these values only (as the CUDA test does)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=result_path("fuzz-cpu.json"), help=out_help("fuzz-cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    backends = args.backends or [b for b in pgs_kernels.available_backends("cpu") if b != "triton"]
    env = environment("cpu", "fuzz")
    load = LoadRecord(quiet=True)  # counts, not timings: a busy machine only slows it down
    print(f"fuzzing {', '.join(backends)} against the fp64 reference for {args.seconds:g} s "
          f"from seed {args.seed} (commit {env['commit'][:12]})", flush=True)
    res = fuzz(backends, args.seconds, args.seed, args.cases, args.max_patches,
               log=lambda s: print(s, flush=True), ot_iters_from=args.ot_iters)
    doc = {**env, "load": load.finish(), **res, "findings": res["findings"][:500]}
    print(f"\n{res['seed_end'] - res['seed_start']} cases in {res['seconds']} s")
    mismatches = {b: sum(c[k] for k in CATEGORIES if k != "near_tie") for b, c in res["counts"].items()}
    for b, c in res["counts"].items():
        print(f"  {b:10s} {c['cases']} cases, {mismatches[b]} mismatches, {c['near_tie']} near-ties "
              + " ".join(f"{k}={c[k]}" for k in CATEGORIES if c[k] and k != "near_tie"))
    write_result(args.out, doc)
    return 0 if not any(mismatches.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
