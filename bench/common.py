"""What every benchmark script shares: where results go, the environment
block each result JSON carries, the machine-load record, the device choice,
and the timers.

Result JSON (one object per file, written by :func:`write_result`)::

    {"benchmark": "micro" | "native_speed" | "retention" | "train_throughput"
                  | "train_quality",
     "device": "cpu" | "h200" | ..., "device_name": ..., "torch": ..., "triton": ...,
     "commit": ..., "python": ..., "cpus": ..., "threads": ..., "date": ...,
     "load": {"before": [1, 5, 15 min], "after": [...], "cpus": ..., "threads": ...,
              "busy": bool, "warning": str | None},
     ...the script's own fields}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The committed figures (README, docs): written only with ``--refresh``.
RESULTS = os.path.join(ROOT, "bench", "results")
#: Where a script writes by default: untracked, so a run never changes the checkout.
SCRATCH = os.path.join(ROOT, "bench", "out")
_refresh = False


def result_path(name: str) -> str:
    """``bench/out/<name>``, the default output of every script, or
    ``bench/results/<name>`` once the script was run with ``--refresh``."""
    return os.path.join(RESULTS if _refresh else SCRATCH, name)


class _Parser(argparse.ArgumentParser):
    """``--refresh`` moves every default output from bench/out/ to
    bench/results/ (defaults are computed before the flag is read)."""

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        global _refresh
        if getattr(ns, "refresh", False):
            _refresh = True
            for key, value in vars(ns).items():
                if isinstance(value, str) and (value == SCRATCH or value.startswith(SCRATCH + os.sep)):
                    setattr(ns, key, RESULTS + value[len(SCRATCH):])
        return ns, rest


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose ``--help`` prints the script's whole docstring (which
    says where its results go), with ``--refresh``."""
    p = _Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--refresh", action="store_true",
                   help="write the default outputs into bench/results/ (the committed figures) instead of bench/out/")
    return p


def out_help(default: str) -> str:
    """The ``--out`` help line every script uses."""
    return (f"JSON to write (default: bench/out/{default}, untracked; with --refresh bench/results/{default}; "
            "overwritten; a PNG goes beside it)")


# ----------------------------------------------------------------------------- environment

def git_commit() -> str:
    """``HEAD`` of the checkout the scripts run from, ``-dirty`` when tracked
    files other than bench/results/ differ from it; ``unknown`` outside a git
    checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if head.returncode:
            return "unknown"
        # Results written by an earlier script of the same run do not make the code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def triton_version() -> Optional[str]:
    try:
        import triton

        return triton.__version__
    except Exception:  # absent or broken: the record says so
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(device: torch.device) -> str:
    """``cpu``, or the GPU model as a short lowercase name (``h100``, ``h200``)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower()
    for tok in re.split(r"[^a-z0-9]+", name):
        if re.fullmatch(r"[a-z]+\d+[a-z]*", tok) and tok not in ("nvidia", "geforce"):
            return tok
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {os.cpu_count()} CPUs"


