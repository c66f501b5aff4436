r"""Offline report of what the fused Triton kernel costs on a GPU, made without one.

For each configuration (image size, patch size, dtypes) and each target
architecture, the launches that ``pgs_kernels.triton_pgs._launch_plan`` makes
for batch 256 are compiled ahead of time through ``triton.compile`` with the
specialization a CUDA launch applies (pointer dtypes, 16-byte alignment,
integer arguments equal to 1 or divisible by 16, the launcher's constexprs;
``bench/offline_compile.py``, which does this under every Triton from 3.0 to
3.9), and the cubin is read back:

* ``regs``, ``spill_bytes`` (spill stores + loads), from ``ptxas -v``: the
  ptxas Triton chose (``ptxas-blackwell`` for sm_90 under Triton 3.9) with the
  options it passed, run again on its PTX, reproducing its cubin byte for byte;
* ``shared_bytes``: the dynamic shared memory the launch requests;
* ``ctas_per_sm``: blocks resident per SM, the minimum of the register limit
  (``regs`` rounded up to the 256-register warp allocation unit: warps per SM
  ``⌊65536 / (32 ⌈regs/8⌉ 8)⌋``, divided by the block's warps), the shared
  memory limit (``⌊smem_SM / (shared + static + 1 KiB reserved)⌋``), the warp
  limit (64 warps per SM) and the block limit (32);
* ``dyn_instr_per_thread``: SASS instructions a thread issues for one image,
  summed over the launches (see below);
* ``issue_floor_us = batch · warps · dyn_instr_per_thread / (SMs · 4 · f)``:
  every warp-instruction takes one issue slot of one of the SM's 4
  schedulers at clock ``f``, so no schedule can be faster;
* ``bandwidth_floor_us = bytes / DRAM bandwidth``, bytes = images + tokens
  (when ``token_weight > 0``) + noise read once, plus every output written
  once (``keep_idx``, ``mask``, ``edge``, ``candidates``, ``redundancy``).

Dynamic instruction count. The SASS (``nvdisasm -g``, the one Triton ships:
every instruction with the source line it came from) is cut into basic
blocks; natural loops are found from the dominator tree (a back edge ``u -> h`` with ``h`` dominating
``u``). A loop's latch branch carries the line of the ``for`` statement it
closes, which names the source loop. One program of the same launch (same
constexprs; batch 1, with the launch's ``ITERS``) runs in the Triton
interpreter with ``range`` (the kernel module's, and the one the
interpreter's ``tl.range`` calls) replaced by one that counts, per ``for``
line, its entries and iterations, and with a line tracer recording which
kernel lines ran. That gives ``trips(F)``, the iterations of ``for`` line
``F`` per entry (constant, as the bounds are constexprs). Then, outermost
loop first,

    iterations(loop) = iterations(enclosing loop, or 1) · trips(F) / unroll(F)
    count(instruction) = iterations of its innermost loop (1 outside loops)
    dyn_instr_per_thread = Σ count(instruction) over the launches' SASS

A source loop the compiler unrolled completely is straight-line code, counted
with what encloses it; copies of a loop (an enclosing loop unrolled) each get
their own entries. ``unroll(F)`` is what ptxas did on top of LLVM: the PTX has
the same loops with line information, and ptxas keeps global memory
instructions, shuffles and barriers one for one (``ld.global.v4`` is one
``LDG.128``), so ``unroll(F)`` is the whole number that makes the dynamic count
of such instructions in ``F``'s own blocks (nested loops excluded, PTX loops
that ptxas unrolled completely folded in) equal in SASS and PTX; where no
such instructions or no whole number is found, 1. A basic block most of whose
kernel-source instructions come from lines that never ran in the traced
program (e.g. the log-domain fallback of Sinkhorn when the scaling form
holds) counts zero; so do blocks reached only through a divergent-warp branch
(``BRA.DIV``) or a subroutine call (the slow paths of IEEE division and
square root, taken only for special operands). The per-program count covers
``ITERS`` images when programs stride over the batch; it is divided by
``ITERS``.

The per-step split attributes every instruction to the kernel helper (or the
``# ----`` section of the kernel body) that its line belongs to; instructions
of shared helpers or of Triton's library go to the step of the instruction
before them.

Usage::

    python -m bench.kernel_report                 # all configs, sm_90 and sm_80
    python -m bench.kernel_report --configs 224/16:bf16 336/14:bf16x1024 --archs sm_90 --out /tmp/r.json
    python -m bench.kernel_report --steps --verbose   # per-step split; SASS loops (for line, iterations, unroll)
"""

from __future__ import annotations

import argparse
import ast
import builtins
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

from bench import offline_compile
from bench.common import ROOT, argument_parser, git_commit, out_help, result_path, write_result

DEFAULT_OUT = result_path("kernel-sm90.json")
BATCH = 256
TOKEN_WEIGHT = 0.5

