"""Microbenchmark of PGS selection: the fused op against its baselines.

Implementations (all given the same images, tokens and noise):

* ``pgs_select[auto]``       the fused op: Triton on CUDA, native on CPU
                             (the pure-PyTorch reference until it is built);
* ``pgs_select[<backend>]``  every other backend usable on the device;
* ``python_ref_fp32``        ``python_ref.pgs_select(dtype=float32)``, eager;
* ``python_ref_compiled``    ``torch.compile`` of the same (GPU; CPU with ``--compile-cpu``);
* ``published``              ``python_ref.published_pgs``: L x L similarity,
                             division Sinkhorn with host syncs;
* ``random``                 ``python_ref.random_masking``, the floor of any masking.

Timing: on CUDA ``triton.testing.do_bench`` (median, L2 flushed between
repeats; CUDA events when Triton is missing) after a warm-up; on CPU
``time.perf_counter``, a warm-up call, then the median of 3 to 50 repeats.
Every ratio compares rows measured in the same run.

A slow implementation is skipped for the larger batches of a series once its
predicted time per call passes a budget (``--budget-ms``; the fused op has
its own, ``--fused-budget-ms``); skips are listed in the table and the JSON.

Examples::

    python -m bench.micro                    # default sweep on CUDA if present, else CPU
    python -m bench.micro --quick
    python -m bench.micro --issue3           # the Triton issue's preset and ratios
    python -m bench.micro --configs 224/16 336/14 --dtypes fp32 --batches 1 32 1024
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CONFIGS = ("224/16", "224/14", "336/14", "384/16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOKEN_WIDTH = 768
TOKEN_WEIGHT = 0.5
FUSED = "pgs_select[auto]"
GPU_BATCHES = (1, 4, 16, 64, 256, 1024)
CPU_BATCHES = (1, 4, 16, 64, 256, 1024)
# The Triton issue's acceptance ratios (fused must be this many times faster).
ISSUE3_TARGETS = {"python_ref_fp32": 10.0, "python_ref_compiled": 3.0}


# ----------------------------------------------------------------------------- environment

def device_slug(device: torch.device) -> str:
    """``cpu``, or the GPU model as a short lowercase name (``h100``)."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower()
    for tok in re.split(r"[^a-z0-9]+", name):
        if re.fullmatch(r"[a-z]+\d+", tok) and tok not in ("nvidia", "geforce"):
            return tok
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def triton_version() -> Optional[str]:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


# ----------------------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cpu(fn: Callable, target_s: float = 0.15, min_reps: int = 3, max_reps: int = 50) -> Tuple[float, float]:
    """(median, min) ms of ``fn`` after one warm-up call; the number of
    repeats fills about ``target_s`` but stays within [min_reps, max_reps]."""
    fn()
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    n = max(min_reps, min(max_reps, int(target_s / max(first, 1e-7))))
    times = [first]  # the estimate is a genuine post-warm-up sample
    for _ in range(n - 1):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), 1e3 * min(times)


def time_cuda(fn: Callable, device: torch.device) -> float:
    """Median ms of ``fn`` on the GPU, after warm-up."""
    fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    est = max(start.elapsed_time(end), 1e-3)
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        # do_bench repeats ``rep`` ms worth; ask for at least 5 samples of slow calls.
        return float(do_bench(fn, warmup=max(25, int(2 * est)), rep=max(100, int(5 * est)) + 1,
                              return_mode="median"))
    n = max(5, min(200, int(100 / est)))
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(statistics.median(times))


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, (read + write) bytes / s, in GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), device)
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------- implementations

def _compiled_ref():
    import python_ref

    # Every new shape or dtype is a recompile; the default limit (8) would
    # silently fall back to eager and time the wrong thing.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, 4096)
    return torch.compile(python_ref.pgs_select)


