"""Speed of the native C++ CPU kernel against the pure-PyTorch reference and
against its own floor, the time to read its inputs once.

    python -m bench.native_speed            # batch 64, 224x224, patch 16, tokens 768, token_weight 0.5

Times ``pgs_kernels.pgs_select(..., backend="native")`` with fp32 images and
fp32 tokens and with the same tokens in bf16, its floor for each, and
``python_ref.pgs_select(..., dtype=float32)`` (and ``dtype=float64``, for
information; fp32 tokens) on the same inputs and noise, with 1 and with 2
intra-op threads (``torch.set_num_threads``). Each figure is the median of
``--repeats`` calls after ``--warmup`` calls, timed with
``time.perf_counter``; for each thread count every row is interleaved round
by round, so a busy neighbour hurts each alike.

The floor. A call reads its images (B C H W fp32), its tokens (B L D, fp32
or bf16) and its noise (B L fp32) and writes a few bytes per patch, so no
implementation of it can take less than the time to read

    bytes = 4 B C H W + s_t B L D + 4 B L       (s_t = 4 fp32, 2 bf16 tokens)

once from memory. ``floor_ms`` is that read, measured in the same run on the
same thread count: ``torch.ops.pgs_kernels_bench.read_bytes([images,
tokens, noise])`` (csrc/read.cpp) sums the raw bytes of the three tensors as
64-bit words with the kernel's widest vectors, four accumulators deep, the
bytes cut into 64 KiB chunks spread over ATen's intra-op threads with
``at::parallel_for`` (the pool the kernel itself runs on). One vector add per
64 bytes leaves it bound by memory bandwidth alone. It is used rather than a
torch reduction because it reads all three tensors in one parallel region,
as the kernel does, with no dtype-dependent arithmetic (a float sum of the
bf16 tokens would widen them on the way) and no output beyond one word; on
the development host ``images.view(torch.int64).sum()`` reaches the same
bandwidth on one thread. Reported per (tokens dtype, threads):

    ratio      = kernel_ms / floor_ms            (target <= 1.5)
    floor_gbps = bytes / floor_ms                 (the read's bandwidth)
    kernel_gbps = bytes / kernel_ms               (the kernel's, on the same bytes)
    cached_ms  = B x (time per image of the same call on the batch's first
                 CACHED = 2 images, repeated: inputs in cache, no memory stalls)
    cached_over_floor = cached_ms / floor_ms      (above 1.5: arithmetic alone misses)

The steps. After the timed rounds the kernel's own step clocks
(``pgs_kernels._C.step_profile``, off otherwise) time ``--profile-calls``
further calls per (tokens dtype, threads): per step the steady-clock time
summed over threads, divided by the calls and the thread count (so the
steps add up to about the wall time of a call), and its share. The steps
are csrc's: convert (per-image copies, only for inputs not read in place),
edge (step 1, edge.cpp), stats (min-max and keys), order (the candidates),
similarity_pixels and similarity_tokens (step 3, similarity.cpp: the pixel
and the token dot products against the candidates and the S they make),
sinkhorn (step 4, sinkhorn.cpp) and select (step 5). For the two dot-product
steps ``gflops`` is 2 k L (n + 1) B / time (n = C P^2 or D: the dots with k
candidates and the squared norms), per thread: set beside the core's peak it
says whether the step is bound by arithmetic or by memory.

Prints the tables and writes ``bench/out/native-cpu.json`` (``bench/results/``
with ``--refresh``; overwritten) unless ``--out`` is given: the environment (CPU model, torch version,
commit), the machine's load before and after (with a warning when another
process held a core the run needed), one row per (implementation,
threads), the ``floors`` and the ``steps``. Targets: native >= 10x faster
than the fp32 reference, <= 1 ms per image on one thread, <= 1.5x its floor.
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

# Images of the in-cache run (the batch's first ones, repeated).
CACHED = 2
TARGETS = {"speedup_vs_fp32_reference_min": 10.0, "ms_per_image_1_thread_max": 1.0, "native_over_floor_max": 1.5}
DEFAULT_OUT = "native-cpu.json"
# The kernel's step clocks (csrc/op.cpp), in its order; token_sweep is the
# token part of similarity.
STEPS = ("convert", "edge", "stats", "order", "similarity_pixels", "similarity_tokens", "sinkhorn", "select")


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
    p.add_argument("--profile-calls", type=int, default=5,
                   help="calls per (tokens dtype, threads) timed step by step after the rounds")
    p.add_argument("--no-fp64", action="store_true", help="skip the (slow) fp64 reference")
    p.add_argument("--out", default=result_path(DEFAULT_OUT), help=out_help(DEFAULT_OUT))
    return p.parse_args(argv)


def cpu_simd() -> str:
    """The compiled variant the native kernel dispatches to on this CPU, as
    the kernel itself reports it."""
    return {16: "avx512", 8: "avx2", 4: "baseline"}[pgs_kernels.op._C.simd_width()]


def read_floor(*tensors):
    """Read every byte of ``tensors`` once (csrc/read.cpp; the module docstring)."""
    return torch.ops.pgs_kernels_bench.read_bytes(list(tensors))


def input_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def step_split(fn, calls: int, threads: int) -> dict:
    """Per step of the native kernel: ms per call (thread time / threads) and share."""
    C = pgs_kernels.op._C
    C.step_profile(True)
    try:
        for _ in range(calls):
            fn()
        ns = C.step_times()
    finally:
        C.step_profile(False)
    ns = dict(ns)
    tokens = ns.pop("token_sweep")
    ns["similarity_pixels"] = ns.pop("similarity") - tokens
    ns["similarity_tokens"] = tokens
    ms = {k: ns[k] / 1e6 / calls / threads for k in STEPS}
    total = sum(ms.values())
    return {k: {"ms": v, "share": v / total if total > 0 else 0.0} for k, v in ms.items()}


def main(argv=None):
    args = parse_args(argv)
    if not pgs_kernels.NATIVE_AVAILABLE:
        sys.exit(f"the native extension is not built ({pgs_kernels.op.NATIVE_ERROR}); "
                 "run: pip install --no-build-isolation --no-deps -e .")
    B, S, P, D = args.batch_size, args.size, args.patch_size, args.token_dim
    C_in = 3
    L = (S // P) ** 2
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, C_in, S, S, generator=g)
    tokens = {"float32": torch.randn(B, L, D, generator=g)}
    tokens["bfloat16"] = tokens["float32"].to(torch.bfloat16)
    noise = torch.rand(B, L, generator=g)
    kw = dict(noise=noise, patch_size=P, token_weight=args.token_weight)
    # The candidates of pgs_select's defaults (mask_ratio 0.5, candidate_ratio 0.05).
    _, _, k = pgs_kernels.pgs_counts(L, 0.5, 0.05)

    def native(tk):
        return lambda: pgs_kernels.pgs_select(images, tk, backend="native", **kw)

    def floor(tk):
        return lambda: read_floor(images, tk, noise)

    def cached_call(tk):
        kw_c = dict(kw, noise=noise[:CACHED])
        return lambda: pgs_kernels.pgs_select(images[:CACHED], tk[:CACHED], backend="native", **kw_c)

    impls = {
        "native": native(tokens["float32"]),
        "native-bf16-tokens": native(tokens["bfloat16"]),
        "floor": floor(tokens["float32"]),
        "floor-bf16-tokens": floor(tokens["bfloat16"]),
        "reference-fp32": lambda: python_ref.pgs_select(images, tokens["float32"], dtype=torch.float32, **kw),
    }
    if not args.no_fp64:
        impls["reference-fp64"] = lambda: python_ref.pgs_select(images, tokens["float32"], dtype=torch.float64,
                                                                **kw)
    pairs = {"float32": ("native", "floor"), "bfloat16": ("native-bf16-tokens", "floor-bf16-tokens")}
    threads = [int(t) for t in args.threads.split(",") if t]

    env = environment("cpu", "native_speed")
    load = LoadRecord(threads=max(threads))
    before = torch.get_num_threads()
    times = {(name, n): [] for name in impls for n in threads}
    splits = {}
    cached = {}
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
            if args.profile_calls > 0:
                for dt, (kernel, _) in pairs.items():
                    splits[(dt, n)] = step_split(impls[kernel], args.profile_calls, n)
            # The same call on the batch's first CACHED images, repeated: the
            # inputs stay in cache, so this is the kernel without memory stalls.
            for dt in pairs:
                fn = cached_call(tokens[dt])
                for _ in range(args.warmup + 3):
                    fn()
                ts = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
                cached[(dt, n)] = statistics.median(ts) / min(CACHED, B)
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

    floors = []
    for dt, (kernel, fl) in pairs.items():
        nbytes = input_bytes(images, tokens[dt], noise)
        for n in threads:
            kms, fms = by[(kernel, n)]["median_ms"], by[(fl, n)]["median_ms"]
            cms = 1000.0 * cached[(dt, n)] * B
            floors.append({"tokens_dtype": dt, "threads": n, "bytes": nbytes, "kernel_ms": kms, "floor_ms": fms,
                           "ratio": kms / fms, "best_of_ratio": by[(kernel, n)]["min_ms"] / by[(fl, n)]["min_ms"],
                           "floor_gbps": nbytes / fms / 1e6, "kernel_gbps": nbytes / kms / 1e6,
                           "cached_ms": cms, "cached_over_floor": cms / fms})
    steps = []
    for (dt, n), split in splits.items():
        entry = {"tokens_dtype": dt, "threads": n, "calls": args.profile_calls, "steps": split}
        # Arithmetic rate of the dot products per thread (module docstring).
        for step, dim in (("similarity_pixels", C_in * P * P), ("similarity_tokens", D)):
            ms = split[step]["ms"]
            split[step]["gflops_per_thread"] = (2.0 * k * L * (dim + 1) * B / n / (ms * 1e6)
                                                if ms > 0 and args.token_weight > 0 else None)
        steps.append(entry)

    simd = cpu_simd()
    print(f"pgs_select on CPU: batch {B}, {S}x{S}, patch {P} (L={L}, k={k}), fp32 images, fp32/bf16 tokens "
          f"D={D}, token_weight={args.token_weight}; {cpu_model()} ({simd}), torch {torch.__version__}")
    print(f"{'impl':<20}{'threads':>8}{'median ms':>12}{'ms/image':>10}{'native x':>10}")
    for r in rows:
        print(f"{r['impl']:<20}{r['threads']:>8}{r['median_ms']:>12.2f}{r['ms_per_image']:>10.3f}"
              f"{r['native_speedup']:>10.2f}")
    print("\nagainst the floor (read the inputs once):")
    print(f"{'tokens':<10}{'threads':>8}{'kernel ms':>11}{'floor ms':>10}{'ratio':>8}{'floor GB/s':>12}"
          f"{'kernel GB/s':>13}{'cached ms':>11}{'cached ratio':>14}")
    for f in floors:
        print(f"{f['tokens_dtype']:<10}{f['threads']:>8}{f['kernel_ms']:>11.2f}{f['floor_ms']:>10.2f}"
              f"{f['ratio']:>8.2f}{f['floor_gbps']:>12.1f}{f['kernel_gbps']:>13.1f}{f['cached_ms']:>11.2f}"
              f"{f['cached_over_floor']:>14.2f}")
    if steps:
        print("\nper step, ms per call (share):")
        print(f"{'tokens':<10}{'threads':>8}" + "".join(f"{s.replace('similarity_', 'sim_'):>14}" for s in STEPS))
        for e in steps:
            print(f"{e['tokens_dtype']:<10}{e['threads']:>8}" + "".join(
                f"{e['steps'][s]['ms']:>8.2f} {e['steps'][s]['share']:>4.0%}" for s in STEPS))
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
    for f in floors:
        summary[f"native_over_floor_{f['tokens_dtype']}_tokens_{f['threads']}_threads"] = f["ratio"]
    for key, v in summary.items():
        print(f"{key}: {v:.4g}")
    print(f"load average before {load_block['before']}, after {load_block['after']} "
          f"({load_block['cpus']} CPUs, up to {load_block['threads']} threads)"
          + (" -- BUSY, see the warning above" if load_block["busy"] else ""))

    result = {
        **env,
        "cpu_model": cpu_model(),
        "cpu_simd": simd,
        "config": {"batch_size": B, "size": S, "patch_size": P, "num_patches": L, "num_candidates": k,
                   "token_dim": D, "token_weight": args.token_weight, "images_dtype": "float32",
                   "tokens_dtype": "float32", "floor_tokens_dtypes": list(pairs),
                   "threads": threads, "repeats": args.repeats, "warmup": args.warmup,
                   "profile_calls": args.profile_calls, "timer": "time.perf_counter, median"},
        "load": load_block,
        "targets": TARGETS,
        "summary": summary,
        "rows": rows,
        "floors": floors,
        "steps": steps,
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