# Per-SM limits and the figures the floors use.
ARCHS = {
    "sm_90": dict(capability=90, name="H100/H200 (sm_90)", sms=132, schedulers=4, clock_ghz=1.98,
                  dram_tbps=4.3, regs_per_sm=65536, max_warps=64, max_ctas=32, smem_per_sm=228 * 1024),
    "sm_80": dict(capability=80, name="A100 (sm_80)", sms=108, schedulers=4, clock_ghz=1.41,
                  dram_tbps=1.9, regs_per_sm=65536, max_warps=64, max_ctas=32, smem_per_sm=164 * 1024),
}

# (height = width, patch size, tokens dtype or None, token width)
CONFIGS = [
    (224, 16, None, 0), (224, 16, "bf16", 768), (224, 16, "fp32", 768),
    (224, 14, None, 0), (224, 14, "bf16", 768), (224, 14, "fp32", 768),
    (336, 14, "bf16", 1024),
    (512, 16, "bf16", 768),
]
# The contract's defaults for the rest.
MASK_RATIO, CANDIDATE_RATIO, SIM_THRESHOLD, EDGE_WEIGHT, OT_REG, OT_ITERS = 0.5, 0.05, 0.5, 1.0, 0.05, 20


def config_name(cfg) -> str:
    size, p, tdt, d = cfg
    return f"{size}/{p}:" + (f"{tdt}x{d}" if tdt else "notok")


def parse_config(text: str):
    """``224/16:bf16`` (width 768), ``336/14:bf16x1024``, ``224/16:notok``."""
    m = re.fullmatch(r"(\d+)/(\d+):(notok|bf16|fp32)(?:x?(\d+))?", text)
    if not m:
        raise ValueError(f"--configs: expected SIZE/P:notok|bf16[xD]|fp32[xD], got {text!r}")
    tdt = None if m.group(3) == "notok" else m.group(3)
    return int(m.group(1)), int(m.group(2)), tdt, (int(m.group(4) or 768) if tdt else 0)


def parse_tuning(text: str) -> dict:
    """``num_warps=4,num_stages=1,maxnreg=none,DOT=ieee`` -> the settings over
    ``triton_tuning.DEFAULT``."""
    from pgs_kernels import triton_tuning

    out = dict(triton_tuning.DEFAULT)
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in out:
            raise ValueError(f"--tuning: unknown setting {name!r} (known: {', '.join(out)})")
        out[name] = None if value.lower() == "none" else int(value) if value.isdigit() else value
    return out


def _counts(L: int):
    # Imported here: the package must load after the choice between the
    # interpreter (trace worker) and the compiler (report) is made.
    from pgs_kernels import pgs_counts

    return pgs_counts(L, MASK_RATIO, CANDIDATE_RATIO)  # (K, M, k)