def make_impls(device: torch.device, names: Optional[List[str]], compile_ok: bool) -> Dict[str, Tuple[str, Callable]]:
    """name -> (backend label, f(images, tokens, noise, P, tw) -> output).

    The fused op comes first; every ratio is taken against it."""
    import pgs_kernels
    import python_ref

    impls: Dict[str, Tuple[str, Callable]] = {}

    def op(backend):
        return lambda x, t, u, P, tw: pgs_kernels.pgs_select(x, t, noise=u, patch_size=P, token_weight=tw,
                                                              backend=backend)

    impls[FUSED] = ("auto", op("auto"))
    resolved = resolve_auto(device)
    for b in pgs_kernels.available_backends(device):
        # On CPU "triton" is the interpreter: a debugging aid, hours per sweep.
        if b == resolved or (b == "triton" and device.type != "cuda"):
            continue
        impls[f"pgs_select[{b}]"] = (b, op(b))
    impls["python_ref_fp32"] = ("python_ref", lambda x, t, u, P, tw: python_ref.pgs_select(
        x, t, noise=u, patch_size=P, token_weight=tw, dtype=torch.float32))
    if compile_ok:
        holder = {}

        def compiled(x, t, u, P, tw):
            if "f" not in holder:
                holder["f"] = _compiled_ref()
            return holder["f"](x, t, noise=u, patch_size=P, token_weight=tw, dtype=torch.float32)

        impls["python_ref_compiled"] = ("inductor", compiled)
    impls["published"] = ("python_ref", lambda x, t, u, P, tw: python_ref.published_pgs(
        x, t, noise=u, patch_size=P, token_weight=tw))
    impls["random"] = ("python_ref", lambda x, t, u, P, tw: python_ref.random_masking(
        x, t, noise=u, patch_size=P))
    if names:
        unknown = [n for n in names if n not in impls]
        if unknown:
            raise SystemExit(f"--impls: unknown {unknown}; here: {list(impls)}")
        impls = {k: v for k, v in impls.items() if k == FUSED or k in names}
    return impls


def resolve_auto(device: torch.device) -> str:
    import pgs_kernels

    return pgs_kernels.resolve_backend("auto", device).name


# ----------------------------------------------------------------------------- sweep

def parse_config(s: str) -> Tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", s)
    if not m:
        raise argparse.ArgumentTypeError(f"config must look like 224/16 (resolution/patch), got {s!r}")
    return int(m.group(1)), int(m.group(2))


