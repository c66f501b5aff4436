"""One launch of a Triton kernel compiled ahead of time for a CUDA
architecture, without a GPU, under any Triton release from 3.0 to 3.9.

The compile goes through Triton's public entry,
``triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget("cuda", capability, 32), options=...)``. The specialization
a CUDA launch would add is computed here the way the launcher computes it:

* each argument's type from ``triton.runtime.jit.mangle_type`` (``*fp32``,
  ``*bf16``, ``i32``, ``fp32``; a bool tensor is ``*i1`` up to 3.3, ``*u1``
  from 3.4);
* ``tt.divisibility = 16`` for pointers aligned to 16 bytes and integers
  divisible by 16;
* integers equal to 1 folded into constants (every release up to 3.9 does);
* the launch's constexprs; ``num_warps``, ``num_stages``, ``maxnreg`` as
  options.

How ``ASTSource`` wants that spelled is what changes between releases
(:func:`ast_source`):

* 3.0, 3.1: ``signature`` ``{name: type}`` of the non-constexpr parameters,
  ``constants`` ``{name: value}`` (constexprs and the integers equal to 1),
  ``attrs`` ``AttrsDescriptor(divisible_by_16, equal_to_1)`` of parameter
  indices;
* 3.2: the same signature and constants, ``attrs`` the backend's
  ``AttrsDescriptor`` with ``tt.divisibility`` and ``tt.equal_to`` index lists;
* 3.3 and later: ``signature`` ``{name: type or "constexpr"}`` of every
  parameter, ``constexprs`` ``{(index,): value}``, ``attrs``
  ``{(index,): [["tt.divisibility", 16]]}``.

Registers and spills come from ``ptxas -v`` run again on Triton's PTX with the
ptxas Triton chose and the options it passed (:func:`ptxas_command`: the
bundled ``ptxas`` up to 3.8 and for sm_80 under 3.9, ``ptxas-blackwell``
(CUDA 13) for sm_90 under 3.9; ``--regAllocOptLevel=2`` from 3.7), and the
cubin it writes must be Triton's byte for byte, so the figures are those of
the kernel Triton compiled.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import tempfile
from typing import Dict, List, Tuple


def triton_version() -> Tuple[int, int]:
    """(major, minor) of the Triton that is imported."""
    import triton

    major, minor = re.match(r"(\d+)\.(\d+)", triton.__version__).groups()
    return int(major), int(minor)


def specialize(kernel, args, meta) -> dict:
    """What a CUDA launch of ``kernel(*args, **meta)`` specializes on:
    ``types`` (name -> type of each non-constexpr argument),
    ``constants`` (name -> value: the constexprs, the integers equal to 1 and
    the ``None`` arguments),
    ``divisible`` (indices of the arguments divisible by 16), ``ones``
    (indices of the integers equal to 1) and ``options`` (the rest of
    ``meta``: ``num_warps``, ``num_stages``, ``maxnreg``)."""
    from triton.runtime.jit import mangle_type

    names = [p.name for p in kernel.params]
    values = dict(zip(names, args))
    for name in names[len(args):]:
        if name not in meta:
            raise TypeError(f"{kernel.__name__}: no value for {name}")
        values[name] = meta[name]
    types, constants, divisible, ones = {}, {}, set(), set()
    for p in kernel.params:
        v = values[p.name]
        if p.is_constexpr:
            constants[p.name] = v
            continue
        if v is None:  # a null pointer: a constant, named *i8 in the signature up to 3.2
            types[p.name], constants[p.name] = "*i8", None
            continue
        types[p.name] = mangle_type(v)
        if p.do_not_specialize:
            continue
        is_int = isinstance(v, int) and not isinstance(v, bool)
        if is_int and v == 1:
            ones.add(p.num)
            constants[p.name] = v
        if getattr(p, "do_not_specialize_on_alignment", False):  # the flag exists from 3.2
            continue
        if (hasattr(v, "data_ptr") and v.data_ptr() % 16 == 0) or (is_int and v % 16 == 0):
            divisible.add(p.num)
    options = {key: v for key, v in meta.items() if key not in values}
    return dict(types=types, constants=constants, divisible=divisible, ones=ones, options=options)


def ast_source(kernel, spec: dict):
    """``ASTSource`` of ``kernel`` with the specialization ``spec`` (from
    :func:`specialize`), spelled for the imported Triton."""
    from triton.compiler import ASTSource

    version = triton_version()
    names = [p.name for p in kernel.params]
    if version < (3, 3):
        # Parameters folded into constants keep their place in the signature.
        signature = {n: spec["types"][n] for n in names if n in spec["types"]}
        if version < (3, 2):
            from triton.compiler import AttrsDescriptor

            attrs = AttrsDescriptor(divisible_by_16=set(spec["divisible"]), equal_to_1=set(spec["ones"]))
        else:
            from triton.backends.compiler import AttrsDescriptor

            attrs = AttrsDescriptor.from_dict({"cls": "AttrsDescriptor", "arg_properties": {
                "tt.divisibility": sorted(spec["divisible"]), "tt.equal_to": sorted(spec["ones"])}})
        return ASTSource(kernel, signature, dict(spec["constants"]), attrs)
    signature = {n: ("constexpr" if n in spec["constants"] else spec["types"][n]) for n in names}
    constexprs = {(names.index(n),): v for n, v in spec["constants"].items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i in sorted(spec["divisible"])}
    return ASTSource(kernel, signature, constexprs, attrs)


def ptxas_path(capability: int) -> str:
    """The ptxas Triton runs for ``capability`` (``TRITON_PTXAS_PATH`` and,
    from 3.6, ``TRITON_PTXAS_BLACKWELL_PATH`` respected as Triton does)."""
    from triton.backends.nvidia import compiler as nv

    version = triton_version()
    if version < (3, 3):
        return nv._path_to_binary("ptxas")[0]
    if version < (3, 4):
        return nv.get_ptxas(capability)[0]
    if version < (3, 6):
        return nv.get_ptxas().path
    return nv.get_ptxas(capability).path


@functools.lru_cache(maxsize=None)
def tool_release(path: str) -> str:
    """``name release`` of a CUDA tool, e.g. ``ptxas-blackwell 13.4``."""
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return os.path.basename(path) + (" " + m.group(1) if m else "")


def tool_path(tool: str) -> str:
    """Triton's own copy of a CUDA tool (``nvdisasm``, ``cuobjdump``)."""
    version = triton_version()
    if version < (3, 4):
        from triton.backends.nvidia import compiler as nv

        return nv._path_to_binary(tool)[0]
    from triton import knobs

    return getattr(knobs.nvidia, tool).path


