"""The ``pgs_kernels::pgs_select`` operator: one schema, and the one place
where a device picks its kernel.

=========  ==========================================================  ==================
device     kernel                                                      name
=========  ==========================================================  ==================
CPU        the native C++ kernel (``csrc/``, extension ``_C``)           ``native``
CUDA       the fused Triton kernel (``triton_pgs.py``)                 ``triton``
any other  the reference in fp32 (``python_ref``): also CPU without    ``reference``
           ``_C`` and CUDA without Triton (one warning says so on CPU)
Meta/fake  :func:`_fake`, so ``torch.compile`` traces without running
=========  ==========================================================  ==================

The reference is registered once, as the ``CompositeExplicitAutograd``
kernel: the dispatcher takes it for every device that has no kernel of its
own, which is the whole fallback. :data:`KERNELS` says which runs where.

The operator takes host-side counts (``num_keep = K``, ``num_candidates =
k``) rather than ratios: output shapes are then plain functions of the
arguments and nothing on the path reads device memory, which is what a CUDA
graph capture needs. ``pgs_select`` checks every argument before it calls
the operator; the operator's kernels and its fake implementation check only
what keeps them safe on a direct call (:func:`pgs_kernels.contract.check_op_args`:
shapes, dtypes, devices, counts), with the same messages. The C++ kernel is
registered under a private name (``_pgs_select_native``) and reached through
:func:`native_kernel`, so that no message is written twice.
"""

from __future__ import annotations

import importlib
import json
import os
import warnings
from typing import Dict

import torch

from .contract import PGSCall, check_op_args, check_params, fixed_weight

_ARGS = ("Tensor images, Tensor? tokens, Tensor noise, int patch_size, int num_keep, int num_candidates, "
         "float sim_threshold, float token_weight, float edge_weight, bool use_ot, float ot_reg, int ot_iters")
_RETURNS = "(Tensor, Tensor, Tensor, Tensor, Tensor)"
#: The operator's one schema.
SCHEMA = f"pgs_select({_ARGS}) -> {_RETURNS}"
OP_NAME = "pgs_kernels::pgs_select"

#: The same operator with ``token_weight`` as a 0-dim CPU tensor, which its
#: kernel reads at run time. ``torch.compile`` specializes a schema float, so
#: a weight on a schedule (``PGSPatchDropout.set_epoch``) would recompile the
#: model at every change, and fail once past dynamo's recompile limit under
#: ``fullgraph=True``; a tensor's value is no part of a compiled graph's guards.
#: A CUDA graph would freeze the value read at capture: the tag makes inductor
#: keep this call out of its graphs.
SCHEDULED_SCHEMA = f"pgs_select_scheduled({_ARGS.replace('float token_weight', 'Tensor token_weight')}) -> {_RETURNS}"
SCHEDULED_OP_NAME = "pgs_kernels::pgs_select_scheduled"