def make_inputs(B: int, res: int, P: int, dtype: torch.dtype, tokens_dtype: Optional[torch.dtype],
                device: torch.device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    L = (res // P) ** 2
    images = torch.randn(B, 3, res, res, device=device, dtype=torch.float32, generator=g).to(dtype)
    tokens = None
    if tokens_dtype is not None:
        tokens = torch.randn(B, L, TOKEN_WIDTH, device=device, dtype=torch.float32, generator=g).to(tokens_dtype)
    noise = torch.rand(B, L, device=device, dtype=torch.float32, generator=g)
    return images, tokens, noise


def bytes_read(images, tokens, noise) -> int:
    """What the fused op must read at least once: images, tokens, noise."""
    n = images.numel() * images.element_size() + noise.numel() * noise.element_size()
    if tokens is not None:
        n += tokens.numel() * tokens.element_size()
    return n


def run_series(device, impls, batches, res, P, dtype_name, tokens_dtype_name, budget_ms, fused_budget_ms,
               copy_gbps, deadline, compile_state, log) -> Tuple[List[Dict], List[Dict]]:
    """One (resolution, patch, dtype, tokens) series over ``batches``.
    Returns (rows, skipped)."""
    dtype = DTYPES[dtype_name]
    tdt = DTYPES[tokens_dtype_name] if tokens_dtype_name else None
    tw = TOKEN_WEIGHT if tdt is not None else 0.0
    base = {"height": res, "width": res, "patch_size": P, "dtype": dtype_name,
            "tokens": tdt is not None, "tokens_dtype": tokens_dtype_name, "token_width": TOKEN_WIDTH if tdt else 0,
            "token_weight": tw}
    rows, skipped = [], []
    last: Dict[str, Tuple[int, float]] = {}  # impl -> (batch, ms) of its last measurement
    dead: Dict[str, str] = {}  # impl -> why it is not run any more in this series
    for B in batches:
        todo = []
        for name in impls:
            why = dead.get(name)
            if why is None and name != FUSED and FUSED in dead:
                why = "fused op skipped"
            if why is None and time.monotonic() > deadline:
                why = "sweep time limit"
            if why is None and name in last:
                b0, ms0 = last[name]
                pred = ms0 * B / b0
                lim = fused_budget_ms if name == FUSED else budget_ms
                if pred > lim:
                    why = f"predicted {pred:.0f} ms > budget {lim:.0f} ms"
                    dead[name] = why
            if why is None and name == "python_ref_compiled" and compile_state.get("error"):
                why = compile_state["error"]
            if why is None and name == "python_ref_compiled" and time.monotonic() > compile_state["deadline"]:
                why = "compile time budget spent"
            if why:
                skipped.append({"impl": name, "backend": impls[name][0], "batch": B, **base, "skipped": why})
            else:
                todo.append(name)
        if not todo:
            continue
        x, t, u = make_inputs(B, res, P, dtype, tdt, device)
        fused_ms = None
        for name in todo:
            backend, f = impls[name]
            call = lambda: f(x, t, u, P, tw)  # noqa: E731
            extra = {}
            try:
                if name == "python_ref_compiled":
                    t0 = time.perf_counter()
                    call()
                    _sync(device)
                    extra["first_call_s"] = round(time.perf_counter() - t0, 3)
                if device.type == "cuda":
                    ms = ms_min = time_cuda(call, device)
                else:
                    ms, ms_min = time_cpu(call)
                    extra["ms_min"] = round(ms_min, 5)
            except Exception as exc:  # record and carry on: one broken impl must not sink the sweep
                msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                log(f"  ! {name} B={B}: {msg}")
                dead[name] = f"error: {msg}"
                if name == "python_ref_compiled":
                    compile_state["error"] = dead[name]
                skipped.append({"impl": name, "backend": backend, "batch": B, **base, "skipped": dead[name]})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            # The fastest sample predicts the next batch: on a shared machine
            # the median carries other processes' time slices.
            last[name] = (B, ms_min)
            row = {"impl": name, "backend": backend, "batch": B, **base, "ms": round(ms, 5), **extra}
            if name == FUSED:
                fused_ms = ms
                row["resolved_backend"] = resolve_auto(device)
                nb = bytes_read(x, t, u)
                row["bytes_read"] = nb
                row["gbps"] = round(nb / (ms * 1e-3) / 1e9, 3)
                if copy_gbps:
                    floor = nb / (copy_gbps * 1e9) * 1e3
                    row["floor_ms"] = round(floor, 5)
                    row["ratio_to_floor"] = round(ms / floor, 3)
                    row["bw_fraction"] = round(row["gbps"] / copy_gbps, 4)
            if fused_ms is not None:
                row["ratio_to_fused"] = round(ms / fused_ms, 4)
            rows.append(row)
        del x, t, u
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, skipped


# ----------------------------------------------------------------------------- reporting

def short(name: str) -> str:
    return {FUSED: "fused", "python_ref_fp32": "ref_fp32", "python_ref_compiled": "ref_compiled",
            "published": "published", "random": "random"}.get(name, name.replace("pgs_select", "op"))


def print_series(rows, skipped, impls, key, log) -> None:
    res, P, dt, tk = key
    sel = [r for r in rows if (r["height"], r["patch_size"], r["dtype"], r["tokens_dtype"]) == key]
    sk = [r for r in skipped if (r["height"], r["patch_size"], r["dtype"], r["tokens_dtype"]) == key]
    batches = sorted({r["batch"] for r in sel} | {r["batch"] for r in sk})
    if not batches:
        return
    names = list(impls)
    log(f"\n{res}/{P}  images {dt}  tokens {tk + ' x' + str(TOKEN_WIDTH) if tk else 'off'}"
        f"   ms (x = time / fused time; '-' = skipped, see below)")
    hdr = f"{'batch':>6} " + " ".join(f"{short(n):>19}" for n in names)
    if any("gbps" in r for r in sel):
        hdr += f" {'fused GB/s':>10}"
    if any("bw_fraction" in r for r in sel):
        hdr += f" {'of copy':>8}"
    log(hdr)
    for B in batches:
        by = {r["impl"]: r for r in sel if r["batch"] == B}
        cells = []
        for n in names:
            r = by.get(n)
            if r is None:
                cells.append(f"{'-':>19}")
            elif n == FUSED:
                cells.append(f"{r['ms']:>11.3f}       ")
            else:
                x = r.get("ratio_to_fused")
                cells.append(f"{r['ms']:>11.3f} {('(' + format(x, '.1f') + 'x)') if x else '':>7}")
        line = f"{B:>6} " + " ".join(cells)
        fr = by.get(FUSED)
        if fr and "gbps" in fr:
            line += f" {fr['gbps']:>10.2f}"
        if fr and "bw_fraction" in fr:
            line += f" {100 * fr['bw_fraction']:>7.1f}%"
        log(line)
    reasons: Dict[str, List[int]] = {}
    for r in sk:
        reasons.setdefault(f"{short(r['impl'])}: {r['skipped']}".split(" (pred")[0], []).append(r["batch"])
    for why, bs in reasons.items():
        first = why.split(": ", 1)
        log(f"  skipped {first[0]} at B={','.join(map(str, bs))}: {first[1] if len(first) > 1 else ''}")


def plot(path: str, rows, device_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = []
    for r in rows:
        k = (r["height"], r["patch_size"], r["dtype"], r["tokens_dtype"])
        if k not in keys:
            keys.append(k)
    if not keys:
        return
    ncol = min(3, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.8 * ncol, 3.6 * nrow), squeeze=False)
    impls = []
    for r in rows:
        if r["impl"] not in impls:
            impls.append(r["impl"])
    colors = {n: f"C{i}" for i, n in enumerate(impls)}
    for ax, k in zip(axes.flat, keys):
        for n in impls:
            pts = sorted((r["batch"], r["ms"]) for r in rows
                         if r["impl"] == n and (r["height"], r["patch_size"], r["dtype"], r["tokens_dtype"]) == k)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, lw=1.5 if n != FUSED else 2.5,
                        color=colors[n], label=short(n))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{k[0]}/{k[1]} {k[2]} tokens {k[3] or 'off'}", fontsize=9)
        ax.set_xlabel("batch size")
        ax.set_ylabel("ms per call")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"PGS selection latency, {device_label}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the suptitle
    fig.savefig(path, dpi=110)
    plt.close(fig)


def issue3_report(rows, log) -> Dict:
    """The Triton issue's ratios: fused vs eager reference (>= 10x), vs the
    compiled reference (>= 3x), vs published and random (reported only)."""
    out = {}
    log("\nIssue 3 ratios (time of X / time of fused; targets are measurements, not asserts)")
    for B in sorted({r["batch"] for r in rows}):
        by = {r["impl"]: r for r in rows if r["batch"] == B}
        if FUSED not in by:
            continue
        entry = {"fused_ms": by[FUSED]["ms"]}
        parts = []
        for n in ("python_ref_fp32", "python_ref_compiled", "published", "random"):
            if n not in by:
                entry[n] = None
                parts.append(f"{short(n)} n/a")
                continue
            x = by[n]["ms"] / by[FUSED]["ms"]
            entry[n] = round(x, 3)
            tgt = ISSUE3_TARGETS.get(n)
            verdict = "" if tgt is None else (f" (>= {tgt:g}x: {'met' if x >= tgt else 'missed'})")
            if tgt is not None:
                entry[f"{n}_target_met"] = x >= tgt
            parts.append(f"{short(n)} {x:.2f}x{verdict}")
        out[str(B)] = entry
        log(f"  B={B:>5}: fused {by[FUSED]['ms']:.3f} ms; " + "; ".join(parts))
    return out


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--quick", action="store_true", help="small sweep: B 1, 8, 64; 224/16; fp32")
    ap.add_argument("--issue3", action="store_true",
                    help="B 32, 256, 1024; 224/16; fp32 images; bf16 tokens x768; token_weight 0.5")
    ap.add_argument("--batches", type=int, nargs="+")
    ap.add_argument("--configs", nargs="+", help="resolution/patch, e.g. 224/16 336/14")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES))
    ap.add_argument("--tokens", choices=("both", "off", "on"), default="both")
    ap.add_argument("--impls", nargs="+", help="subset of implementations (the fused op is always run)")
    ap.add_argument("--compile-cpu", action="store_true", help="also time torch.compile(python_ref) on CPU")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile(python_ref)")
    ap.add_argument("--budget-ms", type=float, help="skip a baseline once a call is predicted above this")
    ap.add_argument("--fused-budget-ms", type=float, help="the same for the fused op")
    ap.add_argument("--compile-budget-s", type=float, default=240.0,
                    help="stop timing the compiled reference after this many seconds of the run")
    ap.add_argument("--time-limit", type=float, help="seconds; later series are skipped and listed")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--out", help="JSON path (the PNG goes beside it)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other series already in the output JSON (same device): split a long "
                         "sweep over several runs")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    warnings.filterwarnings("ignore", message="pgs_kernels: the native CPU kernel is not built")

    batches = args.batches or (list(GPU_BATCHES) if gpu else list(CPU_BATCHES))
    configs = args.configs or list(CONFIGS)
    dtypes = args.dtypes or list(DTYPES)
    token_modes = {"both": [False, True], "off": [False], "on": [True]}[args.tokens]
    series = []  # (res, P, image dtype, tokens dtype or None)
    if args.issue3:
        batches = args.batches or [32, 256, 1024]
        series = [(224, 16, "fp32", "bf16")]
    else:
        if args.quick:
            batches = args.batches or [1, 8, 64]
            configs = args.configs or ["224/16"]
            dtypes = args.dtypes or ["fp32"]
        for c in configs:
            res, P = parse_config(c)
            for d in dtypes:
                for tk in token_modes:
                    series.append((res, P, d, d if tk else None))
    batches = sorted(set(batches))
    budget_ms = args.budget_ms or (5000.0 if gpu else 250.0)
    fused_budget_ms = args.fused_budget_ms or (20000.0 if gpu else 800.0)
    time_limit = args.time_limit or (540.0 if gpu else 360.0)
    compile_ok = not args.no_compile and (gpu or args.compile_cpu)

    slug = device_slug(device)
    out = args.out or os.path.join(RESULTS, f"micro-{slug}{'-issue3' if args.issue3 else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def log(s=""):
        print(s, flush=True)

    t_start = time.monotonic()
    deadline = t_start + time_limit
    compile_state = {"deadline": t_start + args.compile_budget_s, "error": None}
    impls = make_impls(device, args.impls, compile_ok)
    copy_gbps = copy_bandwidth_gbps(device) if gpu else None
    doc = {
        "device": slug,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "commit": git_commit(),
        "fused_backend": resolve_auto(device),
        "timer": ("triton.testing.do_bench median (L2 flushed)" if gpu and triton_version()
                  else "cuda events median" if gpu else "time.perf_counter median after warm-up"),
        "copy_gbps": round(copy_gbps, 2) if copy_gbps else None,
        "impls": {n: b for n, (b, _) in impls.items()},
        "settings": {"batches": batches, "series": [list(s) for s in series], "budget_ms": budget_ms,
                     "fused_budget_ms": fused_budget_ms, "time_limit_s": time_limit,
                     "token_width": TOKEN_WIDTH, "token_weight_with_tokens": TOKEN_WEIGHT,
                     "issue3": args.issue3, "threads": torch.get_num_threads()},
        "rows": [],
        "skipped": [],
    }
    if args.merge and os.path.exists(out):
        with open(out) as fh:
            old = json.load(fh)
        if old.get("device") == slug:
            mine = {(r, p, d, t) for r, p, d, t in series}

            def other(r):
                return (r["height"], r["patch_size"], r["dtype"], r["tokens_dtype"]) not in mine

            doc["rows"] = [r for r in old.get("rows", []) if other(r)]
            doc["skipped"] = [r for r in old.get("skipped", []) if other(r)]
            doc["merged_commits"] = sorted(set(old.get("merged_commits", [old.get("commit")])) | {doc["commit"]})
            log(f"merging into {out}: kept {len(doc['rows'])} rows of other series")
    doc["loadavg_start"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    load = doc["loadavg_start"]
    if not gpu and load and load[0] > (os.cpu_count() or 1) - 0.5 and torch.get_num_threads() > 1:
        # Seen here: python_ref at B=1 took 230-700 ms with 2 threads on a busy
        # 2-core machine and 3.4 ms with 1 (OpenMP threads wait out each
        # other's time slices). Such timings measure the neighbours.
        log(f"WARNING: load average {load[0]:.1f} on {os.cpu_count()} cores with {torch.get_num_threads()} torch "
            f"threads: multi-threaded timings will be dominated by contention; consider --threads 1")
    log(f"device {doc['device_name']}  torch {doc['torch']}  triton {doc['triton']}  commit {doc['commit'][:12]}")
    log(f"fused op = pgs_select(backend='auto') -> {doc['fused_backend']};  timer: {doc['timer']}")
    if copy_gbps:
        log(f"device-to-device copy bandwidth: {copy_gbps:.1f} GB/s (read + write)")
    log(f"implementations: {', '.join(impls)}")

    for res, P, d, tk in series:
        rows, skipped = run_series(device, impls, batches, res, P, d, tk, budget_ms, fused_budget_ms, copy_gbps,
                                   deadline, compile_state, log)
        doc["rows"] += rows
        doc["skipped"] += skipped
        print_series(doc["rows"], doc["skipped"], impls, (res, P, d, tk), log)
        doc["wall_s"] = round(time.monotonic() - t_start, 1)
        with open(out, "w") as fh:  # after every series, so a killed run keeps what it measured
            json.dump(doc, fh, indent=1)

    if args.issue3:
        doc["issue3"] = issue3_report(doc["rows"], log)
    doc["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    doc["wall_s"] = round(time.monotonic() - t_start, 1)
    with open(out, "w") as fh:
        json.dump(doc, fh, indent=1)
    log(f"\nwrote {out}  ({len(doc['rows'])} rows, {len(doc['skipped'])} skipped; wall {doc['wall_s']} s)")
    if not args.no_plot:
        png = os.path.splitext(out)[0] + ".png"
        plot(png, doc["rows"], doc["device_name"])
        log(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
