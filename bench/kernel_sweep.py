"""The first GPU run chooses the fused Triton kernel's launch settings.

    python -m bench.kernel_sweep [--out DIR] [--budget-s 240] [--workers N]
    python -m bench.kernel_sweep --dry-run [--out DIR]
    python -m bench.kernel_sweep --merge DIR/triton-tuning-DEV.json [--table PATH]

What is swept. Every setting of ``pgs_kernels.triton_tuning.SPACE``
(``num_warps``, ``num_stages``, ``maxnreg``, the pixel product's ``tl.dot``
precision ``DOT``, whatever else is added there), on three calls at batch
256 (mask ratio 0.5, candidate ratio 0.05, the contract's defaults
otherwise: ``sim_threshold`` 0.5, edge weight 1, OT with ``ot_reg`` 0.05
and 20 iterations): 224/16 without tokens, 224/16 with bf16 tokens of width
768 and 336/14 with bf16 tokens of width 1024 (``token_weight`` 0.5). Each
is one key of the table, ``(arch, (GH, GW), token width)``.

The method, per candidate setting and call:

1. Compile. A pool of worker processes (``--workers``, default the CPUs
   less two, at a lower priority) compiles every (setting, call) in the
   order below, ahead of the main process, into Triton's on-disk cache
   (``JITFunction.warmup`` on the launcher's own plan, so the main process
   finds exactly those binaries). A compile the compiler rejects (Triton's
   compilation or ptxas errors, out of shared memory or registers) makes the
   candidate *failed* for that call. Where a worker has no verdict (another
   error, it could not start, or nothing came back within
   ``--compile-wait-s``), the main process compiles on its first launch; an
   error there fails the candidate the same way.
2. Check. The launches of ``triton_pgs._launch_plan(..., tuning=setting)``
   run on inputs made of real photos (``pgs_kernels.samples``: half the
   batch, flipped and scaled variants of the ten sample photos) and random
   images with smooth and constant regions (the other half,
   ``bench.gpu_smoke``'s), random bf16 tokens and uniform noise. The outputs
   are compared with the fp64 reference (``python_ref.pgs_select`` on the
   same device, once per call) by the tests' rule
   (``python_ref.compare.compare_with_reference``): ``keep_idx`` and
   ``mask`` meet the invariants on every row; edge ``ê`` and redundancy
   ``r`` within 1e-4; candidates and selections equal on the rows decided by
   more than that. Any breach, or an error while launching, and the
   candidate is *incorrect* (or *failed*) and is never timed. At least half
   the rows must be decided, or the call's check counts as too weak and
   nothing may win there.
3. Time. Only a correct candidate: ``triton.testing.do_bench`` (L2 flushed
   before each repeat, after its own warm-up; the check's launch already
   loaded the kernel) of the plan's launches alone, median, 20th and 80th
   percentile in µs.

Order and budget. Candidates come from ``triton_tuning.candidates()``:
``DEFAULT`` (here and below: the architecture's offline best,
``triton_tuning.default_for(arch)``, what the launcher runs without an
entry) first, then by how many settings differ from it (one, then
two, ...), earlier values of ``SPACE`` first. Time counts from the start
of the script (imports, inputs and references included). Once less than
``--confirm-s`` (15 s) of ``--budget-s`` (240 s) is left no new candidate
starts, nor does the wait for a compile last past that point; the results
so far stand and the rest are listed as not run. The suite's limit on the
part (300 s) leaves a minute over the budget for the last candidate and the
files.

The winner. In what time is left, each call's three fastest correct
candidates and ``DEFAULT`` are timed again, twice each, interleaved, now
that the compile workers are done; a candidate's time is the median of all
its medians. The fastest correct candidate wins; one that is not
``DEFAULT`` must beat ``DEFAULT`` (where that is correct) by
``--min-gain`` (1 %), or ``DEFAULT`` is kept: a difference within the
noise does not change the table.

Outputs, in ``--out`` (default bench/out/), ``DEV`` the GPU
(``h100``, ``dry-run``):

* ``sweep-DEV.jsonl``: one line per event (start, each candidate's record,
  each re-timing, end), appended and flushed the moment it exists: a run cut
  short leaves what it measured;
* ``sweep-DEV.json``: every candidate's record (settings; ``status`` ok,
  incorrect, failed, or unverified where the call's check is too weak; why;
  errors against the reference; median, p20, p80 µs), the calls'
  references, the winners; rewritten after each candidate;
* ``triton-tuning-DEV.json``: the winners in the table's format
  (``pgs_kernels/triton_tuning.py``), rewritten after each candidate too.

``--merge FILE`` folds a winners file into the table
(``pgs_kernels/triton_tuning.json``, or ``--table``; ``PGS_TRITON_TUNING``
where set): an entry replaces the one of the same key. A dry run's winners
(arch ``interpreter``) never go into the committed table.

Exit status: 0 when every call has a winner, 1 otherwise, 2 without CUDA.

``--dry-run`` runs the same code on the CPU through the Triton interpreter
(``TRITON_INTERPRET=1``, set before Triton is imported) at toy sizes (32x48
images with patch 8, with and without tokens, and 56x42 with patch 14;
batch 4), two candidate settings, one worker, a wall-clock timer instead of
``do_bench``: a check of this script, so that the first GPU minute is not
spent on a bug in it. Its times mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from typing import Dict, List, Optional

from bench.common import argument_parser, result_path, write_result

TOL = 1e-4
#: A call's check needs at least this share of decided rows (python_ref.compare).
MIN_DECIDED = 0.5
BATCH = 256
DRY_BATCH = 4
TOKEN_WEIGHT = 0.5
# The contract's defaults (pgs_kernels.pgs_select), with the ratios of the issue.
CALL = dict(mask_ratio=0.5, candidate_ratio=0.05, sim_threshold=0.5, edge_weight=1.0, use_ot=True, ot_reg=0.05,
            ot_iters=20)

#: The calls swept on a GPU: one table key each.
CONFIGS = [
    dict(name="224-16", H=224, W=224, P=16, D=0),
    dict(name="224-16-bf16x768", H=224, W=224, P=16, D=768),
    dict(name="336-14-bf16x1024", H=336, W=336, P=14, D=1024),
]
#: The same kinds of call at toy sizes, for --dry-run.
DRY_CONFIGS = [
    dict(name="32x48-8", H=32, W=48, P=8, D=0),
    dict(name="32x48-8-bf16x32", H=32, W=48, P=8, D=32),
    dict(name="56x42-14-bf16x48", H=56, W=42, P=14, D=48),
]
#: The interpreter's "architecture" in a dry run's table keys.
DRY_ARCH = "interpreter"


def dry_candidates(default: Dict) -> List[Dict]:
    """The dry run's two settings: ``DEFAULT`` and one differing in every
    setting that has another value in ``SPACE``."""
    from pgs_kernels import triton_tuning

    other = dict(default)
    for name, values in triton_tuning.SPACE.items():
        alt = [v for v in values if v != default.get(name)]
        if alt:
            other[name] = alt[0]
    return [dict(default), other]


def config_key(cfg: Dict, arch: str):
    """The table key of a call: ``(arch, (GH, GW), token width)``."""
    return arch, (cfg["H"] // cfg["P"], cfg["W"] // cfg["P"]), cfg["D"]


def _counts(cfg: Dict):
    from pgs_kernels import pgs_counts

    L = (cfg["H"] // cfg["P"]) * (cfg["W"] // cfg["P"])
    K, _, k = pgs_counts(L, CALL["mask_ratio"], CALL["candidate_ratio"])
    return L, K, k


def plan(cfg: Dict, images, tokens, noise, setting: Dict, compiled: bool):
    """``triton_pgs._launch_plan`` of this call with ``setting``."""
    from pgs_kernels import triton_pgs

    _, K, k = _counts(cfg)
    tw = TOKEN_WEIGHT if cfg["D"] else 0.0
    return triton_pgs._launch_plan(images, tokens if cfg["D"] else None, noise, cfg["P"], K, k,
                                   CALL["sim_threshold"], tw, CALL["edge_weight"], CALL["use_ot"], CALL["ot_reg"],
                                   CALL["ot_iters"], compiled=compiled, tuning=dict(setting))


def launch(launches) -> None:
    """Runs a plan's launches as the launcher does."""
    from pgs_kernels import triton_pgs

    triton_pgs._run(launches)