def environment(device: torch.device, benchmark: str) -> Dict:
    """The block every result JSON starts with."""
    device = torch.device(device)
    return {
        "benchmark": benchmark,
        "device": device_slug(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "commit": git_commit(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# ----------------------------------------------------------------------------- device

def pick_device(arg: Optional[str]) -> torch.device:
    """``arg`` as a device, CUDA when present if ``None``. Asking for CUDA
    where there is none ends the script with "needs a CUDA device" and exit
    status 2, without a traceback."""
    if arg is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(arg)
    except RuntimeError:
        raise SystemExit(f"--device: {arg!r} is not a device (cpu, cuda, cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(f"{script_name()}: --device {arg} needs a CUDA device; "
                  "this machine has none (torch.cuda.is_available() is False)", file=sys.stderr)
            raise SystemExit(2)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise SystemExit(f"--device: {arg!r} is neither cpu nor cuda")
    return device


def script_name() -> str:
    """``bench.micro`` when run with ``-m``, else the file's name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None and spec.name else os.path.basename(sys.argv[0]) or "bench"


@contextlib.contextmanager
def tf32_flags_restored():
    """The TF32 flags (``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.backends.cudnn.allow_tf32``) as they were on entry, restored on
    exit, whatever the body set them to. They are settable without CUDA."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def sync(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- machine load

def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _cpu_ticks() -> Optional[Tuple[int, int]]:
    """(busy ticks of the whole machine, ticks of this process, its threads
    and its children once waited for), from /proc; None where there is no
    /proc. A study that trains in worker processes counts them as its own."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            mine = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy, sum(int(v) for v in mine[11:15])  # utime + stime + cutime + cstime


def others_cores(t0: Optional[Tuple[int, int]], t1: Optional[Tuple[int, int]], seconds: float) -> Optional[float]:
    """Cores that other processes kept busy between two :func:`_cpu_ticks`."""
    if t0 is None or t1 is None or seconds <= 0:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return round(max(0.0, ((t1[0] - t0[0]) - (t1[1] - t0[1])) / hz / seconds), 2)


class LoadRecord:
    """How busy the machine was before and during a run.

    A run with ``threads`` intra-op threads on ``cpus`` CPUs needs
    ``threads`` cores to itself. Other processes' use is measured directly
    from /proc (all CPU time less this process's): over half a second with
    the run idle, before it starts, and averaged over the whole run. The
    machine is busy when they held more than ``cpus - threads + 0.5`` cores
    at either time: on a busy machine multi-threaded timings measure
    contention (OpenMP threads wait out each other's time slices: 10-400x
    slower has been seen on 2 cores), so the script warns on the terminal
    and in its JSON. The 1-minute load average (which counts the run
    itself) is recorded beside it; where /proc is missing it stands in,
    compared with the same bound before the run.
    """

    def __init__(self, threads: Optional[int] = None, quiet: bool = False, sample_s: float = 0.5):
        self.cpus = os.cpu_count() or 1
        self.threads = int(threads or torch.get_num_threads())
        self.allowed = self.cpus - self.threads + 0.5
        self.quiet = quiet
        self.warnings: List[str] = []
        self.before = load_average()
        self.after = None
        self.during = None
        t0, w0 = _cpu_ticks(), time.monotonic()
        if t0 is not None:
            time.sleep(sample_s)
        self._start = (_cpu_ticks(), time.monotonic())
        self.others_before = others_cores(t0, self._start[0], self._start[1] - w0)
        if self.others_before is not None:
            if self.others_before > self.allowed:
                self._warn(f"other processes kept {self.others_before:.2f} of {self.cpus} CPUs busy before the "
                           f"run, which needs {self.threads} to itself: its timings measure contention")
        elif self.before and self.before[0] > self.allowed:
            self._warn(f"load average {self.before[0]:.2f} before the run on {self.cpus} CPUs, which "
                       f"needs {self.threads} to itself: its timings measure contention")

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)
        if not self.quiet:
            print(f"WARNING: {msg}", file=sys.stderr, flush=True)

    def finish(self) -> Dict:
        """Reads the load after the run; returns the JSON block."""
        self.after = load_average()
        self.during = others_cores(self._start[0], _cpu_ticks(), time.monotonic() - self._start[1])
        if self.during is not None and self.during > self.allowed:
            self._warn(f"other processes kept {self.during:.2f} of {self.cpus} CPUs busy on average during the "
                       f"run, which needs {self.threads} to itself: its timings measure contention")
        return self.record()

    def record(self) -> Dict:
        return {"before": self.before, "after": self.after, "cpus": self.cpus, "threads": self.threads,
                "others_cores_before": self.others_before, "others_cores_during": self.during,
                "busy": bool(self.warnings), "warning": "; ".join(self.warnings) or None}


# ----------------------------------------------------------------------------- timers

def time_cpu(fn: Callable, target_s: float = 0.15, min_reps: int = 3, max_reps: int = 50) -> Tuple[float, float]:
    """(median, min) ms of ``fn`` by ``time.perf_counter`` after one warm-up
    call; the number of repeats fills about ``target_s`` but stays within
    ``[min_reps, max_reps]``."""
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
    """Median ms of ``fn`` on the GPU after warm-up: ``triton.testing.do_bench``
    (L2 flushed between repeats), or CUDA event pairs without Triton."""
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


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30,
                        timer: Optional[Callable[[Callable], float]] = None) -> float:
    """Device-to-device copy bandwidth, (read + write) bytes / s, in GB/s, of
    copying ``nbytes``; ``timer(fn)`` gives ms (default :func:`time_cuda`)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = (timer or (lambda fn: time_cuda(fn, device)))(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def timer_name(device: torch.device) -> str:
    if torch.device(device).type != "cuda":
        return "time.perf_counter median after warm-up"
    return "triton.testing.do_bench median (L2 flushed)" if triton_version() else "cuda events median"


class SectionTimer:
    """Times a section of a step without forcing a sync.

    On CUDA it records an event pair per call; reading them needs a sync,
    which the caller does once per logging window. On CPU it uses
    ``perf_counter``, exact because CPU ops are eager.
    """

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self._pending = []
        self._t0 = None

    def start(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._t0 = ev
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._pending.append((self._t0, ev))
        else:
            self._pending.append((time.perf_counter() - self._t0) * 1e3)
        self._t0 = None

    def take(self) -> list:
        """The sections recorded since the last take, unread (reading CUDA events needs a sync)."""
        out, self._pending = self._pending, []
        return out

    @staticmethod
    def total_ms(records: list) -> float:
        """Milliseconds in ``records`` from :meth:`take`; on CUDA, synchronize first."""
        return float(sum(r if isinstance(r, float) else r[0].elapsed_time(r[1]) for r in records))

    def drain(self) -> float:
        """Total milliseconds since the last take or drain (sync first on CUDA)."""
        return self.total_ms(self.take())


# ----------------------------------------------------------------------------- writing

def write_result(path: str, doc: Dict, quiet: bool = False) -> str:
    """Writes ``doc`` as JSON to ``path`` (folders made, file overwritten)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)  # a killed run never leaves half a file
    if not quiet:
        print(f"wrote {path}", flush=True)
    return path
