"""Which implementation runs a ``pgs_select`` call: the backend names and the
one resolver that maps a name and a device to what runs.

=============  ====================================  ==========================================
name           runs on                               what runs
=============  ====================================  ==========================================
``auto``       any device                            the operator, which picks the device's kernel
``native``     CPU tensors, where ``_C`` is built    the operator (its CPU kernel is the native one)
``triton``     CUDA tensors, where Triton imports    the operator (its CUDA kernel is Triton's)
``triton``     CPU tensors under                     the Triton kernel, called directly
               ``TRITON_INTERPRET=1``
``reference``  any device but meta                   ``python_ref``, called directly
=============  ====================================  ==========================================

The operator ``pgs_kernels::pgs_select`` (``op.py``) is the only per-device
dispatch, and the only fallback: a device without a kernel of its own runs
the reference there. ``native`` and ``triton`` are therefore a request that
the operator runs that kernel here, and a ``ValueError`` says why when it
would not. Two paths do not go through the operator, on purpose: the
``reference`` backend (the oracle: it must run the reference wherever a
kernel exists) and the Triton interpreter on CPU tensors (for the tests; the
operator's CPU kernel is the native one).
"""

from __future__ import annotations

import os
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch

from . import op as _op
from .contract import PGSCall, fixed_weight

__all__ = ["Backend", "NAMES", "resolve_backend", "available_backends", "check_backend_name"]

#: The backend names ``pgs_select`` takes.
NAMES = ("auto", "native", "triton", "reference")


class Backend(NamedTuple):
    """What runs a call: ``name`` (the kernel's) and ``run(call) ->
    (keep_idx, mask, edge, candidates, redundancy)``."""

    name: str
    run: Callable[[PGSCall], tuple]


def _run_operator(call: PGSCall):
    if isinstance(call.token_weight, torch.Tensor):  # a schedule's weight: read by the kernel, not traced
        return _op.pgs_select_scheduled_op(*call)
    return _op.pgs_select_op(*call)


def _run_interpreter(call: PGSCall):
    return _op.pgs_select_triton(*fixed_weight(call))


def _run_reference(call: PGSCall):
    return _op.run_reference(*fixed_weight(call))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _status(name: str, device_type: str) -> Tuple[Optional[Backend], str]:
    """``(backend, "")`` if ``name`` can run on ``device_type``, else ``(None, why not)``."""
    if name == "auto":
        return Backend(_op.kernel_name(device_type), _run_operator), ""
    if name == "reference":
        if device_type == "meta":
            return None, "meta tensors hold no values"
        return Backend("reference", _run_reference), ""
    if name == "native":
        if device_type != "cpu":
            return None, "needs CPU tensors"
        if not _op.NATIVE_AVAILABLE:
            return None, f"the C++ extension is not built ({_op.NATIVE_ERROR})"
        return Backend("native", _run_operator), ""
    # triton
    if not _op.TRITON_AVAILABLE:
        return None, f"Triton does not import ({_op.TRITON_ERROR})"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return None, "CUDA is not available"
        return Backend("triton", _run_operator), ""
    if device_type == "cpu" and _interpreting():
        return Backend("triton", _run_interpreter), ""
    return None, "needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)"


def check_backend_name(backend) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {backend!r}")
    return backend


def available_backends(device: Optional[torch.device | str] = None) -> List[str]:
    """The kernels usable for tensors on ``device`` (default: on any device
    of this machine), by name: ``native``, ``triton``, ``reference``."""
    types = [torch.device(device).type] if device is not None else ["cpu", "cuda"]
    return [n for n in NAMES[1:] if any(_status(n, t)[0] is not None for t in types)]


def resolve_backend(backend: str, device) -> Backend:
    """The :class:`Backend` that runs ``backend`` (a name or ``"auto"``) for
    tensors on ``device``; a ``ValueError`` naming ``backend`` says why when it
    cannot run there."""
    check_backend_name(backend)
    device_type = torch.device(device).type
    found, why = _status(backend, device_type)
    if found is None:
        raise ValueError(f"backend={backend!r} is not available for {device_type} tensors: {why}")
    return found