# ----------------------------------------------------------------------------- compile workers

_WORKER: Dict = {}


def _worker_init(compiled: bool) -> None:
    """A compile worker: lower priority (the main process times kernels),
    warnings of the interpreter silenced."""
    try:
        os.nice(10)
    except OSError:
        pass
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    _WORKER["compiled"] = compiled
    try:  # never raise here: a pool whose workers die at start restarts them for ever
        import torch

        torch.set_num_threads(1)
        if compiled:
            torch.cuda.set_device(0)
    except Exception as exc:
        _WORKER["error"] = f"{type(exc).__name__}: {exc}"


def compile_task(cfg: Dict, setting: Dict, batch: int) -> Dict:
    """In a worker: the plan of ``cfg`` with ``setting`` on uninitialized
    tensors of the real shapes, each launch compiled into Triton's on-disk
    cache without running (``JITFunction.warmup``); interpreted, only the
    plan. Returns ``{"ok", "error", "seconds"}`` and never raises: ``ok``
    False when the compiler rejected the kernel (:func:`_compile_error`: the
    candidate's verdict), ``None`` on any other error (maybe the worker's own
    trouble: the main process then compiles on its first launch)."""
    t0 = time.time()
    stage = "worker"
    try:
        import torch

        if "error" in _WORKER:
            raise RuntimeError(_WORKER["error"])
        compiled = _WORKER.get("compiled", False)
        dev = "cuda" if compiled else "cpu"
        L, _, _ = _counts(cfg)
        images = torch.empty(batch, 3, cfg["H"], cfg["W"], device=dev)
        tokens = torch.empty(batch, L, max(cfg["D"], 1), dtype=torch.bfloat16, device=dev)
        noise = torch.empty(batch, L, device=dev)
        _, launches = plan(cfg, images, tokens, noise, setting, compiled)
        if compiled:
            stage = "compile"
            for kernel, grid, args, meta in launches:
                kernel.warmup(*args, grid=grid, **meta)
        return dict(ok=True, error=None, seconds=round(time.time() - t0, 2))
    except Exception as exc:  # reported back
        verdict = False if stage == "compile" and _compile_error(exc) else None
        return dict(ok=verdict, error=f"{stage}: {type(exc).__name__}: {exc}"[:2000],
                    seconds=round(time.time() - t0, 2))


