r"""What every implementation of PGS selection shares: the result type, the
counts, the argument checks and the noise draw (docs/algorithm.md, sections
"Inputs", "Counts" and "Errors").

Every backend (the reference, the native and the Triton kernel) and every
baseline takes ``K``, ``M`` and ``k`` from :func:`pgs_counts` and rejects bad
input with the messages written here, which is what makes "the same answer"
meaningful. Two layers of checks:

* :func:`check_call` / :func:`prepare_call`: the public entry points
  (``pgs_select``, the reference, the baselines), which take ratios;
* :func:`check_op_args`: what the raw operator ``pgs_kernels::pgs_select``
  (host-side counts ``num_keep = K``, ``num_candidates = k`` in place of the
  ratios) needs to stay safe on a direct call; its kernels and its fake
  implementation run it. The C++ kernel is called only after it.

Nothing here reads device memory (``validate=True`` aside), so the checks
cost no host sync and survive ``torch.compile`` and CUDA graph capture.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = [
    "PGSSelection",
    "PGSCall",
    "pgs_counts",
    "check_params",
    "check_call",
    "prepare_call",
    "draw_noise",
    "check_op_args",
    "fixed_weight",
    "IMAGE_DTYPES",
    "MIN_OT_REG",
    "FP32_MAX",
]

#: Input dtypes the op accepts for ``images``; the reference also takes float64.
IMAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Below this ``ot_reg`` an fp32 Sinkhorn no longer holds the plan to the
#: contract's accuracy (``S / ε`` spans ``2 / ε``), so it is rejected.
MIN_OT_REG = 1e-4
#: Weights are applied in fp32: a larger one has no fp32 value.
FP32_MAX = float(torch.finfo(torch.float32).max)


class PGSSelection(NamedTuple):
    """Result of a PGS selection over a batch of ``B`` images of ``L`` patches.

    keep_idx:   ``(B, K)`` int64, the kept patches, ascending in each row.
    mask:       ``(B, L)`` bool, ``True`` where the patch is dropped
                (exactly ``M = L - K`` per row; the complement of ``keep_idx``).
    edge:       ``(B, L)`` normalized edge energy ``ê`` (``return_scores`` only).
    candidates: ``(B, k)`` int64, the generated candidates in rank order
                (``return_scores`` only).
    redundancy: ``(B, L)`` redundancy ``r`` (``return_scores`` only).
    """

    keep_idx: Tensor
    mask: Tensor
    edge: Optional[Tensor] = None
    candidates: Optional[Tensor] = None
    redundancy: Optional[Tensor] = None


class PGSCall(NamedTuple):
    """A checked call: the operator's arguments, in the operator's order, so
    that ``torch.ops.pgs_kernels.pgs_select(*call)`` runs it."""

    images: Tensor
    tokens: Optional[Tensor]
    noise: Optional[Tensor]
    patch_size: int
    num_keep: int
    num_candidates: int
    sim_threshold: float
    token_weight: float  # or a 0-dim CPU tensor holding it: see fixed_weight
    edge_weight: float
    use_ot: bool
    ot_reg: float
    ot_iters: int


def pgs_counts(num_patches: int, mask_ratio: float, candidate_ratio: float):
    """Return ``(K, M, k)`` for ``L = num_patches`` patches.

    ``K = max(1, int(L (1 - mask_ratio)))`` patches are kept,
    ``M = L - K`` dropped, and ``k = L - int(L (1 - candidate_ratio))``
    candidates generated. Plain Python floats, so every backend agrees and no
    device value is ever read on the host.
    """
    L = int(num_patches)
    K = max(1, int(L * (1.0 - float(mask_ratio))))
    k = L - int(L * (1.0 - float(candidate_ratio)))
    return K, L - K, k


# --------------------------------------------------------------------------- scalars


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _real(name: str, value, lo=None, hi=None, lo_open=False, hi_open=False) -> float:
    """``value`` as a float in the interval; an infinite bound is always open
    (infinity itself is rejected wherever a bound is infinite)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    # v != v rather than math.isnan: under torch.compile a float option that
    # changed since the last compile (token_weight on a schedule) arrives as a
    # SymFloat, which math.isnan cannot take; comparisons become guards.
    if v != v:
        raise ValueError(f"{name} must not be NaN")
    lo_bad = lo is not None and (v <= lo if lo_open else v < lo)
    hi_bad = hi is not None and (v >= hi if hi_open else v > hi)
    if lo_bad or hi_bad:
        left = "(" if (lo_open or lo is None) else "["
        right = ")" if (hi_open or hi is None) else "]"
        rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ValueError(f"{name} must be in {rng}, got {value}")
    return v


def _finite(name: str, value, lo=None, hi=None, lo_open=False) -> float:
    v = _real(name, value, lo, hi, lo_open=lo_open)
    if not math.isfinite(v):
        left = "(" if (lo_open or lo is None) else "["
        rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}"
        raise ValueError(f"{name} must be in {rng}{']' if hi is not None else ')'}, got {value}")
    return v