def plan(cfg, batch: int, device: str, compiled: bool, tok_dtype=None, tuning=None):
    """The launcher's own plan for this configuration: ``(outputs, launches)``,
    with the launch settings ``tuning`` (default ``triton_tuning.DEFAULT``)."""
    import torch
    from pgs_kernels import triton_pgs

    size, p, tdt, d = cfg
    L = (size // p) ** 2
    K, _, k = _counts(L)
    images = torch.empty(batch, 3, size, size, device=device) if device == "meta" else \
        torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    noise = torch.empty(batch, L, device=device) if device == "meta" else \
        torch.rand(batch, L, generator=torch.Generator().manual_seed(1))
    tokens, tw = None, 0.0
    if tdt is not None:
        dt = tok_dtype or {"bf16": torch.bfloat16, "fp32": torch.float32}[tdt]
        tokens = torch.empty(batch, L, d, dtype=dt, device=device) if device == "meta" else \
            torch.randn(batch, L, d, generator=torch.Generator().manual_seed(2)).to(dt)
        tw = TOKEN_WEIGHT
    return triton_pgs._launch_plan(images, tokens, noise, p, K, k, SIM_THRESHOLD, tw, EDGE_WEIGHT, True,
                                   OT_REG, OT_ITERS, compiled=compiled, tuning=tuning)


def _bytes_moved(cfg, batch: int) -> int:
    size, p, tdt, d = cfg
    L = (size // p) ** 2
    K, _, k = _counts(L)
    n = batch * 3 * size * size * 4 + batch * L * 4  # fp32 images, fp32 noise
    if tdt is not None:
        n += batch * L * d * (2 if tdt == "bf16" else 4)
    n += batch * (K * 8 + L * 1 + L * 4 + k * 8 + L * 4)  # keep_idx, mask, edge, candidates, redundancy
    return n


# ---- compiling -------------------------------------------------------------------------


def compile_launch(kernel, args, meta, arch: str) -> dict:
    """Compile one launch for ``arch`` with the specialization a CUDA launch
    computes (bench/offline_compile.py): the cubin, the PTX, Triton's metadata
    and the ptxas figures of Triton's own ptxas run."""
    return offline_compile.compile_launch(kernel, args, meta, ARCHS[arch]["capability"])


def disassemble(cubin: bytes) -> str:
    """``nvdisasm -g -c`` of the cubin, with the nvdisasm Triton ships (or
    the one ``TRITON_NVDISASM_PATH`` names)."""
    nvdisasm = offline_compile.tool_path("nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([nvdisasm, "-g", "-c", path], capture_output=True, text=True)
    if proc.returncode != 0:
        # A cubin from a newer ptxas than Triton's nvdisasm (Triton 3.9 ships
        # nvdisasm 13.1 beside ptxas-blackwell 13.4) may need a newer one.
        raise RuntimeError(f"{offline_compile.tool_release(nvdisasm)} cannot read the cubin (set "
                           f"TRITON_NVDISASM_PATH to a newer nvdisasm):\n{proc.stderr[-2000:]}")
    return proc.stdout


def ctas_per_sm(regs: int, num_warps: int, smem: int, arch: str) -> int:
    a = ARCHS[arch]
    regs_per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = (a["regs_per_sm"] // regs_per_warp) // num_warps
    by_smem = a["smem_per_sm"] // (smem + 1024)
    return max(0, min(by_regs, by_smem, a["max_warps"] // num_warps, a["max_ctas"]))


# ---- SASS control flow -----------------------------------------------------------------

_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def parse_sass(text: str):
    """Instructions ``[(addr, predicated, opcode, target_label, (file, line))]``
    and the label -> address map."""
    instrs, labels, pending, loc = [], {}, [], None
    for raw in text.splitlines():
        m = _LINE.search(raw)
        if m:
            loc = (os.path.realpath(m.group(1)), int(m.group(2)))
            continue
        m = _LABEL.match(raw.strip())
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.match(raw)
        if not m:
            continue
        addr = int(m.group(1), 16)
        for lab in pending:
            labels[lab] = addr
        pending = []
        t = _TARGET.search(m.group(4))
        instrs.append((addr, m.group(2) is not None, m.group(3), t.group(1) if t else None, loc))
    for lab in pending:  # labels after the last instruction
        labels[lab] = instrs[-1][0] + 16 if instrs else 0
    return instrs, labels


def _blocks(instrs, labels):
    """Basic blocks as index ranges, and their successor lists. Divergent-warp
    branches (``BRA.DIV``) are not followed. ``CALL.REL.NOINC`` is a jump
    (ptxas also closes loops with it) unless its target reaches a ``RET``
    (a subroutine: the slow path of IEEE division or square root), which is
    not followed."""
    addr_ix = {a[0]: i for i, a in enumerate(instrs)}
    leaders = {0}
    for lab_addr in labels.values():
        if lab_addr in addr_ix:
            leaders.add(addr_ix[lab_addr])
    for i, (_, _, op, tgt, _) in enumerate(instrs):
        if op.startswith(("BRA", "EXIT", "RET", "BRX", "JMP", "JMX", "CALL")) and i + 1 < len(instrs):
            leaders.add(i + 1)
    starts = sorted(leaders)
    blocks = [(s, (starts[n + 1] if n + 1 < len(starts) else len(instrs))) for n, s in enumerate(starts)]
    start_of = {s: n for n, (s, _) in enumerate(blocks)}
    def jumps(op):
        return op.startswith(("BRA", "JMP")) and not op.startswith("BRA.DIV")

    def target(tgt):
        return start_of[addr_ix[labels[tgt]]] if tgt in labels and labels[tgt] in addr_ix else None

    def reaches_ret(b0):
        seen, stack = {b0}, [b0]
        while stack:
            u = stack.pop()
            s_, e_ = blocks[u]
            _, pred_, op_, tgt_, _ = instrs[e_ - 1]
            if op_.startswith("RET"):
                return True
            nxt = []
            if jumps(op_) and target(tgt_) is not None:
                nxt.append(target(tgt_))
            if not (op_.startswith(("EXIT", "RET")) or (jumps(op_) and not pred_)) and u + 1 < len(blocks):
                nxt.append(u + 1)
            for v in nxt:
                if v not in seen:
                    seen.add(v)
                    stack.append(v)
        return False

    succ = []
    for n, (s, e) in enumerate(blocks):
        _, pred, op, tgt, _ = instrs[e - 1]
        out = []
        is_jump = jumps(op) or (op.startswith("CALL") and target(tgt) is not None
                                and not reaches_ret(target(tgt)))
        ends = op.startswith(("EXIT", "RET", "BRX", "JMX")) or (is_jump and not pred)
        if is_jump and target(tgt) is not None:
            out.append(target(tgt))
        if op.startswith("EXIT") and pred:
            ends = False
        if not ends and n + 1 < len(blocks):
            out.append(n + 1)
        succ.append(out)
    return blocks, succ


def _dominators(n: int, succ) -> List[set]:
    preds = [[] for _ in range(n)]
    for u in range(n):
        for v in succ[u]:
            preds[v].append(u)
    reach, stack = {0}, [0]
    while stack:
        u = stack.pop()
        for v in succ[u]:
            if v not in reach:
                reach.add(v)
                stack.append(v)
    dom = [set(reach) if u in reach else set() for u in range(n)]
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for u in sorted(reach):
            if u == 0:
                continue
            ps = [dom[p] for p in preds[u] if p in reach]
            new = set.intersection(*ps) | {u} if ps else {u}
            if new != dom[u]:
                dom[u] = new
                changed = True
    return dom, reach, preds


def for_lines(path: str) -> set:
    """The lines of the ``for`` statements in the module's ``@triton.jit`` functions."""
    tree = ast.parse(open(path).read())
    return {node.lineno for f in tree.body if isinstance(f, ast.FunctionDef) and _is_jit(f)
            for node in ast.walk(f) if isinstance(node, ast.For)}


_PTX_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"')
_PTX_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)")
_PTX_LABEL = re.compile(r"^(\$L__\w+):")
_PTX_INSTR = re.compile(r"^\s*(@!?%\w+\s+)?([a-z][\w.]*)\b([^;]*);")
_PTX_TARGET = re.compile(r"(\$L__\w+)")


def parse_ptx(text: str):
    """PTX in the shape ``parse_sass`` gives SASS: ``[(index, predicated,
    OPCODE, target_label, (file, line))]`` (upper-case opcodes) and labels."""
    files = {m.group(1): os.path.realpath(m.group(2)) for m in map(_PTX_FILE.match, text.splitlines()) if m}
    instrs, labels, pending, loc = [], {}, [], None
    for raw in text.splitlines():
        m = _PTX_LOC.match(raw)
        if m:
            loc = (files.get(m.group(1), m.group(1)), int(m.group(2)))
            continue
        m = _PTX_LABEL.match(raw.strip())
        if m:
            pending.append(m.group(1))
            continue
        line = raw.split("//")[0]
        if line.strip().startswith((".", "{", "}")) or not line.strip():
            continue
        m = _PTX_INSTR.match(line)
        if not m:
            continue
        addr = len(instrs) * 16
        for lab in pending:
            labels[lab] = addr
        pending = []
        op = m.group(2).upper()
        t = _PTX_TARGET.search(m.group(3)) if op.startswith("BRA") else None
        instrs.append((addr, m.group(1) is not None, op, t.group(1) if t else None, loc))
    return instrs, labels


# Instruction classes that ptxas keeps one for one from PTX (``ld.global.v4``
# is one LDG.128): their ratio in a loop body says how far ptxas unrolled it.
_UNROLL_CLASSES = (
    (("LDG", "STG", "LDGSTS", "RED", "ATOM"), ("LD.GLOBAL", "ST.GLOBAL", "CP.ASYNC.CA", "CP.ASYNC.CG",
                                               "RED.GLOBAL", "ATOM.GLOBAL")),
    (("SHFL",), ("SHFL",)),
    (("BAR",), ("BAR.SYNC", "BARRIER.SYNC")),
)


def _loop_forest(instrs, labels, kernel_file: str, fors: set, what: str):
    """Blocks, reachable blocks, natural loops (``{header: {body, latches,
    line}}``) and each block's innermost loop header."""
    blocks, succ = _blocks(instrs, labels)
    dom, reach, preds = _dominators(len(blocks), succ)
    loops: Dict[int, dict] = {}
    for u in reach:
        for h in succ[u]:
            if h in dom[u]:
                body, stack = {h, u}, ([u] if u != h else [])
                while stack:
                    x = stack.pop()
                    for p in preds[x]:
                        if p in reach and p not in body:
                            body.add(p)
                            stack.append(p)
                lp = loops.setdefault(h, {"body": set(), "latches": []})
                lp["body"] |= body
                lp["latches"].append(u)
    for lp in loops.values():
        lp["line"] = None
        for u in lp["latches"]:
            s, e = blocks[u]
            for i in range(e - 1, s - 1, -1):
                loc = instrs[i][4]
                if loc and loc[0] == kernel_file and loc[1] in fors:
                    lp["line"] = loc[1]
                    break
            if lp["line"] is not None:
                break
        if lp["line"] is None:
            raise RuntimeError(f"a {what} loop (latch at 0x%x) closes no for-loop of the kernel"
                               % instrs[blocks[lp["latches"][0]][1] - 1][0])
    inner = {}
    for n in reach:
        ins = [h for h, lp in loops.items() if n in lp["body"]]
        inner[n] = min(ins, key=lambda h: len(loops[h]["body"])) if ins else None
    return blocks, reach, loops, inner


def _in_class(op: str, c: int, ptx: bool) -> bool:
    sass_ops, ptx_ops = _UNROLL_CLASSES[c]
    return op.startswith(ptx_ops) if ptx else op.split(".")[0] in sass_ops


def _own_counts(instrs, blocks, loops, inner, ptx: bool):
    """Per loop header: instructions of each class in the loop's own blocks
    (its nested loops excluded)."""
    own = {h: [0] * len(_UNROLL_CLASSES) for h in loops}
    for n, h in inner.items():
        if h is None:
            continue
        s, e = blocks[n]
        for i in range(s, e):
            for c in range(len(_UNROLL_CLASSES)):
                if _in_class(instrs[i][2], c, ptx):
                    own[h][c] += 1
    return own


def _parents(loops):
    """Each loop header's innermost enclosing loop header (None at the top)."""
    par = {}
    for h in loops:
        outer = [g for g in loops if g != h and h in loops[g]["body"]]
        par[h] = min(outer, key=lambda g: len(loops[g]["body"])) if outer else None
    return par


def dynamic_counts(instrs, labels, ptx_instrs, ptx_labels, trips: Dict[int, float], executed: set,
                   kernel_file: str):
    """Per-instruction execution counts for one program (see the module docstring).

    ``trips``: kernel-file ``for`` line -> iterations per entry in the traced
    program (a ``for`` line absent from it never ran); ``executed``: the
    kernel-file lines that ran. Returns the counts and, per SASS loop,
    ``(for line, iterations per program, unroll factor)``."""
    fors = for_lines(kernel_file)
    blocks, reach, loops, inner = _loop_forest(instrs, labels, kernel_file, fors, "SASS")
    pblocks, _preach, ploops, pinner = _loop_forest(ptx_instrs, ptx_labels, kernel_file, fors, "PTX")
    n_cls = len(_UNROLL_CLASSES)
    # PTX (LLVM's loops, not unrolled further): iterations = entries x trips,
    # entries = iterations of the enclosing loop.
    ppar = _parents(ploops)
    order = sorted(ploops, key=lambda h: -len(ploops[h]["body"]))
    for h in order:
        outer = ploops[ppar[h]]["iters"] if ppar[h] is not None else 1.0
        ploops[h]["iters"] = outer * trips.get(ploops[h]["line"], 0.0)
    pown = _own_counts(ptx_instrs, pblocks, ploops, pinner, ptx=True)
    sass_lines = {lp["line"] for lp in loops.values()}
    # Dynamic class counts per for-line in the PTX, a loop that ptxas unrolled
    # completely (no SASS loop of its line) counted with the nearest enclosing
    # loop that has one.
    ptx_dyn: Dict[int, list] = {}
    for h, lp in ploops.items():
        g = h
        while g is not None and ploops[g]["line"] not in sass_lines:
            g = ppar[g]
        if g is None:
            continue
        acc = ptx_dyn.setdefault(ploops[g]["line"], [0.0] * n_cls)
        for c in range(n_cls):
            acc[c] += pown[h][c] * lp["iters"]
    # SASS, outermost first: iterations = entries x trips / unroll, the unroll
    # factor being what makes the line's own class instructions (nested SASS
    # loops excluded on both sides) as many as in the PTX, when that is a whole
    # number (else 1: ptxas moved instructions between loops).
    par = _parents(loops)
    sown = _own_counts(instrs, blocks, loops, inner, ptx=False)
    by_line: Dict[int, list] = {}
    for h, lp in loops.items():
        by_line.setdefault(lp["line"], []).append(h)
    done: Dict[int, float] = {}
    pending = sorted(by_line, key=lambda ln: -max(len(loops[h]["body"]) for h in by_line[ln]))
    while pending:
        line = next(ln for ln in pending if all(par[h] is None or par[h] in done for h in by_line[ln]))
        pending.remove(line)
        hs = by_line[line]
        entries = {h: (done[par[h]] if par[h] is not None else 1.0) for h in hs}
        unroll = 1.0
        ref = ptx_dyn.get(line)
        if ref is not None:
            for c in sorted(range(n_cls), key=lambda c: -ref[c]):
                if ref[c] <= 0:
                    break
                sass = sum(sown[h][c] * entries[h] * trips.get(line, 0.0) for h in hs)
                if sass > 0:
                    u = sass / ref[c]
                    if u >= 0.95 and abs(u - round(u)) <= 0.05 * u:
                        unroll = float(round(u))
                    break
        for h in hs:
            done[h] = entries[h] * trips.get(line, 0.0) / unroll
            loops[h]["iters"] = done[h]
            loops[h]["unroll"] = unroll

    counts = [0.0] * len(instrs)
    for n, (s, e) in enumerate(blocks):
        if n not in reach:
            continue
        ran = not_ran = 0
        for i in range(s, e):
            loc = instrs[i][4]
            if loc and loc[0] == kernel_file:
                if loc[1] in executed:
                    ran += 1
                else:
                    not_ran += 1
        if not_ran > ran:
            continue
        c = loops[inner[n]]["iters"] if inner[n] is not None else 1.0
        for i in range(s, e):
            counts[i] = c
    return counts, sorted((lp["line"], lp["iters"], lp["unroll"]) for lp in loops.values())


# ---- source structure: which step a line belongs to -----------------------------------


def _is_jit(fn: ast.FunctionDef) -> bool:
    for d in fn.decorator_list:
        txt = ast.unparse(d)
        if "jit" in txt:
            return True
    return False


def step_map(path: str, kernel_names) -> Dict[int, str]:
    """Line -> step name for the kernel module: a kernel's ``# ---- title``
    sections, otherwise the helper called from the kernel body; helpers called
    from a single step inherit it; shared helpers map to nothing."""
    src = open(path).read()
    tree = ast.parse(src)
    lines = src.splitlines()
    fns = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef) and _is_jit(f)}
    line_step: Dict[int, str] = {}
    calls: Dict[str, List[Tuple[str, int]]] = {}  # helper -> [(caller, line)]
    for name, f in fns.items():
        for node in ast.walk(f):
            if isinstance(node, ast.Call):
                callee = node.func.id if isinstance(node.func, ast.Name) else None
                if callee in fns:
                    calls.setdefault(callee, []).append((name, node.lineno))
    for kname in kernel_names:
        f = fns[kname]
        section = kname
        for ln in range(f.lineno, f.end_lineno + 1):
            m = re.match(r"\s*# ----\s*(.*)", lines[ln - 1])
            if m:
                section = m.group(1).strip()
            line_step[ln] = section
    has_sections = {k: any(re.match(r"\s*# ----", lines[ln - 1]) for ln in range(fns[k].lineno, fns[k].end_lineno + 1))
                    for k in kernel_names}

    def helper_step(h, seen=()):
        if h in seen:
            return None
        steps = set()
        for caller, ln in calls.get(h, []):
            if caller in kernel_names:
                steps.add(line_step[ln] if has_sections[caller] else h)
            else:
                steps.add(helper_step(caller, seen + (h,)))
        return steps.pop() if len(steps) == 1 else None

    for name, f in fns.items():
        if name in kernel_names:
            continue
        s = helper_step(name)
        if s is not None:
            for ln in range(f.lineno, f.end_lineno + 1):
                line_step[ln] = s
    return line_step


# ---- tracing one program in the interpreter --------------------------------------------


def _trace_worker(request: dict) -> dict:
    """Runs in a child process with ``TRITON_INTERPRET=1``: one program of each
    launch of the configuration, counting loop iterations and executed lines."""
    import torch
    import triton.runtime.interpreter as interp
    from pgs_kernels import triton_pgs

    cfg = tuple(request["config"])
    # bf16 tokens take the tensor-core path when compiled; the interpreter runs
    # that path correctly on fp16 (same loops, same constexprs).
    tok_dtype = torch.float16 if cfg[2] == "bf16" else None
    _, launches = plan(cfg, 1, "cpu", compiled=False, tok_dtype=tok_dtype, tuning=request.get("tuning"))
    kernel_file = os.path.realpath(triton_pgs.__file__)
    results = []
    for n, (kernel, grid, args, meta) in enumerate(launches):
        want = request["metas"][n]
        # A batch of 256 may make programs stride over images (ITERS > 1); the
        # traced program runs the same trip count, with one image in it.
        differ = {k: (meta[k], want[k]) for k in want if meta[k] != want[k] and k != "ITERS"}
        if differ:
            raise RuntimeError(f"launch {n}: the batch-1 plan's constexprs differ from the compiled ones: {differ}")
        meta = dict(meta, ITERS=want.get("ITERS", meta.get("ITERS")))
        iters: Dict[int, int] = {}
        entries: Dict[int, int] = {}
        executed: set = set()

        def counting_range(*a):
            # The kernel's own line: the caller, or further up for tl.range
            # (the interpreter's tl.range calls range itself).
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename not in kernel_paths:
                frame = frame.f_back
            if frame is None:
                return builtins.range(*a)
            line = frame.f_lineno
            r = builtins.range(*[int(x) for x in a])

            def gen():
                for x in r:
                    iters[line] = iters.get(line, 0) + 1
                    yield x

            iters.setdefault(line, 0)
            entries[line] = entries.get(line, 0) + 1
            return gen()

        def local(frame, event, arg):
            if event == "line":
                executed.add(frame.f_lineno)
            return local

        is_kernel_file: Dict[str, bool] = {}

        def tracer(frame, event, arg):
            name = frame.f_code.co_filename
            hit = is_kernel_file.get(name)
            if hit is None:
                hit = is_kernel_file[name] = os.path.realpath(name) == kernel_file
            if hit:
                executed.add(frame.f_lineno)
                return local
            return None

        kernel_paths = {triton_pgs.__file__, kernel_file}
        triton_pgs.range = counting_range
        interp.range = counting_range
        sys.settrace(tracer)
        try:
            kernel[(1,)](*args, **meta)
        finally:
            sys.settrace(None)
            del triton_pgs.range
            del interp.range
        # iterations per entry of each for-line (constant for constexpr bounds)
        trips = {line: iters[line] / entries[line] for line in iters if entries.get(line)}
        results.append(dict(trips=trips, executed=sorted(executed)))
    return dict(kernel_file=kernel_file, launches=results)


def trace_config(cfg, metas, tuning=None) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    req = json.dumps(dict(config=list(cfg), metas=metas, tuning=tuning))
    proc = subprocess.run([sys.executable, "-m", "bench.kernel_report", "--trace-worker", req], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"tracing {config_name(cfg)} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for lt in out["launches"]:
        lt["trips"] = {int(k): v for k, v in lt["trips"].items()}
        lt["executed"] = set(lt["executed"])
    return out


# ---- one row ---------------------------------------------------------------------------

_CLASSES = {"barriers": ("BAR",), "global_loads": ("LDG", "LDGSTS"), "global_stores": ("STG", "RED", "ATOM"),
            "shared": ("LDS", "STS", "LDSM", "STSM"), "shuffles": ("SHFL",),
            "fp32": ("FFMA", "FMUL", "FADD"), "mufu": ("MUFU",), "mma": ("HMMA", "HGMMA")}


def _json_meta(meta) -> dict:
    return {k: v for k, v in meta.items() if isinstance(v, (int, float, bool, str)) and k not in ("num_warps", "num_stages")}


def report_config(cfg, archs, batch: int = BATCH, verbose: bool = False, tuning=None) -> List[dict]:
    """The rows of one configuration, one per architecture, each compiled with
    ``tuning`` or else the architecture's offline best
    (``triton_tuning.default_for``); each distinct setting is traced once."""
    from pgs_kernels import triton_tuning

    size, p, tdt, d = cfg
    traced = {}
    rows = []
    for arch in archs:
        settings = dict(tuning) if tuning else triton_tuning.default_for(arch)
        key = json.dumps(settings, sort_keys=True)
        _, launches = plan(cfg, batch, "meta", compiled=True, tuning=settings)
        if key not in traced:
            traced[key] = trace_config(cfg, [_json_meta(m) for _, _, _, m in launches], settings)
        trace = traced[key]
        kernel_file = trace["kernel_file"]
        kernel_names = sorted({k.fn.__name__ for k, _, _, _ in launches})
        steps_of = step_map(kernel_file, kernel_names)
        a = ARCHS[arch]
        row = dict(arch=arch, height=size, width=size, patch_size=p, batch=batch, dtype="fp32",
                   tokens_dtype=tdt, token_width=d if tdt else None, launches=len(launches),
                   tuning={k: settings[k] for k in sorted(settings)})
        ptxas = set()
        tot_instr, warp_instr, by_step, by_class, loops_desc = 0.0, 0.0, {}, {}, []
        regs, spills, shared, warps_list, ctas = [], 0, [], [], []
        for n, (kernel, grid, args, meta) in enumerate(launches):
            ck = compile_launch(kernel, args, meta, arch)
            instrs, labels = parse_sass(disassemble(ck["cubin"]))
            ptx_instrs, ptx_labels = parse_ptx(ck["ptx"])
            lt = trace["launches"][n]
            counts, loop_list = dynamic_counts(instrs, labels, ptx_instrs, ptx_labels, lt["trips"], lt["executed"],
                                               kernel_file)
            per_thread = sum(counts)
            # The count covers the ITERS images a program strides over (each
            # iteration counted as one image's work); a launch with several
            # programs per image (grid larger than the batch) costs that many.
            progs = math.prod(grid)
            ppi = (progs / batch if progs > batch else 1.0) / meta.get("ITERS", 1)
            per_image = per_thread * ppi
            tot_instr += per_image
            warp_instr += per_image * ck["num_warps"]
            step = "setup"
            for (addr, _, op, _, loc), c in zip(instrs, counts):
                if loc and loc[0] == kernel_file and loc[1] in steps_of:
                    step = steps_of[loc[1]]
                key = step if len(launches) == 1 else f"{n}:{step}"
                by_step[key] = by_step.get(key, 0.0) + c * ppi
                for cls, names in _CLASSES.items():
                    if op.split(".")[0] in names:
                        by_class[cls] = by_class.get(cls, 0.0) + c * ppi
            ptxas.add(ck["ptxas"])
            regs.append(ck["regs"])
            spills += ck["spill_bytes"]
            shared.append(ck["shared"])
            warps_list.append(ck["num_warps"])
            ctas.append(ctas_per_sm(ck["regs"], ck["num_warps"], ck["shared"] + ck["static_shared"], arch))
            loops_desc.append([[ln, round(it, 2), u] for ln, it, u in loop_list])
        issue = batch * warp_instr / (a["sms"] * a["schedulers"] * a["clock_ghz"] * 1e3)
        row.update(
            num_warps=max(warps_list), regs=max(regs), spill_bytes=spills, shared_bytes=max(shared),
            ctas_per_sm=min(ctas), warps_per_sm=min(c * w for c, w in zip(ctas, warps_list)),
            dyn_instr_per_thread=round(tot_instr), warp_instr_per_image=round(warp_instr),
            issue_floor_us=round(issue, 1),
            bandwidth_floor_us=round(_bytes_moved(cfg, batch) / (a["dram_tbps"] * 1e6), 1),
            dyn_instr_by_step={k: round(v) for k, v in by_step.items()},
            dyn_instr_by_class={k: round(v) for k, v in by_class.items()},
            sass_loops=loops_desc,
            ptxas=", ".join(sorted(ptxas)),
        )
        row["issue_over_bandwidth"] = round(row["issue_floor_us"] / row["bandwidth_floor_us"], 2)
        rows.append(row)
        if verbose:
            print(f"  {config_name(cfg)} {arch}: loops (for-line, iterations, unroll) {loops_desc}", file=sys.stderr)
    return rows


def print_table(rows, out=sys.stdout):
    hdr = (f"{'arch':6} {'config':16} {'warps':>5} {'regs':>4} {'spill':>5} {'smem':>6} {'cta/SM':>6} "
           f"{'warps/SM':>8} {'instr/thr':>9} {'issue µs':>9} {'bw µs':>7} {'ratio':>6}")
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    for r in rows:
        cfg = config_name((r["height"], r["patch_size"], r["tokens_dtype"], r["token_width"] or 0))
        print(f"{r['arch']:6} {cfg:16} {r['num_warps']:5d} {r['regs']:4d} {r['spill_bytes']:5d} "
              f"{r['shared_bytes']:6d} {r['ctas_per_sm']:6d} {r['warps_per_sm']:8d} "
              f"{r['dyn_instr_per_thread']:9d} {r['issue_floor_us']:9.1f} {r['bandwidth_floor_us']:7.1f} "
              f"{r['issue_over_bandwidth']:6.2f}", file=out)


def main(argv=None):
    ap = argument_parser(__doc__)
    ap.add_argument("--out", default=DEFAULT_OUT, help=out_help("kernel-sm90.json"))
    ap.add_argument("--configs", nargs="*", help="e.g. 224/16:bf16 336/14:bf16x1024 224/14:notok")
    ap.add_argument("--archs", nargs="*", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--steps", action="store_true", help="print the per-step split too")
    ap.add_argument("--tuning", default=None,
                    help="launch settings over triton_tuning.DEFAULT, for every arch (default: each arch's offline "
                         "best, triton_tuning.default_for), e.g. num_warps=4,DOT=ieee")
    ap.add_argument("--verbose", action="store_true", help="print the SASS loops and their trip counts")
    ap.add_argument("--trace-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.trace_worker:
        print(json.dumps(_trace_worker(json.loads(args.trace_worker))))
        return 0
    os.environ.pop("TRITON_INTERPRET", None)
    # A fresh compile cache: a cached cubin carries the line information of
    # wherever the same source was compiled first (another checkout's paths).
    cache = tempfile.TemporaryDirectory(prefix="kernel-report-")
    os.environ["TRITON_CACHE_DIR"] = cache.name
    import torch
    import triton

    configs = [parse_config(c) for c in args.configs] if args.configs else CONFIGS
    tuning = parse_tuning(args.tuning) if args.tuning else None
    rows = []
    for cfg in configs:
        rows += report_config(cfg, args.archs, args.batch, verbose=args.verbose, tuning=tuning)
    rows.sort(key=lambda r: (list(ARCHS).index(r["arch"]), r["height"], -r["patch_size"]))
    doc = dict(device="offline: " + ", ".join(ARCHS[a]["name"] for a in args.archs) + " (ptxas, no GPU)",
               triton=triton.__version__, torch=torch.__version__, commit=git_commit(),
               assumptions={a: {k: ARCHS[a][k] for k in ("sms", "schedulers", "clock_ghz", "dram_tbps")}
                            for a in args.archs},
               rows=rows)
    if args.out:
        write_result(args.out, doc, quiet=True)
    print_table(rows)
    if args.steps:
        for r in rows:
            cfg = config_name((r["height"], r["patch_size"], r["tokens_dtype"], r["token_width"] or 0))
            print(f"{r['arch']} {cfg}: " + ", ".join(f"{k} {v}" for k, v in r["dyn_instr_by_step"].items()))
            print(f"{'':6} classes: " + ", ".join(f"{k} {v}" for k, v in r["dyn_instr_by_class"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