def _compile_error(exc: Exception) -> bool:
    """Whether ``exc`` is the compiler's verdict on the kernel (the same in
    any process): Triton's compilation, ptxas and resource errors, an MLIR
    pass failure. Anything else may be the worker's own trouble."""
    classes = []
    for mod, name in (("triton.compiler.errors", "CompilationError"), ("triton.runtime.errors", "PTXASError"),
                      ("triton.runtime.errors", "OutOfResources")):
        try:
            classes.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return isinstance(exc, tuple(classes)) or "PassManager::run failed" in str(exc)


class Compiler:
    """Compiles (setting, call) pairs ahead of the main process in a spawned
    pool; ``result(i, name, timeout)`` waits for one. Without workers (or
    when the pool cannot start) every result is ``None``: the main process
    compiles on its first launch."""

    def __init__(self, workers: int, compiled: bool, batch: int):
        self.pool, self.jobs, self.error = None, {}, None
        self.batch = batch
        if workers > 0:
            import multiprocessing

            try:
                self.pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init,
                                                                      initargs=(compiled,))
            except Exception as exc:
                self.error = repr(exc)

    def submit(self, jobs) -> None:
        """``jobs``: ``(i, cfg, setting)`` in the order they will be needed."""
        if self.pool is None:
            return
        for i, cfg, setting in jobs:
            self.jobs[i, cfg["name"]] = self.pool.apply_async(compile_task, (cfg, setting, self.batch))

    def result(self, i: int, name: str, timeout: float) -> Optional[Dict]:
        job = self.jobs.get((i, name))
        if job is None:
            return None
        import multiprocessing

        try:
            return job.get(timeout=max(0.0, timeout))
        except multiprocessing.TimeoutError:
            return dict(ok=None, error=f"no compile result after {timeout:.0f} s", seconds=None, timed_out=True)

    def close(self) -> None:
        """Stops the workers at once (a compile still running is not needed)."""
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


# ----------------------------------------------------------------------------- inputs and reference

