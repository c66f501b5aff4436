r"""Differential fuzzing of ``pgs_select``: cases drawn from one integer seed
each, and every backend's answer held to the fp64 reference by the
comparison rule (:mod:`python_ref.compare`). The campaign and its record are
``python -m bench.fuzz``; the CI tests run a fixed range of seeds.

Each case is drawn from one integer seed (printed with every finding, so that
``--seed N --cases 1`` replays it): a random grid and patch size (2 to 32,
square or not), 1 to 4 channels, a batch of 1 to 4, fp32/bf16/fp16 images
with structure at several scales, magnitudes from 1e-6 to the contract's
1e15 (fp16: its own range), flat regions (a constant that does not average
exactly in fp32), a layout (contiguous, channels-last, a strided view),
tokens on or off (fp32/bf16/fp16/fp64, norms up to 1e15, strided), and every
option of the op (ratios, threshold, weights, OT on/off, ``ot_reg`` down to
the contract's 1e-4, up to 300 iterations). Some cases carry NaN/Inf regions
or magnitudes past the contract's range: for those only the invariants are
owed.

Each backend's answer is held to the contract by
:func:`python_ref.compare.compare_with_reference`; findings are counted by
category:

* ``crash``: the call raised;
* ``invariant``: ``keep_idx``/``mask`` broke an invariant (any input);
* ``edge``, ``redundancy``: a score off by more than ``1e-4`` (or finite in
  one and not the other);
* ``candidates``, ``selection``: different on a row decided by more than ``1e-4``;
* ``near_tie`` (allowed, counted): different on an undecided row.
"""

from __future__ import annotations

import math
import time
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

import pgs_kernels
from pgs_kernels import pgs_counts

from .compare import compare_with_reference, selection_errors
from .pgs import patch_sobel_energy
from .pgs import pgs_select as reference_select

__all__ = ["CATEGORIES", "Case", "make_case", "check_case", "reference_answer", "fuzz"]

CATEGORIES = ("crash", "invariant", "edge", "redundancy", "candidates", "selection", "near_tie")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


class Case(NamedTuple):
    seed: int
    images: torch.Tensor
    tokens: Optional[torch.Tensor]
    noise: torch.Tensor
    options: Dict
    finite: bool  # inside the contract's numerical range: compared, else invariants only
    desc: str


def _choice(g: torch.Generator, items):
    return items[int(torch.randint(len(items), (1,), generator=g))]


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _structured(g, B, C, H, W) -> torch.Tensor:
    """Noise at several scales: patches neither all alike nor all unrelated."""
    x = torch.zeros(B, C, H, W, dtype=torch.float64)
    for cells in (1, 2, 4):
        lo = torch.randn(B, C, cells + 1, cells + 1, generator=g, dtype=torch.float64)
        x += torch.nn.functional.interpolate(lo, size=(H, W), mode="bilinear", align_corners=False)
    return x + _uniform(g, 0.0, 1.0) * torch.randn(B, C, H, W, generator=g, dtype=torch.float64)


def _layout(g, x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "strided":  # a view with an offset and a stride of 2 in the last dim
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1] + 1, dtype=x.dtype)
        big[..., 1::2] = x
        return big[..., 1::2]
    return x.contiguous()


