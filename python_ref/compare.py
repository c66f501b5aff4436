r"""How a backend's answer is compared with the reference's.

A backend computes in fp32, the oracle in fp64, so continuous outputs agree
within a tolerance ``tol`` (``ê`` and ``r`` within ``1e-4``), and a selection
can only be compared exactly where no decision lies within ``tol`` of
flipping. A row is *decided* when

* the ``k``-th and ``(k+1)``-th smallest keys are more than ``tol`` apart
  (the candidate cut),
* no redundancy of a patch other than a candidate lies within ``tol`` of
  ``θ`` (the tier-1 threshold), and
* the ``M``-th and ``(M+1)``-th patches of the drop order
  ``(tier_j, key_j, j)`` differ by more than ``tol`` in key or differ in tier
  (the drop cut).

On decided rows the candidate set, ``keep_idx`` and ``mask`` must be equal,
and the candidates' rank order too where no two candidate keys lie within
the tolerance of each other; on the other rows (near-ties) only the
invariants are owed.

The min-max normalization of the edge energy is ill-conditioned when a
row's patch energies ``e`` nearly coincide: a relative rounding ``δ`` of
``e`` (about 1e-6 for an fp32 mean of up to ``P²`` Sobel magnitudes) moves
``ê`` by up to ``δ max e / (max e - min e + 1e-6)``. Given the reference's
raw energies (``energy``), the edge tolerance of such a row grows to that
bound, and so does the key tolerance ``w_e`` times it; rows of well-spread
energies keep ``tol``. The invariants hold for
every input, NaN and Inf included: ``keep_idx`` is ``(B, K)`` int64 with
``K`` distinct ascending indices in ``[0, L)`` and ``mask`` is its complement.

Used by the tests (``tests/conftest.py``) and the fuzzer (``bench/fuzz.py``).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["selection_errors", "edge_tolerance", "decided_rows", "Comparison", "compare_with_reference"]

#: Relative rounding of an fp32 patch energy (a mean of up to P² magnitudes).
ENERGY_ROUNDING = 1e-6


def selection_errors(sel, B: int, L: int, K: int) -> List[str]:
    """The invariants ``sel`` breaks (an empty list when it meets them all)."""
    keep, mask = sel.keep_idx, sel.mask
    errs = []
    if keep.dtype != torch.int64 or tuple(keep.shape) != (B, K):
        errs.append(f"keep_idx is {keep.dtype} {tuple(keep.shape)}, expected int64 ({B}, {K})")
    if mask.dtype != torch.bool or tuple(mask.shape) != (B, L):
        errs.append(f"mask is {mask.dtype} {tuple(mask.shape)}, expected bool ({B}, {L})")
    if errs or B == 0:
        return errs
    keep, mask = keep.cpu(), mask.cpu()
    if not ((keep >= 0) & (keep < L)).all():
        errs.append("keep_idx holds indices outside [0, L)")
        return errs
    if K > 1 and not (keep[:, 1:] > keep[:, :-1]).all():
        errs.append("keep_idx is not strictly ascending (sorted, distinct)")
    expect = torch.ones(B, L, dtype=torch.bool)
    expect.scatter_(1, keep, False)
    if not torch.equal(mask, expect):
        errs.append("mask is not the complement of keep_idx")
    return errs


def _gap_at(values: Tensor, n: int) -> Tensor:
    """Per row, the gap between the n-th and (n+1)-th smallest value."""
    B, L = values.shape
    if n <= 0 or n >= L:
        return torch.full((B,), float("inf"), dtype=torch.float64)
    s = torch.sort(values, dim=1).values
    return s[:, n] - s[:, n - 1]


def edge_tolerance(energy: Optional[Tensor], B: int, tol: float = 1e-4) -> Tensor:
    """``(B,)``: how far an fp32 ``ê`` may be from the reference's in each
    row, ``max(tol, δ max e / (max e - min e + 1e-6))`` (module docstring);
    ``tol`` everywhere when the raw energies ``energy`` ``(B, L)`` are not given."""
    out = torch.full((B,), tol, dtype=torch.float64)
    if energy is None or energy.numel() == 0:
        return out
    e = energy.double().cpu()
    cond = e.abs().amax(dim=1) / (e.amax(dim=1) - e.amin(dim=1) + 1e-6)
    return torch.maximum(out, torch.nan_to_num(ENERGY_ROUNDING * cond, nan=tol))


def _keys(ref, noise: Tensor, edge_weight: float, tol: float, energy: Optional[Tensor]):
    """The reference's keys (NaN as a large number) and each row's key tolerance."""
    edge = ref.edge.double().cpu()
    key = noise.double().cpu() + (edge_weight * edge if edge_weight else 0.0)
    key = torch.nan_to_num(key, nan=1e5, posinf=1e5)
    key_tol = tol + (edge_weight * edge_tolerance(energy, key.shape[0], tol) if edge_weight else 0.0)
    return key, key_tol


def decided_rows(ref, noise: Tensor, edge_weight: float, num_keep: int, sim_threshold: float,
                 tol: float = 1e-4, energy: Optional[Tensor] = None) -> Tensor:
    """``(B,)`` bool: the rows of ``ref`` (a reference selection with scores)
    whose selection is decided by more than ``tol``, or by more than the
    key's rounding where ``energy`` shows an ill-conditioned edge row
    (module docstring)."""
    key, key_tol = _keys(ref, noise, edge_weight, tol, energy)
    B, L = key.shape
    k = ref.candidates.shape[1]
    ok = _gap_at(key, k) > key_tol
    r = ref.redundancy.double().cpu()
    is_cand = torch.zeros(B, L, dtype=torch.bool).scatter_(1, ref.candidates.cpu(), True)
    # A candidate's tier is 0 whatever its r: only the others' r can sit on θ.
    ok &= ~(((r - sim_threshold).abs() <= tol) & ~is_cand).any(dim=1)
    tier = torch.full((B, L), 2.0, dtype=torch.float64)
    tier[r > sim_threshold] = 1.0
    tier[is_cand] = 0.0
    ok &= _gap_at(tier * 1e6 + key, L - num_keep) > key_tol
    return ok


def _rank_order_decided(ref, noise: Tensor, edge_weight: float, tol: float, energy: Optional[Tensor]) -> Tensor:
    """``(B,)`` bool: rows whose candidates' keys are all more than the key
    tolerance apart, so that their rank order (not only their set) is decided."""
    key, key_tol = _keys(ref, noise, edge_weight, tol, energy)
    k = ref.candidates.shape[1]
    if k < 2:
        return torch.ones(key.shape[0], dtype=torch.bool)
    ck = torch.sort(torch.gather(key, 1, ref.candidates.cpu()), dim=1).values
    gaps = ck[:, 1:] - ck[:, :-1]
    return (gaps > (key_tol[:, None] if torch.is_tensor(key_tol) else key_tol)).all(dim=1)


class Comparison(NamedTuple):
    """What :func:`compare_with_reference` found; ``problems`` lists every
    breach of the contract (empty: the backend agrees)."""

    problems: List[str]
    decided: Tensor  # (B,) bool, rows compared exactly
    near_tie_rows: int  # undecided rows whose selection differs (allowed)
    edge_err: float  # max |ê - ê_ref| over finite entries
    redundancy_err: float  # max |r - r_ref| over rows with the same candidates


def compare_with_reference(got, ref, noise: Tensor, *, edge_weight: float, num_keep: int, sim_threshold: float,
                           tol: float = 1e-4, energy: Optional[Tensor] = None) -> Comparison:
    """Compare a backend's selection ``got`` with the reference's ``ref``
    (both with scores, from the same ``noise``), as the module docstring says;
    ``energy`` are the reference's raw patch energies ``e`` (optional)."""
    B, L = ref.mask.shape
    problems = [f"invariant: {e}" for e in selection_errors(got, B, L, num_keep)]
    if problems:
        return Comparison(problems, torch.zeros(B, dtype=torch.bool), 0, float("nan"), float("nan"))
    e_got, e_ref = got.edge.double().cpu(), ref.edge.double().cpu()
    both = torch.isfinite(e_got) & torch.isfinite(e_ref)
    if not torch.equal(torch.isfinite(e_got), torch.isfinite(e_ref)):
        problems.append("edge: finite in one backend, not in the other")
    err = torch.where(both, (e_got - e_ref).abs(), 0.0)
    over = err.amax(dim=1) - edge_tolerance(energy, B, tol) if B else torch.zeros(0)
    edge_err = float(err.max()) if err.numel() else 0.0
    if bool((over > 0).any()):
        problems.append(f"edge: max error {edge_err:.3g} > {tol:g} (beyond the row's rounding)")

    # r does not depend on the candidates' order, only on their set.
    same = (got.candidates.cpu() == ref.candidates.cpu()).all(dim=1)
    same_set = (torch.sort(got.candidates.cpu(), 1).values == torch.sort(ref.candidates.cpu(), 1).values).all(1)
    r_got, r_ref = got.redundancy.double().cpu()[same_set], ref.redundancy.double().cpu()[same_set]
    fin = torch.isfinite(r_got) & torch.isfinite(r_ref)
    if not torch.equal(torch.isfinite(r_got), torch.isfinite(r_ref)):
        problems.append("redundancy: finite in one backend, not in the other")
    red_err = float((r_got - r_ref)[fin].abs().max()) if fin.any() else 0.0
    if red_err > tol:
        problems.append(f"redundancy: max error {red_err:.3g} > {tol:g}")

    decided = decided_rows(ref, noise, edge_weight, num_keep, sim_threshold, tol, energy)
    # The candidate set is decided with the cut; their rank order only where
    # no two of their keys are within rounding of each other.
    ordered = _rank_order_decided(ref, noise, edge_weight, tol, energy)
    bad = decided & (~same_set | (ordered & ~same))
    if bool(bad.any()):
        problems.append(f"candidates differ on decided rows {bad.nonzero().flatten().tolist()}")
    differs = (got.mask.cpu() != ref.mask.cpu()).any(dim=1)
    if bool(differs[decided].any()):
        problems.append(f"selection differs on decided rows {(differs & decided).nonzero().flatten().tolist()}")
    return Comparison(problems, decided, int((differs & ~decided).sum()), edge_err, red_err)
