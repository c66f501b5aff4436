"""The ``pgs_kernels::pgs_select`` operator: one schema, a kernel per device.

* CPU: the native C++ kernel from ``csrc/`` (extension ``pgs_kernels._C``),
  which registers itself for the schema defined here; where the extension
  was not built, the CPU kernel is the reference in fp32 (one warning says so).
* CUDA: the fused Triton kernel (``pgs_kernels.triton_pgs``), where Triton
  imports.
* Meta / fake: :func:`_fake`, shared by both, so ``torch.compile`` traces the
  op without running it.

The operator takes host-side counts (``num_keep = K``, ``num_candidates =
k``) rather than ratios: output shapes are then plain functions of the
arguments and nothing on the path reads device memory, which is what a CUDA
graph capture needs. Every kernel checks its arguments
(:func:`pgs_kernels.contract.check_op_args`, or the same checks in C++), so
the raw operator rejects what ``pgs_select`` rejects, wherever that needs no
host sync.
"""

from __future__ import annotations

import importlib
import json
import os
import warnings

import torch

from .contract import check_op_args

#: The operator's one schema; the C++ extension only registers a kernel for it.
SCHEMA = (
    "pgs_select(Tensor images, Tensor? tokens, Tensor noise, int patch_size, int num_keep, "
    "int num_candidates, float sim_threshold, float token_weight, float edge_weight, "
    "bool use_ot, float ot_reg, int ot_iters) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
OP_NAME = "pgs_kernels::pgs_select"

# Defined before the extension loads: its TORCH_LIBRARY_IMPL attaches to this.
_lib = torch.library.Library("pgs_kernels", "DEF")
_lib.define(SCHEMA)

try:  # the native build registers the CPU kernel
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


def reference_kernel(*args):
    """The operator's CPU kernel where the native one is not built: the
    reference in fp32, with scores in fp32 as the kernels give them."""
    from python_ref.pgs import pgs_select_core  # loaded only when this kernel runs

    check_op_args(*args)
    keep_idx, mask, edge, cand, r = pgs_select_core(*args, torch.float32)
    return keep_idx, mask, edge.float(), cand, r.float()


def triton_kernel(*args):
    """The operator's CUDA kernel (and, called directly, the interpreter's)."""
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
    _lib.impl("pgs_select", reference_kernel, "CPU")

if TRITON_AVAILABLE:
    torch.library.register_kernel(OP_NAME, "cuda", triton_kernel)


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


pgs_select_op = torch.ops.pgs_kernels.pgs_select
