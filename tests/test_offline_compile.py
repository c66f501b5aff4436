"""bench/offline_compile.py under the Triton that is imported: the
specialization it computes is the one Triton's own launcher computes, and the
ASTSource it spells compiles to a kernel that carries it (a GPU is not needed;
ptxas is). Run under another Triton with bench/run_under_triton.sh."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A kernel with one argument of each kind the launcher specializes on. Written
# to a file: Triton reads a kernel's source back from it.
_KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def tiny(x_ptr, flags_ptr, y_ptr, n, stride, one, step, scale, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    x = tl.load(x_ptr + i * stride * one, mask=ok, other=0.0)
    f = tl.load(flags_ptr + i, mask=ok, other=0)
    tl.store(y_ptr + i * step, tl.where(f, x * scale, x), mask=ok)
'''

_SCRIPT = r'''
import json, os, sys, tempfile
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
sys.path.insert(0, sys.argv[1])
import torch
import triton
from tiny_kernel import tiny
from bench import offline_compile as oc

x = torch.empty(4096, device="meta")
flags = torch.empty(4096, dtype=torch.bool, device="meta")
y = torch.empty(4096, dtype=torch.bfloat16, device="meta")
# n divisible by 16; stride 3; one == 1; step 32; a float
args = (x, flags, y, 4096, 3, 1, 32, 0.5)
meta = dict(BLOCK=128, num_warps=4, num_stages=2)
spec = oc.specialize(tiny, args, meta)

# What Triton's own launcher makes of the same call.
from triton.compiler import make_backend
from triton.backends.compiler import GPUTarget
backend = make_backend(GPUTarget("cuda", 90, 32))
version = oc.triton_version()
names = [p.name for p in tiny.params]
values = list(args) + [meta["BLOCK"]]
if version >= (3, 3):
    from triton.runtime.jit import create_function_from_signature
    binder = create_function_from_signature(tiny.signature, tiny.params, backend)
    _, specialization, _ = binder(*args, **meta)
    theirs = dict(
        types={n: t for n, (t, _) in zip(names, specialization) if t != "constexpr"},
        constants=sorted(n for n, (t, _) in zip(names, specialization) if t == "constexpr"),
        divisible=sorted(i for i, (_, key) in enumerate(specialization) if isinstance(key, str) and "D" in key))
else:
    from triton.runtime.jit import mangle_type
    if version >= (3, 2):
        desc = backend.get_attrs_descriptor(tiny.params, values)
        divisible, ones = desc.arg_properties["tt.divisibility"], desc.arg_properties["tt.equal_to"]
    else:
        desc = tiny._get_config(*values)
        divisible, ones = desc.divisible_by_16, desc.equal_to_1
    theirs = dict(
        types={n: mangle_type(v) for n, v, p in zip(names, values, tiny.params) if not p.is_constexpr},
        constants=sorted([n for n, p in zip(names, tiny.params) if p.is_constexpr] + [names[i] for i in ones]),
        # (their list also names constexprs that are multiples of 16: no arguments, no effect)
        divisible=sorted(i for i in divisible if not tiny.params[i].is_constexpr))
    # Up to 3.2 the folded integers keep their place in the signature.
    theirs["types"] = {n: t for n, t in theirs["types"].items() if n not in theirs["constants"]}
ours = dict(types={n: t for n, t in spec["types"].items() if n not in spec["constants"]},
            constants=sorted(spec["constants"]), divisible=sorted(spec["divisible"]))

rows = {}
for cap in (90, 80):
    ck = oc.compile_launch(tiny, args, meta, cap)
    rows[cap] = {k: v for k, v in ck.items() if k not in ("cubin", "ptx")}
    if cap == 90:
        first_cubin = ck["cubin"]
    ttir = triton.compile(oc.ast_source(tiny, spec), target=GPUTarget("cuda", cap, 32),
                          options=spec["options"]).asm["ttir"]
    rows[cap]["ttir_head"] = next(ln for ln in ttir.splitlines() if "tt.func" in ln)

# A cached cubin that ptxas would not write again from its PTX (as when the
# kernel's file was touched after the compile: ptxas puts the file's mtime in
# the line table) is compiled afresh, never reported, never an error.
import glob
planted = glob.glob(os.path.join(os.environ["TRITON_CACHE_DIR"], "*", "tiny.cubin"))
for path in planted:
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        data[len(data) // 2] ^= 0xFF
        f.seek(0)
        f.write(data)
again = oc.compile_launch(tiny, args, meta, 90)
mixed = dict(planted=len(planted), same_cubin=again["cubin"] == first_cubin,
             same_figures=all(again[k] == v for k, v in rows[90].items() if k != "ttir_head"))
print(json.dumps(dict(version=list(version), ours=ours, theirs=theirs, rows=rows, mixed=mixed)))
'''


def test_specialization_and_compile_under_this_triton(tmp_path):
    pytest.importorskip("triton.backends.nvidia.compiler")
    (tmp_path / "tiny_kernel.py").write_text(textwrap.dedent(_KERNEL))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "ptxas" in proc.stderr and ("not found" in proc.stderr.lower()
                                                           or "No such file" in proc.stderr):
        pytest.skip("no ptxas here")
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    version = tuple(doc["version"])
    # The same specialization as Triton's launcher, and the one expected:
    # x, flags, y (aligned), n and step (multiples of 16) divisible; one folded.
    assert doc["ours"] == doc["theirs"]
    ours = doc["ours"]
    assert ours["constants"] == ["BLOCK", "one"]
    assert ours["divisible"] == [0, 1, 2, 3, 6]
    assert ours["types"] == {"x_ptr": "*fp32", "flags_ptr": "*i1" if version < (3, 4) else "*u1",
                             "y_ptr": "*bf16", "n": "i32", "stride": "i32", "step": "i32", "scale": "fp32"}
    assert doc["mixed"] == dict(planted=2, same_cubin=True, same_figures=True)
    for cap, row in doc["rows"].items():
        # The kernel Triton compiled carries the divisibility of x, flags, y,
        # n and step, and has no argument `one` (folded).
        head = row["ttir_head"]
        assert len(re.findall(r"%\w+: ", head)) == 7, head
        assert head.count("tt.divisibility = 16") == 5, head
        assert row["name"] == "tiny" and row["num_warps"] == 4
        assert 8 <= row["regs"] <= 255 and row["spill_bytes"] == 0
        # Triton's choice of ptxas: from 3.9 ptxas-blackwell (CUDA 13) for sm_90 and later.
        expect = "ptxas-blackwell" if (version >= (3, 9) and cap == "90") else "ptxas"
        assert row["ptxas"].split()[0] == expect, row["ptxas"]


# ---- every launch the launcher plans, compiled for sm_90 and sm_80 ----------------------

_COMPILE_SCRIPT = r"""
import torch
from bench.kernel_report import compile_launch
from pgs_kernels import triton_pgs as tp