def make_inputs(cfg: Dict, batch: int, device, seed: int = 0):
    """``(images, tokens, noise, info)`` on ``device``: the first half of the
    batch photos (the ten samples, standardized, flipped and scaled per
    repeat), the rest ``bench.gpu_smoke``'s random images with smooth and
    constant regions; bf16 tokens of width ``D`` (at least 1), uniform noise."""
    import torch

    from bench.gpu_smoke import _inputs

    H, W, P = cfg["H"], cfg["W"], cfg["P"]
    images, tokens, noise = _inputs(torch, seed, batch, H, W, P, D=max(cfg["D"], 1), tok_dtype=torch.bfloat16,
                                    device="cpu")
    info = dict(photos=0, photo_names=[], photo_errors={})
    pics = []
    try:
        from pgs_kernels import samples

        for name in samples.PHOTO_NAMES:
            try:
                pics.append(samples.standardize(samples.photo(name, (H, W))))
                info["photo_names"].append(name)
            except Exception as exc:  # a photo scikit-image would have to download: the others
                info["photo_errors"][name] = repr(exc)[:300]
    except Exception as exc:  # no scikit-image: random images only, and the record says so
        info["photo_errors"]["*"] = repr(exc)[:300]
    n_photo = (batch // 2 if batch > 1 else batch) if pics else 0
    for i in range(n_photo):
        x, v = pics[i % len(pics)], i // len(pics)
        if v & 1:
            x = x.flip(-1)
        if v & 2:
            x = x.flip(-2)
        images[i] = x * (1.0 + 0.1 * (v // 4))
    info["photos"] = n_photo
    return images.to(device), tokens.to(device), noise.to(device), info


def reference(cfg: Dict, images, tokens, noise):
    """The fp64 reference of the call (on the inputs' device), its raw patch
    energies and which rows it decides, all on the CPU."""
    import python_ref
    from python_ref.compare import decided_rows

    tw = TOKEN_WEIGHT if cfg["D"] else 0.0
    ref = python_ref.pgs_select(images, tokens.float() if cfg["D"] else None, noise=noise, patch_size=cfg["P"],
                                token_weight=tw, return_scores=True, **CALL)
    ref = type(ref)(*(t.cpu() for t in ref))
    energy = python_ref.patch_sobel_energy(images.double(), cfg["P"]).cpu()
    _, K, _ = _counts(cfg)
    decided = decided_rows(ref, noise.cpu(), CALL["edge_weight"], K, CALL["sim_threshold"], TOL, energy)
    return ref, energy, decided


def check(cfg: Dict, outputs, ref, energy, noise) -> Dict:
    """The tests' comparison (``bench.gpu_smoke._compare``,
    ``python_ref.compare``) of a candidate's outputs with the reference."""
    import torch

    from bench.gpu_smoke import _compare
    from pgs_kernels.contract import PGSSelection

    _, K, _ = _counts(cfg)
    problems, d = _compare(torch, PGSSelection(*outputs), ref, noise, CALL, K, energy)
    return dict(problems=problems, **d)


# ----------------------------------------------------------------------------- timing

def timer(dry_run: bool):
    """``fn -> (median, p20, p80)`` in µs: ``do_bench`` on a GPU; one
    wall-clock call in a dry run."""
    if dry_run:
        def wall(fn):
            t0 = time.perf_counter()
            fn()
            us = (time.perf_counter() - t0) * 1e6
            return us, us, us
        return wall
    from triton.testing import do_bench

    def gpu(fn):
        med, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return med * 1e3, p20 * 1e3, p80 * 1e3
    return gpu


# ----------------------------------------------------------------------------- choosing

def final_us(rec: Dict) -> Optional[float]:
    """A timed record's time: the median of its first median and its re-timings."""
    if rec.get("median_us") is None:
        return None
    return float(statistics.median([rec["median_us"]] + list(rec.get("confirm_us", []))))


def choose_winners(records: List[Dict], configs: List[Dict], default: Dict, min_gain: float = 0.01,
                   weak: Optional[Dict] = None) -> Dict[str, Dict]:
    """Per call name, the winner: the correct (``status == "ok"``), timed
    record of least :func:`final_us`; ``default``'s record instead where it
    is correct and the winner beats it by less than ``min_gain``. Calls
    without a correct timed record, or whose check is too weak (``weak``:
    name -> reason), have no winner. Each winner: ``{"record", "final_us",
    "default_us", "why"}``."""
    out = {}
    for cfg in configs:
        name = cfg["name"]
        if weak and name in weak:
            continue
        ok = [r for r in records if r["config"] == name and r["status"] == "ok" and final_us(r) is not None]
        if not ok:
            continue
        best = min(ok, key=lambda r: (final_us(r), r["candidate"]))
        dflt = next((r for r in ok if r["settings"] == default), None)
        why = "fastest correct"
        if dflt is not None and best is not dflt and final_us(best) > final_us(dflt) * (1.0 - min_gain):
            why = (f"DEFAULT kept: the fastest ({final_us(best):.1f} us, candidate {best['candidate']}) "
                   f"beats it by less than {min_gain:.0%}")
            best = dflt
        out[name] = dict(record=best, final_us=final_us(best),
                         default_us=None if dflt is None else final_us(dflt), why=why)
    return out


def winners_table(winners: Dict[str, Dict], configs: List[Dict], env: Dict, default: Dict, batch: int,
                  dry_run: bool) -> Dict:
    """The winners in the table's format (``pgs_kernels.triton_tuning``)."""
    from pgs_kernels import triton_tuning

    entries = []
    for cfg in configs:
        w = winners.get(cfg["name"])
        if w is None:
            continue
        arch, grid, width = w["record"]["key"]
        prov = dict(device_name=env["device_name"], torch=env["torch"], triton=env["triton"], commit=env["commit"],
                    date=env["date"], batch=batch, median_us=round(w["final_us"], 2),
                    default_us=None if w["default_us"] is None else round(w["default_us"], 2),
                    default=default, why=w["why"])
        if dry_run:
            prov["dry_run"] = True
        entries.append(dict(arch=arch, grid=list(grid), token_width=width, settings=w["record"]["settings"],
                            provenance=prov))
    return dict(format=triton_tuning.FORMAT, entries=entries)


def dumps_table(doc: Dict) -> str:
    """A table as JSON text a person can read: an entry to a few lines (its
    key, its settings, its provenance)."""
    head = {k: v for k, v in doc.items() if k != "entries"}
    lines = ["{"] + [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    ents = []
    for e in doc.get("entries", []):
        rest = {k: v for k, v in e.items() if k not in ("arch", "grid", "token_width", "settings", "provenance")}
        text = (f'  {{"arch": {json.dumps(e["arch"])}, "grid": {json.dumps(list(e["grid"]))}, '
                f'"token_width": {json.dumps(e["token_width"])},\n'
                f'   "settings": {json.dumps(e["settings"])}')
        for k, v in rest.items():
            text += f",\n   {json.dumps(k)}: {json.dumps(v)}"
        if "provenance" in e:
            text += f',\n   "provenance": {json.dumps(e["provenance"])}'
        ents.append(text + "}")
    lines.append(' "entries": [' + ("\n" + ",\n".join(ents) + "\n ]" if ents else "]"))
    return "\n".join(lines) + "\n}\n"


def write_table(path: str, doc: Dict) -> str:
    """Writes a table (:func:`dumps_table`) atomically; checks it reads back as the same document."""
    text = dumps_table(doc)
    assert json.loads(text) == json.loads(json.dumps(doc)), "dumps_table lost something"
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path


# ----------------------------------------------------------------------------- merging

def merge(files: List[str], table: Optional[str] = None) -> int:
    """Folds winners files into ``table`` (default: the committed table, or
    ``PGS_TRITON_TUNING``): an entry replaces the one of its key; entries
    sorted by key. A dry run's entries never go into the committed table."""
    from pgs_kernels import triton_tuning

    table = os.path.abspath(table or triton_tuning.table_path())
    doc = dict(format=triton_tuning.FORMAT, entries=[])
    if os.path.exists(table):
        triton_tuning.load_table(table)  # raises on a file that is not a table
        with open(table) as f:
            doc = json.load(f)
    entries = {triton_tuning.entry_key(e["arch"], e["grid"], e["token_width"]): e for e in doc["entries"]}
    for path in files:
        triton_tuning.load_table(path)  # the same checks as the launcher's
        with open(path) as f:
            new = json.load(f)["entries"]
        for e in new:
            key = triton_tuning.entry_key(e["arch"], e["grid"], e["token_width"])
            if e.get("provenance", {}).get("dry_run") and table == os.path.abspath(triton_tuning.TABLE_PATH):
                print(f"kernel_sweep --merge: {path} is a dry run's; not merged into the committed table",
                      file=sys.stderr)
                return 2
            old = entries.get(key)
            print(f"{key}: {'new' if old is None else 'was ' + json.dumps(old['settings'])} -> "
                  f"{json.dumps(e['settings'])}")
            entries[key] = e
    doc["entries"] = [entries[k] for k in sorted(entries, key=lambda k: (k[0], k[1], k[2]))]
    write_table(table, doc)
    print(f"wrote {table}")
    triton_tuning.clear_cache()
    return 0


# ----------------------------------------------------------------------------- the sweep

class Log:
    """The JSONL (appended and flushed per event) and the JSON documents."""

    def __init__(self, out: str, dev: str):
        os.makedirs(out, exist_ok=True)
        self.jsonl = os.path.join(out, f"sweep-{dev}.jsonl")
        self.json = os.path.join(out, f"sweep-{dev}.json")
        self.table = os.path.join(out, f"triton-tuning-{dev}.json")
        open(self.jsonl, "w").close()

    def event(self, kind: str, **data) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(dict(event=kind, time=round(time.time(), 3), **data)) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _parse_corrupt(text: Optional[str]):
    if not text:
        return None
    i, _, name = text.partition(":")
    return int(i), name


def main(argv=None) -> int:
    ap = argument_parser(__doc__)
    ap.add_argument("--out", default=os.path.dirname(result_path("x")),
                    help="output folder (default bench/out/; with --refresh bench/results/)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, Triton interpreter, toy sizes: checks the script, measures nothing")
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="seconds from the start after which no candidate starts (default 240)")
    ap.add_argument("--confirm-s", type=float, default=None,
                    help="seconds kept for the re-timing of the best (default 15; dry run 0)")
    ap.add_argument("--workers", type=int, default=None,
                    help="compile worker processes (default: CPUs less two; dry run 1; 0: none)")
    ap.add_argument("--compile-wait-s", type=float, default=90.0,
                    help="longest wait for a worker's compile of one (setting, call); past it the main process "
                         "compiles it itself (default 90)")
    ap.add_argument("--max-candidates", type=int, default=None, help="only the first N settings")
    ap.add_argument("--min-gain", type=float, default=0.01,
                    help="a setting other than DEFAULT wins only when this much faster (default 0.01)")
    ap.add_argument("--merge", nargs="+", metavar="FILE", help="fold winners files into the table and exit")
    ap.add_argument("--table", default=None,
                    help="the table --merge writes (default pgs_kernels/triton_tuning.json, or PGS_TRITON_TUNING)")
    # Test only: corrupt candidate I's outputs on call NAME, to show a wrong answer cannot win.
    ap.add_argument("--test-corrupt", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.merge:
        return merge(args.merge, args.table)

    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:  # too late for the interpreter in this process: start afresh
            env = dict(os.environ, TRITON_INTERPRET="1")
            os.execve(sys.executable, [sys.executable, "-m", "bench.kernel_sweep"] +
                      list(sys.argv[1:] if argv is None else argv), env)
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: @triton.jit picks the interpreter
    if args.dry_run:
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    t_start = time.time()
    deadline = t_start + args.budget_s

    import torch

    from bench.common import device_slug, environment, pick_device

    device = torch.device("cpu") if args.dry_run else pick_device("cuda")  # no CUDA: a message, exit 2
    out = args.out
    from pgs_kernels import triton_pgs, triton_tuning

    dry = args.dry_run
    configs = DRY_CONFIGS if dry else CONFIGS
    batch = DRY_BATCH if dry else BATCH
    arch = DRY_ARCH if dry else triton_pgs._arch(device)
    # The architecture's offline best (sm_80 has its own): what the launcher runs without an entry.
    default = triton_tuning.default_for(arch)
    cands = dry_candidates(default) if dry else list(triton_tuning.candidates(default=default))
    if args.max_candidates:
        cands = cands[:args.max_candidates]
    workers = args.workers if args.workers is not None else (1 if dry else max(1, (os.cpu_count() or 4) - 2))
    confirm_s = args.confirm_s if args.confirm_s is not None else (0.0 if dry else 15.0)
    corrupt = _parse_corrupt(args.test_corrupt)

    env = environment(device, "kernel_sweep")
    dev = "dry-run" if dry else device_slug(device)
    log = Log(out, dev)
    header = dict(env, dry_run=dry, arch=arch, batch=batch, budget_s=args.budget_s, min_gain=args.min_gain,
                  tolerance=TOL, min_decided=MIN_DECIDED, call=CALL, token_weight=TOKEN_WEIGHT,
                  space={k: list(v) for k, v in triton_tuning.SPACE.items()}, default=default,
                  candidates=cands, workers=workers)
    log.event("start", **header)
    print(f"[{time.strftime('%H:%M:%S')}] kernel_sweep on {env['device_name']} ({arch}): {len(cands)} settings x "
          f"{len(configs)} calls, batch {batch}, budget {args.budget_s:.0f} s, {workers} compile workers", flush=True)

    # Compiles start first: they overlap with the inputs and references.
    compiler = Compiler(workers, compiled=not dry, batch=batch)
    compiler.submit((i, cfg, s) for i, s in enumerate(cands) for cfg in configs)
    if compiler.error:
        log.event("pool", error=compiler.error)

    records: List[Dict] = []
    refs: Dict[str, Dict] = {}
    data: Dict[str, tuple] = {}
    weak: Dict[str, str] = {}
    state = dict(budget_exhausted=False, context_lost=None, not_run=[])
    time_us = timer(dry)

    def write_docs(final=False):
        winners = choose_winners(records, configs, default, args.min_gain, weak)
        table = winners_table(winners, configs, env, default, batch, dry)
        won = {n: dict(candidate=w["record"]["candidate"], settings=w["record"]["settings"], final_us=w["final_us"],
                       default_us=w["default_us"], why=w["why"]) for n, w in winners.items()}
        doc = dict(header, configs=[dict(c, key=config_key(c, arch), reference=refs.get(c["name"])) for c in configs],
                   records=records, winners=won,
                   no_winner=[c["name"] for c in configs if c["name"] not in winners],
                   weak_checks=weak, seconds=round(time.time() - t_start, 1), finished=final, **state)
        doc["ok"] = not doc["no_winner"]
        write_result(log.json, doc, quiet=True)
        write_table(log.table, table)
        return doc

    # ---- inputs and the fp64 reference, once per call
    for n, cfg in enumerate(configs):
        try:
            t0 = time.time()
            images, tokens, noise, info = make_inputs(cfg, batch, device, seed=100 + n)
            ref, energy, decided = reference(cfg, images, tokens, noise)
            data[cfg["name"]] = (images, tokens, noise.cpu(), noise, ref, energy)
            frac = float(decided.double().mean()) if decided.numel() else 0.0
            refs[cfg["name"]] = dict(info, decided_rows=int(decided.sum()), rows=int(decided.numel()),
                                     seconds=round(time.time() - t0, 1))
            if frac < MIN_DECIDED:
                weak[cfg["name"]] = f"only {frac:.0%} of the rows are decided (< {MIN_DECIDED:.0%})"
        except Exception as exc:
            refs[cfg["name"]] = dict(error=f"{type(exc).__name__}: {exc}")
            weak[cfg["name"]] = f"no reference: {exc!r}"
        log.event("reference", config=cfg["name"], **refs[cfg["name"]])

    # ---- check, then time, each candidate in order
    for i, setting in enumerate(cands):
        for cfg in configs:
            name = cfg["name"]
            if state["context_lost"] or time.time() > deadline - confirm_s:
                state["budget_exhausted"] = not state["context_lost"]
                state["not_run"].append(dict(candidate=i, config=name))
                continue
            rec = dict(candidate=i, config=name, key=config_key(cfg, arch), settings=setting, status="failed",
                       error=None, problems=[], median_us=None, p20_us=None, p80_us=None)
            t0 = time.time()
            comp = compiler.result(i, name, min(args.compile_wait_s, max(0.0, deadline - confirm_s - time.time())))
            if comp is not None and comp.get("timed_out") and time.time() >= deadline - confirm_s:
                state["budget_exhausted"] = True
                state["not_run"].append(dict(candidate=i, config=name))
                continue
            if comp is not None:
                rec["compile_s"] = comp["seconds"]
                if comp["ok"] is None:  # the worker's trouble, not the candidate's: compiled below instead
                    rec["worker_error"] = comp["error"]
            if name not in data:
                rec["error"] = "no reference for this call"
            elif comp is not None and comp["ok"] is False:
                rec["error"] = comp["error"]
            else:
                images, tokens, noise_cpu, noise, ref, energy = data[name]
                try:
                    outputs, launches = plan(cfg, images, tokens, noise, setting, compiled=not dry)
                    launch(launches)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    if corrupt == (i, name):
                        outputs[4].add_(1e-3)  # redundancy off by 10x the tolerance
                    res = check(cfg, outputs, ref, energy, noise_cpu)
                    rec.update(res)
                    if res["problems"]:
                        rec["status"] = "incorrect"
                    elif name in weak:
                        rec["status"] = "unverified"
                        rec["error"] = weak[name]
                    else:
                        med, p20, p80 = time_us(lambda: launch(launches))
                        rec.update(status="ok", median_us=round(med, 3), p20_us=round(p20, 3), p80_us=round(p80, 3))
                except Exception as exc:
                    rec["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                    if device.type == "cuda":
                        try:
                            torch.cuda.synchronize(device)
                        except Exception as exc2:  # the context is gone: nothing more can run
                            state["context_lost"] = f"{type(exc2).__name__}: {exc2}"[:2000]
            rec["seconds"] = round(time.time() - t0, 2)
            records.append(rec)
            log.event("candidate", **rec)
            t = f"{rec['median_us']:.1f} us" if rec["median_us"] is not None else rec["status"]
            why = "" if rec["status"] == "ok" else ": " + "; ".join(rec["problems"] or [str(rec["error"])])[:300]
            print(f"[{time.strftime('%H:%M:%S')}] {i:2d} {name:18s} {json.dumps(setting)}  {t}{why}", flush=True)
            write_docs()
    compiler.close()

    # ---- re-time the best of each call and DEFAULT, interleaved, while time is left
    rounds = 1 if dry else 2
    for cfg in configs:
        name = cfg["name"]
        ok = sorted((r for r in records if r["config"] == name and r["status"] == "ok"),
                    key=lambda r: r["median_us"])
        group = ok[:3] + [r for r in ok[3:] if r["settings"] == default]
        if len(group) < 2 or state["context_lost"]:
            continue
        images, tokens, noise_cpu, noise, ref, energy = data[name]
        plans = {id(r): plan(cfg, images, tokens, noise, r["settings"], compiled=not dry)[1] for r in group}
        for _ in range(rounds):
            for r in group:
                if time.time() > deadline:
                    break
                try:
                    med, _, _ = time_us(lambda: launch(plans[id(r)]))
                    r.setdefault("confirm_us", []).append(round(med, 3))
                    log.event("confirm", candidate=r["candidate"], config=name, median_us=round(med, 3))
                except Exception as exc:
                    log.event("confirm", candidate=r["candidate"], config=name, error=repr(exc))
        for r in group:
            if r.get("confirm_us"):
                r["final_us"] = round(final_us(r), 3)

    doc = write_docs(final=True)
    log.event("end", ok=doc["ok"], winners=doc["winners"], no_winner=doc["no_winner"],
              budget_exhausted=state["budget_exhausted"], not_run=len(state["not_run"]), seconds=doc["seconds"])
    print(f"\nkernel_sweep: {len(records)} runs, {len(state['not_run'])} not run"
          f"{' (budget spent)' if state['budget_exhausted'] else ''}, {doc['seconds']:.0f} s")
    for name, w in doc["winners"].items():
        d = "" if w["default_us"] is None else f" (DEFAULT {w['default_us']:.1f} us)"
        print(f"  {name:18s} candidate {w['candidate']:2d} {json.dumps(w['settings'])}  {w['final_us']:.1f} us{d}")
    for name in doc["no_winner"]:
        print(f"  {name:18s} NO WINNER{': ' + weak[name] if name in weak else ''}")
    if state["context_lost"]:
        print(f"  CUDA context lost: {state['context_lost']}")
    print(f"-> {log.json}, {log.table} (merge: python -m bench.kernel_sweep --merge {log.table})")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