def _int(name: str, value, lo: int) -> int:
    # A SymInt (a size traced by torch.compile) stays symbolic.
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return value if isinstance(value, torch.SymInt) else int(value)


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _token_weight(value):
    """``token_weight`` as a float in ``[0, 1]``, or a 0-dim floating CPU tensor
    holding it (a schedule's weight), returned as is: its value is read and
    checked where the kernel runs (:func:`fixed_weight`), never while
    ``torch.compile`` traces."""
    if not isinstance(value, Tensor):
        return _real("token_weight", value, 0.0, 1.0)
    if value.dim() != 0 or not value.is_floating_point() or value.device.type != "cpu":
        raise ValueError("token_weight given as a tensor must be a 0-dim floating-point CPU tensor, got "
                         f"shape {tuple(value.shape)}, {_dtype_name(value.dtype)} on {value.device}")
    return value


def fixed_weight(call: "PGSCall") -> "PGSCall":
    """``call`` with a tensor ``token_weight`` read into a checked float, and
    its tokens dropped where that weight is 0 (the term is not evaluated).
    A read of a CPU tensor: no device sync."""
    if not isinstance(call.token_weight, Tensor):
        return call
    alpha = _real("token_weight", float(call.token_weight), 0.0, 1.0)
    return call._replace(token_weight=alpha, tokens=call.tokens if alpha > 0 else None)


def check_params(
    *,
    patch_size=16,
    mask_ratio=0.5,
    candidate_ratio=0.05,
    sim_threshold=0.5,
    token_weight=0.0,
    edge_weight=1.0,
    use_ot=True,
    ot_reg=0.05,
    ot_iters=20,
    validate=False,
) -> dict:
    """Check the scalar arguments of ``pgs_select`` (no tensors needed: the
    training layer runs this in its constructor). Returns them as plain
    Python values, keyed by name."""
    return dict(
        patch_size=_int("patch_size", patch_size, 1),
        mask_ratio=_real("mask_ratio", mask_ratio, 0.0, 1.0, hi_open=True),
        candidate_ratio=_real("candidate_ratio", candidate_ratio, 0.0, 1.0),
        sim_threshold=_real("sim_threshold", sim_threshold),
        token_weight=_token_weight(token_weight),
        edge_weight=_real("edge_weight", edge_weight, 0.0, FP32_MAX),
        use_ot=_bool("use_ot", use_ot),
        ot_reg=_finite("ot_reg", ot_reg, MIN_OT_REG),
        ot_iters=_int("ot_iters", ot_iters, 1),
        validate=_bool("validate", validate),
    )


# --------------------------------------------------------------------------- tensors


