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
its own, ``--fused-budget-ms``). Every run has a time limit (``--time-limit``,
default 360 s on CPU, 540 s on CUDA): a measurement predicted to end past it
is skipped, and one still running at the limit is cut short; the run then
writes what it has. Skips are listed in the table and the JSON.

Presets: ``--preset vit-b16`` is ViT-B/16's selection at training batch
sizes (B 32, 256, 1024; 224/16; fp32 images; bf16 tokens x768;
``token_weight=0.5``), reported with its target ratios: the fused op at
least 10x faster than the eager fp32 reference and 3x faster than the
compiled one, and at most 0.2 ms at batch 256 (GPU).

Writes ``bench/out/micro-<device>.json`` (``micro-vit-b16-<device>.json``
with the preset; ``bench/results/`` with ``--refresh``), overwriting it,
unless ``--out`` is given, and the plot
beside it (``python -m bench.plot``). The JSON carries the environment and
the machine's load before and after, with a warning when another process
held a core the run needed.

Examples::

    python -m bench.micro                    # default sweep on CUDA if present, else CPU
    python -m bench.micro --quick
    python -m bench.micro --device cuda --preset vit-b16 --time-limit 300
    python -m bench.micro --configs 224/16 336/14 --dtypes fp32 --batches 1 32 1024
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

from bench.common import (LoadRecord, argument_parser, copy_bandwidth_gbps, device_slug, environment, out_help,
                          pick_device, result_path, sync, time_cpu, time_cuda, timer_name, write_result)

