r"""The kernel's offline figures under each Triton release: which releases
compile it and hold its targets on sm_90 and sm_80.

For each folder given (a Triton installed with ``pip install --no-deps
--target DIR triton==X.Y.Z``; none given: the Triton this Python imports), a
subprocess with that folder first on ``PYTHONPATH`` runs
``bench.kernel_report`` on the ViT sizes, 224/16 and 224/14 with and without
bf16 tokens, for sm_90 and sm_80: registers, spill bytes, warps per SM, SASS
instructions a thread issues per image and the issue floor (see
bench/kernel_report.py). When the report fails after the compile (the
interpreter that traces trip counts breaks under that release), the compile
figures are still given, without the instruction counts.

Targets, on both architectures at 224/16 and 224/14, with and without
tokens: no spills and 16 warps per SM (two 8-warp blocks). A release passes
when every row is there and meets them; otherwise the JSON says why (the
compile error, or which rows miss which target).

Output: one JSON (default ``bench/out/triton-versions.json``, an untracked
folder; the committed figures are ``bench/results/triton-versions.json``,
written only with ``--out bench/results/triton-versions.json``)::

    {"benchmark": "triton_versions", "device": "offline", "torch": ..., "commit": ...,
     "load": {"before": [1, 5, 15 min], "after": [...]}, "targets": ...,
     "versions": [{"triton": "3.9.0", "passed": true, "reason": null,
                   "rows": [{"arch", "config", "regs", "spill_bytes", "num_warps", "ctas_per_sm",
                             "warps_per_sm", "dyn_instr_per_thread", "issue_floor_us", "ptxas",
                             "targets_met"}, ...], "errors": [...]}, ...],
     "passed": ["3.5.1", ...], "failed": [{"triton": "3.2.0", "reason": ...}, ...]}

These are compile figures, not timings: the machine's load does not change
them (it is recorded all the same).

Usage::

    python -m bench.triton_versions /work/tritons/3.5 /work/tritons/3.9
    python -m bench.triton_versions /work/tritons/* --out bench/results/triton-versions.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

from bench.common import ROOT, argument_parser, git_commit, load_average, write_result

DEFAULT_OUT = os.path.join(ROOT, "bench", "out", "triton-versions.json")
CONFIGS = ["224/16:notok", "224/16:bf16x768", "224/14:notok", "224/14:bf16x768"]
ARCHS = ["sm_90", "sm_80"]
TARGETS = "spill_bytes == 0 and warps_per_sm == 16 for every row (224/16 and 224/14, with and without bf16 " \
          "tokens, sm_90 and sm_80)"


def reason(exc: BaseException) -> str:
    """The exception in one line: its type and the last line of its message
    (Triton's compile errors put the source excerpt first)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:600]


def meets_targets(row: dict) -> bool:
    return row["spill_bytes"] == 0 and row["warps_per_sm"] == 16


def compile_rows(cfg, archs) -> List[dict]:
    """Registers, spills and occupancy of a configuration without the
    instruction counts (the compile alone)."""
    from bench import kernel_report as kr

    _, launches = kr.plan(cfg, kr.BATCH, "meta", compiled=True)
    rows = []
    for arch in archs:
        cks = [kr.compile_launch(kernel, args, meta, arch) for kernel, _, args, meta in launches]
        ctas = [kr.ctas_per_sm(ck["regs"], ck["num_warps"], ck["shared"] + ck["static_shared"], arch) for ck in cks]
        rows.append(dict(arch=arch, regs=max(ck["regs"] for ck in cks), spill_bytes=sum(ck["spill_bytes"] for ck in cks),
                         num_warps=max(ck["num_warps"] for ck in cks), ctas_per_sm=min(ctas),
                         warps_per_sm=min(c * ck["num_warps"] for c, ck in zip(ctas, cks)),
                         dyn_instr_per_thread=None, issue_floor_us=None,
                         ptxas=", ".join(sorted({ck["ptxas"] for ck in cks}))))
    return rows


def measure(configs: List[str], archs: List[str]) -> dict:
    """Runs under the Triton being measured: the report's rows for each
    configuration, or the compile's when the report fails, and the errors."""
    os.environ.pop("TRITON_INTERPRET", None)
    # A fresh compile cache, as kernel_report's own main makes (line information).
    cache = tempfile.TemporaryDirectory(prefix="triton-versions-")
    os.environ["TRITON_CACHE_DIR"] = cache.name
    import triton

    from bench import kernel_report as kr

    rows, errors = [], []
    for name in configs:
        cfg = kr.parse_config(name)
        try:
            got = [dict(r, config=name) for r in kr.report_config(cfg, archs)]
        except Exception as exc:  # noqa: BLE001 - every failure is a finding
            errors.append(dict(config=name, stage="report", error=reason(exc)))
            try:
                got = [dict(r, config=name) for r in compile_rows(cfg, archs)]
            except Exception as exc2:  # noqa: BLE001
                errors.append(dict(config=name, stage="compile", error=reason(exc2)))
                continue
        for r in got:
            rows.append({k: r[k] for k in ("arch", "config", "regs", "spill_bytes", "num_warps", "ctas_per_sm",
                                           "warps_per_sm", "dyn_instr_per_thread", "issue_floor_us", "ptxas")})
    return dict(triton=triton.__version__, triton_file=triton.__file__, rows=rows, errors=errors)


def run_version(folder: Optional[str], configs, archs) -> dict:
    """``measure`` in a subprocess with ``folder`` first on the path; the
    version entry of the JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The folder's Triton must shadow the environment's: first on the path.
    first = [os.path.abspath(folder)] if folder else []
    env["PYTHONPATH"] = os.pathsep.join(first + [ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    req = json.dumps(dict(configs=configs, archs=archs))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bench.triton_versions", "--worker", req], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    seconds = round(time.monotonic() - t0, 1)
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return dict(triton=None, passed=False, seconds=seconds,
                    reason=f"worker failed under {folder}: {tail[-1] if tail else proc.returncode}", rows=[], errors=[])
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if folder and not os.path.realpath(got["triton_file"]).startswith(os.path.realpath(folder) + os.sep):
        raise SystemExit(f"{folder}: the worker imported {got['triton_file']}, not the folder's Triton")
    for r in got["rows"]:
        r["targets_met"] = meets_targets(r)
    expected = {(a, c) for a in archs for c in configs}
    present = {(r["arch"], r["config"]) for r in got["rows"]}
    why, seen = [], {}
    for e in got["errors"]:  # the same error for several configurations said once
        seen.setdefault((e["stage"], e["error"]), []).append(e["config"])
    for (stage, error), names in seen.items():
        why.append(f"{stage} failed ({', '.join(names)}): {error}")
    if expected - present and not got["errors"]:
        why.append("missing rows: " + ", ".join(f"{a} {c}" for a, c in sorted(expected - present)))
    missed = [f"{r['arch']} {r['config']}: {r['spill_bytes']} spill bytes, {r['warps_per_sm']} warps/SM"
              for r in got["rows"] if not r["targets_met"]]
    if missed:
        why.append("targets missed: " + "; ".join(missed))
    return dict(triton=got["triton"], passed=not why, reason="; ".join(why) or None, seconds=seconds,
                rows=got["rows"], errors=got["errors"])


def print_table(versions: List[dict], out=sys.stdout) -> None:
    hdr = f"{'triton':8} {'arch':6} {'config':16} {'regs':>4} {'spill':>5} {'warps/SM':>8} {'instr/thr':>9} " \
          f"{'issue µs':>8}  ptxas"
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    for v in versions:
        for r in v["rows"]:
            instr = "-" if r["dyn_instr_per_thread"] is None else str(r["dyn_instr_per_thread"])
            issue = "-" if r["issue_floor_us"] is None else f"{r['issue_floor_us']:.1f}"
            print(f"{v['triton']:8} {r['arch']:6} {r['config']:16} {r['regs']:4d} {r['spill_bytes']:5d} "
                  f"{r['warps_per_sm']:8d} {instr:>9} {issue:>8}  {r['ptxas']}", file=out)
        print(f"{v['triton'] or '?':8} {'PASS' if v['passed'] else 'FAIL: ' + v['reason']}", file=out)


def main(argv=None) -> int:
    ap = argument_parser(__doc__)
    ap.add_argument("folders", nargs="*", help="folders with a Triton installed in them (--target installs)")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="JSON to write (default: bench/out/triton-versions.json, overwritten)")
    ap.add_argument("--configs", nargs="*", default=CONFIGS)
    ap.add_argument("--archs", nargs="*", default=ARCHS, choices=ARCHS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        req = json.loads(args.worker)
        print(json.dumps(measure(req["configs"], req["archs"])))
        return 0
    import torch

    before = load_average()
    versions = []
    for folder in args.folders or [None]:
        print(f"{folder or 'this environment'}: ...", file=sys.stderr, flush=True)
        v = run_version(folder, args.configs, args.archs)
        print(f"  triton {v['triton']}: {'passed' if v['passed'] else 'FAILED: ' + str(v['reason'])} "
              f"({v['seconds']} s)", file=sys.stderr, flush=True)
        versions.append(v)
    doc = dict(benchmark="triton_versions", device="offline", torch=torch.__version__, commit=git_commit(),
               python=sys.version.split()[0], date=time.strftime("%Y-%m-%d %H:%M:%S"),
               load=dict(before=before, after=load_average(),
                         note="compile figures, not timings: the load does not change them"),
               configs=args.configs, archs=args.archs, targets=TARGETS, versions=versions,
               passed=[v["triton"] for v in versions if v["passed"]],
               failed=[dict(triton=v["triton"], reason=v["reason"]) for v in versions if not v["passed"]])
    write_result(args.out, doc)
    print_table(versions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