def _check_tensors(images, tokens, noise, patch_size: int, token_weight: float, allowed_dtypes,
                   allow_meta: bool = False):
    """Shapes, dtypes and devices; returns ``(B, L)``."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {images.dim()} dims {tuple(images.shape)}")
    if images.dtype not in allowed_dtypes:
        names = ", ".join(_dtype_name(d) for d in allowed_dtypes)
        raise TypeError(f"images must be one of {names}, got {_dtype_name(images.dtype)}")
    if images.device.type == "meta" and not allow_meta:
        raise ValueError("images must be on a device that holds values (cpu, cuda, ...), got meta")
    P = patch_size
    B, C, H, W = images.shape
    if C < 1:
        raise ValueError(f"images must have at least one channel, got C={C}")
    if H % P != 0:
        raise ValueError(f"images: H={H} is not divisible by patch_size={P}")
    if W % P != 0:
        raise ValueError(f"images: W={W} is not divisible by patch_size={P}")
    L = (H // P) * (W // P)
    if L < 1:
        raise ValueError(f"images: H={H}, W={W} hold no {P}x{P} patch")

    if tokens is not None:
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor or None, got {type(tokens).__name__}")
        if not tokens.is_floating_point():
            raise TypeError(f"tokens must be floating point, got {_dtype_name(tokens.dtype)}")
        if tokens.dim() != 3 or tokens.shape[0] != B or tokens.shape[1] != L or tokens.shape[2] < 1:
            raise ValueError(
                f"tokens must have shape (B, L, D) = ({B}, {L}, D>=1) for images of shape "
                f"{tuple(images.shape)} and patch_size={P}, got {tuple(tokens.shape)}"
            )
        if tokens.device != images.device:
            raise ValueError(f"tokens must be on images' device {images.device}, got {tokens.device}")
    elif isinstance(token_weight, Tensor):
        raise ValueError("token_weight given as a tensor (a schedule) needs tokens, got tokens=None")
    elif token_weight > 0:
        raise ValueError(f"token_weight={token_weight} > 0 needs tokens, got tokens=None")

    if noise is not None:
        if not isinstance(noise, Tensor):
            raise TypeError(f"noise must be a torch.Tensor or None, got {type(noise).__name__}")
        if not noise.is_floating_point():
            raise TypeError(f"noise must be floating point, got {_dtype_name(noise.dtype)}")
        if noise.dim() != 2 or noise.shape[0] != B or noise.shape[1] != L:
            raise ValueError(f"noise must have shape (B, L) = ({B}, {L}), got {tuple(noise.shape)}")
        if noise.device != images.device:
            raise ValueError(f"noise must be on images' device {images.device}, got {noise.device}")
    return B, L


def _check_generator(generator, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator must be on images' device type {device.type}, got {generator.device}")


def check_call(
    images,
    tokens=None,
    noise=None,
    generator=None,
    *,
    allow_float64: bool = False,
    **params,
) -> PGSCall:
    """Check every argument of ``pgs_select`` before any work is done.

    Raises ``TypeError`` for a wrong type or dtype and ``ValueError`` for a
    wrong shape, device or range; each message names the argument, what was
    expected and what was given. Returns the :class:`PGSCall` with the counts
    ``K`` and ``k`` and ``noise`` as given (``None`` when it is to be drawn:
    :func:`with_noise`). Tokens are dropped from the call when
    ``token_weight = 0``: that term is not evaluated.

    ``validate=True`` also rejects non-finite ``images``, ``tokens`` and
    ``noise``: that check reads device memory (a host sync).
    """
    p = check_params(**params)
    dtypes = IMAGE_DTYPES + ((torch.float64,) if allow_float64 else ())
    B, L = _check_tensors(images, tokens, noise, p["patch_size"], p["token_weight"], dtypes)
    _check_generator(generator, images.device)
    if p["validate"]:
        for name, t in (("images", images), ("tokens", tokens), ("noise", noise)):
            if t is not None and t.numel() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf (validate=True)")
    K, _, k = pgs_counts(L, p["mask_ratio"], p["candidate_ratio"])
    # The selection is not differentiable: detaching keeps autograd out of it.
    scheduled = isinstance(p["token_weight"], Tensor)
    tokens = tokens.detach() if (tokens is not None and (scheduled or p["token_weight"] > 0)) else None
    return PGSCall(
        images.detach(), tokens, None if noise is None else noise.detach(), p["patch_size"], K, k,
        p["sim_threshold"], p["token_weight"], p["edge_weight"], p["use_ot"], p["ot_reg"], p["ot_iters"],
    )


def draw_noise(B: int, L: int, device, generator: Optional[torch.Generator] = None) -> Tensor:
    """The step's randomness ``u ~ U[0, 1)``, shape ``(B, L)``, fp32."""
    # ``generator=None`` is not passed on: under torch.compile with a dynamic
    # batch size, an explicit None generator makes torch.rand demand concrete sizes.
    if generator is None:
        return torch.rand((B, L), device=device, dtype=torch.float32)
    return torch.rand((B, L), device=device, dtype=torch.float32, generator=generator)


def with_noise(call: PGSCall, generator: Optional[torch.Generator] = None) -> PGSCall:
    """``call`` with its noise drawn (from ``generator``) when none was given."""
    if call.noise is not None:
        return call
    B = call.images.shape[0]
    L = (call.images.shape[2] // call.patch_size) * (call.images.shape[3] // call.patch_size)
    return call._replace(noise=draw_noise(B, L, call.images.device, generator))


def prepare_call(images, tokens=None, noise=None, generator=None, *, allow_float64=False, **params) -> PGSCall:
    """:func:`check_call`, then :func:`with_noise`: the preamble of every
    entry point that has no backend to choose in between."""
    return with_noise(check_call(images, tokens, noise, generator, allow_float64=allow_float64, **params),
                      generator)


# --------------------------------------------------------------------------- the raw operator


def check_op_args(images, tokens, noise, patch_size, num_keep, num_candidates, sim_threshold, token_weight,
                  edge_weight, use_ot, ot_reg, ot_iters) -> None:
    """What keeps the raw operator's kernels safe on a direct call (no host
    sync), with :func:`check_call`'s messages: the tensors' shapes, dtypes and
    devices, ``patch_size >= 1``, the counts (``1 <= num_keep <= L``,
    ``0 <= num_candidates <= L``), ``token_weight`` in ``[0, 1]`` (it decides
    which terms a kernel evaluates) and tokens wherever it is > 0. The ranges
    of the other scalars are :func:`check_call`'s: out of them a kernel
    computes a meaningless selection, but touches no memory it should not."""
    P = _int("patch_size", patch_size, 1)
    alpha = _real("token_weight", token_weight, 0.0, 1.0)
    if not isinstance(noise, Tensor):
        raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
    # Meta tensors are the operator's own shape inference: allowed, as long as
    # every tensor is on the same device.
    _, L = _check_tensors(images, tokens, noise, P, alpha, IMAGE_DTYPES, allow_meta=True)
    K = _int("num_keep", num_keep, 1)
    if K > L:
        raise ValueError(f"num_keep must be in [1, L={L}], got {num_keep}")
    k = _int("num_candidates", num_candidates, 0)
    if k > L:
        raise ValueError(f"num_candidates must be in [0, L={L}], got {num_candidates}")