CONFIGS = ("224/16", "224/14", "336/14", "384/16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOKEN_WIDTH = 768
TOKEN_WEIGHT = 0.5
FUSED = "pgs_select[auto]"
GPU_BATCHES = (1, 4, 16, 64, 256, 1024)
CPU_BATCHES = (1, 4, 16, 64, 256, 1024)
PRESETS = {
    "vit-b16": {
        "batches": [32, 256, 1024],
        "series": [(224, 16, "fp32", "bf16")],
        # how many times faster than each baseline the fused op must be
        "targets": {"python_ref_fp32": 10.0, "python_ref_compiled": 3.0},
        # the fused op's median at one batch size, on a GPU
        "fused_ms_max": {"batch": 256, "ms": 0.2},
    },
}


class TimeLimitReached(BaseException):
    """Raised by the alarm at the time limit; a BaseException so that the
    per-implementation error handling does not swallow it."""


def fused_backend(device: torch.device) -> str:
    """The backend ``pgs_select(backend="auto")`` runs on ``device``."""
    import pgs_kernels

    return pgs_kernels.resolve_backend("auto", device).name


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
    resolved = fused_backend(device)
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


def predicted_wall_s(device: torch.device, call_ms: float) -> float:
    """Seconds one measurement of a call of ``call_ms`` takes: warm-up and
    repeats (``time_cpu``: about 4 calls at least; ``do_bench``: 8 calls
    and 125 ms at least)."""
    if device.type == "cuda":
        return 0.2 + 8 * call_ms / 1e3
    return max(4 * call_ms, 150 + 2 * call_ms) / 1e3


def run_series(device, impls, batches, res, P, dtype_name, tokens_dtype_name, budget_ms, fused_budget_ms,
               copy_gbps, deadline, compile_state, log, rows: List[Dict], skipped: List[Dict],
               save: Callable[[], None]) -> None:
    """One (resolution, patch, dtype, tokens) series over ``batches``,
    appended to ``rows`` and ``skipped``; ``save()`` after every batch."""
    dtype = DTYPES[dtype_name]
    tdt = DTYPES[tokens_dtype_name] if tokens_dtype_name else None
    tw = TOKEN_WEIGHT if tdt is not None else 0.0
    base = {"height": res, "width": res, "patch_size": P, "dtype": dtype_name,
            "tokens": tdt is not None, "tokens_dtype": tokens_dtype_name, "token_width": TOKEN_WIDTH if tdt else 0,
            "token_weight": tw}
    last: Dict[str, Tuple[int, float]] = {}  # impl -> (batch, ms) of its last measurement
    dead: Dict[str, str] = {}  # impl -> why it is not run any more in this series
    for B in batches:
        todo = []
        preds: Dict[str, float] = {}
        for name in impls:
            why = dead.get(name)
            if why is None and name != FUSED and FUSED in dead:
                why = "fused op skipped"
            pred = None
            if why is None and name in last:
                b0, ms0 = last[name]
                pred = ms0 * B / b0
                lim = fused_budget_ms if name == FUSED else budget_ms
                if pred > lim:
                    why = f"predicted {pred:.0f} ms > budget {lim:.0f} ms"
                    dead[name] = why
            preds[name] = pred or 0.0
            if why is None and name == "python_ref_compiled" and compile_state.get("error"):
                why = compile_state["error"]
            if why is None and name == "python_ref_compiled" and time.monotonic() > compile_state["deadline"]:
                why = "compile time budget spent"
            if why:
                skipped.append({"impl": name, "backend": impls[name][0], "batch": B, **base, "skipped": why})
            else:
                todo.append(name)
        if todo and time.monotonic() > deadline:
            skipped += [{"impl": n, "backend": impls[n][0], "batch": B, **base, "skipped": "time limit"} for n in todo]
            todo = []
        if not todo:
            continue
        x, t, u = make_inputs(B, res, P, dtype, tdt, device)
        fused_ms = None
        for name in todo:
            backend, f = impls[name]
            # a new shape recompiles: count the last compile's time too
            need = predicted_wall_s(device, preds[name]) + compile_state["first_call_s"].get(name, 0.0)
            if time.monotonic() + need > deadline:
                skipped.append({"impl": name, "backend": backend, "batch": B, **base, "skipped": "time limit"})
                continue
            call = lambda: f(x, t, u, P, tw)  # noqa: E731
            extra = {}
            try:
                if name == "python_ref_compiled":
                    t0 = time.perf_counter()
                    call()
                    sync(device)
                    extra["first_call_s"] = round(time.perf_counter() - t0, 3)
                    compile_state["first_call_s"][name] = extra["first_call_s"]
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
                row["resolved_backend"] = fused_backend(device)
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
        x = t = u = None  # free the batch before the next one is allocated
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()


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


def preset_report(preset: str, rows, device: torch.device, log) -> Dict:
    """The preset's ratios (time of X / time of the fused op) at each batch
    size, and whether each target is met; figures to meet, not asserts."""
    spec = PRESETS[preset]
    targets, fmax = spec["targets"], spec["fused_ms_max"]
    out = {}
    log(f"\n{preset} preset: time of X / time of the fused op (targets: "
        + ", ".join(f"{short(n)} >= {t:g}x" for n, t in targets.items())
        + f", fused <= {fmax['ms']} ms at B={fmax['batch']} on a GPU)")
    for B in sorted({r["batch"] for r in rows}):
        by = {r["impl"]: r for r in rows if r["batch"] == B}
        if FUSED not in by:
            continue
        entry = {"fused_ms": by[FUSED]["ms"]}
        parts = []
        if B == fmax["batch"] and device.type == "cuda":
            entry["fused_ms_target_met"] = by[FUSED]["ms"] <= fmax["ms"]
            parts.append(f"<= {fmax['ms']} ms: {'met' if entry['fused_ms_target_met'] else 'missed'}")
        for n in ("python_ref_fp32", "python_ref_compiled", "published", "random"):
            if n not in by:
                entry[n] = None
                parts.append(f"{short(n)} n/a")
                continue
            x = by[n]["ms"] / by[FUSED]["ms"]
            entry[n] = round(x, 3)
            tgt = targets.get(n)
            verdict = "" if tgt is None else f" (>= {tgt:g}x: {'met' if x >= tgt else 'missed'})"
            if tgt is not None:
                entry[f"{n}_target_met"] = x >= tgt
            parts.append(f"{short(n)} {x:.2f}x{verdict}")
        out[str(B)] = entry
        log(f"  B={B:>5}: fused {by[FUSED]['ms']:.3f} ms; " + "; ".join(parts))
    return out


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argument_parser(__doc__)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a fixed set of series and batches, with targets")
    ap.add_argument("--quick", action="store_true", help="small sweep: B 1, 8, 64; 224/16; fp32")
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
    ap.add_argument("--time-limit", type=float,
                    help="seconds the whole run may take (default: 360 on CPU, 540 on CUDA)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--out", help=out_help("micro-<device>.json"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the other series already in the output JSON (same device): split a long "
                         "sweep over several runs")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    if args.time_limit is not None and args.time_limit <= 0:
        ap.error(f"--time-limit must be > 0, got {args.time_limit}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    warnings.filterwarnings("ignore", message="pgs_kernels: the native CPU kernel is not built")

    batches = args.batches or (list(GPU_BATCHES) if gpu else list(CPU_BATCHES))
    configs = args.configs or list(CONFIGS)
    dtypes = args.dtypes or list(DTYPES)
    token_modes = {"both": [False, True], "off": [False], "on": [True]}[args.tokens]
    series = []  # (res, P, image dtype, tokens dtype or None)
    if args.preset:
        batches = args.batches or list(PRESETS[args.preset]["batches"])
        series = list(PRESETS[args.preset]["series"])
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
    # What is left at the end goes to writing the JSON and the plot.
    deadline = t_start + time_limit - max(2.0, min(20.0, 0.05 * time_limit))
    compile_ok = not args.no_compile and (gpu or args.compile_cpu)

    slug = device_slug(device)
    out = args.out or result_path(f"micro-{args.preset + '-' if args.preset else ''}{slug}.json")

    def log(s=""):
        print(s, flush=True)

    compile_state = {"deadline": t_start + args.compile_budget_s, "error": None, "first_call_s": {}}
    load = LoadRecord()
    impls = make_impls(device, args.impls, compile_ok)
    copy_gbps = copy_bandwidth_gbps(device) if gpu else None
    doc = {
        **environment(device, "micro"),
        "fused_backend": fused_backend(device),
        "timer": timer_name(device),
        "copy_gbps": round(copy_gbps, 2) if copy_gbps else None,
        "impls": {n: b for n, (b, _) in impls.items()},
        "settings": {"batches": batches, "series": [list(s) for s in series], "budget_ms": budget_ms,
                     "fused_budget_ms": fused_budget_ms, "time_limit_s": time_limit,
                     "token_width": TOKEN_WIDTH, "token_weight_with_tokens": TOKEN_WEIGHT,
                     "preset": args.preset, "threads": torch.get_num_threads()},
        "load": load.record(),
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
    log(f"device {doc['device_name']}  torch {doc['torch']}  triton {doc['triton']}  commit {doc['commit'][:12]}")
    log(f"fused op = pgs_select(backend='auto') -> {doc['fused_backend']};  timer: {doc['timer']}")
    if copy_gbps:
        log(f"device-to-device copy bandwidth: {copy_gbps:.1f} GB/s (read + write)")
    log(f"implementations: {', '.join(impls)};  time limit {time_limit:.0f} s")

    def save():
        doc["wall_s"] = round(time.monotonic() - t_start, 1)
        write_result(out, doc, quiet=True)  # after every batch, so a killed run keeps what it measured

    def on_alarm(signum, frame):
        raise TimeLimitReached()

    # The alarm cuts short a measurement still running at the deadline (a
    # slow compile, a slow baseline); past the deadline nothing new starts.
    remaining = deadline - time.monotonic()
    use_alarm = (remaining > 0 and hasattr(signal, "SIGALRM")
                 and threading.current_thread() is threading.main_thread())
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, remaining)
    try:
        for res, P, d, tk in series:
            run_series(device, impls, batches, res, P, d, tk, budget_ms, fused_budget_ms, copy_gbps,
                       deadline, compile_state, log, doc["rows"], doc["skipped"], save)
            print_series(doc["rows"], doc["skipped"], impls, (res, P, d, tk), log)
            save()
    except TimeLimitReached:
        doc["stopped"] = f"time limit of {time_limit:.0f} s reached; the series and batches not listed were not run"
        log(f"\n{doc['stopped']}")
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if args.preset:
        doc["targets"] = {k: v for k, v in PRESETS[args.preset].items() if k in ("targets", "fused_ms_max")}
        doc["ratios"] = preset_report(args.preset, doc["rows"], device, log)
    doc["load"] = load.finish()
    save()
    log(f"\nwrote {out}  ({len(doc['rows'])} rows, {len(doc['skipped'])} skipped; wall {doc['wall_s']} s)")
    if not args.no_plot:
        from bench.plot import plot_file

        for png in plot_file(out):
            log(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