def ptxas_command(capability: int, options) -> List[str]:
    """ptxas and the options Triton's ``make_cubin`` passes it (default
    knobs: line info, fused multiply-add on), without the file names."""
    cmd = [ptxas_path(capability), "-lineinfo", "-v"]
    if not getattr(options, "enable_fp_fusion", True):
        cmd.append("--fmad=false")
    if triton_version() >= (3, 7):
        cmd.append("--regAllocOptLevel=2")  # Triton's workaround for a ptxas 13 bug, on every arch
    if getattr(options, "ptx_options", None):
        cmd += options.ptx_options.split(" ")
    cmd.append(f"--gpu-name=sm_{capability}" + ("a" if capability == 90 else ""))
    return cmd


def parse_ptxas_log(log: str) -> Dict[str, int]:
    """Registers, spill bytes (stores + loads) and static shared memory from a
    ``ptxas -v`` log."""
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    st = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    smem = re.search(r"(\d+) bytes smem", log)
    return dict(regs=regs, spill_bytes=int(st.group(1)) + int(st.group(2)),
                static_shared=int(smem.group(1)) if smem else 0)


def ptxas_usage(ptx: str, cubin: bytes, capability: int, options) -> dict:
    """``ptxas -v`` figures of Triton's compile: ptxas run again on its PTX
    with its command; raises when the cubin differs from Triton's."""
    cmd = ptxas_command(capability, options)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(cmd + [src, "-o", out], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        with open(out, "rb") as f:
            same = f.read() == cubin
    if not same:
        raise CubinMismatch(f"{' '.join(cmd)} does not reproduce Triton's cubin: not the command Triton ran")
    return dict(parse_ptxas_log(proc.stderr + proc.stdout), ptxas=tool_release(cmd[0]))


class CubinMismatch(RuntimeError):
    """ptxas run again on Triton's PTX wrote another cubin than Triton's."""


@contextlib.contextmanager
def always_compile():
    """Triton compiles afresh and rewrites its cache entry for the duration
    (``TRITON_ALWAYS_COMPILE``, read at each compile from 3.0 to 3.9)."""
    saved = os.environ.get("TRITON_ALWAYS_COMPILE")
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TRITON_ALWAYS_COMPILE"]
        else:
            os.environ["TRITON_ALWAYS_COMPILE"] = saved


def compile_launch(kernel, args, meta, capability: int) -> dict:
    """Compile ``kernel(*args, **meta)`` for ``sm_<capability>``: the cubin,
    the PTX, Triton's metadata (``num_warps``, ``shared``, ``name``) and the
    ptxas figures (``regs``, ``spill_bytes``, ``static_shared``, ``ptxas``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", capability, 32)
    spec = specialize(kernel, args, meta)
    options = make_backend(target).parse_options(spec["options"])

    def compile_and_check():
        ck = triton.compile(ast_source(kernel, spec), target=target, options=spec["options"])
        cubin, ptx = ck.asm["cubin"], ck.asm["ptx"]
        return dict(cubin=cubin, ptx=ptx, num_warps=ck.metadata.num_warps, shared=ck.metadata.shared,
                    name=ck.metadata.name, **ptxas_usage(ptx, cubin, capability, options))

    try:
        return compile_and_check()
    except CubinMismatch:
        # ptxas writes each source file's modification time and size (read
        # when it runs) into the cubin's line table, while Triton's cache key
        # hashes the source text only: a cubin cached before the kernel's file
        # was last touched (an edit outside the kernel, a fresh checkout)
        # differs from ptxas run now in those bytes alone. Compile afresh,
        # which also refreshes the cache entry, before calling it a difference
        # in the command.
        with always_compile():
            return compile_and_check()