# (B, C, H, W, P, D, k, alpha, images dtype, tokens dtype, use_ot)
CONFIGS = [
    (256, 3, 224, 224, 16, 768, 10, 0.5, torch.float32, torch.bfloat16, True),   # the ViT-B/16 target
    (256, 3, 224, 224, 14, 768, 13, 0.0, torch.float32, None, True),
    (8, 1, 56, 84, 14, 64, 3, 0.0, torch.bfloat16, torch.float32, False),
    (8, 4, 1024, 1024, 32, 2048, 1024, 1.0, torch.float16, torch.float32, True),  # S streamed from scratch
    (8, 3, 64, 64, 16, 8, 0, 0.3, torch.float32, torch.float16, True),
]
for B, C, H, W, P, D, k, alpha, idt, tdt, use_ot in CONFIGS:
    L = (H // P) * (W // P)
    images = torch.empty(B, C, H, W, dtype=idt, device="meta")
    tokens = torch.empty(B, L, D, dtype=tdt, device="meta") if tdt is not None else None
    noise = torch.empty(B, L, device="meta")
    _, launches = tp._launch_plan(images, tokens, noise, P, L // 2, k, 0.5, alpha, 1.0, use_ot, 0.05, 20,
                                  compiled=True)
    for arch in ("sm_90", "sm_80"):
        for kernel, grid, args, meta in launches:
            ck = compile_launch(kernel, args, meta, arch)
            print("compiled", arch, B, C, H, W, P, D, k, alpha, "regs", ck["regs"], "spills", ck["spill_bytes"],
                  flush=True)
"""


@pytest.mark.slow
def test_compiles_for_sm90_and_sm80():
    """The interpreter runs numpy, not the compiler: check that the real Triton
    compiler (down to cubins for an H100 and an A100) accepts every launch of
    the shapes we support, on this machine too, and that the ViT sizes fit
    their registers without spilling."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("no ptxas here")
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("compiled")]
    assert len(lines) == 2 * (2 + 1 + 1 + 1 + 1)  # two archs; the ViT-B/16 call takes two launches
    for ln in lines:
        if " 224 224 " in ln:
            assert ln.endswith("spills 0"), ln