# Defined before the extension loads: its TORCH_LIBRARY_IMPL attaches to the
# private name (the native kernel without the Python checks in front of it).
_lib = torch.library.Library("pgs_kernels", "DEF")
_lib.define(SCHEMA)
_lib.define(f"_pgs_select_native({_ARGS}) -> {_RETURNS}")
_lib.define(SCHEDULED_SCHEMA, tags=(torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ())

try:
    _C = importlib.import_module("pgs_kernels._C")

    NATIVE_AVAILABLE = True
    NATIVE_ERROR = None
except ImportError as exc:  # installed without it (setup.py records why), or built for another torch
    _C = None
    NATIVE_AVAILABLE = False
    NATIVE_ERROR = exc

try:
    from .triton_pgs import pgs_select_triton

    TRITON_AVAILABLE = True
    TRITON_ERROR = None
except ImportError as exc:
    pgs_select_triton = None
    TRITON_AVAILABLE = False
    TRITON_ERROR = exc


def run_reference(*args):
    """The reference in fp32 on checked arguments (the ``reference`` backend
    calls it directly: ``pgs_select`` has checked them)."""
    from python_ref.pgs import pgs_select_core  # loaded only when the reference runs

    return pgs_select_core(*args, torch.float32)


def reference_kernel(*args):
    """The reference, after the operator's checks."""
    check_op_args(*args)
    return run_reference(*args)


def native_kernel(*args):
    """The native C++ kernel, after the operator's checks."""
    check_op_args(*args)
    return torch.ops.pgs_kernels._pgs_select_native(*args)


def triton_kernel(*args):
    """The fused Triton kernel, after the operator's checks (on CUDA through
    the operator; on CPU tensors under ``TRITON_INTERPRET=1`` called directly)."""
    check_op_args(*args)
    return pgs_select_triton(*args)


def native_missing_message(error: ImportError) -> str:
    """Why the CPU kernel is the reference here: the ImportError, and what
    setup.py recorded of the build in ``_build_info.json``."""
    try:
        with open(os.path.join(os.path.dirname(__file__), "_build_info.json")) as f:
            info = json.load(f)
    except (OSError, ValueError):
        info = {}
    error = f"{type(error).__name__}: {error}"
    if info.get("native") == "skipped":
        why = f"is not built: the package was installed without it ({info.get('reason')}) [{error}]"
    elif info.get("native") == "built":
        why = (f"was built, against torch {info.get('torch')}, but does not load under torch {torch.__version__} "
               f"({error})")
    else:
        why = f"does not import ({error}), and no build of it is recorded here"
    return (
        f"pgs_kernels: the native CPU kernel {why}. CPU tensors use the pure-PyTorch reference. To build it, "
        "with a C++ compiler present and PGS_NO_NATIVE unset, reinstall from source: pip install "
        "--no-build-isolation --no-deps --force-reinstall <sdist or checkout> (in a checkout: "
        "python setup.py build_ext --inplace)."
    )


if not NATIVE_AVAILABLE:
    warnings.warn(native_missing_message(NATIVE_ERROR), RuntimeWarning, stacklevel=2)

#: Which kernel the operator runs per device type (every other device: ``reference``).
KERNELS: Dict[str, str] = {
    "cpu": "native" if NATIVE_AVAILABLE else "reference",
    "cuda": "triton" if TRITON_AVAILABLE else "reference",
}
_lib.impl("pgs_select", reference_kernel, "CompositeExplicitAutograd")
if NATIVE_AVAILABLE:
    torch.library.register_kernel(OP_NAME, "cpu", native_kernel)
if TRITON_AVAILABLE:
    torch.library.register_kernel(OP_NAME, "cuda", triton_kernel)


def kernel_name(device_type: str) -> str:
    """The name of the kernel the operator runs for tensors on ``device_type``."""
    return KERNELS.get(device_type, "reference")


@torch.library.register_fake(OP_NAME)
def _fake(images, tokens, noise, patch_size, num_keep, num_candidates, sim_threshold,
          token_weight, edge_weight, use_ot, ot_reg, ot_iters):
    # A call with tensors on mixed devices lands here (the Meta key wins), so
    # the checks are what stand between it and uninitialised outputs.
    check_op_args(images, tokens, noise, patch_size, num_keep, num_candidates, sim_threshold,
                  token_weight, edge_weight, use_ot, ot_reg, ot_iters)
    B, _, H, W = images.shape
    L = (H // patch_size) * (W // patch_size)
    i64, f32 = torch.int64, torch.float32
    return (
        images.new_empty((B, num_keep), dtype=i64),
        images.new_empty((B, L), dtype=torch.bool),
        images.new_empty((B, L), dtype=f32),
        images.new_empty((B, num_candidates), dtype=i64),
        images.new_empty((B, L), dtype=f32),
    )


def scheduled_kernel(*args):
    """``pgs_select_scheduled`` on any device: the weight read (a CPU read, no
    device sync) and checked, then the operator, whose dispatch picks the kernel."""
    return pgs_select_op(*fixed_weight(PGSCall(*args)))


_lib.impl("pgs_select_scheduled", scheduled_kernel, "CompositeExplicitAutograd")


@torch.library.register_fake(SCHEDULED_OP_NAME)
def _fake_scheduled(images, tokens, noise, patch_size, num_keep, num_candidates, sim_threshold,
                    token_weight, edge_weight, use_ot, ot_reg, ot_iters):
    # The weight's value is unknown here: its form is checked as pgs_select
    # checks it, and 0 lets the checks pass the tokens, which a weight > 0 reads.
    if not isinstance(token_weight, torch.Tensor):
        raise ValueError("token_weight of pgs_select_scheduled must be a 0-dim CPU tensor")
    check_params(token_weight=token_weight)
    return _fake(images, tokens, noise, patch_size, num_keep, num_candidates, sim_threshold,
                 0.0, edge_weight, use_ot, ot_reg, ot_iters)


pgs_select_op = torch.ops.pgs_kernels.pgs_select
pgs_select_scheduled_op = torch.ops.pgs_kernels.pgs_select_scheduled
