"""The backends of ``pgs_select``, in one table, and the one resolver that
maps a backend name and a device to the implementation that runs.

=============  ====================  =============================================
name           runs on               implementation
=============  ====================  =============================================
``native``     CPU tensors           the C++ kernel (``pgs_kernels._C``), through
                                     the ``pgs_kernels::pgs_select`` operator
``triton``     CUDA tensors; CPU     the fused Triton kernel, through the operator
               tensors under         on CUDA; called directly under the
               ``TRITON_INTERPRET=1`` interpreter
``reference``  any device            ``python_ref.pgs_select_core`` in fp32
=============  ====================  =============================================

``"auto"`` takes the first available of ``AUTO_ORDER`` for the device type.
Everything that chooses a backend (``pgs_select``, the training layer, the
benchmarks) goes through :func:`resolve_backend`.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from . import op as _op
from .contract import PGSCall

__all__ = ["Backend", "BACKENDS", "AUTO_ORDER", "resolve_backend", "available_backends", "check_backend_name"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _run_op(call: PGSCall):
    # The dispatcher holds the kernel registered for the tensors' device:
    # native on CPU, Triton on CUDA (pgs_kernels/op.py).
    return _op.pgs_select_op(*call)


def _run_triton(call: PGSCall):
    if call.images.is_cuda:
        return _op.pgs_select_op(*call)
    return _op.triton_kernel(*call)  # the interpreter, on CPU tensors


def _run_reference(call: PGSCall):
    from python_ref.pgs import pgs_select_core  # loaded only when this backend is used

    return pgs_select_core(*call, torch.float32)


def _native_status(device_type: str) -> Tuple[bool, str]:
    if device_type != "cpu":
        return False, "needs CPU tensors"
    if not _op.NATIVE_AVAILABLE:
        return False, f"the C++ extension is not built ({_op.NATIVE_ERROR})"
    return True, ""


def _triton_status(device_type: str) -> Tuple[bool, str]:
    if not _op.TRITON_AVAILABLE:
        return False, f"Triton does not import ({_op.TRITON_ERROR})"
    if device_type == "cuda":
        return (True, "") if torch.cuda.is_available() else (False, "CUDA is not available")
    if device_type == "cpu":
        return (True, "") if _interpreting() else (False, "needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    return False, "needs CUDA tensors"


def _reference_status(device_type: str) -> Tuple[bool, str]:
    return (False, "meta tensors hold no values") if device_type == "meta" else (True, "")


class Backend(NamedTuple):
    """One implementation of the op: ``status(device_type) -> (usable, why
    not)`` and ``run(call) -> (keep_idx, mask, edge, candidates, redundancy)``."""

    name: str
    status: Callable[[str], Tuple[bool, str]]
    run: Callable[[PGSCall], tuple]


BACKENDS: Dict[str, Backend] = {
    "native": Backend("native", _native_status, _run_op),
    "triton": Backend("triton", _triton_status, _run_triton),
    "reference": Backend("reference", _reference_status, _run_reference),
}
#: What ``"auto"`` tries, in order, per device type; other devices get the reference.
AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("native", "reference")}
NAMES = ("auto",) + tuple(BACKENDS)


def check_backend_name(backend) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {backend!r}")
    return backend


def _device_type(device) -> str:
    return torch.device(device).type


def available_backends(device: Optional[torch.device | str] = None) -> List[str]:
    """Names of the backends usable for tensors on ``device`` (default: on
    any device of this machine), in the order of the table."""
    types = [_device_type(device)] if device is not None else ["cpu", "cuda"]
    return [name for name, b in BACKENDS.items() if any(b.status(t)[0] for t in types)]


def resolve_backend(backend: str, device) -> Backend:
    """The :class:`Backend` that runs ``backend`` (a name or ``"auto"``) for
    tensors on ``device``; a ``ValueError`` naming ``backend`` says why when it
    cannot run there."""
    check_backend_name(backend)
    dtype = _device_type(device)
    if backend == "auto":
        for name in AUTO_ORDER.get(dtype, ("reference",)):
            if BACKENDS[name].status(dtype)[0]:
                return BACKENDS[name]
        backend = "reference"
    ok, why = BACKENDS[backend].status(dtype)
    if not ok:
        raise ValueError(f"backend={backend!r} is not available for {dtype} tensors: {why}")
    return BACKENDS[backend]