def make_case(seed: int, max_patches: int = 64, beyond: bool = True,
              ot_iters_from: Optional[Sequence[int]] = None) -> Case:
    """The case of ``seed`` (module docstring). ``max_patches`` bounds ``L``;
    ``beyond`` allows NaN/Inf and out-of-range magnitudes; ``ot_iters_from``
    replaces the drawn ``ot_iters`` by one of a few values (the rest of the
    case is the same)."""
    g = torch.Generator().manual_seed(seed)
    P = _choice(g, (2, 3, 4, 8, 8, 14, 16, 16, 32))
    while True:
        gh, gw = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
        if gh * gw <= max_patches and gh * gw * P * P <= 96 * 96:
            break
    B, C = int(torch.randint(1, 5, (1,), generator=g)), _choice(g, (1, 1, 2, 3, 3, 4))
    H, W, L = gh * P, gw * P, gh * gw
    idt = _choice(g, ("fp32", "fp32", "bf16", "fp16"))
    # Magnitude: log-uniform within the contract's range (fp16 within its own).
    top = 3.5 if idt == "fp16" else 15.0
    scale = 10.0 ** _uniform(g, -6.0, top)
    x = _structured(g, B, C, H, W) * scale
    desc = [f"B={B} C={C} {H}x{W} P={P} L={L} {idt} scale={scale:.2g}"]
    finite = True
    if float(torch.rand((), generator=g)) < 0.4:  # a flat rectangle, e.g. a letterbox bar
        y0, x0 = int(torch.randint(0, H, (1,), generator=g)), int(torch.randint(0, W, (1,), generator=g))
        value = scale * _choice(g, (0.7, 1.0 / 3.0, -1.3, 0.0, 0.1))
        x[..., y0:, x0:] = value
        desc.append(f"flat[{y0}:,{x0}:]={value:.3g}")
    kind = "none"
    if beyond and float(torch.rand((), generator=g)) < 0.15:
        kind = _choice(g, ("nan", "inf", "-inf", "huge"))
        if kind == "huge":
            x = x * 1e20 / max(scale, 1e-30)
        else:
            b = int(torch.randint(0, B, (1,), generator=g))
            x[b, :, : max(1, H // 3), : max(1, W // 2)] = float(kind)
        finite = False
        desc.append(f"non-finite:{kind}")
    images = _layout(g, x.to(DTYPES[idt]), _choice(g, ("contiguous", "channels_last", "strided")))

    opts = dict(
        patch_size=P,
        mask_ratio=_choice(g, (0.0, 0.25, 0.5, 0.5, 0.75, _uniform(g, 0.0, 0.95))),
        candidate_ratio=_choice(g, (0.0, 0.05, 0.05, 0.1, 0.25, 0.5, 1.0, _uniform(g, 0.0, 1.0))),
        sim_threshold=_choice(g, (0.5, 0.5, 0.1, 0.9, -0.2, _uniform(g, -0.5, 1.0))),
        edge_weight=_choice(g, (1.0, 1.0, 0.0, 0.5, 3.0)),
        use_ot=bool(float(torch.rand((), generator=g)) < 0.75),
        ot_reg=_choice(g, (0.05, 0.05, 0.05, 10.0 ** _uniform(g, -4.0, 0.0))),
        ot_iters=_choice(g, (20, 20, 1, 5, int(torch.randint(1, 301, (1,), generator=g)))),
    )
    if ot_iters_from:  # compiled, every new ot_iters is a new kernel (T is a compile-time constant)
        opts["ot_iters"] = ot_iters_from[seed % len(ot_iters_from)]
    tokens = None
    if float(torch.rand((), generator=g)) < 0.5:
        tdt = _choice(g, ("fp32", "bf16", "fp16", "fp64"))
        D = _choice(g, (1, 3, 8, 24, 64))
        ttop = 3.5 if tdt == "fp16" else 15.0
        tscale = 10.0 ** _uniform(g, -6.0, ttop) / math.sqrt(3 * D)
        t = torch.randn(B, L, D, generator=g, dtype=torch.float64) * tscale
        if kind in ("nan", "inf") and float(torch.rand((), generator=g)) < 0.5:
            t[0, 0] = float(kind)
        tokens = _layout(g, t.to(DTYPES[tdt]), _choice(g, ("contiguous", "strided")))
        opts["token_weight"] = _choice(g, (0.5, 0.3, 1.0, 0.0))
        desc.append(f"tokens {tdt} D={D} norm~{tscale * math.sqrt(D):.2g} w={opts['token_weight']}")
    noise = torch.rand(B, L, generator=g)
    desc.append(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in opts.items()))
    return Case(seed, images, tokens, noise, opts, finite, "; ".join(desc))


def check_case(case: Case, backend: str, reference=None) -> List[tuple]:
    """``[(category, message), ...]`` for ``backend`` on ``case`` (empty:
    the contract holds). ``reference`` reuses a reference answer."""
    o = case.options
    B, _, H, W = case.images.shape
    L = (H // o["patch_size"]) * (W // o["patch_size"])
    K, _, _ = pgs_counts(L, o["mask_ratio"], o["candidate_ratio"])
    try:
        got = pgs_kernels.pgs_select(case.images, case.tokens, noise=case.noise, backend=backend,
                                     return_scores=True, **o)
    except Exception as exc:  # noqa: BLE001 - a raise is itself the finding
        return [("crash", f"{type(exc).__name__}: {exc}".splitlines()[0][:300])]
    errs = selection_errors(got, B, L, K)
    if errs:
        return [("invariant", "; ".join(errs))]
    if not case.finite:
        return []
    ref, energy = reference if reference is not None else reference_answer(case)
    res = compare_with_reference(got, ref, case.noise, edge_weight=o["edge_weight"], num_keep=K,
                                 sim_threshold=o["sim_threshold"], energy=energy)
    out = [(p.split(":")[0].split(" ")[0], p) for p in res.problems]
    out += [("near_tie", f"{res.near_tie_rows} undecided row(s) differ")] if res.near_tie_rows else []
    return out


def reference_answer(case: Case):
    """The fp64 reference on the values the backends see, and its raw patch
    energies (for the edge row's conditioning)."""
    tw = case.options.get("token_weight", 0.0)
    tokens = case.tokens.double() if (case.tokens is not None and tw > 0) else None
    images = case.images.double()
    ref = reference_select(images, tokens, noise=case.noise, return_scores=True, **case.options)
    return ref, patch_sobel_energy(images, case.options["patch_size"])


def fuzz(backends: List[str], seconds: float, seed0: int = 0, max_cases: Optional[int] = None,
         max_patches: int = 64, log=print, ot_iters_from: Optional[Sequence[int]] = None) -> Dict:
    """Run cases from ``seed0`` on until ``seconds`` pass or ``max_cases``
    are done; return the counts and findings. ``ot_iters_from``: see :func:`make_case`."""
    counts = {b: {"cases": 0, **{c: 0 for c in CATEGORIES}} for b in backends}
    findings = []
    t0 = time.monotonic()
    seed = seed0
    while time.monotonic() - t0 < seconds and (max_cases is None or seed - seed0 < max_cases):
        case = make_case(seed, max_patches, ot_iters_from=ot_iters_from)
        ref = reference_answer(case) if case.finite else None
        for b in backends:
            counts[b]["cases"] += 1
            for cat, msg in check_case(case, b, ref):
                counts[b][cat] += 1
                findings.append({"seed": seed, "backend": b, "category": cat, "message": msg, "case": case.desc})
                if cat != "near_tie":
                    log(f"seed {seed} {b}: {cat}: {msg}\n    case: {case.desc}")
        seed += 1
    return {"seconds": round(time.monotonic() - t0, 1), "seed_start": seed0, "seed_end": seed, "counts": counts,
            "findings": findings}
