"""Speed of the native C++ CPU kernel against the pure-PyTorch reference.

    python -m bench.native_speed            # batch 64, 224x224, patch 16, tokens 768, token_weight 0.5

Times ``pgs_kernels.pgs_select(..., backend="native")`` and
``python_ref.pgs_select(..., dtype=float32)`` (and ``dtype=float64``, for
information) on the same inputs and noise, with 1 and with 2 intra-op threads
(``torch.set_num_threads``). Each figure is the median of ``--repeats`` calls
after ``--warmup`` calls, timed with ``time.perf_counter``; for each thread
count the implementations are interleaved round by round, so a busy
neighbour hurts each alike.

Prints a table and writes ``bench/out/native-cpu.json`` (``bench/results/``
with ``--refresh``; overwritten) unless ``--out`` is given: the environment (CPU model, torch version,
commit), the machine's load before and after (with a warning when another
process held a core the run needed), and one row per (implementation,
threads). Targets: native >= 10x faster than the fp32 reference, <= 1 ms per
image on one thread.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import pgs_kernels
import python_ref

if __package__:
    from .common import LoadRecord, argument_parser, cpu_model, environment, out_help, result_path, write_result
else:  # run as a file (python bench/native_speed.py): bench/ is the first import path
    from common import LoadRecord, argument_parser, cpu_model, environment, out_help, result_path, write_result

TARGETS = {"speedup_vs_fp32_reference_min": 10.0, "ms_per_image_1_thread_max": 1.0}
DEFAULT_OUT = "native-cpu.json"


def parse_args(argv=None):
    p = argument_parser(__doc__)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--token-dim", type=int, default=768)
    p.add_argument("--token-weight", type=float, default=0.5)
    p.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-fp64", action="store_true", help="skip the (slow) fp64 reference")
    p.add_argument("--out", default=result_path(DEFAULT_OUT), help=out_help(DEFAULT_OUT))
    return p.parse_args(argv)


def cpu_simd() -> str:
    """The compiled variant the native kernel dispatches to on this CPU, as
    the kernel itself reports it."""
    return {16: "avx512", 8: "avx2", 4: "baseline"}[pgs_kernels.op._C.simd_width()]


def main(argv=None):
    args = parse_args(argv)
    if not pgs_kernels.NATIVE_AVAILABLE:
        sys.exit(f"the native extension is not built ({pgs_kernels.op.NATIVE_ERROR}); "
                 "run: pip install --no-build-isolation --no-deps -e .")
    B, S, P, D = args.batch_size, args.size, args.patch_size, args.token_dim
    L = (S // P) ** 2
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, S, S, generator=g)
    tokens = torch.randn(B, L, D, generator=g)
    noise = torch.rand(B, L, generator=g)
    kw = dict(noise=noise, patch_size=P, token_weight=args.token_weight)

    impls = {
        "native": lambda: pgs_kernels.pgs_select(images, tokens, backend="native", **kw),
        "reference-fp32": lambda: python_ref.pgs_select(images, tokens, dtype=torch.float32, **kw),
    }
    if not args.no_fp64:
        impls["reference-fp64"] = lambda: python_ref.pgs_select(images, tokens, dtype=torch.float64, **kw)
    threads = [int(t) for t in args.threads.split(",") if t]

    env = environment("cpu", "native_speed")
    load = LoadRecord(threads=max(threads))
    before = torch.get_num_threads()
    times = {(name, n): [] for name in impls for n in threads}
    try:
        # One thread count at a time (switching counts leaves OpenMP workers
        # spinning), implementations interleaved round by round within it.
        for n in threads:
            torch.set_num_threads(n)
            for fn in impls.values():
                for _ in range(args.warmup):
                    fn()
            for _ in range(args.repeats):
                for name, fn in impls.items():
                    t0 = time.perf_counter()
                    fn()
                    times[(name, n)].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    load_block = load.finish()

    rows = []
    for (name, n), ts in times.items():
        ms = 1000.0 * statistics.median(ts)
        rows.append({"impl": name, "threads": n, "median_ms": ms, "ms_per_image": ms / B,
                     "min_ms": 1000.0 * min(ts), "repeats": len(ts)})
    by = {(r["impl"], r["threads"]): r for r in rows}
    for r in rows:
        nat = by[("native", r["threads"])]["median_ms"]
        r["native_speedup"] = r["median_ms"] / nat  # how many times faster native is than this row

    simd = cpu_simd()
    print(f"pgs_select on CPU: batch {B}, {S}x{S}, patch {P} (L={L}), fp32 images, fp32 tokens D={D}, "
          f"token_weight={args.token_weight}; {cpu_model()} ({simd}), torch {torch.__version__}")
    print(f"{'impl':<16}{'threads':>8}{'median ms':>12}{'ms/image':>10}{'native x':>10}")
    for r in rows:
        print(f"{r['impl']:<16}{r['threads']:>8}{r['median_ms']:>12.1f}{r['ms_per_image']:>10.3f}"
              f"{r['native_speedup']:>10.1f}")
    summary = {}
    if 1 in threads:
        summary["native_ms_per_image_1_thread"] = by[("native", 1)]["ms_per_image"]
    for n in threads:
        summary[f"native_over_fp32_reference_time_{n}_threads"] = (
            by[("native", n)]["median_ms"] / by[("reference-fp32", n)]["median_ms"])
        summary[f"speedup_vs_fp32_reference_{n}_threads"] = by[("reference-fp32", n)]["native_speedup"]
        # Best against best: the reference's time swings with page-fault cost.
        summary[f"best_of_speedup_vs_fp32_reference_{n}_threads"] = (
            by[("reference-fp32", n)]["min_ms"] / by[("native", n)]["min_ms"])
    for k, v in summary.items():
        print(f"{k}: {v:.4g}")
    print(f"load average before {load_block['before']}, after {load_block['after']} "
          f"({load_block['cpus']} CPUs, up to {load_block['threads']} threads)"
          + (" -- BUSY, see the warning above" if load_block["busy"] else ""))

    result = {
        **env,
        "cpu_model": cpu_model(),
        "cpu_simd": simd,
        "config": {"batch_size": B, "size": S, "patch_size": P, "num_patches": L, "token_dim": D,
                   "token_weight": args.token_weight, "images_dtype": "float32", "tokens_dtype": "float32",
                   "threads": threads, "repeats": args.repeats, "warmup": args.warmup,
                   "timer": "time.perf_counter, median"},
        "load": load_block,
        "targets": TARGETS,
        "summary": summary,
        "rows": rows,
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
